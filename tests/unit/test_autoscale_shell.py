"""The Serve-facing policy shell: observations from Serve's contexts, errors kept inside."""

import time
from types import SimpleNamespace

from ray.serve.config import AutoscalingConfig, AutoscalingContext

from cluster.inventory import DeviceRead
from cluster.packing import DeviceCapacity
from cluster.policy import ModelPolicyInput, PolicyConfig, VariantSpec
from deployments.autoscale import DeviceWatch, PlateauAutoscaler, observe, policy_kwargs

GiB = 1 << 30


def context(name, kwargs, running=1, target=1, requests=0.0, metrics=None):
    cfg = AutoscalingConfig(min_replicas=0, max_replicas=4, policy={"policy_kwargs": kwargs} if kwargs else {})
    return AutoscalingContext(
        deployment_id=SimpleNamespace(name=name), deployment_name=name, app_name="app",
        current_num_replicas=running, target_num_replicas=target, running_replicas=[],
        total_num_requests=requests, total_queued_requests=0.0, aggregated_metrics=metrics or {},
        raw_metrics={}, capacity_adjusted_min_replicas=0, capacity_adjusted_max_replicas=4, policy_state={},
        last_scale_up_time=None, last_scale_down_time=None, current_time=None, config=cfg,
    )


def alpha_input(max_replicas=4):
    return ModelPolicyInput(model="alpha", min_replicas=1, max_replicas=max_replicas, variants=[
        VariantSpec(n=2, deployment="LLM:alpha@n2", share=0.5, memory_bytes=GiB, max_num_seqs=32)])


DEVICES = [DeviceCapacity(name=f"gpu{i}", memory_bytes=4 * GiB) for i in range(2)]


def test_observe_sums_rates_and_weights_the_shape_by_finished_requests():
    metrics = {"tokens_per_s": {"r1": 100.0, "r2": 50.0}, "kv_usage": {"r1": 0.5, "r2": 0.1},
               "recent_requests": {"r1": 3.0, "r2": 1.0}, "recent_prompt_tokens": {"r1": 100.0, "r2": 1500.0},
               "recent_output_tokens": {"r1": 16.0, "r2": 16.0},
               "recent_output_tokens_sq": {"r1": 256.0, "r2": 512.0}}
    o = observe(context("LLM:alpha@n2", None, running=2, target=3, requests=7.0, metrics=metrics))
    assert (o.running, o.target, o.requests, o.tokens_per_s) == (2, 3, 7.0, 150.0)
    assert o.kv_usage == 0.3 and o.recent_requests == 4.0
    assert o.recent_prompt_tokens == (3 * 100 + 1500) / 4 and o.recent_output_tokens == 16.0
    assert o.recent_output_tokens_sq == (3 * 256 + 512) / 4


def test_requests_sent_straight_to_the_replicas_count_as_load():
    """HAProxy sends requests to the replicas' own servers (the direct path), past Serve's handles:
    Serve counts none of them, the replicas count them all."""
    metrics = {"ongoing_requests": {"r1": 20.0, "r2": 12.0}}
    assert observe(context("LLM:alpha@n2", None, running=2, target=2, requests=0.0, metrics=metrics)).requests == 32.0
    # through Serve's handles (the Python path) both count the same requests: no double count
    assert observe(context("LLM:alpha@n2", None, running=2, target=2, requests=40.0, metrics=metrics)).requests == 40.0


def test_observe_takes_live_samples_from_replicas_keyed_as_serve_keys_them():
    """Serve keys aggregated metrics by ReplicaID, which has no order (sorting them raised
    TypeError in the policy on every tick once a variant ran two replicas)."""
    from ray.serve._private.common import DeploymentID, ReplicaID

    dep = DeploymentID(name="LLM:alpha@n2", app_name="app")
    r1, r2 = ReplicaID("b", dep), ReplicaID("a", dep)
    metrics = {"mean_context_tokens": {r1: 150.0, r2: 90.0}, "decode_steps": {r1: 50.0, r2: 60.0},
               "decode_batch": {r1: 4.0, r2: 2.0}, "decode_step_ms": {r1: 100.0, r2: 80.0}}
    o = observe(context("LLM:alpha@n2", None, running=2, target=2, metrics=metrics))
    assert [(s.batch, s.context_tokens, s.tokens_per_s) for s in o.samples] == [
        (2.0, 90.0, 25.0), (4.0, 150.0, 40.0)]  # sorted by the ReplicaID's text: "a" first


