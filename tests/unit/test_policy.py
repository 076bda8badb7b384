"""The autoscaling / re-pack policy on synthetic replica stats."""

import pytest

from advisor.planner import DeviceSpec
from advisor.profiler import WorkloadShape
from cluster.packing import DeviceCapacity
from cluster.policy import (ModelPolicyInput, ModelView, PolicyConfig, PolicyContext, PolicyState, VariantObservation,
                            VariantSpec, decide)
from tests.factories import make_profile

GiB = 1 << 30
CFG = PolicyConfig(upscale_after_s=5, downscale_after_s=30, repack_sustain_s=10, repack_cooldown_s=100,
                   drain_grace_s=2, shape_min_requests=8)


def profile_with_bandwidth(util=40.0):
    p = make_profile()
    return p.model_copy(update={"points": [q.model_copy(update={"dram_bw_util": util}) for q in p.points]})


PROFILE = profile_with_bandwidth()
DEVICE = DeviceSpec(kind="cuda", name="g", memory_bytes=4 * GiB)  # short prompts: N=2 fits; 1500-token: only N=1


def model_input(name="alpha", variants=(1, 2), min_replicas=1, max_replicas=4, profile=PROFILE):
    return ModelPolicyInput(
        model=name, min_replicas=min_replicas, max_replicas=max_replicas, profile=profile,
        device=DEVICE if profile else None,
        variants=[VariantSpec(n=n, deployment=f"LLM:{name}@n{n}", share=1 / n, memory_bytes=int(3.6 * GiB / n),
                              max_num_seqs=32) for n in variants])


def obs(running=0, target=None, requests=0.0, prompt=100, done=20):
    return VariantObservation(running=running, target=running if target is None else target, requests=requests,
                              tokens_per_s=100.0 * running, kv_usage=0.3 if running else 0.0,
                              recent_requests=done if running else 0, recent_prompt_tokens=prompt if running else 0,
                              recent_output_tokens=64 if running else 0)


def ctx(now, views, devices=2):
    return PolicyContext(now=now, models=views,
                         devices=[DeviceCapacity(name=f"gpu{i}", memory_bytes=4 * GiB) for i in range(devices)])


def view(inp, **per_n):
    return ModelView(input=inp, variants={int(k[1:]): v for k, v in per_n.items()})


def run(now, state, *views, devices=2, cfg=CFG):
    out = decide(ctx(now, list(views), devices), state, cfg)
    return out, out.state


# ---- load ----------------------------------------------------------------------------------

def test_scale_up_waits_for_the_upscale_window_then_follows_load():
    inp = model_input(variants=(2,))
    out, st = run(0.0, PolicyState(), view(inp, n2=obs(running=1, requests=70)))
    assert out.targets == {"LLM:alpha@n2": 1} and not out.new_decisions  # wish noted, not acted on
    out, st = run(3.0, st, view(inp, n2=obs(running=1, requests=70)))
    assert out.targets == {"LLM:alpha@n2": 1}
    out, st = run(5.0, st, view(inp, n2=obs(running=1, requests=70)))
    assert out.targets == {"LLM:alpha@n2": 3}  # ceil(70 / (32 x 0.8)) = 3
    [d] = out.new_decisions
    assert (d.action, d.replicas_from, d.replicas_to) == ("scale", 1, 3) and "load needs 3 replicas" in d.reason


def test_scale_down_needs_the_longer_window_and_noise_does_not_flap():
    inp = model_input(variants=(2,))
    st = PolicyState()
    changes = []
    for t in range(0, 60):
        load = 50.0 if t % 2 else 10.0  # noisy: the wish flips direction every tick
        out, st = run(float(t), st, view(inp, n2=obs(running=2, target=2, requests=load)))
        changes += out.new_decisions
    assert changes == [] and out.targets["LLM:alpha@n2"] == 2
    for t in range(100, 131):
        out, st = run(float(t), st, view(inp, n2=obs(running=2, requests=5.0)))
        if t < 130:
            assert out.targets["LLM:alpha@n2"] == 2
    assert out.targets["LLM:alpha@n2"] == 1 and out.new_decisions[0].action == "scale"


