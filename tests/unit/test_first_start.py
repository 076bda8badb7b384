"""A first start serves at once on a predicted plan, measures the profile beside its replicas, and
the policy switches to the measured plan live."""

import asyncio
from types import SimpleNamespace

import pytest

from advisor.actor import Advisor, DeviceResources, beside_replicas
from advisor.planner import DeviceSpec, PlannerConfig
from advisor.profiler import PREDICTED_ENGINE_VERSION, WorkloadShape
from cluster.policy import ModelPolicyInput, ModelView, PolicyContext, PolicyState, VariantObservation, VariantSpec, decide
from cluster.refit import RefitState
from tests.factories import make_profile

GIB = 1 << 30


def _cpu_request(tmp_path, **kw):
    from deployments.profiling import AdvisorRequest

    return AdvisorRequest(model="smollm2-135m", device="cpu", dtype="float32", store_dir=str(tmp_path),
                          shape=WorkloadShape(prompt_tokens=128, output_tokens=64), max_model_len=2048, **kw)


@pytest.fixture
def bandwidth(monkeypatch):
    """This CPU's bandwidth, as `measure_memory_bandwidth` would read it (without the 4 s of copies)."""
    import advisor.perfmodel as perfmodel

    monkeypatch.setattr(perfmodel, "measure_memory_bandwidth", lambda *a, **kw: 12.9e9)


def test_an_empty_store_with_first_start_predict_plans_at_once_from_the_prediction(tmp_path, bandwidth):
    from deployments.profiling import plan_model

    req = _cpu_request(tmp_path, first_start="predict")
    lines = []
    plan = plan_model(req, lines.append, profiler=lambda r, log: pytest.fail("profiled before serving"))
    assert plan.predicted and plan.provisional
    assert plan.reasons[0].startswith("provisional: predicted")
    assert plan.profile is not None and plan.profile.engine_version == PREDICTED_ENGINE_VERSION
    assert plan.profile.b_star == plan.b_star and plan.replicas_per_device >= 1
    assert req.store().profiles().empty  # a prediction is never stored as a profile
    assert "profile" not in plan.model_dump(), "the predicted profile travels with the plan, not in its JSON"
    assert any("predicted plan: N=" in line for line in lines)


def test_first_start_profile_profiles_before_planning(tmp_path, bandwidth):
    from deployments.profiling import device_name, plan_model

    req = _cpu_request(tmp_path)  # the default: profile first
    profiled = []
    measured = make_profile(model=req.model, device_name=device_name(req), dtype="float32")

    def profiler(r, log):
        profiled.append(r)
        return measured, ""

    plan = plan_model(req, lambda line: None, profiler=profiler)
    assert profiled == [req] and not plan.predicted and plan.profile is None


def test_a_gpu_first_start_profiles_first():
    from deployments.profiling import predicted_first_plan

    req = SimpleNamespace(kind="cuda")
    lines = []
    assert predicted_first_plan(req, None, "cuda:NVIDIA H100", lines.append) is None
    assert "profiles first" in lines[0]


# ---- the Advisor measures a predicted plan's profile beside the replicas -------------------------
class _Recorder(Advisor):
    """Runs device tasks inline and records what they asked Ray for."""

    def __init__(self, plan, profiles, **kw):
        super().__init__(lambda r, log: plan, lambda r, log, beside=False: None, **kw)
        self.calls, self._profiles = [], list(profiles)

    async def _on_device(self, fn, request, resources, beside=False):
        self.calls.append((resources, beside))
        if not beside:
            return self._plan_fn(request, None)
        await asyncio.sleep(0.05)  # a measurement takes a while
        result = self._profiles.pop(0)
        if isinstance(result, Exception):
            raise result
        return result, "stored"


def _predicted_plan():
    return SimpleNamespace(predicted=True, provisional=True, device_kind="cpu")


