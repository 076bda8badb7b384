"""The performance model: step time, replicas sharing a device, fitting, predicted plans."""

import json
from pathlib import Path

import pytest

from advisor.memory import memory_model
from advisor.perfmodel import (
    DEFAULT_BATCHES, CalibrationFile, DeviceFigures, EngineConstants, MeasuredPoint, PerfModelError, aggregate_tokens_per_s,
    fit_engine, fit_output_cv, fits, load_constants, measured_points, plan_on_named_device, predict,
    predicted_profile, step,
)
from advisor.plateau import PlateauRules, find_knee
from advisor.planner import DeviceSpec, PlannerConfig, evaluate_shape, plan_replicas
from advisor.profiler import WorkloadShape
from advisor.store import ProfileStore
from tests.factories import make_profile

CONFIGS = Path(__file__).resolve().parents[1] / "fixtures" / "hf_configs"
GIB = 2**30
SHAPE = WorkloadShape(prompt_tokens=128, output_tokens=64)
REQUIRED_DEVICES = {"h100-sxm", "h100-pcie", "h200", "a100-40gb", "a100-80gb", "l4", "l40s", "cpu"}


def engine(**overrides) -> EngineConstants:
    fields = dict(t_fixed_s=0.002, t_seq_s=30e-6, weight_bw_efficiency=0.8, kv_bw_efficiency=0.5,
                  flops_efficiency=0.5, overhead_bytes=GIB, overlap_memory_and_compute=True, source="test")
    fields.update(overrides)
    return EngineConstants(**fields)


def gpu(**overrides) -> DeviceFigures:
    fields = dict(kind="cuda", memory_bytes=80 * GIB, dram_bandwidth_bytes_per_s=2e12, peak_flops=800e12,
                  nvml_names=["Test GPU 80GB"], source="test")
    fields.update(overrides)
    return DeviceFigures(**fields)


def cpu(**overrides) -> DeviceFigures:
    fields = dict(kind="cpu", memory_bytes=24 * GIB, dram_bandwidth_bytes_per_s=14e9, peak_flops=1e12, cores=2,
                  core_bandwidth_bytes_per_s=14e9, source="test")
    fields.update(overrides)
    return DeviceFigures(**fields)


@pytest.fixture(scope="module")
def opt13():
    return memory_model(CONFIGS / "opt-1.3b")


@pytest.fixture(scope="module")
def llama7():
    return memory_model(CONFIGS / "llama-2-7b")


def test_data_file_has_every_device_and_every_constant_has_a_source():
    c = load_constants()
    assert REQUIRED_DEVICES <= set(c.devices)
    assert all(d.source for d in c.devices.values()) and all(e.source for e in c.engines.values())
    for kind, name in c.engine_for_kind.items():
        assert name in c.engines, f"engine_for_kind[{kind}] names a missing engine"
    h100, l4 = c.device("h100-sxm"), c.device("l4")
    assert h100.dram_bandwidth_bytes_per_s > 10 * l4.dram_bandwidth_bytes_per_s / 2 > 0
    with pytest.raises(PerfModelError, match="h100-sxm"):
        c.device("tpu-v9")


def test_fixture_configs_have_the_published_parameter_counts(opt13, llama7):
    assert opt13.parameters == pytest.approx(1.3e9, rel=0.02)
    assert llama7.parameters == pytest.approx(6.74e9, rel=0.01)
    assert memory_model(CONFIGS / "opt-2.7b").parameters == pytest.approx(2.65e9, rel=0.01)


def test_step_reads_weights_once_and_every_sequences_kv(llama7):
    dev, eng = gpu(), engine()
    s = step(llama7, dev, eng, 8, SHAPE, prefill=False)
    weights = llama7.weight_bytes / (2e12 * 0.8)
    kv = 8 * SHAPE.context_tokens * llama7.kv_bytes_per_token / (2e12 * 0.5)
    assert s.memory_s == pytest.approx(weights + kv)
    assert s.cpu_s == pytest.approx(0.002 + 8 * 30e-6)
    assert s.step_s == pytest.approx(s.cpu_s + max(s.memory_s, s.compute_s))
    assert s.bound == "memory"