def test_min_and_max_replicas_bound_the_load_target():
    inp = model_input(variants=(2,), min_replicas=2, max_replicas=3)
    st = PolicyState()
    for t in (0.0, 10.0):
        out, st = run(t, st, view(inp, n2=obs(running=2, requests=1000)))
    assert out.targets["LLM:alpha@n2"] == 3
    st = PolicyState()
    for t in (0.0, 40.0):
        out, st = run(t, st, view(inp, n2=obs(running=3, requests=0)))
    assert out.targets["LLM:alpha@n2"] == 2


def test_scale_up_is_capped_by_the_room_the_packer_finds():
    inp = model_input(variants=(2,), max_replicas=10)
    st = PolicyState()
    for t in (0.0, 10.0):
        out, st = run(t, st, view(inp, n2=obs(running=1, requests=1000)), devices=2)
    assert out.targets["LLM:alpha@n2"] == 4  # 2 devices x 2 replicas of share 1/2
    assert "capped at 4" in out.new_decisions[0].reason


def test_two_models_share_the_devices_round_robin_when_both_grow():
    a, b = model_input("a", variants=(2,), max_replicas=10), model_input("b", variants=(2,), max_replicas=10)
    st = PolicyState()
    for t in (0.0, 10.0):
        out, st = run(t, st, view(a, n2=obs(running=1, requests=1000)), view(b, n2=obs(running=1, requests=1000)))
    assert out.targets == {"LLM:a@n2": 2, "LLM:b@n2": 2}


def test_a_model_pinned_to_a_device_type_grows_only_onto_devices_of_that_type():
    a = model_input("a", variants=(2,), max_replicas=10).model_copy(update={"device_type": "A"})
    b = model_input("b", variants=(2,), max_replicas=10).model_copy(update={"device_type": "B"})
    devices = ([DeviceCapacity(name="a0", memory_bytes=4 * GiB, device_type="A")]
               + [DeviceCapacity(name=f"b{i}", memory_bytes=4 * GiB, device_type="B") for i in range(3)])
    st = PolicyState()
    for t in (0.0, 10.0):
        out = decide(PolicyContext(now=t, models=[view(a, n2=obs(running=1, requests=1000)),
                                                  view(b, n2=obs(running=1, requests=1000))], devices=devices), st, CFG)
        st = out.state
    # a's one type-A device holds 2 replicas of share 1/2, though three B devices are there
    assert out.targets == {"LLM:a@n2": 2, "LLM:b@n2": 6}


def test_with_cluster_autoscaling_growth_goes_onto_added_devices_and_says_what_to_ask_for():
    inp = model_input(variants=(2,), max_replicas=10)
    st = PolicyState()
    devices = [DeviceCapacity(name="gpu0", memory_bytes=4 * GiB), DeviceCapacity(name="+cuda-0", memory_bytes=4 * GiB)]
    for t in (0.0, 10.0):
        out = decide(PolicyContext(now=t, models=[view(inp, n2=obs(running=1, requests=1000))], devices=devices,
                                   may_add_devices=True), st, CFG)
        st = out.state
    # ceil(1000 / (32 x 0.8)) = 40, capped by max_replicas 10 only: 5 devices of 2 replicas
    assert out.targets == {"LLM:alpha@n2": 10} and "capped" not in out.new_decisions[0].reason
    assert out.needed is not None and out.needed.packing.devices_used == 5
    [missing] = out.needed.missing  # the start placement's two devices count as there
    assert (missing.kind, missing.count, missing.memory_bytes) == ("cuda", 3, 4 * GiB)
    assert sorted(out.needed.packing.placement) == ["+cuda-0", "+cuda-1", "+cuda-2", "+cuda-3", "gpu0"]
    # load gone (past the downscale window): the request shrinks back to what one replica uses
    for t in (20.0, 60.0):
        out = decide(PolicyContext(now=t, models=[view(inp, n2=obs(running=10, requests=0))], devices=devices,
                                   may_add_devices=True), st, CFG)
        st = out.state
    assert out.targets == {"LLM:alpha@n2": 1} and out.needed.packing.devices_used == 1 and out.needed.missing == []


def test_without_cluster_autoscaling_there_is_nothing_to_ask_for():
    out, _ = run(0.0, PolicyState(), view(model_input(variants=(2,)), n2=obs(running=1)))
    assert out.needed is None