def test_the_shell_scales_variants_from_their_policy_kwargs_and_ignores_the_ingress():
    policy = PolicyConfig(upscale_after_s=0)
    kw = policy_kwargs(alpha_input(), 2, policy, DEVICES)
    variant = context("LLM:alpha@n2", kw, running=1, requests=60.0)
    ingress = context("OpenAIIngress", None)
    shell = PlateauAutoscaler(evaluate_every_s=0, store=DictStore())
    shell({"v": variant, "i": ingress})  # the first tick notes the wish
    decisions, _ = shell({"v": variant, "i": ingress})
    assert decisions == {"v": 3}  # ceil(60 / (32 x 0.8)); the ingress is left alone
    assert shell.state.decisions[-1].action == "scale"


def test_an_exception_in_the_policy_keeps_the_targets_and_is_counted():
    bad = context("LLM:alpha@n2", {"plateau": {"model": {"model": "alpha"}, "n": 2, "policy": {}, "devices": []}})
    shell = PlateauAutoscaler(evaluate_every_s=0)
    assert shell({"v": bad}) == ({}, {})
    assert shell._errors == 1


def test_calls_between_evaluations_change_nothing():
    kw = policy_kwargs(alpha_input(), 2, PolicyConfig(upscale_after_s=0), DEVICES)
    shell = PlateauAutoscaler(evaluate_every_s=3600, store=DictStore())
    shell({"v": context("LLM:alpha@n2", kw, requests=60.0)})
    assert shell({"v": context("LLM:alpha@n2", kw, requests=60.0)}) == ({}, {})


# ---- state that survives a controller restart; errors before the first publish ----

class DictStore:
    """A fake of Ray's internal KV."""

    def __init__(self):
        self.data: dict[str, bytes] = {}

    def get(self, key):
        return self.data.get(key)

    def put(self, key, value):
        self.data[key] = value


class FakeBoard:
    """Records the calls the shell makes (`.remote` is called directly, as on an actor handle)."""

    def __init__(self):
        self.errors, self.published = [], []
        self.policy_error = SimpleNamespace(remote=lambda app, msg: self.errors.append((app, msg)))
        self.publish = SimpleNamespace(remote=lambda *a: self.published.append(a))


def repack_contexts(n1_running=0, n1_target=0, deploy_id="build-1"):
    from tests.unit.test_policy import CFG, model_input

    inp = model_input()
    metrics = {"recent_requests": {"r": 20.0}, "recent_prompt_tokens": {"r": 1500.0},
               "recent_output_tokens": {"r": 64.0}}
    return {
        "v1": context("LLM:alpha@n1", policy_kwargs(inp, 1, CFG, DEVICES, deploy_id), running=n1_running,
                      target=n1_target),
        "v2": context("LLM:alpha@n2", policy_kwargs(inp, 2, CFG, DEVICES, deploy_id), running=1, target=1, requests=5.0,
                      metrics=metrics),
    }


def test_a_restarted_controller_reads_the_repack_back_instead_of_dropping_the_new_variant(monkeypatch):
    store, clock = DictStore(), [1000.0]
    monkeypatch.setattr("deployments.autoscale.time.time", lambda: clock[0])
    first = PlateauAutoscaler(evaluate_every_s=0, store=store, board=FakeBoard())
    first(repack_contexts())  # the better variant is noted
    clock[0] += 11.0
    decisions, _ = first(repack_contexts())  # held long enough: the re-pack starts
    assert first.state.models["alpha"].repack is not None and decisions["v1"] == 1

    restarted = PlateauAutoscaler(evaluate_every_s=0, store=store, board=FakeBoard())  # a new controller
    clock[0] += 1.0
    decisions, _ = restarted(repack_contexts(n1_target=1))
    assert restarted.state.models["alpha"].repack == first.state.models["alpha"].repack
    assert decisions["v1"] == 1  # the warming variant is kept, not scaled to zero by a fresh state
    assert [d.action for d in restarted.state.decisions] == ["repack_start"]  # not started again