def test_compute_bound_when_flops_dominate_and_cpu_sums_memory_and_compute(opt13):
    slow = gpu(peak_flops=1e12)
    assert step(opt13, slow, engine(), 256, SHAPE).bound == "compute"
    s = step(opt13, cpu(), engine(overlap_memory_and_compute=False), 4, SHAPE, prefill=False)
    assert s.device_s == pytest.approx(s.memory_s + s.compute_s)


def test_overhead_bound_when_cpu_time_exceeds_device_time(opt13):
    assert step(opt13, gpu(), engine(t_fixed_s=0.1), 1, SHAPE).bound == "overhead"


def test_prefill_lowers_tokens_per_s_more_for_long_prompts(opt13):
    short = WorkloadShape(prompt_tokens=16, output_tokens=64)
    long = WorkloadShape(prompt_tokens=2000, output_tokens=64)
    dev, eng = gpu(peak_flops=50e12), engine()
    def loss(shape):
        return 1 - step(opt13, dev, eng, 32, shape).tokens_per_s / step(opt13, dev, eng, 32, shape, prefill=False).tokens_per_s
    assert loss(long) > 5 * loss(short) > 0


def test_throughput_rises_then_flattens(opt13):
    dev, eng = gpu(), engine()
    t = [step(opt13, dev, eng, b, SHAPE).tokens_per_s for b in (1, 8, 64, 512)]
    assert t == sorted(t)
    assert t[1] / t[0] > 5 and t[3] / t[2] < 2  # 8x the batch: nearly 8x, then under 2x


def test_gpu_replicas_gain_only_from_overlapping_cpu_work(opt13):
    dev = gpu()
    no_cpu = engine(t_fixed_s=0.0, t_seq_s=0.0)
    single = aggregate_tokens_per_s(opt13, dev, no_cpu, 64, SHAPE, 1)
    assert aggregate_tokens_per_s(opt13, dev, no_cpu, 64, SHAPE, 2) == pytest.approx(single)
    eng = engine(t_seq_s=60e-6)
    s = step(opt13, dev, eng, 64, SHAPE)
    two = aggregate_tokens_per_s(opt13, dev, eng, 64, SHAPE, 2)
    assert two == pytest.approx(2 * 64 / max(s.step_s, 2 * s.device_s))
    assert two > aggregate_tokens_per_s(opt13, dev, eng, 64, SHAPE, 1)
    # Never beyond the device: N engines cannot decode faster than B per device time.
    assert aggregate_tokens_per_s(opt13, dev, eng, 64, SHAPE, 8) == pytest.approx(64 / s.device_s)


def test_cpu_replicas_split_cores_and_share_the_bus(opt13):
    dev = cpu()
    eng = engine(overlap_memory_and_compute=False, t_seq_s=0.0, t_fixed_s=0.0, flops_efficiency=0.3)
    one = aggregate_tokens_per_s(opt13, dev, eng, 32, SHAPE, 1, prefill=False)
    two = aggregate_tokens_per_s(opt13, dev, eng, 32, SHAPE, 2, prefill=False)
    bus = step(opt13, dev, eng, 32, SHAPE, prefill=False).memory_s
    # One engine computes while the other reads memory, but the bus caps them all.
    assert one < two < 32 / bus
    assert aggregate_tokens_per_s(opt13, dev, eng, 32, SHAPE, 8, prefill=False) < 32 / bus
    busy = eng.model_copy(update={"t_fixed_s": 0.5})
    gain = two / one
    assert (aggregate_tokens_per_s(opt13, dev, busy, 32, SHAPE, 2, prefill=False)
            / aggregate_tokens_per_s(opt13, dev, busy, 32, SHAPE, 1, prefill=False)) > gain
    # A core that draws only part of the bandwidth: a one-core engine reads memory at that core's rate.
    weak = cpu(core_bandwidth_bytes_per_s=7e9)
    assert (step(opt13, weak, eng, 32, SHAPE, share=0.5).memory_s
            == pytest.approx(2 * step(opt13, weak, eng, 32, SHAPE).memory_s))