def test_with_cluster_autoscaling_a_repack_warms_on_an_added_device_instead_of_aborting():
    inp = model_input()
    st = PolicyState()
    full = dict(n1=obs(), n2=obs(running=2, requests=40, prompt=1500))
    for t in (0.0, 10.0):
        out = decide(PolicyContext(now=t, models=[view(inp, **full)], may_add_devices=True,
                                   devices=[DeviceCapacity(name="gpu0", memory_bytes=4 * GiB)]), st, CFG)
        st = out.state
    # on a fixed cluster this aborts (no room next to N=2, test above); here the new variant surges onto a new device
    assert [d.action for d in out.new_decisions] == ["repack_start"]
    assert out.targets == {"LLM:alpha@n1": 2, "LLM:alpha@n2": 2}  # two whole devices for N=1 next to the old one
    assert [(m.kind, m.count) for m in out.needed.missing] == [("cuda", 2)]


# ---- re-pack --------------------------------------------------------------------------------

def test_shape_shift_repacks_make_before_break_and_reports_each_step():
    inp = model_input()
    st = PolicyState()
    short = dict(n1=obs(), n2=obs(running=1, requests=10, prompt=100))
    out, st = run(0.0, st, view(inp, **short))
    assert out.targets == {"LLM:alpha@n1": 0, "LLM:alpha@n2": 1} and out.live[0].best_n == 2

    long_ = dict(n1=obs(), n2=obs(running=1, requests=10, prompt=1500))
    out, st = run(1.0, st, view(inp, **long_))
    assert st.models["alpha"].want_n == 1 and not out.new_decisions
    out, st = run(11.0, st, view(inp, **long_))
    [start] = out.new_decisions
    assert start.action == "repack_start" and (start.from_n, start.to_n) == (2, 1)
    assert "no longer fits" in start.reason and "prompt 1500" in start.reason
    assert out.targets == {"LLM:alpha@n1": 1, "LLM:alpha@n2": 1}  # new next to old
    assert all(r.accepting for r in out.routes["alpha"])

    out, st = run(12.0, st, view(inp, n1=obs(target=1), n2=obs(running=1, requests=10, prompt=1500)))
    assert not out.new_decisions  # warming: the new replica is not running yet

    out, st = run(40.0, st, view(inp, n1=obs(running=1), n2=obs(running=1, requests=3, prompt=1500)))
    assert out.new_decisions[0].action == "repack_drain"
    routes = {r.n: r.accepting for r in out.routes["alpha"]}
    assert routes == {1: True, 2: False} and out.targets["LLM:alpha@n2"] == 1  # drains before it stops

    out, st = run(45.0, st, view(inp, n1=obs(running=1, prompt=1500), n2=obs(running=1, requests=0, prompt=1500)))
    assert out.targets == {"LLM:alpha@n1": 1, "LLM:alpha@n2": 0}
    out, st = run(47.0, st, view(inp, n1=obs(running=1, prompt=1500), n2=obs(running=0)))
    [done] = out.new_decisions
    assert done.action == "repack_done" and done.seconds == pytest.approx(36.0)
    assert st.models["alpha"].active_n == 1 and st.models["alpha"].repack is None
    assert [d.action for d in st.decisions] == ["repack_start", "repack_drain", "repack_done"]


def test_draining_waits_for_in_flight_requests_until_the_timeout():
    inp = model_input()
    cfg = CFG.model_copy(update={"drain_timeout_s": 30.0})
    st = PolicyState()
    long_ = dict(n1=obs(), n2=obs(running=1, requests=10, prompt=1500))
    for t in (0.0, 10.0):
        out, st = run(t, st, view(inp, **long_), cfg=cfg)
    out, st = run(11.0, st, view(inp, n1=obs(running=1), n2=obs(running=1, requests=4, prompt=1500)), cfg=cfg)
    out, st = run(20.0, st, view(inp, n1=obs(running=1), n2=obs(running=1, requests=4, prompt=1500)), cfg=cfg)
    assert out.targets["LLM:alpha@n2"] == 1  # still busy
    out, st = run(41.0, st, view(inp, n1=obs(running=1), n2=obs(running=1, requests=4, prompt=1500)), cfg=cfg)
    assert out.targets["LLM:alpha@n2"] == 0  # timeout


