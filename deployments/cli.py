"""The `plateau` command line.

  plateau models list               embedded models and whether they are provisioned
  plateau models pull NAME          provision an embedded model (idempotent)
  plateau config check FILE         validate a Serve config's plateau-serve args without starting
  plateau memory MODEL              weight and KV bytes from config.json (pure, no engine)
  plateau profile MODEL             real engine sweep: throughput/latency vs batch, B*, step-time fit
  plateau plan MODEL                N per device, memory and batch per replica, with reasons
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional, Sequence


def _models_list(_: argparse.Namespace) -> int:
    from deployments.models import EMBEDDED, is_pulled, model_dir

    rows = [
        {"name": m.name, "pulled": is_pulled(m.name), "path": str(model_dir(m.name)), "description": m.description}
        for m in EMBEDDED.values()
    ]
    print(json.dumps(rows, indent=2))
    return 0


def _models_pull(ns: argparse.Namespace) -> int:
    from deployments.models import ModelNotFound, pull

    try:
        path = pull(ns.name)
    except ModelNotFound as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


def _config_check(ns: argparse.Namespace) -> int:
    import yaml

    from deployments.app import AppConfigError, parse_args

    path = Path(ns.file)
    if not path.is_file():
        print(f"error: {path} does not exist", file=sys.stderr)
        return 2
    doc = yaml.safe_load(path.read_text()) or {}
    apps = [a for a in doc.get("applications", []) if str(a.get("import_path", "")).startswith("deployments.app:")]
    if not apps:
        print(f"error: {path} has no application with import_path deployments.app:build_app", file=sys.stderr)
        return 2
    for app in apps:
        try:
            args = parse_args(app.get("args"))
        except AppConfigError as exc:
            print(f"{path}: application {app.get('name')!r}: {exc}", file=sys.stderr)
            return 1
        print(json.dumps({"application": app.get("name"), "args": args.model_dump(mode="json")}, indent=2))
    return 0


def _err(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def _model_folder(reference: str) -> Path:
    from deployments.models import resolve_model

    return resolve_model(reference)


def _memory(ns: argparse.Namespace) -> int:
    from advisor.memory import ModelConfigError, memory_model
    from deployments.models import ModelNotFound

    try:
        m = memory_model(_model_folder(ns.model), dtype=ns.dtype, device_kind=ns.device_kind,
                         max_model_len=ns.max_model_len)
    except (ModelConfigError, ModelNotFound) as exc:
        return _err(str(exc))
    out = m.model_dump()
    out["kv_block_bytes"] = m.kv_block_bytes
    out["kv_bytes_at_max_model_len"] = m.kv_bytes_per_token * m.max_model_len
    print(json.dumps(out, indent=2), flush=True)
    return 0


def device_name(device: str) -> str:
    """Stable name of the device a profile is measured on (a key of the profile store)."""
    if device == "cpu":
        import platform

        cpu = platform.processor() or "cpu"
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        return f"cpu:{cpu} x{len(os.sched_getaffinity(0))}"
    from advisor.nvml import gpu_sampler

    sampler = gpu_sampler(_cuda_index(device))
    return f"cuda:{sampler.name}" if sampler else device


def _cuda_index(device: str) -> int:
    return int(device.split(":", 1)[1]) if ":" in device else 0


class CliError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


def _device_kind(device: str) -> str:
    if device != "cpu" and not device.startswith("cuda"):
        raise CliError(f"--device {device!r}: use cpu or cuda[:INDEX]")
    return "cpu" if device == "cpu" else "cuda"


def run_profile(ns: argparse.Namespace):
    """Profile ns.model on ns.device, store it, and return (profile, store path)."""
    from advisor.memory import ModelConfigError, memory_model
    from advisor.nvml import gpu_sampler
    from advisor.plateau import PlateauRules
    from advisor.profiler import SweepConfig, WorkloadShape, build_profile
    from deployments.engine import vllm_version
    from deployments.models import ModelNotFound
    from deployments.profiling import VllmBatchRunner, profiling_spec

    kind = _device_kind(ns.device)
    try:
        folder = _model_folder(ns.model)
        memory = memory_model(folder, dtype=ns.dtype, device_kind=kind)
    except (ModelConfigError, ModelNotFound) as exc:
        raise CliError(str(exc)) from None
    shape = WorkloadShape(prompt_tokens=ns.prompt_tokens, output_tokens=ns.output_tokens)
    rules = PlateauRules(tpot_p99_slo_ms=ns.tpot_slo_ms)
    extra = {"load_format": "dummy", "skip_tokenizer_init": True} if ns.dummy else {}
    spec = profiling_spec(str(folder), memory, shape, ns.max_batch, kind, ns.max_kv_bytes, dtype=memory.dtype,
                          engine_kwargs=extra)
    sampler = gpu_sampler(_cuda_index(ns.device)) if kind == "cuda" else None
    print(f"[profile] starting one engine on {ns.device} (max batch {ns.max_batch}, KV {spec.kv_cache_bytes / 2**20:.0f} MiB)",
          file=sys.stderr, flush=True)

    def progress(p, i):
        bar = "#" * i + "." * max(0, 11 - i)
        print(f"[profile] [{bar}] point {i}: batch {p.batch:4d} ctx {p.context_tokens:6.0f} -> {p.tokens_per_s:8.1f} tok/s, "
              f"TPOT p50 {p.tpot_p50_ms:7.1f} ms, KV {p.kv_usage:5.1%}", file=sys.stderr, flush=True)

    with VllmBatchRunner(spec) as runner:
        kv_allocated = runner.num_kv_blocks * runner.kv_block_tokens * memory.kv_bytes_per_token
        overhead = max(0, runner.engine_memory_bytes() - memory.weight_bytes - kv_allocated)
        try:
            profile = build_profile(
                runner, shape, rules, model=ns.model, device_name=device_name(ns.device),
                engine_version=vllm_version(), dtype=memory.dtype, weight_bytes=memory.weight_bytes,
                kv_bytes_per_token=memory.kv_bytes_per_token, overhead_bytes=overhead,
                cfg=SweepConfig(max_points=ns.max_points), sampler=sampler, progress=progress,
            )
        except ValueError as exc:  # e.g. no batch size meets the SLO
            raise CliError(str(exc)) from None
    if kind == "cpu" and ns.share_point:
        profile = _with_share_point(profile, spec, shape, progress)
    path = _store(ns).put_profile(profile)
    return profile, path


def _store(ns: argparse.Namespace):
    from advisor.store import ProfileStore
    from deployments.models import plateau_home

    return ProfileStore(Path(ns.store) if ns.store else plateau_home() / "profiles")


def _profile(ns: argparse.Namespace) -> int:
    from advisor.store import StoreKey

    profile, path = run_profile(ns)
    out = profile.model_dump(mode="json")
    out["b_star"] = profile.b_star
    out["stored_at"] = str(path)
    out["store_key"] = StoreKey.of(profile).model_dump()
    print(json.dumps(out, indent=2), flush=True)
    return 0


def _plan(ns: argparse.Namespace) -> int:
    import psutil

    from advisor.memory import memory_model
    from advisor.planner import DeviceSpec, PlanError, plan_replicas
    from advisor.profiler import Profile, WorkloadShape
    from deployments.engine import vllm_version

    kind = _device_kind(ns.device)
    shape = WorkloadShape(prompt_tokens=ns.prompt_tokens, output_tokens=ns.output_tokens)
    dtype = memory_model(_model_folder(ns.model), dtype=ns.dtype, device_kind=kind).dtype
    name = device_name(ns.device)
    stored = _store(ns).find(ns.model, name, vllm_version(), dtype, shape.bucket)
    if stored is None or ns.reprofile:
        print("[plan] no stored profile for this model/device/engine/dtype: profiling first", file=sys.stderr)
        stored, _ = run_profile(ns)
    profile: Profile = stored
    if ns.tpot_slo_ms is not None and ns.tpot_slo_ms != profile.rules.tpot_p99_slo_ms:
        from advisor.plateau import find_knee

        rules = profile.rules.model_copy(update={"tpot_p99_slo_ms": ns.tpot_slo_ms})
        try:
            profile = profile.model_copy(update={"rules": rules, "knee": find_knee(profile.points, rules)})
        except ValueError as exc:
            raise CliError(str(exc)) from None
    if ns.device_memory:
        memory_bytes = ns.device_memory
    elif kind == "cpu":
        memory_bytes = psutil.virtual_memory().total
    else:
        from advisor.nvml import gpu_sampler

        sampler = gpu_sampler(_cuda_index(ns.device))
        if sampler is None:
            raise CliError("no NVIDIA GPU found through NVML; pass --device-memory BYTES")
        memory_bytes = sampler.memory_total
    device = DeviceSpec(kind=kind, name=name, memory_bytes=memory_bytes,
                        cores=len(os.sched_getaffinity(0)) if kind == "cpu" else 0)
    try:
        plan = plan_replicas(profile, device, shape)
    except PlanError as exc:
        raise CliError(str(exc)) from None
    print(json.dumps(plan.model_dump(mode="json"), indent=2), flush=True)
    return 0


def _with_share_point(profile, spec, shape, progress):
    """On CPU: B* again on half the cores, so the planner knows how throughput scales with cores."""
    from advisor.profiler import SharePoint, SweepConfig, measure
    from deployments.profiling import VllmBatchRunner

    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        return profile
    half = cores[: len(cores) // 2]
    print(f"[profile] share point: B*={profile.b_star} on {len(half)} of {len(cores)} cores", file=sys.stderr, flush=True)
    with VllmBatchRunner(spec, cores=half) as runner:
        point = measure(runner, profile.b_star, shape, None, SweepConfig())
    progress(point, len(profile.points) + len(profile.fit_points) + 1)
    return profile.model_copy(update={"cores": len(cores), "share_points": [SharePoint(cores=len(half), point=point)]})


def _add_profile_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="embedded name, model folder or hub id")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:INDEX]")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--output-tokens", type=int, default=64)
    p.add_argument("--max-batch", type=int, default=128, help="largest batch the sweep may try")
    p.add_argument("--max-points", type=int, default=8, help="batch sizes in the main sweep, at most")
    p.add_argument("--max-kv-bytes", type=int, default=4 << 30, help="cap on the profiling engine's KV pool")
    p.add_argument("--tpot-slo-ms", type=float, default=None, help="TPOT p99 limit that caps B*")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--dummy", action="store_true", help="random weights (load_format=dummy), token-id prompts")
    p.add_argument("--store", default=None, help="profile store folder (default $PLATEAU_HOME/profiles)")
    p.add_argument("--no-share-point", dest="share_point", action="store_false",
                   help="CPU: skip measuring B* on half the cores (the planner then predicts no gain from N>1)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="plateau", description="plateau-serve: pack vLLM replicas at the bandwidth plateau")
    sub = parser.add_subparsers(dest="command", required=True)

    models = sub.add_parser("models", help="embedded models").add_subparsers(dest="action", required=True)
    models.add_parser("list", help="list embedded models").set_defaults(func=_models_list)
    pull = models.add_parser("pull", help="provision an embedded model")
    pull.add_argument("name", help="embedded model name, e.g. smollm2-135m")
    pull.set_defaults(func=_models_pull)

    config = sub.add_parser("config", help="Serve config files").add_subparsers(dest="action", required=True)
    check = config.add_parser("check", help="validate the plateau-serve args of a Serve config")
    check.add_argument("file", help="path to config.yaml")
    check.set_defaults(func=_config_check)

    mem = sub.add_parser("memory", help="weight and KV bytes of a model (no engine)")
    mem.add_argument("model", help="embedded name, model folder or hub id")
    mem.add_argument("--dtype", default="auto")
    mem.add_argument("--max-model-len", type=int, default=None)
    mem.add_argument("--device-kind", choices=["cuda", "cpu"], default="cuda", help="sets the KV block size")
    mem.set_defaults(func=_memory)

    prof = sub.add_parser("profile", help="measure throughput vs batch with a real engine and find B*")
    _add_profile_args(prof)
    prof.set_defaults(func=_profile)

    plan = sub.add_parser("plan", help="replicas per device, memory and batch per replica (profiles first if needed)")
    _add_profile_args(plan)
    plan.add_argument("--device-memory", type=int, default=None, help="device memory in bytes (default: measured)")
    plan.add_argument("--reprofile", action="store_true", help="profile again even if a stored profile exists")
    plan.set_defaults(func=_plan)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    ns = build_parser().parse_args(argv)
    if ns.command in ("profile", "plan"):
        # vLLM logs every engine start in detail; the CLI reports its own progress.
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    try:
        return int(ns.func(ns))
    except CliError as exc:
        return _err(str(exc))


if __name__ == "__main__":
    sys.exit(main())