def synthetic(mem, dev, truth, batches, shapes, replicas=1):
    return [MeasuredPoint(batch=b, shape=s, replicas=replicas,
                          tokens_per_s=aggregate_tokens_per_s(mem, dev, truth, b, s, replicas))
            for s in shapes for b in batches]


def test_fit_recovers_cpu_costs_from_one_context(opt13):
    dev, truth = gpu(), engine(t_fixed_s=0.003, t_seq_s=45e-6)
    pts = synthetic(opt13, dev, truth, (1, 16, 64, 256), [SHAPE])
    got = fit_engine(pts, opt13, dev, engine(t_fixed_s=0.0, t_seq_s=0.0), source="synthetic")
    assert got.t_fixed_s == pytest.approx(0.003, rel=1e-6)
    assert got.t_seq_s == pytest.approx(45e-6, rel=1e-6)
    assert got.source == "synthetic"


def test_fit_separates_kv_efficiency_with_two_contexts(opt13):
    dev, truth = gpu(), engine(t_fixed_s=0.002, t_seq_s=20e-6, kv_bw_efficiency=0.37)
    long = SHAPE.model_copy(update={"prompt_tokens": 512})
    pts = synthetic(opt13, dev, truth, (1, 32, 128, 256), [SHAPE, long])
    got = fit_engine(pts, opt13, dev, engine(kv_bw_efficiency=0.9), free=("t_fixed_s", "t_seq_s", "kv_bw_efficiency"))
    assert got.kv_bw_efficiency == pytest.approx(0.37, rel=1e-3)
    assert got.t_seq_s == pytest.approx(20e-6, rel=1e-2)


def test_a_running_batch_of_mixed_lengths_holds_more_context_than_the_mean_lengths_say():
    # fixed lengths: a sequence is on average half-way through its output
    assert SHAPE.context_tokens == 128 + 64 / 2
    # outputs of 32 and 96 tokens (mean 64, cv 0.5): the long ones are in the batch three times as long,
    # so the batch's mean output-so-far is (32*16 + 96*48) / 128 = 40, not 32
    spread = SHAPE.model_copy(update={"output_tokens_cv": 0.5})
    assert spread.context_tokens == pytest.approx(128 + 40)


def test_a_profile_is_measured_with_outputs_all_alike():
    with pytest.raises(ValueError, match="output_tokens_cv 0.5: a profile sends requests of exactly 64"):
        make_profile(shape=SHAPE.model_copy(update={"output_tokens_cv": 0.5}))


def test_the_kv_check_plans_the_length_biased_context_past_cv_1(llama7):
    dev, eng = gpu(memory_bytes=40 * GIB), engine()
    long = WorkloadShape(prompt_tokens=512, output_tokens=1024)
    biggest = max(b for b in range(1, 1024) if fits(llama7, dev, eng, b, long))
    spread = long.model_copy(update={"output_tokens_cv": 1.5})  # 512 + 1024 * 3.25 / 2 = 2176 > 1536 tokens
    assert max(b for b in range(1, 1024) if fits(llama7, dev, eng, b, spread)) < biggest
    assert fits(llama7, dev, eng, biggest, long.model_copy(update={"output_tokens_cv": 0.9}))  # a whole request is more


def test_length_spread_lowers_kv_bound_throughput_only(opt13):
    dev, eng = gpu(), engine()
    chat = SHAPE.model_copy(update={"output_tokens_cv": 1.3})
    assert step(opt13, dev, eng, 1, chat).tokens_per_s == pytest.approx(step(opt13, dev, eng, 1, SHAPE).tokens_per_s,
                                                                          rel=0.01)
    assert step(opt13, dev, eng, 256, chat).tokens_per_s < 0.9 * step(opt13, dev, eng, 256, SHAPE).tokens_per_s


