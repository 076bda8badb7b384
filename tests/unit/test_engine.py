import os
import threading
import time

import pytest

from deployments.engine import (
    EngineConfigError,
    check_engine_kwargs,
    cpu_cores_for,
    deployment_options,
    replica_deployment_name,
    device_start_lock,
    engine_args,
    engine_env,
    vllm_engine_arg_names,
)
from deployments.spec import ReplicaResources
from tests.factories import make_spec


def test_engine_args_carry_the_plan_under_vllm_names():
    args = engine_args(make_spec(max_num_seqs=48, kv_cache_bytes=300_000_000, replicas_per_device=4))
    assert args["model"] == "/models/smollm2"
    assert args["served_model_name"] == "smollm2-135m"
    assert args["max_num_seqs"] == 48
    assert args["kv_cache_memory_bytes"] == 300_000_000
    assert args["gpu_memory_utilization"] == pytest.approx(0.9 / 4)
    assert args["max_model_len"] == 2048
    assert args["enforce_eager"] is True


def test_every_engine_arg_is_a_real_vllm_field():
    spec = make_spec(engine_kwargs={"enable_prefix_caching": False})
    assert set(engine_args(spec)) <= vllm_engine_arg_names()


def test_without_kv_bytes_vllm_sizes_the_pool_from_the_share():
    args = engine_args(make_spec(kv_cache_bytes=None, device_kind="cuda", replicas_per_device=2,
                                 device_memory_fraction=0.8))
    assert "kv_cache_memory_bytes" not in args
    assert args["gpu_memory_utilization"] == pytest.approx(0.4)


def test_engine_kwargs_pass_through():
    args = engine_args(make_spec(engine_kwargs={"seed": 7, "enable_prefix_caching": False}))
    assert args["seed"] == 7 and args["enable_prefix_caching"] is False


def test_unknown_engine_kwarg_is_named_with_a_suggestion():
    with pytest.raises(EngineConfigError) as err:
        check_engine_kwargs({"max_num_seq": 4})
    assert "engine_kwargs.max_num_seq" in str(err.value)
    assert "max_num_seqs" in str(err.value)


def test_engine_kwarg_owned_by_the_spec_is_refused():
    with pytest.raises(EngineConfigError) as err:
        check_engine_kwargs({"gpu_memory_utilization": 0.5})
    assert "device_memory_fraction" in str(err.value)