def test_a_predicted_plan_is_answered_at_once_and_its_profile_measured_beside_the_replicas():
    whole = DeviceResources(num_cpus=2)
    trusted = SimpleNamespace(trusted=True)

    async def run():
        advisor = _Recorder(_predicted_plan(), [trusted])
        plan = await advisor.get_plan(SimpleNamespace(model_dump_json=lambda: "req", model="m"), whole)
        assert plan.predicted and advisor.measuring()  # the answer does not wait for the measurement
        while advisor.measuring():
            await asyncio.sleep(0.01)
        return advisor.calls

    calls = asyncio.run(run())
    assert calls == [(whole, False), (beside_replicas(whole), True)]
    assert beside_replicas(whole).num_cpus == 0 and beside_replicas(whole).num_gpus == 0


def test_an_untrusted_or_failed_measurement_is_tried_again_a_bounded_number_of_times(capsys):
    noisy = SimpleNamespace(trusted=False)

    async def run():
        advisor = _Recorder(_predicted_plan(), [RuntimeError("engine did not start"), noisy, noisy],
                            measure_rounds=3, measure_retry_s=0.0)
        await advisor.get_plan(SimpleNamespace(model_dump_json=lambda: "req", model="m"), DeviceResources())
        while advisor.measuring():
            await asyncio.sleep(0.01)
        return advisor.calls

    calls = asyncio.run(run())
    assert [beside for _, beside in calls] == [False, True, True, True]
    out = capsys.readouterr().out
    assert "engine did not start" in out and "no trusted profile after 3 rounds" in out


def test_a_measured_plan_is_not_measured_again():
    async def run():
        advisor = _Recorder(SimpleNamespace(predicted=False, provisional=False, device_kind="cpu"), [])
        await advisor.get_plan(SimpleNamespace(model_dump_json=lambda: "req", model="m"), DeviceResources())
        return advisor.measuring(), advisor.calls

    measuring, calls = asyncio.run(run())
    assert measuring == [] and len(calls) == 1


# ---- the policy takes the measured profile -------------------------------------------------------
def _input(profile, measured_key="measured/x"):
    device = DeviceSpec(kind="cpu", name="dev", memory_bytes=24 * GIB, cores=2)
    variants = [VariantSpec(n=1, deployment="m-n1", share=1.0, memory_bytes=2 * GIB, max_num_seqs=32),
                VariantSpec(n=2, deployment="m-n2", share=0.5, memory_bytes=2 * GIB, max_num_seqs=32)]
    return ModelPolicyInput(model="m", variants=variants, min_replicas=1, max_replicas=2, profile=profile,
                            device=device, planner=PlannerConfig(admit_plateau=False), measured_key=measured_key)


def test_the_measured_profile_replaces_the_prediction_once_and_says_so():
    predicted = make_profile(engine_version=PREDICTED_ENGINE_VERSION)
    measured = make_profile()
    inp = _input(predicted)
    obs = {2: VariantObservation(running=2, target=2), 1: VariantObservation()}
    first = decide(PolicyContext(now=100.0, models=[ModelView(input=inp, variants=obs)], devices=[]), PolicyState())
    assert not [d for d in first.new_decisions if d.action == "measured"]
    took = decide(PolicyContext(now=110.0, models=[ModelView(input=inp, variants=obs, measured=measured)], devices=[]),
                  first.state)
    [d] = [d for d in took.new_decisions if d.action == "measured"]
    assert "replaces the prediction" in d.reason and d.replicas_from == 2
    assert took.state.refits["m"].profile == measured and took.state.refits["m"].measured_at == 110.0
    again = decide(PolicyContext(now=120.0, models=[ModelView(input=inp, variants=obs, measured=measured)], devices=[]),
                   took.state)
    assert not [d for d in again.new_decisions if d.action == "measured"]