def test_fit_output_cv_recovers_a_workloads_length_spread(opt13):
    dev, eng = gpu(), engine(t_seq_s=20e-6)
    truth = SHAPE.model_copy(update={"output_tokens_cv": 1.2})
    pts = [MeasuredPoint(batch=p.batch, shape=SHAPE, tokens_per_s=p.tokens_per_s)  # measured: only the means known
           for p in synthetic(opt13, dev, eng, (1, 32, 128, 256), [truth])]
    assert fit_output_cv(pts, opt13, dev, eng) == pytest.approx(1.2, rel=1e-3)
    fixed = synthetic(opt13, dev, eng, (1, 32, 128, 256), [SHAPE])
    assert fit_output_cv(fixed, opt13, dev, eng) == pytest.approx(0.0, abs=1e-3)


def test_measured_points_keep_a_profiles_contexts_whatever_its_length_spread(opt13):
    fixed = make_profile(shape=WorkloadShape(prompt_tokens=100, output_tokens=60))
    profile = fixed.model_copy(update={"shape": fixed.shape.model_copy(update={"output_tokens_cv": 1.0})})
    pts = measured_points(profile)
    assert [p.shape.context_tokens for p in pts] == pytest.approx(
        [round(q.context_tokens) for q in profile.points + profile.fit_points], abs=1.0)


def test_fit_clamps_negative_costs_to_zero(opt13):
    dev = gpu()
    truth = engine(t_fixed_s=0.0, t_seq_s=0.0)
    pts = [MeasuredPoint(batch=p.batch, shape=p.shape, tokens_per_s=p.tokens_per_s * 1.2)  # faster than the device allows
           for p in synthetic(opt13, dev, truth, (1, 64), [SHAPE])]
    got = fit_engine(pts, opt13, dev, truth)
    assert got.t_fixed_s == 0.0 and got.t_seq_s == 0.0


def test_fit_refuses_what_it_cannot_identify(opt13):
    pts = synthetic(opt13, gpu(), engine(), (1, 64, 128), [SHAPE])
    with pytest.raises(PerfModelError, match="one efficiency at a time"):
        fit_engine(pts, opt13, gpu(), engine(), free=("kv_bw_efficiency", "weight_bw_efficiency"))
    with pytest.raises(PerfModelError, match="cannot fit"):
        fit_engine(pts, opt13, gpu(), engine(), free=("bogus",))
    with pytest.raises(PerfModelError, match="1 points cannot fit 2"):
        fit_engine(pts[:1], opt13, gpu(), engine())


def test_predict_uses_the_knee_rule_and_the_planners_memory_sizing(opt13):
    dev, eng = gpu(), engine()
    out = predict("opt-1.3b", opt13, "test-gpu", dev, eng, SHAPE, replicas=2)
    profile = predicted_profile("opt-1.3b", opt13, "test-gpu", dev, eng, SHAPE, [p.batch for p in out.points])
    assert out.b_star == find_knee(profile.points, PlateauRules()).b_star
    ev = evaluate_shape(profile, DeviceSpec(kind="cuda", name="test-gpu", memory_bytes=dev.memory_bytes), SHAPE)
    assert out.memory_per_replica_bytes == ev.memory_per_replica_bytes
    assert out.memory_per_replica_bytes > opt13.weight_bytes + eng.overhead_bytes
    best = max(p.tokens_per_s for p in out.points)
    assert out.replication_gain == pytest.approx(out.aggregate_tokens_per_s / best - 1)
    assert {p.bound for p in out.points} <= {"memory", "compute", "overhead"}
    doc = json.loads(out.model_dump_json())
    for key in ("memory_bytes", "dram_bandwidth_bytes_per_s", "peak_flops", "points", "b_star",
                "memory_per_replica_bytes", "aggregate_tokens_per_s", "replication_gain"):
        assert key in doc


def test_predict_leaves_out_batches_that_do_not_fit(llama7):
    dev = gpu(memory_bytes=40 * GIB)
    out = predict("llama-2-7b", llama7, "small", dev, engine(), WorkloadShape(prompt_tokens=1024, output_tokens=1024),
                  batches=[1, 8, 64, 512])
    assert [p.batch for p in out.points] == [1, 8]
    assert "[64, 512]" in out.notes[0]
    assert not fits(llama7, dev, engine(), 64, WorkloadShape(prompt_tokens=1024, output_tokens=1024))


