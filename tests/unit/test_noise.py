"""Noise checks of the profiler: repeat a point until its rounds agree, flag interference, wait for quiet."""

import subprocess
import sys
import time

import pytest

from advisor.noise import BackgroundLoad, CpuLoadProbe, NoiseConfig, coefficient_of_variation, wait_for_quiet
from advisor.profiler import SweepConfig, WorkloadShape, measure
from tests.factories import FakeRunner, make_profile, step_ms


class NoisyRunner(FakeRunner):
    """A fake engine whose rounds run `slowdowns[i]` times slower, call by call (then steady)."""

    def __init__(self, slowdowns, **kw):
        super().__init__(**kw)
        self.slowdowns = list(slowdowns)

    def run(self, batch, shape):
        m = super().run(batch, shape)
        k = self.slowdowns.pop(0) if self.slowdowns else 1.0
        return m.model_copy(update={"wall_s": m.wall_s * k, "decode_window_s": m.decode_window_s * k,
                                    "tpot_ms": [t * k for t in m.tpot_ms]})


class FakeProbe:
    """A `LoadProbe` reporting the given background cores, one value per window (then the last)."""

    def __init__(self, cores, total=2):
        self.cores = list(cores)
        self.total = total
        self.windows = 0

    def start(self):
        pass

    def stop(self):
        self.windows += 1
        c = self.cores.pop(0) if len(self.cores) > 1 else self.cores[0]
        return BackgroundLoad(cpu_cores=c, cores=self.total)


CFG = SweepConfig(min_tokens_per_point=1, noise=NoiseConfig(max_cv=0.10, max_tries=3, rounds_per_try=2))


def test_a_quiet_point_is_measured_once_and_records_its_spread():
    runner = FakeRunner()
    p = measure(runner, 8, WorkloadShape(), None, CFG, FakeProbe([0.05]))
    assert runner.calls == [8, 8]  # one try of two rounds
    assert p.noise.tries == 1 and p.noise.cv == pytest.approx(0.0) and not p.noise.noisy
    assert p.noise.background_cores == pytest.approx(0.05)


def test_rounds_that_disagree_are_measured_again_until_they_agree():
    runner = NoisyRunner([1.0, 1.6, 1.6, 1.6])  # the first try's rounds differ by 60%, the second agrees
    p = measure(runner, 8, WorkloadShape(), None, CFG)
    assert runner.calls == [8] * 4
    assert p.noise.tries == 2 and not p.noise.noisy and p.noise.cv < 0.10
    assert p.tokens_per_s == pytest.approx(8 * 1000 / 1.6 / step_ms(8, WorkloadShape().context_tokens))


def test_a_point_that_never_settles_is_kept_as_its_least_spread_try_and_marked_noisy():
    runner = NoisyRunner([1.0, 2.0, 1.0, 1.5, 1.0, 3.0])
    p = measure(runner, 8, WorkloadShape(), None, CFG)
    assert p.noise.tries == 3 and p.noise.noisy
    assert "CV" in p.noise.reason
    assert p.noise.cv == pytest.approx(coefficient_of_variation([1.0, 1 / 1.5]))  # the second try


def test_background_load_flags_a_point_even_when_its_rounds_agree():
    # A steady busy loop slows every round alike: only the background load can tell.
    p = measure(FakeRunner(), 8, WorkloadShape(), None, CFG, FakeProbe([1.0]))
    assert p.noise.noisy and p.noise.tries == 3
    assert "1.00 of 2 cores" in p.noise.reason


def test_a_profile_under_interference_is_flagged_and_untrusted_a_quiet_one_is_trusted():
    quiet = make_profile(FakeRunner(), cfg=CFG, probe=FakeProbe([0.1]))
    assert quiet.trusted and not quiet.noise.flagged and quiet.noise.max_background_cores == pytest.approx(0.1)
    busy = make_profile(FakeRunner(), cfg=CFG, probe=FakeProbe([0.1, 0.1, 0.1, 1.0]))
    assert busy.noise.flagged and not busy.trusted
    assert busy.noise.noisy_batches and "interference" in busy.noise.reason
    legacy = quiet.model_copy(update={"noise": None})  # stored before noise was recorded
    assert not legacy.trusted and "no noise record" in legacy.distrust_reason


def test_the_noise_record_survives_the_store(tmp_path):
    from advisor.store import ProfileStore, StoreKey

    busy = make_profile(FakeRunner(), cfg=CFG, probe=FakeProbe([1.0]))
    ProfileStore(tmp_path).put_profile(busy)
    again = ProfileStore(tmp_path).get_profile(StoreKey.of(busy))
    assert again.noise == busy.noise and again.noise.flagged and not again.trusted


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t

    def sleep(self, s):
        self.t += s