def test_cpu_env_binds_disjoint_cores_and_frees_the_reserved_core():
    env = engine_env(make_spec(device_kind="cpu"), cores=[2, 3])
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "2,3"
    assert env["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    assert "VLLM_CPU_OMP_THREADS_BIND" not in engine_env(make_spec(device_kind="cuda"), cores=None)


@pytest.mark.parametrize(
    "slot,n,available,expected",
    [(0, 2, [0, 1], [0]), (1, 2, [0, 1], [1]), (3, 2, [0, 1], [1]), (1, 2, [0, 1, 2, 3], [2, 3]),
     (2, 4, [0, 1], [0]), (0, 1, [0, 1], [0, 1])],
)
def test_cpu_cores_for_partitions_the_node(slot, n, available, expected):
    assert cpu_cores_for(slot, n, available) == expected


def test_deployment_options_request_a_gpu_share():
    spec = make_spec(device_kind="cuda", replicas_per_device=4, resources=ReplicaResources(num_gpus=0.25, num_cpus=1))
    opts = deployment_options(spec, num_replicas=4)
    assert opts["ray_actor_options"]["num_gpus"] == 0.25
    assert opts["num_replicas"] == 4
    assert opts["max_ongoing_requests"] == spec.max_num_seqs
    assert opts["name"] == "LLM:smollm2-135m@n4"
    cpu_opts = deployment_options(make_spec(), num_replicas=2)
    assert "num_gpus" not in cpu_opts["ray_actor_options"]
    elastic = deployment_options(spec, 0, autoscaling={"min_replicas": 0, "max_replicas": 3})
    assert "num_replicas" not in elastic and elastic["autoscaling_config"]["max_replicas"] == 3


def test_deployment_names_carry_the_variant_and_only_safe_characters():
    assert replica_deployment_name("org/model v2", 3) == "LLM:org_model_v2@n3"


def test_device_start_lock_serializes_engine_starts(tmp_path):
    spans = []

    def start(name):
        with device_start_lock("cuda-0", lock_dir=tmp_path):
            begin = time.monotonic()
            time.sleep(0.2)
            spans.append((begin, time.monotonic()))

    threads = [threading.Thread(target=start, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    spans.sort()
    assert len(spans) == 3
    assert all(a_end <= b_begin for (_, a_end), (b_begin, _) in zip(spans, spans[1:]))


def test_server_kwargs_are_checked_and_reach_vllms_server_args():
    from deployments.engine import EngineConfigError, check_server_kwargs, server_args
    from deployments.spec import ReplicaResources, ReplicaSpec

    with pytest.raises(EngineConfigError, match="did you mean tool_call_parser"):
        check_server_kwargs({"tool_parser": "hermes"})
    with pytest.raises(EngineConfigError, match="ingress"):
        check_server_kwargs({"api_key": "x"})
    spec = ReplicaSpec(served_name="m", model_path="/models/m", device_kind="cpu", replicas_per_device=1,
                       resources=ReplicaResources(), max_num_seqs=4,
                       server_kwargs={"tool_call_parser": "hermes", "enable_auto_tool_choice": True})
    args = server_args(spec)
    assert (args.model, args.served_model_name) == ("/models/m", ["m"])
    assert args.tool_call_parser == "hermes" and args.enable_auto_tool_choice is True


@pytest.mark.parametrize("key,why", [
    ("tensor_parallel_size", "spans devices"), ("pipeline_parallel_size", "spans devices"),
    ("data_parallel_size", "data parallelism"), ("distributed_executor_backend", "distributed executor"),
    ("kv_cache_dtype", "KV bytes per token"), ("hf_overrides", "config.json"),
])
def test_engine_kwargs_that_contradict_packing_are_refused_with_the_reason(key, why):
    with pytest.raises(EngineConfigError, match=f"engine_kwargs.{key}: not supported with replica packing.*{why}"):
        check_engine_kwargs({key: 2}, known=frozenset({key}))


def test_the_one_file_lock_waits_at_most_its_timeout(tmp_path):
    from advisor.locks import file_lock

    lock = tmp_path / "sub" / "x.lock"
    with file_lock(lock):
        with pytest.raises(TimeoutError, match="x.lock: still locked"):
            with file_lock(lock, timeout_s=0.2):  # a second open file description: flock conflicts
                pass
    with file_lock(lock, timeout_s=0.2):
        pass


def test_a_start_that_holds_the_device_lock_too_long_is_named_instead_of_blocking_for_good(tmp_path):
    from deployments.engine import EngineStartTimeout

    # a second open file description conflicts under flock even in this process: a hung start elsewhere
    with device_start_lock("cuda-0", lock_dir=tmp_path):
        with pytest.raises(EngineStartTimeout, match=rf"waited 0.2 s .* held by process {os.getpid()}.*kill {os.getpid()}"):
            with device_start_lock("cuda-0", lock_dir=tmp_path, timeout_s=0.2):
                pass
    with device_start_lock("cuda-0", lock_dir=tmp_path, timeout_s=0.2):  # released with its holder
        pass


def test_a_timeout_inside_the_start_is_not_taken_for_the_lock_wait(tmp_path):
    with pytest.raises(TimeoutError, match="engine core did not answer"):
        with device_start_lock("cuda-0", lock_dir=tmp_path, timeout_s=0.2):
            raise TimeoutError("engine core did not answer")


def test_vllms_logging_setup_leaves_serves_replica_log_file_working(tmp_path):
    """vLLM's dictConfig closes every handler; Serve's replica logger must keep writing to its file (and a
    recovering Serve controller reads that file's path from it)."""
    import logging
    from logging.config import dictConfig
    from logging.handlers import MemoryHandler

    from deployments.engine import serve_log_targets_kept

    serve_logger = logging.getLogger("ray.serve")
    log_file = tmp_path / "replica.log"
    target = logging.FileHandler(log_file)
    buffered = MemoryHandler(capacity=1, target=target)  # as Serve's configure_component_logger sets it up
    serve_logger.addHandler(buffered)
    vllm_like = {"version": 1, "disable_existing_loggers": False,
                 "handlers": {"vllm": {"class": "logging.StreamHandler"}},
                 "loggers": {"vllm": {"handlers": ["vllm"], "level": "INFO", "propagate": False}}}
    try:
        with serve_log_targets_kept():
            dictConfig(vllm_like)  # what AsyncLLM's configure_logging does
        assert buffered.target is target
        serve_logger.warning("after the engine started")
        assert "after the engine started" in log_file.read_text()
    finally:
        serve_logger.removeHandler(buffered)
        target.close()


def test_engine_core_pids_come_from_vllms_handle_on_its_processes_not_their_titles():
    from types import SimpleNamespace

    from deployments.engine import engine_core_pids

    procs = [SimpleNamespace(pid=41), SimpleNamespace(pid=None)]  # a process not started yet has no pid
    engine = SimpleNamespace(engine_core=SimpleNamespace(resources=SimpleNamespace(
        engine_manager=SimpleNamespace(processes=procs))))
    assert engine_core_pids(engine) == [41]
    in_process = SimpleNamespace(engine_core=SimpleNamespace(resources=SimpleNamespace(engine_manager=None)))
    assert engine_core_pids(in_process) == []


def test_the_node_lock_dir_is_this_users_own_and_private(tmp_path):
    import stat

    from advisor.locks import node_lock_dir

    mine = node_lock_dir(base=tmp_path)
    assert mine == tmp_path / f"plateau-{os.getuid()}"
    assert stat.S_IMODE(mine.stat().st_mode) == 0o700
    cores = node_lock_dir("cores", base=tmp_path)
    assert cores == mine / "cores" and stat.S_IMODE(cores.stat().st_mode) == 0o700
    assert node_lock_dir(base=tmp_path) == mine  # there already, and ours: used as is


@pytest.mark.parametrize("prepare,why", [
    (lambda d: (d.mkdir(), d.chmod(0o777)), "writable by other users"),
    (lambda d: (d.mkdir(), d.chmod(0o770)), "writable by other users"),
    (lambda d: ((d.parent / "elsewhere").mkdir(), d.symlink_to(d.parent / "elsewhere")), "a symbolic link"),
])
def test_a_lock_dir_another_user_could_have_prepared_is_refused_naming_it_and_the_fix(tmp_path, prepare, why):
    from advisor.locks import LockDirError, node_lock_dir

    folder = tmp_path / f"plateau-{os.getuid()}"
    prepare(folder)
    with pytest.raises(LockDirError, match=rf"{folder}: {why}.*remove it"):
        node_lock_dir(base=tmp_path)


def test_a_lock_dir_owned_by_another_user_is_a_problem():
    import stat

    from advisor.locks import lock_dir_problem

    assert lock_dir_problem(stat.S_IFDIR | 0o700, owner=1000, uid=1000) is None
    assert "owned by uid 0" in lock_dir_problem(stat.S_IFDIR | 0o700, owner=0, uid=1000)
    assert "writable by other users" in lock_dir_problem(stat.S_IFDIR | 0o755 | stat.S_IWOTH, owner=1000, uid=1000)
    assert "not a folder" in lock_dir_problem(stat.S_IFREG | 0o600, owner=1000, uid=1000)
    assert "symbolic link" in lock_dir_problem(stat.S_IFLNK | 0o777, owner=1000, uid=1000)


def test_device_start_locks_are_taken_in_the_private_lock_dir(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with device_start_lock("cuda-0", timeout_s=1):
        assert (tmp_path / f"plateau-{os.getuid()}" / "cuda-0.lock").is_file()
    assert not (tmp_path / "plateau-locks").exists()


def test_a_lock_file_that_is_a_symlink_is_refused_and_never_written_through(tmp_path):
    from advisor.locks import LockPathError

    victim = tmp_path / "victim"
    victim.write_text("keep\n")
    (tmp_path / "cuda-0.lock").symlink_to(victim)
    with pytest.raises(LockPathError, match=r"cuda-0.lock: a symbolic link.*remove it"):
        with device_start_lock("cuda-0", lock_dir=tmp_path, timeout_s=0.2):
            pass
    assert victim.read_text() == "keep\n"
