"""Planner choices on hand-built profiles."""

import pytest

from advisor.memory import KV_BLOCK_TOKENS
from advisor.plateau import PlateauRules
from advisor.planner import DeviceSpec, PlanError, PlannerConfig, kv_pool_bytes, plan_replicas
from advisor.profiler import SharePoint, WorkloadShape
from tests.factories import make_profile

GIB = 2**30
H100 = DeviceSpec(kind="cuda", name="H100", memory_bytes=80 * GIB)


def with_bw(profile, util_pct):
    pts = [p.model_copy(update={"dram_bw_util": util_pct}) for p in profile.points]
    return profile.model_copy(update={"points": pts})


def test_memory_per_replica_holds_b_star_full_sequences_with_headroom():
    profile = make_profile()
    plan = plan_replicas(profile, H100)
    b = profile.knee.b_star
    blocks = -(-192 // 16) * b
    assert plan.max_num_seqs == b
    assert plan.kv_cache_bytes == int(-(-blocks * 1.1 // 1)) * 16 * profile.kv_bytes_per_token
    assert plan.memory_per_replica_bytes == profile.weight_bytes + profile.overhead_bytes + plan.kv_cache_bytes
    assert plan.memory_freed_bytes == int(80 * GIB * 0.9) - plan.replicas_per_device * plan.memory_per_replica_bytes


def test_gpu_packs_replicas_up_to_the_bandwidth_share():
    profile = with_bw(make_profile(), 30.0)
    plan = plan_replicas(profile, H100)
    # One engine uses 30% of the bandwidth: 3 replicas give 3x, a 4th adds the last 0.33x (> 5%), a 5th nothing.
    assert plan.replicas_per_device == 4
    assert plan.num_gpus_per_replica == 0.25
    assert plan.predicted_aggregate_tokens_per_s == pytest.approx(profile.knee.tokens_per_s_at_b_star / 0.3)
    assert any("DRAM bandwidth" in r for r in plan.reasons)


def test_gpu_without_bandwidth_reading_keeps_one_engine_and_says_why():
    plan = plan_replicas(make_profile(), H100)
    assert plan.replicas_per_device == 1
    assert any("no DRAM bandwidth reading" in r for r in plan.reasons)


def test_memory_caps_n():
    profile = with_bw(make_profile(), 10.0)  # bandwidth would allow 10 replicas
    per_replica = plan_replicas(profile, H100).memory_per_replica_bytes
    small = DeviceSpec(kind="cuda", name="small", memory_bytes=int(2.5 * per_replica / 0.9))
    plan = plan_replicas(profile, small)
    assert plan.replicas_per_device == 2
    assert any("memory 2" in r for r in plan.reasons)


def test_model_that_does_not_fit_is_a_clear_error():
    tiny = DeviceSpec(kind="cuda", name="tiny", memory_bytes=1 * GIB)
    with pytest.raises(PlanError, match="does not fit on tiny: one replica needs .* GiB"):
        plan_replicas(make_profile(), tiny)


def test_cpu_share_point_drives_n():
    profile = make_profile()
    knee_point = next(p for p in profile.points if p.batch == profile.knee.b_star)
    half = knee_point.model_copy(update={"tokens_per_s": knee_point.tokens_per_s * 0.66})
    profile = profile.model_copy(update={"cores": 2, "share_points": [SharePoint(cores=1, point=half)]})
    cpu = DeviceSpec(kind="cpu", name="cpu", memory_bytes=24 * GIB, cores=2)
    plan = plan_replicas(profile, cpu)
    assert plan.replicas_per_device == 2 and plan.num_cpus_per_replica == 1.0
    assert plan.predicted_aggregate_tokens_per_s == pytest.approx(2 * 0.66 * knee_point.tokens_per_s, rel=0.01)


def test_other_workload_shape_uses_the_fit_and_lowers_b_star_for_long_contexts():
    profile = make_profile()
    long = plan_replicas(profile, H100, WorkloadShape(prompt_tokens=4000, output_tokens=64))
    short = plan_replicas(profile, H100)
    assert long.max_num_seqs < short.max_num_seqs
    assert any("predicted by the step model" in r for r in long.reasons)


def test_impossible_slo_is_reported_before_planning():
    from advisor.plateau import find_knee

    profile = make_profile()
    with pytest.raises(ValueError, match="no batch size meets"):
        find_knee(profile.points, PlateauRules(tpot_p99_slo_ms=1.0))


# ---- a launch-bound fit (cost per sequence <= 0); the KV pool floor ----------------

def test_a_fit_without_cost_per_sequence_plans_with_a_reason_instead_of_crashing():
    profile = make_profile()
    launch_bound = profile.step_model.model_copy(update={"b_ms": -0.01, "c_ms": 0.0})
    profile = profile.model_copy(update={"step_model": launch_bound})
    other = WorkloadShape(prompt_tokens=1024, output_tokens=64)  # not the profiled bucket: the fit predicts B*
    plan = plan_replicas(profile, H100, other)
    largest = max(p.batch for p in profile.points)
    assert plan.max_num_seqs == 2 * largest
    assert any("<= 0" in r and "does not flatten" in r for r in plan.reasons)


def test_the_kv_pool_holds_at_least_one_max_model_len_sequence_plus_a_block():
    from advisor.planner import PlannerConfig

    profile = make_profile()
    small = plan_replicas(profile, H100, cfg=PlannerConfig())
    assert small.kv_cache_bytes < 32768 * profile.kv_bytes_per_token  # B* short sequences: below one long one
    plan = plan_replicas(profile, H100, cfg=PlannerConfig(max_model_len=32768))
    assert plan.kv_cache_bytes == (32768 // 16 + 1) * 16 * profile.kv_bytes_per_token
    assert any("one max_model_len 32768-token sequence" in r for r in plan.reasons)


# ---- replicas admit up to the end of the plateau ----------------------------------------

CPU = DeviceSpec(kind="cpu", name="cpu", memory_bytes=24 * GIB, cores=2)


def flat_profile(**rules):
    from tests.factories import FakeRunner
    # step = 20 + 4*B ms (x10 TPOT rule): B*=24 (207 tok/s; batch 16's 190 is under 90% of the 216 peak),
    # batch 32 (216) still on the plateau, batch 64 breaks the rule
    return make_profile(runner=FakeRunner(a=20, b=4, c=0), rules=PlateauRules(tpot_growth_limit=10, **rules))


def test_a_replica_admits_the_largest_batch_still_on_the_plateau_with_its_kv():
    profile = flat_profile()
    plan = plan_replicas(profile, CPU)
    assert (plan.b_star, plan.max_num_seqs) == (profile.knee.b_star, 32) == (24, 32)
    knee_only = plan_replicas(profile, CPU, cfg=PlannerConfig(admit_plateau=False))
    assert (knee_only.b_star, knee_only.max_num_seqs) == (24, 24)
    assert plan.kv_cache_bytes == kv_pool_bytes(profile.kv_bytes_per_token, KV_BLOCK_TOKENS["cpu"], 32,
                                                profile.shape.kv_tokens_per_sequence, 0.10)
    assert plan.kv_cache_bytes > knee_only.kv_cache_bytes
    assert plan.memory_per_replica_bytes == profile.weight_bytes + profile.overhead_bytes + plan.kv_cache_bytes
    n = plan.replicas_per_device
    assert plan.memory_freed_bytes == int(CPU.memory_bytes * 0.9) - n * plan.memory_per_replica_bytes
    assert any(r.startswith("max_num_seqs 32 (B*=24)") for r in plan.reasons)


def test_the_batch_is_the_largest_on_the_plateau_whose_kv_still_fits_the_chosen_n():
    from advisor.plateau import find_knee
    rules = PlateauRules(tpot_growth_limit=10)
    base = make_profile()
    ctx = base.points[0].context_tokens
    curve = [(1, 20.0, 49.9), (2, 38.9, 51.7), (4, 76.8, 51.8), (8, 133.9, 59.7), (16, 166.5, 95.4),
             (24, 239.0, 116.1), (32, 247.0, 130.1), (64, 249.1, 332.9)]  # plateau: 24, 32, 64
    points = [base.points[0].model_copy(update={"batch": b, "context_tokens": ctx, "tokens_per_s": t, "tpot_p50_ms": ms,
                                                "tpot_p99_ms": ms * 1.2, "dram_bw_util": 50.0}) for b, t, ms in curve]
    profile = base.model_copy(update={"points": points, "rules": rules, "knee": find_knee(points, rules)})
    fixed = profile.weight_bytes + profile.overhead_bytes

    def per_replica(b):
        return fixed + kv_pool_bytes(profile.kv_bytes_per_token, KV_BLOCK_TOKENS["cuda"], b,
                                     profile.shape.kv_tokens_per_sequence, 0.10)
    # two replicas (one engine uses half the bandwidth) fit at batch 32, not at 64
    gpu = DeviceSpec(kind="cuda", name="g", memory_bytes=int((2 * per_replica(32) + 1) / 0.9) + 1)
    assert 2 * per_replica(64) > gpu.memory_bytes * 0.9
    plan = plan_replicas(profile, gpu)
    assert (plan.replicas_per_device, plan.b_star, plan.max_num_seqs) == (2, 24, 32)
    assert plan.memory_per_replica_bytes == per_replica(32)


def test_the_larger_batch_never_costs_a_replica_where_memory_is_short():
    profile = flat_profile()
    knee_only = plan_replicas(profile, CPU, cfg=PlannerConfig(admit_plateau=False))
    # a device that holds N replicas at B* and not one byte more
    tight = CPU.model_copy(update={"memory_bytes": int(knee_only.replicas_per_device *
                                                       knee_only.memory_per_replica_bytes / 0.9) + 1})
    plan = plan_replicas(profile, tight)
    assert (plan.replicas_per_device, plan.max_num_seqs) == (knee_only.replicas_per_device, 24)
    assert any("would not fit" in r for r in plan.reasons)


def test_another_workload_keeps_its_predicted_b_star():
    from tests.factories import FakeRunner
    # KV reads make a 1024-token prompt's predicted B* small, far under the profiled plateau's 64 and 128
    profile = make_profile(runner=FakeRunner(a=40, b=4, c=0.01), rules=PlateauRules(tpot_growth_limit=50))
    assert plan_replicas(profile, CPU).max_num_seqs > profile.knee.b_star
    plan = plan_replicas(profile, CPU, WorkloadShape(prompt_tokens=1024, output_tokens=64))
    assert plan.max_num_seqs == plan.b_star < profile.knee.b_star