def test_a_new_deploy_does_not_read_back_the_state_of_the_previous_one(monkeypatch):
    store, clock = DictStore(), [1000.0]
    monkeypatch.setattr("deployments.autoscale.time.time", lambda: clock[0])
    first = PlateauAutoscaler(evaluate_every_s=0, store=store, board=FakeBoard())
    first(repack_contexts())
    clock[0] += 11.0
    first(repack_contexts())
    assert first.state.models["alpha"].repack is not None
    redeployed = PlateauAutoscaler(evaluate_every_s=0, store=store, board=FakeBoard())
    clock[0] += 1.0
    redeployed(repack_contexts(deploy_id="build-2"))
    assert redeployed.state.models["alpha"].repack is None and redeployed.state.decisions == []


class FlakyStore(DictStore):
    """A state store whose reads fail until `healed`."""

    def __init__(self, data):
        super().__init__()
        self.data, self.healed, self.puts = data, False, 0

    def get(self, key):
        if not self.healed:
            raise ConnectionError("GCS unreachable")
        return super().get(key)

    def put(self, key, value):
        self.puts += 1
        super().put(key, value)


def test_a_saved_state_that_cannot_be_read_holds_the_targets_and_is_never_overwritten(monkeypatch):
    """A read that fails is not "nothing saved": a fresh state written over the saved re-pack
    would scale the warming variant to zero."""
    store, clock = DictStore(), [1000.0]
    monkeypatch.setattr("deployments.autoscale.time.time", lambda: clock[0])
    first = PlateauAutoscaler(evaluate_every_s=0, store=store, board=FakeBoard())
    first(repack_contexts())
    clock[0] += 11.0
    first(repack_contexts())
    saved = dict(store.data)
    assert first.state.models["alpha"].repack is not None

    flaky, board = FlakyStore(dict(saved)), FakeBoard()
    restarted = PlateauAutoscaler(evaluate_every_s=0, store=flaky, board=board)
    for _ in range(3):
        clock[0] += 1.0
        assert restarted(repack_contexts(n1_target=1)) == ({}, {})  # Serve keeps the current targets
    assert flaky.puts == 0 and flaky.data == saved
    assert "could not be read" in board.errors[-1][1]
    flaky.healed = True  # read again on the next tick
    clock[0] += 1.0
    decisions, _ = restarted(repack_contexts(n1_target=1))
    assert restarted.state.models["alpha"].repack == first.state.models["alpha"].repack
    assert decisions["v1"] == 1


def test_what_a_saved_state_reads_back_as():
    from cluster.policy import PolicyState
    from deployments.autoscale import SavedPolicyState, saved_state

    mine = SavedPolicyState(deploy_id="b1", state=PolicyState()).model_dump_json().encode()
    assert saved_state(None, "b1") == (None, "nothing saved")
    assert saved_state(mine, "b1") == (PolicyState(), "read back")
    assert saved_state(mine, "b2") == (None, "saved by another deploy (b1)")
    state, why = saved_state(b"{cut sh", "b1")
    assert state is None and why.startswith("not a saved policy state")


def test_policy_errors_reach_the_board_before_any_successful_publish():
    board = FakeBoard()
    bad = context("LLM:alpha@n2", {"plateau": {"model": {"model": "alpha"}, "n": 2, "policy": {}, "devices": []}})
    shell = PlateauAutoscaler(evaluate_every_s=0, store=DictStore(), board=board)
    shell({"v": bad})
    assert board.published == [] and len(board.errors) == 1
    app, message = board.errors[0]
    assert app == "app" and "ValidationError" in message


# ---- growth asks Ray's autoscaler for the devices it needs ---------------------------

def test_with_cluster_autoscaling_the_shell_asks_for_the_devices_its_targets_use_only_when_they_change(monkeypatch):
    clock, asked, board = [1000.0], [], FakeBoard()
    monkeypatch.setattr("deployments.autoscale.time.time", lambda: clock[0])
    kw = policy_kwargs(alpha_input(max_replicas=8), 2, PolicyConfig(upscale_after_s=0), DEVICES[:1],
                       cluster_autoscaling=True)
    shell = PlateauAutoscaler(evaluate_every_s=0, store=DictStore(), board=board, ask=asked.append,
                              ask_in_background=False)
    shell({"v": context("LLM:alpha@n2", kw, running=1)})
    assert asked == [[{"GPU": 1.0}]]  # one replica on the one device
    clock[0] += 1.0
    shell({"v": context("LLM:alpha@n2", kw, running=1)})
    assert len(asked) == 1  # same devices: not asked again
    clock[0] += 1.0
    shell({"v": context("LLM:alpha@n2", kw, running=1, requests=100.0)})  # the wish is noted
    clock[0] += 1.0
    decisions, _ = shell({"v": context("LLM:alpha@n2", kw, running=1, requests=100.0)})
    assert decisions == {"v": 4}  # ceil(100 / (32 x 0.8)): two devices of share 1/2 each, one of them added
    assert asked[-1] == [{"GPU": 1.0}, {"GPU": 1.0}]
    request = board.published[-1][5]  # (app, routes, live, decisions, kept, requested, devices)
    assert [(m.kind, m.count) for m in request.missing] == [("cuda", 1)] and len(request.bundles) == 2