def test_wait_for_quiet_waits_while_others_load_the_device_and_logs_progress():
    clock, lines = FakeClock(), []
    probe = FakeProbe([1.2, 0.9, 0.8, 0.1])
    cfg = NoiseConfig(quiet_window_s=5, quiet_log_every_s=10, quiet_timeout_s=100)
    wait = wait_for_quiet(probe, cfg, lines.append, clock.sleep, clock)
    assert wait.quiet and probe.windows == 4 and wait.waited_s == pytest.approx(20)
    assert any("waiting for a quiet device" in line and "1.20 of 2 cores" in line for line in lines)
    assert "quiet after 20 s" in lines[-1]


def test_wait_for_quiet_gives_up_after_its_timeout():
    clock, lines = FakeClock(), []
    wait = wait_for_quiet(FakeProbe([1.5]), NoiseConfig(quiet_window_s=5, quiet_timeout_s=30), lines.append,
                          clock.sleep, clock)
    assert not wait.quiet and wait.waited_s == pytest.approx(30) and "still busy" in lines[-1]


def test_cpu_load_probe_sees_a_busy_loop_that_is_not_ours():
    import os

    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        probe = CpuLoadProbe(lambda: [os.getpid()])
        probe.start()
        time.sleep(1.5)  # the measurement window
        load = probe.stop()
    finally:
        hog.kill()
        hog.wait()
    assert load.cpu_cores >= 0.5  # the loop burns about one core; other tenants only add to it


def test_plan_model_reprofiles_instead_of_reusing_a_flagged_profile(tmp_path):
    from deployments.engine import vllm_version
    from deployments.profiling import AdvisorRequest, _memory, device_name, plan_model

    req = AdvisorRequest(model="smollm2-135m", store_dir=str(tmp_path), share_point=False)
    _, memory = _memory(req)
    key = dict(model=req.model, device_name=device_name(req), engine_version=vllm_version(), dtype=memory.dtype)
    clean = make_profile(FakeRunner(), cfg=CFG, probe=FakeProbe([0.0]), **key)
    flagged = make_profile(FakeRunner(), cfg=CFG, probe=FakeProbe([1.0]), **key)
    calls, lines = [], []

    def profiler(r, log):
        calls.append(r)
        return clean, req.store().put_profile(clean)

    req.store().put_profile(flagged)
    plan = plan_model(req, lines.append, profiler)
    assert len(calls) == 1 and any("not reusing the stored profile" in line for line in lines)
    assert not plan.provisional
    plan_model(req, lines.append, profiler)  # now the clean one is stored: reused
    assert len(calls) == 1


def test_the_advisor_does_not_cache_a_provisional_plan():
    import asyncio

    from advisor.actor import Advisor, DeviceResources
    from advisor.planner import DeviceSpec, plan_replicas
    from advisor.profiler import WorkloadShape

    plan = plan_replicas(make_profile(), DeviceSpec(kind="cpu", name="c", memory_bytes=8 << 30, cores=2))
    made = []

    def plan_fn(request, log):
        made.append(request)
        return plan.model_copy(update={"provisional": len(made) == 1})  # the first from a noisy profile

    class LocalAdvisor(Advisor):  # the device task runs inline instead of as a Ray task
        @staticmethod
        async def _on_device(fn, request, resources):
            return fn(request, print)

    advisor, request = LocalAdvisor(plan_fn), WorkloadShape()
    for _ in range(3):
        asyncio.run(advisor.get_plan(request, DeviceResources()))
    assert len(made) == 2  # the provisional plan was made again, the clean one then served from the cache


def test_callers_asking_the_advisor_for_one_plan_at_once_share_one_device_task():
    import asyncio

    from advisor.actor import Advisor, DeviceResources
    from advisor.planner import DeviceSpec, plan_replicas
    from advisor.profiler import WorkloadShape

    plan = plan_replicas(make_profile(), DeviceSpec(kind="cuda", name="g", memory_bytes=8 << 30))
    made = []

    class LocalAdvisor(Advisor):
        @staticmethod
        async def _on_device(fn, request, resources):
            made.append(request)
            await asyncio.sleep(0.05)  # the device task takes a while
            return plan

    async def together():
        advisor = LocalAdvisor(lambda r, log: plan)
        asks = [(WorkloadShape(), DeviceResources()), (WorkloadShape(), DeviceResources()),
                (WorkloadShape(prompt_tokens=1000), DeviceResources()),
                (WorkloadShape(), DeviceResources(accelerator_type="L4"))]
        return await asyncio.gather(*(advisor.get_plan(s, r) for s, r in asks))

    assert asyncio.run(together()) == [plan] * 4
    # the two equal asks shared one task; another shape, and the same shape on another device type, got their own
    assert len(made) == 3