def test_model_that_does_not_fit_at_all_is_an_error(llama7):
    with pytest.raises(PerfModelError, match="does not fit"):
        predict("llama-2-7b", llama7, "tiny", gpu(memory_bytes=8 * GIB), engine(), SHAPE)


def named(constants_device: str = "h100-sxm"):
    return load_constants(), constants_device


def test_plan_on_a_device_we_lack_says_it_is_predicted(opt13, tmp_path):
    c, name = named()
    plan = plan_on_named_device("opt-1.3b", opt13, name, c, SHAPE, ProfileStore(tmp_path), mem_for=None)
    assert plan.reasons[0].startswith("predicted, not measured")
    assert plan.device_kind == "cuda" and plan.replicas_per_device >= 1
    assert plan.memory_per_replica_bytes * plan.replicas_per_device <= 0.9 * c.device(name).memory_bytes
    assert plan.max_num_seqs == plan.b_star  # a predicted curve never admits past its knee (nothing measured there)


def stored_real_profile(store, model, device_name, dtype="float16"):
    p = make_profile(model=model, device_name=device_name, engine_version="0.24.0", dtype=dtype,
                     weight_bytes=2_631_516_160, kv_bytes_per_token=196608)
    store.put_profile(p)
    return p


def test_a_real_profile_on_that_device_wins(opt13, tmp_path):
    c, name = named()
    store = ProfileStore(tmp_path)
    real = stored_real_profile(store, "opt-1.3b", "cuda:NVIDIA H100 80GB HBM3")
    plan = plan_on_named_device("opt-1.3b", opt13, name, c, SHAPE, store, mem_for=None)
    assert "measured profile" in plan.reasons[0]
    assert plan.max_num_seqs == real.knee.b_star


def test_another_models_real_profile_recalibrates_the_device(opt13, tmp_path):
    c, name = named()
    store = ProfileStore(tmp_path)
    stored_real_profile(store, "other-model", "cuda:NVIDIA H100 80GB HBM3")
    asked = []

    def mem_for(ref, dtype):
        asked.append((ref, dtype))
        return opt13

    plan = plan_on_named_device("opt-1.3b", opt13, name, c, SHAPE, store, mem_for=mem_for)
    assert asked == [("other-model", "float16")]
    assert "recalibrated on the measured profile of other-model" in plan.reasons[0]
    stored = CalibrationFile(ProfileStore(tmp_path)).read()[name]
    assert stored.source.startswith("recalibrated") and stored != c.engine_for(c.device(name))


def test_planner_config_is_respected(opt13, tmp_path):
    c, name = named("l4")
    plan = plan_on_named_device("opt-1.3b", opt13, name, c, SHAPE, None, mem_for=None,
                                cfg=PlannerConfig(max_replicas=1))
    assert plan.replicas_per_device == 1


# ---- the command line -------------------------------------------------------------------------
def run_cli(capsys, *argv):
    from deployments.cli import main

    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_predict_prints_the_issue_fields(capsys, tmp_path):
    rc, out, _ = run_cli(capsys, "predict", str(CONFIGS / "opt-2.7b"), "--device", "a100-80gb", "--batches", "1,16,64,256",
                         "--replicas", "2", "--prompt-tokens", "200", "--output-tokens", "300", "--store", str(tmp_path))
    assert rc == 0
    doc = json.loads(out)
    assert doc["dram_bandwidth_bytes_per_s"] == load_constants().device("a100-80gb").dram_bandwidth_bytes_per_s
    assert [p["batch"] for p in doc["points"]] == [1, 16, 64, 256]
    assert {"batch", "tokens_per_s", "tpot_ms", "bound"} <= set(doc["points"][0])
    assert doc["replicas"] == 2 and doc["replication_gain"] is not None and doc["b_star"] in (1, 16, 64, 256)