def test_an_autoscaler_call_that_fails_is_made_again_on_the_next_tick():
    calls = []

    def ask(bundles):
        calls.append(bundles)
        if len(calls) == 1:
            raise ConnectionError("GCS unreachable")

    kw = policy_kwargs(alpha_input(), 2, PolicyConfig(), DEVICES, cluster_autoscaling=True)
    shell = PlateauAutoscaler(evaluate_every_s=0, store=DictStore(), board=FakeBoard(), ask=ask, ask_in_background=False)
    shell({"v": context("LLM:alpha@n2", kw)})
    shell({"v": context("LLM:alpha@n2", kw)})
    assert calls == [[{"GPU": 1.0}], [{"GPU": 1.0}]] and shell._errors == 0


def test_a_slow_autoscaler_call_never_holds_up_the_controller_loop():
    """request_resources is a blocking GCS call; the policy runs in Serve's controller loop."""
    import threading

    release, calls, board = threading.Event(), [], FakeBoard()

    def ask(bundles):
        calls.append(bundles)
        if len(calls) == 1:
            assert release.wait(30)  # a GCS that answers late
        else:
            raise ConnectionError("GCS unreachable")

    kw = policy_kwargs(alpha_input(), 2, PolicyConfig(), DEVICES, cluster_autoscaling=True)
    shell = PlateauAutoscaler(evaluate_every_s=0, store=DictStore(), board=board, ask=ask)
    started = time.monotonic()
    for _ in range(3):  # the ticks go on while the call hangs, and it is not made twice meanwhile
        shell({"v": context("LLM:alpha@n2", kw)})
    assert time.monotonic() - started < 5 and len(calls) == 1
    assert board.published[-1][5] is None  # nothing taken yet
    release.set()
    for _ in range(100):
        shell({"v": context("LLM:alpha@n2", kw)})
        if board.published[-1][5] is not None:
            break
        time.sleep(0.05)
    assert board.published[-1][5].bundles == [{"GPU": 1.0}]  # taken: published, and not asked again
    shell({"v": context("LLM:alpha@n2", kw)})
    assert len(calls) == 1


def test_without_cluster_autoscaling_the_shell_never_asks():
    asked = []
    kw = policy_kwargs(alpha_input(), 2, PolicyConfig(upscale_after_s=0), DEVICES[:1])
    shell = PlateauAutoscaler(evaluate_every_s=0, store=DictStore(), board=FakeBoard(), ask=asked.append)
    shell({"v": context("LLM:alpha@n2", kw, running=1, requests=100.0)})
    shell({"v": context("LLM:alpha@n2", kw, running=1, requests=100.0)})
    assert asked == []


# ---- a fixed cluster: nodes that join after the deploy ----------------------------------------

READ = DeviceRead(use_gpus=True)


def test_on_a_fixed_cluster_growth_uses_a_device_that_joined_after_the_deploy(monkeypatch):
    clock, cluster = [1000.0], [DEVICES[:1]]
    monkeypatch.setattr("deployments.autoscale.time.time", lambda: clock[0])
    kw = policy_kwargs(alpha_input(max_replicas=8), 2, PolicyConfig(upscale_after_s=0), DEVICES[:1], device_read=READ)
    reads = []
    shell = PlateauAutoscaler(evaluate_every_s=0, store=DictStore(), board=FakeBoard(),
                              read_devices=lambda read, known: reads.append(read) or cluster[0],
                              watch_in_background=False)

    def tick(running):
        clock[0] += 1.0
        return shell({"v": context("LLM:alpha@n2", kw, running=running, target=running, requests=100.0)})[0]

    tick(1)  # the wish is noted
    assert tick(1) == {"v": 2}  # ceil(100 / (32 x 0.8)) = 4 wished; the one device holds 2
    shell._watch.poll()
    assert tick(2) == {"v": 2}  # still one device: nothing more fits
    cluster[0] = DEVICES  # a node joins
    shell._watch.poll()
    assert tick(2) == {"v": 4}
    assert reads and all(r == READ for r in reads)  # read the way the builder read them
    assert shell._board.published[-1][-1] == DEVICES  # `plateau status` shows the devices the policy grows onto