def test_the_shell_reads_the_measured_profile_from_the_key_the_builder_named_until_the_policy_took_it():
    from deployments.autoscale import MeasuredProfiles

    class Store(dict):
        reads = 0

        def get(self, key):
            Store.reads += 1
            return super().get(key)

    store = Store()
    profiles = MeasuredProfiles(store, every_s=10.0, in_background=False)
    assert profiles.get("measured/x", now=0.0) is None
    assert profiles.get("measured/x", now=5.0) is None and Store.reads == 1  # not read again within every_s
    store["measured/x"] = make_profile().model_dump_json().encode()
    found = profiles.get("measured/x", now=11.0)
    assert found is not None and found.b_star == make_profile().b_star
    store["measured/bad"] = b"{not json"
    assert profiles.get("measured/bad", now=0.0) is None


def test_a_refit_state_without_a_measurement_reads_as_not_taken():
    assert RefitState().measured_at is None


def test_a_profile_beside_replicas_allows_the_idle_serving_stack_and_no_more():
    from advisor.noise import BackgroundLoad, NoiseConfig, too_busy

    alone, beside = NoiseConfig(), NoiseConfig(serving_cores=0.5)
    idle_stack = BackgroundLoad(cpu_cores=0.45, cores=2)
    assert too_busy(idle_stack, alone) is not None  # alone on the device, that much load is interference
    assert too_busy(idle_stack, beside) is None
    one_request = BackgroundLoad(cpu_cores=1.45, cores=2)  # an engine serving a request on its core
    why = too_busy(one_request, beside)
    assert why is not None and "0.50 of them allowed to the idle serving stack" in why


def test_a_profile_measured_beside_replicas_runs_below_them_and_above_rays_workers(monkeypatch):
    import os

    import advisor.niceness as niceness

    nice = {1: 15, 2: 15}  # a Ray worker's two threads, at Ray's worker niceness
    monkeypatch.setattr(niceness, "_thread_ids", lambda pid=None: list(nice))
    monkeypatch.setattr(os, "getpriority", lambda which, who: nice.get(who, nice[1]))
    monkeypatch.setattr(os, "setpriority", lambda which, who, value: nice.__setitem__(who, value))
    assert niceness.yield_to_serving() is None
    assert set(nice.values()) == {niceness.YIELD_NICENESS} and 0 < niceness.YIELD_NICENESS < 15

    def refused(which, who, value):
        raise PermissionError

    nice.update({1: 15, 2: 15})
    monkeypatch.setattr(os, "setpriority", refused)
    warning = niceness.yield_to_serving()
    assert "RAY_worker_niceness=0" in warning and set(nice.values()) == {15}


def test_a_measurement_beside_replicas_may_run_as_long_as_a_profile():
    from advisor.actor import BESIDE_RUN_TIMEOUT_S

    shared_plan = DeviceResources(num_cpus=0, whole_device=False, run_timeout_s=600)
    assert beside_replicas(shared_plan).run_timeout_s == BESIDE_RUN_TIMEOUT_S >= 3600


def test_a_profile_measured_beside_replicas_is_published_under_the_key_the_builder_named(tmp_path, monkeypatch):
    import deployments.profiling as profiling
    from advisor.noise import QuietWait

    req = _cpu_request(tmp_path, first_start="predict")
    key = req.measured_key  # what the app builder puts in the policy's input
    seen, published = [], {}
    monkeypatch.setattr(profiling, "wait_for_quiet", lambda probe, cfg, log: seen.append(cfg) or QuietWait(
        quiet=True, waited_s=0.0, load=None))
    monkeypatch.setattr(profiling, "load_probe", lambda r, cores=None: None)
    monkeypatch.setattr(profiling, "device_sharing", lambda r: None)
    from advisor.noise import NoiseConfig, ProfileNoise

    clean = make_profile(model=req.model).model_copy(update={"noise": ProfileNoise(
        limits=NoiseConfig(), worst_cv=0.01, flagged=False, reason="quiet")})
    monkeypatch.setattr(profiling, "_measure_profile", lambda r, log, quiet, yield_cpu=False: clean)
    monkeypatch.setattr(profiling, "publish_measured", lambda r, p: published.setdefault(r.measured_key, p))
    profiling.profile_model(req, lambda line: None, beside=True)
    assert seen[0].serving_cores == profiling.SERVING_IDLE_CORES  # measured with the serving stack allowed
    assert list(published) == [key]