def test_a_shape_that_flips_back_before_the_sustain_window_changes_nothing():
    inp = model_input()
    st = PolicyState()
    for t in range(0, 40):
        prompt = 1500 if (t // 5) % 2 == 0 else 100  # 5 s long, 5 s short: never 10 s in a row
        out, st = run(float(t), st, view(inp, n1=obs(), n2=obs(running=1, requests=5, prompt=prompt)))
        assert not out.new_decisions
    assert st.models["alpha"].repack is None


def test_the_live_shape_carries_the_spread_of_output_lengths_pooled_over_variants():
    from cluster.policy import _live_shape

    # variant 1: 30 requests of 64 tokens; variant 2: 10 requests, half of 16 and half of 208 tokens
    fixed = obs(running=1, done=30)
    mixed = obs(running=1, done=10).model_copy(update={"recent_output_tokens": 112.0,
                                                       "recent_output_tokens_sq": (16**2 + 208**2) / 2})
    fixed = fixed.model_copy(update={"recent_output_tokens_sq": 64.0**2})
    shape = _live_shape([fixed, mixed], PolicyConfig())
    mean, square = (30 * 64 + 10 * 112) / 40, (30 * 64**2 + 10 * (16**2 + 208**2) / 2) / 40
    assert shape.output_tokens == round(mean)
    assert shape.output_tokens_cv == pytest.approx((square / mean**2 - 1) ** 0.5, abs=1e-3)
    # replicas that report no squares (all alike, or an older replica): no spread
    assert _live_shape([obs(running=1, done=30)], PolicyConfig()).output_tokens_cv == 0.0
    # a spread needs more finished requests than the means do
    few = mixed.model_copy(update={"recent_requests": 10})
    assert _live_shape([few], PolicyConfig()).output_tokens == 112
    assert _live_shape([few], PolicyConfig()).output_tokens_cv == 0.0
    assert _live_shape([few], PolicyConfig(spread_min_requests=10)).output_tokens_cv > 0.5


def test_a_wide_spread_of_output_lengths_plans_more_kv_per_sequence():
    from advisor.planner import evaluate_shape

    fixed = WorkloadShape(prompt_tokens=100, output_tokens=64)
    chat = fixed.model_copy(update={"output_tokens_cv": 1.5})  # mean context 100 + 64 * 3.25 / 2 = 204 > 164
    assert (fixed.kv_tokens_per_sequence, chat.kv_tokens_per_sequence) == (164, 204)
    assert fixed.model_copy(update={"output_tokens_cv": 0.9}).kv_tokens_per_sequence == 164  # a whole request is more
    ev = evaluate_shape(PROFILE, DEVICE, chat)
    assert ev.context_tokens == 204
    # the profile's own lengths, spread: B* comes from the step model at the larger context, not the measured knee
    spread = PROFILE.shape.model_copy(update={"output_tokens_cv": 1.5})
    reasons = evaluate_shape(PROFILE, DEVICE, spread).reasons
    assert not reasons[0].startswith("measured knee") and "output spread cv 1.50" in reasons[0], reasons[0]
    assert evaluate_shape(PROFILE, DEVICE, PROFILE.shape).reasons[0].startswith("measured knee")


def test_too_few_finished_requests_is_no_shape_and_no_repack():
    inp = model_input()
    st = PolicyState()
    for t in (0.0, 20.0, 40.0):
        out, st = run(t, st, view(inp, n1=obs(), n2=obs(running=1, prompt=1500, done=3)))
    assert not st.decisions and out.live[0].shape is None


def test_cooldown_blocks_an_immediate_move_back():
    inp = model_input()
    st = PolicyState()
    for t, v in [(0.0, dict(n1=obs(), n2=obs(running=1, prompt=1500))), (10.0, dict(n1=obs(), n2=obs(running=1, prompt=1500))),
                 (11.0, dict(n1=obs(running=1), n2=obs(running=1))), (14.0, dict(n1=obs(running=1), n2=obs(running=1))),
                 (15.0, dict(n1=obs(running=1), n2=obs()))]:
        out, st = run(t, st, view(inp, **v))
    assert st.models["alpha"].active_n == 1
    back = dict(n1=obs(running=1, prompt=100), n2=obs())
    for t in (20.0, 40.0, 100.0):
        out, st = run(t, st, view(inp, **back))
        assert st.models["alpha"].repack is None
    for t in (115.0, 125.0):  # cooldown (100 s after 15) over, then the sustain window
        out, st = run(t, st, view(inp, **back))
    assert st.models["alpha"].repack is not None and st.models["alpha"].repack.to_n == 2


def test_no_room_for_make_before_break_aborts_and_keeps_serving():
    inp = model_input()
    st = PolicyState()
    full = dict(n1=obs(), n2=obs(running=2, requests=40, prompt=1500))
    for t in (0.0, 10.0):
        out, st = run(t, st, view(inp, **full), devices=1)
    assert [d.action for d in out.new_decisions] == ["repack_start", "repack_abort"]
    assert "no room for N=1 next to N=2" in out.new_decisions[1].reason
    assert out.targets == {"LLM:alpha@n1": 0, "LLM:alpha@n2": 2}


def test_new_replicas_that_never_start_abort_the_repack():
    inp = model_input()
    cfg = CFG.model_copy(update={"warm_timeout_s": 60.0})
    st = PolicyState()
    for t in (0.0, 10.0, 50.0, 71.0):
        out, st = run(t, st, view(inp, n1=obs(target=1), n2=obs(running=1, requests=5, prompt=1500)), cfg=cfg)
    assert out.new_decisions[0].action == "repack_abort" and out.targets["LLM:alpha@n1"] == 0
    assert st.models["alpha"].active_n == 2


def test_without_a_profile_the_policy_only_follows_load():
    inp = model_input(profile=None)
    st = PolicyState()
    for t in (0.0, 30.0, 60.0):
        out, st = run(t, st, view(inp, n1=obs(), n2=obs(running=1, requests=5, prompt=1500)))
    assert not st.decisions and out.targets == {"LLM:alpha@n1": 0, "LLM:alpha@n2": 1}


def test_a_fresh_state_takes_the_variant_with_running_replicas_as_active():
    inp = model_input()
    out, st = run(0.0, PolicyState(), view(inp, n1=obs(running=1), n2=obs()))
    assert st.models["alpha"].active_n == 1 and out.targets == {"LLM:alpha@n1": 1, "LLM:alpha@n2": 0}


def test_if_the_new_replica_dies_while_the_old_drains_the_old_serves_again_until_it_is_back():
    inp = model_input()
    st = PolicyState()
    for t in (0.0, 10.0):
        out, st = run(t, st, view(inp, n1=obs(), n2=obs(running=1, requests=5, prompt=1500)))
    out, st = run(11.0, st, view(inp, n1=obs(running=1), n2=obs(running=1, requests=5, prompt=1500)))
    assert st.models["alpha"].repack.phase == "draining"
    out, st = run(12.0, st, view(inp, n1=obs(target=1), n2=obs(running=1, requests=5, prompt=1500)))  # n1 died
    routes = {r.n: r.accepting for r in out.routes["alpha"]}
    assert routes[2] and out.targets == {"LLM:alpha@n1": 1, "LLM:alpha@n2": 1}  # old serves, new is replaced
    out, st = run(40.0, st, view(inp, n1=obs(running=1), n2=obs(running=1, requests=0, prompt=1500)))
    assert not {r.n: r.accepting for r in out.routes["alpha"]}[2]  # back to draining
    out, st = run(41.0, st, view(inp, n1=obs(running=1), n2=obs(running=0)))
    assert st.models["alpha"].active_n == 1 and out.new_decisions[0].action == "repack_done"


# ---- re-pack stall, hysteresis and capacity, drain clock --------------------------

def test_warming_ends_when_the_replicas_the_room_allowed_run_instead_of_stalling_until_the_timeout():
    inp = model_input()
    cfg = CFG.model_copy(update={"upscale_after_s": 1000.0, "warm_timeout_s": 60.0})
    st = PolicyState()
    busy = dict(n1=obs(), n2=obs(running=1, requests=60, prompt=1500))  # load wants 3 replicas of N=1
    for t in (0.0, 10.0):
        out, st = run(t, st, view(inp, **busy), cfg=cfg)
    assert out.new_decisions[0].action == "repack_start"
    assert out.targets["LLM:alpha@n1"] == 1  # only one N=1 fits next to the old N=2 replica
    out, st = run(11.0, st, view(inp, n1=obs(running=1), n2=obs(running=1, requests=60, prompt=1500)), cfg=cfg)
    assert [d.action for d in out.new_decisions] == ["repack_drain"]
    for t in (30.0, 75.0):
        out, st = run(t, st, view(inp, n1=obs(running=1, requests=60, prompt=1500), n2=obs(running=1)), cfg=cfg)
        assert "repack_abort" not in [d.action for d in out.new_decisions]


def _draining(cfg):
    inp = model_input()
    st = PolicyState()
    for t in (0.0, 10.0):
        out, st = run(t, st, view(inp, n1=obs(), n2=obs(running=1, requests=5, prompt=1500)), cfg=cfg)
    out, st = run(11.0, st, view(inp, n1=obs(running=1), n2=obs(running=1, requests=5, prompt=1500)), cfg=cfg)
    assert st.models["alpha"].repack.phase == "draining"
    return inp, st


def test_during_a_repack_the_new_variant_does_not_follow_every_load_swing():
    cfg = CFG.model_copy(update={"drain_timeout_s": 1000.0})
    inp, st = _draining(cfg)
    seen = set()
    for t in range(12, 40):
        load = 100.0 if t % 2 else 5.0  # noisy load: wants 4 replicas, then 1, every other tick
        out, st = run(float(t), st, view(inp, n1=obs(running=1, requests=load, prompt=1500),
                                         n2=obs(running=1, requests=1)), cfg=cfg)
        seen.add(out.targets["LLM:alpha@n1"])
    assert seen == {1}


def test_during_draining_the_new_variant_grows_only_as_far_as_the_devices_have_room():
    cfg = CFG.model_copy(update={"drain_timeout_s": 1000.0})
    inp, st = _draining(cfg)
    for t in (12.0, 20.0):  # the old N=2 replica still drains on one device: one N=1 replica fits
        out, st = run(t, st, view(inp, n1=obs(running=1, requests=200, prompt=1500),
                                  n2=obs(running=1, requests=1)), cfg=cfg)
        assert out.targets["LLM:alpha@n1"] == 1
    out, st = run(30.0, st, view(inp, n1=obs(running=1, requests=200, prompt=1500), n2=obs()), cfg=cfg)
    assert st.models["alpha"].repack is None and out.targets["LLM:alpha@n1"] == 2  # both devices now


def test_when_the_new_variant_comes_back_the_old_one_gets_its_drain_grace_again():
    inp, st = _draining(CFG)
    out, st = run(12.0, st, view(inp, n1=obs(target=1), n2=obs(running=1, requests=5, prompt=1500)))  # n1 died
    out, st = run(40.0, st, view(inp, n1=obs(running=1), n2=obs(running=1, requests=0, prompt=1500)))
    assert out.targets["LLM:alpha@n2"] == 1  # back to draining, but the grace starts now, not at 11 s
    out, st = run(40.0 + CFG.drain_grace_s, st, view(inp, n1=obs(running=1), n2=obs(running=1, requests=0)))
    assert out.targets["LLM:alpha@n2"] == 0


def test_the_policy_state_round_trips_through_json_with_an_infinite_gain():
    inp = model_input()
    st = PolicyState()
    for t in (0.0, 10.0):
        out, st = run(t, st, view(inp, n1=obs(), n2=obs(running=1, requests=5, prompt=1500)))
    assert st.models["alpha"].repack.predicted_gain == float("inf")  # N=2 no longer fits
    assert PolicyState.model_validate_json(st.model_dump_json()) == st


def test_a_saved_state_naming_a_variant_this_deploy_lacks_is_not_used():
    from cluster.policy import ModelState, Repack

    saved = PolicyState(models={"alpha": ModelState(active_n=4, repack=Repack(
        from_n=4, to_n=2, started_at=0.0, reason="old deploy", predicted_gain=0.5))})
    out, st = run(10.0, saved, view(model_input(), n1=obs(), n2=obs(running=1)))
    assert st.models["alpha"].active_n == 2 and st.models["alpha"].repack is None
    assert out.targets == {"LLM:alpha@n1": 0, "LLM:alpha@n2": 1}


def test_a_launch_bound_profile_does_not_stop_the_policy():
    launch_bound = PROFILE.model_copy(update={"step_model": PROFILE.step_model.model_copy(
        update={"b_ms": -0.01, "c_ms": 0.0})})
    inp = model_input(variants=(2,), profile=launch_bound)
    st = PolicyState()
    for t in (0.0, 10.0):  # a live shape outside the profiled bucket: B* comes from the fit
        out, st = run(t, st, view(inp, n2=obs(running=1, requests=70, prompt=1500)))
    assert out.targets == {"LLM:alpha@n2": 3} and out.live[0].b_star > 0


# ---- the drain waits for streams that still produce tokens ---------------------------------

def _long_model_input(max_model_len=2048):
    from advisor.planner import PlannerConfig

    return model_input().model_copy(update={"planner": PlannerConfig(max_model_len=max_model_len)})


def test_the_longest_request_is_max_model_len_steps_at_the_full_batch_times_n():
    from cluster.policy import longest_request_s

    inp = _long_model_input()
    n2 = inp.variant(2)
    step_ms = PROFILE.step_model.step_ms(n2.max_num_seqs, 1024)
    assert longest_request_s(inp, n2) == pytest.approx(2048 * step_ms * 2 / 1000)
    assert longest_request_s(inp, inp.variant(1)) == pytest.approx(2048 * step_ms / 1000)
    assert longest_request_s(model_input(), n2) is None  # no context length: nothing bounds a request
    assert longest_request_s(model_input(profile=None), n2) is None


def _drain_until(t_end, inp, cfg, tokens_per_s):
    """A re-pack from N=2 to N=1 whose old replica keeps 4 requests that make `tokens_per_s`; the
    policy runs every 5 s from 11 s on: the time the old variant's target went to 0 and the decisions."""
    st = PolicyState()
    for t in (0.0, 10.0):
        out, st = run(t, st, view(inp, n1=obs(), n2=obs(running=1, requests=10, prompt=1500)), cfg=cfg)
    busy = obs(running=1, requests=4, prompt=1500).model_copy(update={"tokens_per_s": tokens_per_s})
    cut_at, decisions, t = None, [], 11.0
    while t <= t_end:
        out, st = run(t, st, view(inp, n1=obs(running=1), n2=busy), cfg=cfg)
        decisions += out.new_decisions
        if cut_at is None and out.targets["LLM:alpha@n2"] == 0:
            cut_at = t
        t += 5.0
    return cut_at, decisions


def test_the_drain_outwaits_its_timeout_while_the_old_replicas_still_make_tokens():
    from cluster.policy import longest_request_s

    inp, cfg = _long_model_input(), CFG.model_copy(update={"drain_timeout_s": 30.0})
    longest = longest_request_s(inp, inp.variant(2))
    assert longest > 2 * cfg.drain_timeout_s  # the case: long outputs at this step time outlast the timeout
    cut_at, decisions = _drain_until(11.0 + longest + 20, inp, cfg, tokens_per_s=50.0)
    assert cut_at is not None and 11.0 + longest <= cut_at < 11.0 + longest + 5.0
    cuts = [d for d in decisions if d.action == "repack_drain" and "in flight" in d.reason]
    assert len(cuts) == 1, decisions  # said once, not on every tick
    assert "4 requests in flight" in cuts[0].reason and "longest request the model allows" in cuts[0].reason


def test_requests_that_make_no_tokens_are_cut_at_the_drain_timeout_and_the_decision_says_so():
    inp, cfg = _long_model_input(), CFG.model_copy(update={"drain_timeout_s": 30.0})
    cut_at, decisions = _drain_until(80.0, inp, cfg, tokens_per_s=0.0)
    assert cut_at == 41.0  # drain started at 11 s
    (cut,) = [d for d in decisions if "in flight" in d.reason]
    assert "made no tokens" in cut.reason and "drain_timeout_s (30 s)" in cut.reason