def test_cli_predict_takes_the_output_length_spread(capsys, tmp_path):
    args = ("predict", str(CONFIGS / "opt-1.3b"), "--device", "h100-sxm", "--batches", "256", "--store", str(tmp_path))
    rc, out, _ = run_cli(capsys, *args)
    rc2, out2, _ = run_cli(capsys, *args, "--output-cv", "1.3")
    assert rc == rc2 == 0
    fixed, chat = json.loads(out), json.loads(out2)
    assert fixed["shape"]["output_tokens_cv"] == 0.0 and chat["shape"]["output_tokens_cv"] == 1.3
    assert chat["points"][0]["tokens_per_s"] < fixed["points"][0]["tokens_per_s"]  # more KV read per step
    rc, _, err = run_cli(capsys, *args, "--output-cv", "-1")
    assert rc == 2 and "--output-cv" in err


def test_cli_predict_uses_a_stored_recalibration(capsys, tmp_path):
    c = load_constants()
    slow = c.engine_for(c.device("l40s")).model_copy(update={"t_fixed_s": 0.05, "source": "recalibrated (test)"})
    CalibrationFile(ProfileStore(tmp_path)).put("l40s", slow)
    rc, out, _ = run_cli(capsys, "predict", str(CONFIGS / "opt-1.3b"), "--device", "l40s", "--batches", "1",
                         "--store", str(tmp_path))
    assert rc == 0 and json.loads(out)["engine"]["source"] == "recalibrated (test)"


def test_cli_predict_errors_name_the_fix(capsys, tmp_path):
    rc, _, err = run_cli(capsys, "predict", str(CONFIGS / "opt-1.3b"), "--device", "tpu-v9")
    assert rc == 2 and "h100-sxm" in err
    rc, _, err = run_cli(capsys, "predict", str(CONFIGS / "opt-1.3b"), "--device", "l4", "--batches", "0,4")
    assert rc == 2 and "--batches" in err
    rc, _, err = run_cli(capsys, "predict", str(tmp_path), "--device", "l4")
    assert rc == 2 and "config.json" in err


def test_cli_plan_on_a_named_device_is_predicted_and_pack_takes_the_plan(capsys, tmp_path):
    rc, out, _ = run_cli(capsys, "plan", str(CONFIGS / "opt-1.3b"), "--device", "h100-sxm", "--store", str(tmp_path))
    assert rc == 0
    plan = json.loads(out)
    assert plan["reasons"][0].startswith("predicted, not measured")
    assert not any("measured knee" in r or "(GPM)" in r for r in plan["reasons"])
    per_replica = plan["predicted_tokens_per_s_per_replica"]
    pack_in = tmp_path / "pack.json"
    pack_in.write_text(json.dumps({
        "devices": [{"name": f"gpu{i}", "kind": "cuda", "memory_bytes": 80 * GIB} for i in range(3)],
        "models": [{"plan": plan, "name": "opt", "target_tokens_per_s": 2.5 * per_replica},
                   {"model": "other", "kind": "cuda", "replicas": 1, "share": 0.5, "memory_per_replica_bytes": GIB}],
    }))
    rc, out, _ = run_cli(capsys, "pack", str(pack_in))
    assert rc == 0
    placed = [r for rows in json.loads(out)["placement"].values() for r in rows if r["model"] == "opt"]
    assert sum(r["replicas"] for r in placed) == 3  # ceil(2.5)
    assert all(r["memory_bytes"] == r["replicas"] * plan["memory_per_replica_bytes"] for r in placed)
    pack_in.write_text(json.dumps({"devices": [], "models": [{"plan": plan, "oops": 1}]}))
    rc, _, err = run_cli(capsys, "pack", str(pack_in))
    assert rc == 2 and "oops" in err