def test_the_policys_reads_start_from_the_builders_device_names():
    read = DeviceRead(use_gpus=True, hosts={"node-a": "10.0.0.1"})
    kw = policy_kwargs(alpha_input(), 2, PolicyConfig(), DEVICES, device_read=read)
    caches = []
    shell = PlateauAutoscaler(evaluate_every_s=0, store=DictStore(), board=FakeBoard(),
                              read_devices=lambda r, cache: caches.append(cache) or DEVICES, watch_in_background=False)
    shell({"v": context("LLM:alpha@n2", kw)})
    shell._watch.poll()
    shell._watch.poll()
    assert caches[0] is caches[1] and caches[0].hosts == {"node-a": "10.0.0.1"}  # one cache for the watch's life


def test_the_policy_uses_the_deploys_devices_until_a_reading_lands():
    kw = policy_kwargs(alpha_input(max_replicas=8), 2, PolicyConfig(upscale_after_s=0), DEVICES[:1], device_read=READ)
    shell = PlateauAutoscaler(evaluate_every_s=0, store=DictStore(), board=FakeBoard(),
                              read_devices=lambda read, known: DEVICES, watch_in_background=False)
    for _ in range(2):
        decisions, _ = shell({"v": context("LLM:alpha@n2", kw, running=1, target=1, requests=100.0)})
    assert decisions == {"v": 2}  # the deploy's one device, though the (unread) cluster has two


def test_a_policy_that_serve_drops_stops_its_watch_thread():
    import gc

    kw = policy_kwargs(alpha_input(), 2, PolicyConfig(), DEVICES, device_read=READ)
    shell = PlateauAutoscaler(evaluate_every_s=0, store=DictStore(), board=FakeBoard(),
                              read_devices=lambda read, known: DEVICES)
    shell({"v": context("LLM:alpha@n2", kw)})
    thread = shell._watch._thread
    assert thread.is_alive()
    del shell  # a redeploy: Serve makes a new policy object and drops this one without a word
    gc.collect()
    thread.join(timeout=5)
    assert not thread.is_alive()


def test_device_refresh_s_is_0_or_at_least_a_second():
    import pydantic
    import pytest

    assert PolicyConfig(device_refresh_s=0).device_refresh_s == 0
    with pytest.raises(pydantic.ValidationError, match="give 0 .never. or at least 1"):
        PolicyConfig(device_refresh_s=0.01)


def test_the_deploys_devices_stand_until_a_read_lands_and_a_failed_or_empty_read_keeps_the_last():
    answers = [ConnectionError("GCS unreachable"), DEVICES, [], ConnectionError("again")]

    def read():
        a = answers.pop(0)
        if isinstance(a, Exception):
            raise a
        return a

    watch = DeviceWatch(read, every_s=30)
    watch.poll()
    assert watch.latest is None
    for _ in range(3):
        watch.poll()
        assert watch.latest == DEVICES


def test_the_devices_are_not_read_again_with_cluster_autoscaling_or_device_refresh_s_0():
    def read(_, known):
        raise AssertionError("read")

    for kw in (policy_kwargs(alpha_input(), 2, PolicyConfig(), DEVICES, cluster_autoscaling=True, device_read=READ),
               policy_kwargs(alpha_input(), 2, PolicyConfig(device_refresh_s=0), DEVICES, device_read=READ),
               policy_kwargs(alpha_input(), 2, PolicyConfig(), DEVICES)):
        shell = PlateauAutoscaler(evaluate_every_s=0, store=DictStore(), board=FakeBoard(), ask=lambda b: None,
                                  read_devices=read)
        shell({"v": context("LLM:alpha@n2", kw)})
        assert shell._watch is None and shell._errors == 0
