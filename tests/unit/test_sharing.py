"""How engines share a GPU: detection from the host (pure over a probe, and the probe over a fake
NVML and a pipe directory), and what the planner makes of each mode and of a measured gain."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from advisor.planner import DeviceSpec, plan_replicas
from advisor.profiler import MeasuredGain
from advisor.sharing import (
    MPS_CONTROL_PIPE,
    NVML_COMPUTEMODE_EXCLUSIVE_PROCESS,
    SharingProbe,
    detect_sharing,
    mps_thread_percentage,
    probe_sharing,
)
from tests.factories import make_profile

GIB = 2**30
H100 = DeviceSpec(kind="cuda", name="H100", memory_bytes=80 * GIB)


def gpu_profile(sharing, bw=None, busy=None, measured=None):
    p = make_profile()
    pts = [q.model_copy(update={"dram_bw_util": bw, "gpu_busy": busy}) for q in p.points]
    return p.model_copy(update={"points": pts, "sharing": sharing, "measured_gain": measured})


# ---- detection ------------------------------------------------------------------------------
def test_a_control_pipe_in_the_pipe_directory_means_mps():
    d = detect_sharing(SharingProbe(pipe_directory="/tmp/nvidia-mps", control_pipe=True))
    assert d.mode == "mps" and "/tmp/nvidia-mps" in d.reason


def test_without_a_control_pipe_engines_time_slice_and_the_reason_says_how_to_start_mps():
    d = detect_sharing(SharingProbe(pipe_directory="/tmp/nvidia-mps", control_pipe=False, compute_mode=0))
    assert d.mode == "time-slice" and "nvidia-cuda-mps-control -d" in d.reason


def test_an_mps_server_this_environment_cannot_reach_is_named_with_the_fix():
    d = detect_sharing(SharingProbe(pipe_directory="/tmp/nvidia-mps", control_pipe=False, mps_server_on_device=True))
    assert d.mode == "time-slice" and "CUDA_MPS_PIPE_DIRECTORY" in d.reason


def test_exclusive_process_without_mps_holds_one_engine_but_mps_lifts_it():
    probe = SharingProbe(pipe_directory="/p", control_pipe=False, compute_mode=NVML_COMPUTEMODE_EXCLUSIVE_PROCESS)
    assert detect_sharing(probe).mode == "exclusive"
    assert detect_sharing(probe.model_copy(update={"control_pipe": True})).mode == "mps"


class ProcNvml:
    def __init__(self, names, mode=0):
        self.names, self.mode = names, mode

    def nvmlDeviceGetComputeMode(self, handle):
        return self.mode

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        return [SimpleNamespace(pid=pid) for pid in self.names]

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle):
        raise RuntimeError("Not Supported")

    def nvmlSystemGetProcessName(self, pid):
        if self.names[pid] is None:
            raise RuntimeError("Not Found")  # a pid of another namespace
        return self.names[pid].encode()


def test_probe_reads_the_pipe_directory_of_the_environment_and_the_gpu_processes(tmp_path):
    pipes = tmp_path / "mps"
    pipes.mkdir()
    env = {"CUDA_MPS_PIPE_DIRECTORY": str(pipes)}
    nvml = ProcNvml({11: "/usr/bin/nvidia-cuda-mps-server", 12: None})
    probe = probe_sharing(env, nvml, handle="gpu0")
    assert probe.pipe_directory == str(pipes) and not probe.control_pipe
    assert probe.mps_server_on_device and probe.compute_mode == 0
    (pipes / MPS_CONTROL_PIPE).touch()
    assert probe_sharing(env, nvml, handle="gpu0").control_pipe
    assert probe_sharing({}, None).pipe_directory == "/tmp/nvidia-mps"


def test_mps_thread_percentage_is_an_equal_share_rounded_up():
    assert [mps_thread_percentage(n) for n in (1, 2, 3, 8)] == [100, 50, 34, 13]
    with pytest.raises(ValueError, match="replicas_per_device 0"):
        mps_thread_percentage(0)


# ---- planning by mode -----------------------------------------------------------------------
def test_mps_packs_up_to_the_bandwidth_share_and_caps_each_replicas_sms():
    plan = plan_replicas(gpu_profile("mps", bw=30.0, busy=95.0), H100)
    assert plan.replicas_per_device == 4 and plan.sharing == "mps"
    assert plan.mps_thread_percentage == 25
    assert any(r.startswith("MPS:") for r in plan.reasons)


def test_time_slicing_is_bounded_by_how_busy_one_engine_keeps_the_gpu():
    # 30% of the bandwidth would allow 4 under MPS; time-slicing with the GPU busy 80% allows 1.25x
    plan = plan_replicas(gpu_profile("time-slice", bw=30.0, busy=80.0), H100)
    assert plan.replicas_per_device == 2 and plan.sharing == "time-slice"
    assert any("start MPS" in w for w in plan.warnings)
    assert plan.mps_thread_percentage is None
    t = make_profile().knee.tokens_per_s_at_b_star
    assert plan.predicted_aggregate_tokens_per_s == pytest.approx(t * 1.25)
    busy = plan_replicas(gpu_profile("time-slice", bw=30.0, busy=99.0), H100)
    assert busy.replicas_per_device == 1


def test_time_slicing_without_a_busy_reading_predicts_no_gain_and_says_what_decides():
    plan = plan_replicas(gpu_profile("time-slice", bw=30.0, busy=None), H100)
    assert plan.replicas_per_device == 1
    assert any("no GPU busy reading" in r and "plateau doctor" in r and "two engines" in r for r in plan.reasons)


def test_gpm_unusable_is_said_loudly_with_the_fix():
    plan = plan_replicas(gpu_profile("mps"), H100)
    assert plan.replicas_per_device == 1
    assert any("NVML GPM gave no readings" in r and "plateau doctor" in r for r in plan.reasons)
    assert len(plan.warnings) == 1 and "NVML GPM gave no readings" in plan.warnings[0]
    assert plan_replicas(gpu_profile("mps", bw=30.0), H100).warnings == []


def test_an_exclusive_process_gpu_gets_one_engine_whatever_the_readings():
    plan = plan_replicas(gpu_profile("exclusive", bw=10.0, busy=20.0), H100)
    assert plan.replicas_per_device == 1
    assert any("EXCLUSIVE_PROCESS" in r for r in plan.reasons)


def _gain(replicas, gain, batch=32):
    return MeasuredGain(replicas=replicas, batch=batch, single_tokens_per_s=1000.0,
                        aggregate_tokens_per_s=1000.0 * (1 + gain))


def test_a_measured_loss_overrides_a_predicted_gain():
    plan = plan_replicas(gpu_profile("time-slice", bw=30.0, busy=50.0, measured=_gain(2, -0.04)), H100)
    assert plan.replicas_per_device == 1
    assert any("measured on the device (time-slice)" in r and "-4%" in r for r in plan.reasons)


def test_a_measured_gain_without_readings_packs_and_caps_at_what_was_measured():
    plan = plan_replicas(gpu_profile("mps", measured=_gain(2, 0.30)), H100)
    t = make_profile().knee.tokens_per_s_at_b_star
    assert plan.replicas_per_device == 2
    assert plan.predicted_aggregate_tokens_per_s == pytest.approx(t * 1.30)
    assert plan.mps_thread_percentage == 50


def test_a_measured_gain_decides_over_the_model_and_no_unmeasured_n_is_credited():
    plan = plan_replicas(gpu_profile("mps", bw=20.0, measured=_gain(4, 0.10)), H100)
    t = make_profile().knee.tokens_per_s_at_b_star
    # the model says up to 5x; measured, 4 engines gave 1.10x: N=4 at 1.10x, and N=2 or 3 (never measured) no gain
    assert plan.replicas_per_device == 4
    assert plan.predicted_aggregate_tokens_per_s == pytest.approx(t * 1.10)
    small = plan_replicas(gpu_profile("mps", bw=20.0, measured=_gain(4, 0.04)), H100)
    assert small.replicas_per_device == 1  # below min_gain: one engine


# ---- what a GPU plan still needs measured ---------------------------------------------------
def test_a_gpu_plan_without_a_measured_gain_measures_at_least_two_engines():
    from advisor.planner import gain_check

    one = gpu_profile("time-slice")  # no readings: the model predicts N=1
    plan = plan_replicas(one, H100)
    check = gain_check(one, H100, plan)
    assert plan.replicas_per_device == 1
    assert check.replicas == 2 and check.batch == one.knee.b_star
    four = gpu_profile("mps", bw=30.0)
    plan4 = plan_replicas(four, H100)
    check4 = gain_check(four, H100, plan4)
    assert (check4.replicas, check4.batch, check4.kv_cache_bytes) == (4, plan4.max_num_seqs, plan4.kv_cache_bytes)


def test_no_gain_check_once_measured_on_cpus_on_exclusive_gpus_or_where_two_do_not_fit():
    from advisor.planner import gain_check

    measured = gpu_profile("mps", measured=_gain(2, 0.2))
    assert gain_check(measured, H100, plan_replicas(measured, H100)) is None
    exclusive = gpu_profile("exclusive")
    assert gain_check(exclusive, H100, plan_replicas(exclusive, H100)) is None
    cpu = DeviceSpec(kind="cpu", name="cpu", memory_bytes=64 * GIB, cores=8)
    p = make_profile()
    assert gain_check(p, cpu, plan_replicas(p, cpu)) is None
    one = gpu_profile("time-slice")
    per_replica = plan_replicas(one, H100).memory_per_replica_bytes
    small = DeviceSpec(kind="cuda", name="small", memory_bytes=int(1.5 * per_replica / 0.9))
    assert gain_check(one, small, plan_replicas(one, small)) is None


# ---- the plan on a GPU: detection, one measured check, kept with the profile -----------------
def test_plan_model_on_a_gpu_measures_once_keeps_the_gain_and_plans_by_it(tmp_path, monkeypatch):
    from advisor.noise import NoiseConfig, ProfileNoise
    from deployments import profiling
    from deployments.engine import vllm_version
    from deployments.profiling import AdvisorRequest, _memory, device_name, plan_model

    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", str(tmp_path / "no-mps"))
    req = AdvisorRequest(model="smollm2-135m", device="cuda", store_dir=str(tmp_path), device_memory=80 * GIB)
    _, memory = _memory(req)
    key = dict(model=req.model, device_name=device_name(req), engine_version=vllm_version(), dtype=memory.dtype)
    quiet = ProfileNoise(limits=NoiseConfig(), worst_cv=0.0, flagged=False, reason="quiet")
    profile = make_profile(**key).model_copy(update={"sharing": "time-slice", "noise": quiet, "mode": req.mode})
    pts = [q.model_copy(update={"dram_bw_util": 20.0, "gpu_busy": 50.0}) for q in profile.points]
    profile = profile.model_copy(update={"points": pts})
    measured, lines = [], []

    def measure(req_, folder, memory_, prof, n, batch, kv, log):
        measured.append((n, batch, prof.sharing))
        return 1000.0, 960.0  # two engines lose 4% on this GPU

    monkeypatch.setattr(profiling, "_measure_replicas", measure)
    plan = plan_model(req, lines.append, lambda r, log: (profile, req.store().put_profile(profile)))
    assert any("GPU sharing: time-slicing" in line for line in lines)
    assert measured == [(2, plan.max_num_seqs, "time-slice")]  # the model said 2 (busy 50%): measured, lost
    assert plan.replicas_per_device == 1 and plan.sharing == "time-slice"
    kept = req.store().find(req.model, key["device_name"], vllm_version(), memory.dtype, req.shape.bucket,
                            mode=req.mode, sharing="time-slice")
    assert kept.measured_gain.replicas == 2 and kept.measured_gain.gain == pytest.approx(-0.04)
    again = plan_model(req, lines.append, lambda r, log: pytest.fail("profiled again"))
    assert len(measured) == 1 and again.replicas_per_device == 1  # reused: no second measurement


def test_engines_under_mps_get_their_sm_share_through_the_seam():
    from deployments.engine import engine_env
    from tests.factories import make_spec

    assert engine_env(make_spec(device_kind="cuda", mps_thread_percentage=50), None)[
        "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "50"
    assert "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE" not in engine_env(make_spec(device_kind="cuda"), None)


def test_an_uncapped_engine_started_after_a_capped_one_in_the_same_process_is_not_capped():
    from deployments.engine import apply_engine_env
    from tests.factories import make_spec

    environ = {"PATH": "/bin"}
    apply_engine_env(make_spec(device_kind="cuda", mps_thread_percentage=50), None, environ)
    assert environ["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "50"
    apply_engine_env(make_spec(device_kind="cuda"), None, environ)  # e.g. the one-engine baseline after
    assert "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE" not in environ and environ["PATH"] == "/bin"


def test_each_packing_variant_under_mps_caps_its_engines_at_its_share():
    from cluster.inventory import Device, Inventory
    from deployments.cluster_view import ClusterView
    from deployments.config import parse_args
    from deployments.layout import layout_model

    cluster = ClusterView(gpus=1, cpus_per_node=4, engine_device="cuda")
    inv = Inventory(devices=[Device(name="h/gpu0", node_id="h", kind="cuda", model_name="H100",
                                    memory_bytes=80 * GIB, memory_source="nvml", cores=0)])
    m = parse_args({"models": [{"replicas_per_device": 1, "variants": [1, 2, 4]}]}).models[0]
    lay = layout_model(m, cluster, inv, "cuda", gpu_profile("mps", bw=30.0))
    assert {n: s.mps_thread_percentage for n, s in lay.specs.items()} == {1: None, 2: 50, 4: 25}
    slicing = layout_model(m, cluster, inv, "cuda", gpu_profile("time-slice", bw=30.0, busy=50.0))
    assert all(s.mps_thread_percentage is None for s in slicing.specs.values())
    # the plan says MPS but its profile is not readable on the node that builds the app
    fixed = parse_args({"models": [{"replicas_per_device": 2}]}).models[0]
    assert layout_model(fixed, cluster, inv, "cuda", None, sharing="mps").specs[2].mps_thread_percentage == 50


def gpu_request(tmp_path, monkeypatch):
    """A CUDA plan request on a GPU without MPS whose trusted profile (no measured gain) is stored."""
    from advisor.noise import NoiseConfig, ProfileNoise
    from deployments.engine import vllm_version
    from deployments.profiling import AdvisorRequest, _memory, device_name

    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", str(tmp_path / "no-mps"))
    req = AdvisorRequest(model="smollm2-135m", device="cuda", store_dir=str(tmp_path), device_memory=80 * GIB)
    _, memory = _memory(req)
    key = dict(model=req.model, device_name=device_name(req), engine_version=vllm_version(), dtype=memory.dtype)
    quiet = ProfileNoise(limits=NoiseConfig(), worst_cv=0.0, flagged=False, reason="quiet")
    profile = make_profile(**key).model_copy(update={"sharing": "time-slice", "noise": quiet, "mode": req.mode})
    req.store().put_profile(profile)
    return req, profile


def test_a_plan_made_beside_serving_replicas_measures_nothing_and_says_so(tmp_path, monkeypatch):
    from deployments import profiling
    from deployments.profiling import plan_model

    req, _ = gpu_request(tmp_path, monkeypatch)
    monkeypatch.setattr(profiling, "_measure_replicas", lambda *a: pytest.fail("an engine started beside replicas"))
    plan = plan_model(req, lambda line: None, profiler=lambda r, log: pytest.fail("profiled"), measure_gain=False)
    assert any("not measured yet" in w and "beside serving replicas" in w for w in plan.warnings)


def test_a_gain_that_cannot_be_measured_leaves_the_models_plan_with_a_warning_and_stores_nothing(tmp_path, monkeypatch):
    from deployments import profiling
    from deployments.profiling import AdvisorError, plan_model

    req, profile = gpu_request(tmp_path, monkeypatch)

    def fails(*args):
        raise AdvisorError("2 engine(s) of 40.0 GiB each need 80.0 GiB")

    monkeypatch.setattr(profiling, "_measure_replicas", fails)
    plan = plan_model(req, lambda line: None)
    assert plan.replicas_per_device == 1 and any("could not be measured" in w and "80.0 GiB" in w for w in plan.warnings)
    assert req.store().find(profile.model, profile.device_name, profile.engine_version, profile.dtype,
                            req.shape.bucket, mode=req.mode, sharing="time-slice").measured_gain is None


def test_a_control_socket_nobody_answers_on_is_a_crashed_daemon_not_mps(tmp_path):
    import socket as so

    from advisor.sharing import control_socket_answers

    pipes = tmp_path / "mps"
    pipes.mkdir()
    path = pipes / MPS_CONTROL_PIPE
    listener = so.socket(so.AF_UNIX, so.SOCK_SEQPACKET)
    listener.bind(str(path))
    listener.listen(1)
    assert control_socket_answers(path)
    env = {"CUDA_MPS_PIPE_DIRECTORY": str(pipes)}
    assert detect_sharing(probe_sharing(env)).mode == "mps"
    listener.close()  # the daemon is gone; its socket file stays
    assert path.exists() and not control_socket_answers(path)
    d = detect_sharing(probe_sharing(env))
    assert d.mode == "time-slice" and "no MPS control daemon answers" in d.reason