def test_engine_for_a_named_device_prefers_measurements(opt13, tmp_path):
    from advisor.perfmodel import engine_for_named_device

    c = load_constants()
    default = c.engine_for(c.device("h100-sxm"))
    assert engine_for_named_device(c, "h100-sxm", None, mem_for=None)[0] == default
    store = ProfileStore(tmp_path)
    stored_real_profile(store, "gone-model", "cuda:NVIDIA H100 80GB HBM3")

    def unreachable(ref, dtype):
        raise ValueError(f"{ref}: no config.json")

    eng, source = engine_for_named_device(c, "h100-sxm", store, unreachable)
    assert eng == default and "perf_constants.json" in source
    eng, source = engine_for_named_device(c, "h100-sxm", store, lambda ref, dtype: opt13)
    assert source.startswith("recalibrated on the measured profile of gone-model") and eng != default
    assert CalibrationFile(ProfileStore(tmp_path)).read()["h100-sxm"] == eng
    # A profile on another GPU does not recalibrate this one.
    assert engine_for_named_device(c, "a100-80gb", store, lambda ref, dtype: opt13)[0] == c.engine_for(c.device("a100-80gb"))


BCA_MPS_GAINS = [("opt-1.3b", 2, 256, 0.337), ("opt-1.3b", 4, 96, 0.20), ("opt-1.3b", 2, 96, 0.12),
                 ("opt-2.7b", 2, 128, 0.128)]  # N x batch under MPS: the BCA paper's measured gains


@pytest.mark.parametrize("model,replicas,batch,measured", BCA_MPS_GAINS)
def test_the_shipped_gpu_model_predicts_the_bca_mps_gains_within_ten_points(model, replicas, batch, measured):
    c = load_constants()
    dev, eng = c.devices["h100-64gb"], c.engines[c.engine_for_kind["cuda"]]
    mem = memory_model(CONFIGS / model)
    sharegpt = WorkloadShape(prompt_tokens=111, output_tokens=292, output_tokens_cv=1.34)  # the fitted spread
    whole = WorkloadShape(prompt_tokens=111, output_tokens=292)  # the paper's engines admitted whole requests
    paper = PlannerConfig(device_memory_fraction=0.9, kv_headroom=0.0)
    single = max(step(mem, dev, eng, b, sharegpt).tokens_per_s for b in (*DEFAULT_BATCHES, 640, 768)
                 if fits(mem, dev, eng, b, whole, cfg=paper))
    gain = aggregate_tokens_per_s(mem, dev, eng, batch, sharegpt, replicas) / single - 1
    assert abs(gain - measured) <= 0.10


def test_predict_names_the_sharing_mode_and_what_its_number_rests_on(opt13):
    dev, eng = gpu(), engine(t_fixed_s=0.002)
    mps = predict("opt", opt13, "g", dev, eng, SHAPE, batches=[16, 64], replicas=2, sharing="mps")
    sliced = predict("opt", opt13, "g", dev, eng, SHAPE, batches=[16, 64], replicas=2, sharing="time-slice")
    assert mps.sharing == "mps" and any(n.startswith("MPS:") and "BCA" in n for n in mps.notes)
    assert sliced.sharing == "time-slice" and any("upper bound" in n for n in sliced.notes)
    exclusive = predict("opt", opt13, "g", dev, eng, SHAPE, batches=[16, 64], replicas=2, sharing="exclusive")
    assert exclusive.aggregate_tokens_per_s is None and any("one engine per GPU" in n for n in exclusive.notes)
    cpu_pred = predict("opt", opt13, "c", cpu(), engine(), SHAPE, batches=[16], replicas=2)
    assert cpu_pred.sharing is None


def test_predicted_gpu_profiles_plan_the_same_n_in_either_mode(opt13):
    dev, eng = gpu(), engine(t_fixed_s=0.002)
    plans = {}
    for mode in ("mps", "time-slice"):
        profile = predicted_profile("opt", opt13, "g", dev, eng, SHAPE, [1, 8, 32, 64, 128], sharing=mode)
        assert profile.sharing == mode and all(p.gpu_busy == p.dram_bw_util for p in profile.points)
        plans[mode] = plan_replicas(profile, DeviceSpec(kind="cuda", name="g", memory_bytes=dev.memory_bytes))
    assert plans["mps"].replicas_per_device == plans["time-slice"].replicas_per_device
