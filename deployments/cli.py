"""The `plateau` command line.

  plateau models list               embedded models and whether they are provisioned
  plateau models pull NAME          provision an embedded model (idempotent)
  plateau config check FILE         validate a Serve config's plateau-serve args without starting
  plateau memory MODEL              weight and KV bytes from config.json (pure, no engine)
  plateau profile MODEL             real engine sweep: throughput/latency vs batch, B*, step-time fit
  plateau plan MODEL                N per device, memory and batch per replica, with reasons
  plateau predict MODEL --device D  predicted curve, B*, memory and N-replica gain on a named device (no engine)
  plateau report PROFILE --out DIR  throughput/latency/KV/bandwidth plots of a profile (PNG + HTML)
  plateau pack INPUT.json           place replicas of many models on devices (capacity planning)
  plateau status                    a running app's placement, variants, live readings, last decisions
  plateau stop                      delete the running apps, end the `serve run` that started them and its local Ray
  plateau doctor                    GPU first-hour checks: driver, NVML mapping, GPM, MPS, engines (PASS/FAIL/SKIP)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Mapping, Optional, Sequence


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

    from deployments.config import AppConfigError, open_access_warning, parse_args
    from deployments.autoscale import POLICY_FUNCTION

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
        # args.model_dump shows api_key as ********** (a SecretStr), and api_key_env holds only a variable's
        # name (parse_args refuses anything else): the key is never printed
        print(json.dumps({"application": app.get("name"), "args": args.model_dump(mode="json")}, indent=2))
        try:
            warning = open_access_warning(args)
        except AppConfigError as exc:
            warning = f"{exc} (the server refuses to start without it)"
        if warning is not None:
            print(f"{path}: application {app.get('name')!r}: warning: {warning}", file=sys.stderr)
        policy = (app.get("autoscaling_policy") or {}).get("policy_function", "")
        elastic = [m.served_name for m in args.models if m.elastic]
        if elastic and policy != POLICY_FUNCTION:
            print(f"{path}: application {app.get('name')!r}: models {', '.join(elastic)} set variants or "
                  "min/max_replicas, which needs `autoscaling_policy: {policy_function: "
                  "deployments.autoscale:PlateauAutoscaler}` on the application", file=sys.stderr)
            return 1
    return 0


def _connect(address: str) -> None:
    """Joins the running Ray cluster at `address`. A local `serve run` starts its cluster with Ray's
    token authentication on (Ray >= 2.5x's default) and keeps the token in ~/.ray/auth_token: the token
    is sent whenever this machine has one (as `ray.init()` does for `auto` only), which a cluster
    without authentication ignores. An explicit RAY_AUTH_MODE wins."""
    import ray
    from ray._private.authentication.authentication_token_setup import maybe_enable_token_auth_if_token_available

    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    try:
        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    except (ConnectionError, RuntimeError) as exc:
        raise CliError(f"no Ray cluster at {address!r} ({exc}); start one with `serve run config.yaml`") from None


def _status(ns: argparse.Namespace) -> int:
    import ray

    from cluster.board import find_board, render_status

    _connect(ns.address)
    board = find_board()
    if board is None:
        return _err("no plateau-serve application has started on this cluster (no status board)")
    apps = ray.get(board.status.remote(ns.app), timeout=30)
    if not apps:
        return _err(f"no application {ns.app!r} on the status board" if ns.app else "the status board is empty")
    if ns.json:
        print(json.dumps({name: st.model_dump(mode="json") for name, st in apps.items()}, indent=2))
    else:
        print("\n\n".join(render_status(name, st) for name, st in apps.items()))
    return 0


def _stop(ns: argparse.Namespace) -> int:
    import ray
    from ray import serve

    from deployments.stop import end_drivers, serve_run_drivers

    _connect(ns.address)
    apps = sorted(serve.status().applications)
    drivers = serve_run_drivers()
    if apps:
        print(f"deleting {', '.join(apps)} (each replica stops its engine; up to a minute)", flush=True)
        serve.shutdown()
        print(f"deleted {', '.join(apps)}", flush=True)
    else:
        print("no Serve application runs on this cluster", flush=True)
    ray.shutdown()  # this process leaves the cluster before the local one it may end goes away
    if not drivers:
        print("no `serve run` of this cluster runs on this machine: the Ray cluster keeps running", flush=True)
        return 0
    commands = {d.pid: d.command for d in drivers}
    ended = end_drivers(drivers, timeout_s=ns.timeout)
    for e in ended:
        how = (f"did not end {ns.timeout:.0f} s after SIGTERM: killed, with its process tree" if e.killed
               else "ended, with the local Ray it started")
        print(f"`{commands[e.pid]}` (pid {e.pid}): {how}", flush=True)
        if e.left:
            print(f"  still running, end them with kill -9: {' '.join(map(str, e.left))}", flush=True)
    return 1 if any(e.left for e in ended) else 0


def _doctor(ns: argparse.Namespace) -> int:
    from advisor.nvml import GpuSelectionError, cuda_index
    from deployments.doctor import DoctorOptions, exit_code, run_doctor

    try:
        cuda_index(ns.device)
    except GpuSelectionError as exc:
        raise CliError(str(exc)) from None
    options = DoctorOptions(device=ns.device, quick=ns.quick, **({"model": ns.model} if ns.model else {}))
    results = run_doctor(options, emit=None if ns.json else lambda r: print(r.line(), flush=True))
    if ns.json:
        print(json.dumps([r.model_dump(mode="json") for r in results], indent=2), flush=True)
    return exit_code(results)


class CliError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


def _err(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def _memory(ns: argparse.Namespace) -> int:
    from advisor.memory import ModelConfigError, memory_model
    from deployments.models import ModelNotFound

    from deployments.models import resolve_model

    try:
        m = memory_model(resolve_model(ns.model), dtype=ns.dtype, device_kind=ns.device_kind,
                         max_model_len=ns.max_model_len)
    except (ModelConfigError, ModelNotFound) as exc:
        return _err(str(exc))
    out = m.model_dump()
    out["kv_block_bytes"] = m.kv_block_bytes
    out["kv_bytes_at_max_model_len"] = m.kv_bytes_per_token * m.max_model_len
    print(json.dumps(out, indent=2), flush=True)
    return 0


def _request(ns: argparse.Namespace):
    from advisor.profiler import WorkloadShape
    from deployments.profiling import AdvisorRequest

    return AdvisorRequest(
        model=ns.model, device=ns.device, shape=WorkloadShape(prompt_tokens=ns.prompt_tokens, output_tokens=ns.output_tokens),
        max_batch=ns.max_batch, max_points=ns.max_points, max_kv_bytes=ns.max_kv_bytes, tpot_slo_ms=ns.tpot_slo_ms,
        dtype=ns.dtype, dummy=ns.dummy, share_point=ns.share_point, store_dir=ns.store, enforce_eager=ns.enforce_eager,
        device_memory=getattr(ns, "device_memory", None), reprofile=getattr(ns, "reprofile", False),
        validate_plan=getattr(ns, "validate", False),
    )


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _profile(ns: argparse.Namespace) -> int:
    from advisor.store import StoreKey
    from deployments.profiling import AdvisorError, profile_model

    try:
        profile, path = profile_model(_request(ns), _progress)
    except AdvisorError as exc:
        raise CliError(str(exc)) from None
    out = profile.model_dump(mode="json")
    out["b_star"] = profile.b_star
    out["stored_at"] = str(path)
    out["store_key"] = StoreKey.of(profile).model_dump()
    print(json.dumps(out, indent=2), flush=True)
    return 0


def _plan(ns: argparse.Namespace) -> int:
    from deployments.profiling import AdvisorError, plan_model

    if _named_device(ns.device):
        return _plan_predicted(ns)
    try:
        plan = plan_model(_request(ns), _progress)
    except AdvisorError as exc:
        raise CliError(str(exc)) from None
    print(json.dumps(plan.model_dump(mode="json"), indent=2), flush=True)
    return 0


# ---- devices named in advisor/perf_constants.json: predicted, unless a real profile exists ----
def _named_device(device: str) -> bool:
    """A device name from the performance model's data file (h100-sxm, l4, ...), not cpu / cuda[:INDEX]."""
    from advisor.perfmodel import load_constants

    return device != "cpu" and not device.startswith("cuda") and device in load_constants().devices


def _predicted_model(ns: argparse.Namespace, device_kind: str):
    from advisor.memory import ModelConfigError, memory_model
    from deployments.models import ModelNotFound, resolve_model

    try:
        return memory_model(resolve_model(ns.model), dtype=ns.dtype, device_kind=device_kind)
    except (ModelConfigError, ModelNotFound) as exc:
        raise CliError(str(exc)) from None


def _predict_store(ns: argparse.Namespace):
    from advisor.store import ProfileStore
    from deployments.models import plateau_home

    return ProfileStore(ns.store or plateau_home() / "profiles")


def _predict(ns: argparse.Namespace) -> int:
    from advisor.perfmodel import (
        PerfModelError, engine_for_named_device, load_constants, measure_memory_bandwidth, predict, this_cpu,
    )
    from advisor.profiler import WorkloadShape

    constants = load_constants()
    try:
        dev = constants.device(ns.device)
    except PerfModelError as exc:
        raise CliError(str(exc)) from None
    if ns.device == "cpu":
        dev = this_cpu(dev, measure_memory_bandwidth(), measure_memory_bandwidth(threads=1))
    eng, _ = engine_for_named_device(constants, ns.device, _predict_store(ns), _mem_for(dev.kind))
    try:
        batches = sorted({int(b) for b in ns.batches.split(",")}) if ns.batches else None
        if batches is not None and min(batches) < 1:
            raise ValueError
    except ValueError:
        raise CliError(f"--batches {ns.batches!r}: give positive integers separated by commas, e.g. 1,2,4,8") from None
    if ns.replicas is not None and ns.replicas < 1:
        raise CliError(f"--replicas {ns.replicas}: give 1 or more")
    mem = _predicted_model(ns, dev.kind)
    try:
        shape = WorkloadShape(prompt_tokens=ns.prompt_tokens, output_tokens=ns.output_tokens,
                              output_tokens_cv=ns.output_cv)
    except ValueError:
        raise CliError(f"--output-cv {ns.output_cv}: give the output lengths' standard deviation over their mean, "
                       f"0 to 10 (0: every request generates --output-tokens)") from None
    try:
        out = predict(ns.model, mem, ns.device, dev, eng, shape, **({"batches": batches} if batches else {}),
                      replicas=ns.replicas, sharing=ns.sharing)
    except PerfModelError as exc:
        raise CliError(str(exc)) from None
    print(out.model_dump_json(indent=2), flush=True)
    return 0


def _mem_for(device_kind: str):
    """How the performance model reads a stored profile's model (to recalibrate on it)."""
    from advisor.memory import memory_model
    from deployments.models import resolve_model

    return lambda ref, dtype: memory_model(resolve_model(ref), dtype=dtype, device_kind=device_kind)


def _plan_predicted(ns: argparse.Namespace) -> int:
    from advisor.perfmodel import PerfModelError, load_constants, plan_on_named_device
    from advisor.planner import PlanError
    from advisor.profiler import WorkloadShape

    constants = load_constants()
    dev = constants.device(ns.device)
    mem = _predicted_model(ns, dev.kind)
    shape = WorkloadShape(prompt_tokens=ns.prompt_tokens, output_tokens=ns.output_tokens)
    try:
        plan = plan_on_named_device(ns.model, mem, ns.device, constants, shape, _predict_store(ns), _mem_for(dev.kind))
    except (PerfModelError, PlanError) as exc:
        raise CliError(str(exc)) from None
    if plan.reasons[0].startswith("predicted"):
        plan = plan.model_copy(update={"reasons": plan.reasons + _local_gpu_hint(ns.model, dev)})
    print(json.dumps(plan.model_dump(mode="json"), indent=2), flush=True)
    return 0


def _local_gpu_hint(model: str, dev) -> list[str]:
    """If this machine has the named GPU, say how to measure it (a real profile then wins)."""
    from advisor.nvml import gpu_sampler

    sampler = gpu_sampler("cuda:0")
    if sampler is None or sampler.name not in dev.nvml_names:
        return []
    return [f"this machine has a {sampler.name}: `plateau profile {model} --device cuda:0` measures it, "
            "and the stored profile then wins over the prediction"]


def _report(ns: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from advisor.profiler import Profile
    from advisor.report import write_report
    from deployments.install_check import missing_extra

    missing = missing_extra(("matplotlib",), "report", "`plateau report`")
    if missing:
        raise CliError(missing)
    path = Path(ns.profile)
    if not path.is_file():
        raise CliError(f"{path}: no such file; save `plateau profile ... > profile.json` first")
    try:
        profile = Profile.model_validate_json(_profile_json(path.read_text()))
    except (ValidationError, ValueError) as exc:
        raise CliError(f"{path}: not a plateau profile ({str(exc).splitlines()[0]})") from None
    png, page = write_report(profile, Path(ns.out))
    print(json.dumps({"png": str(png), "html": str(page)}), flush=True)
    return 0


def _profile_json(text: str) -> str:
    """`plateau profile` output adds b_star/stored_at/store_key around the profile itself."""
    doc = json.loads(text)
    for extra in ("b_star", "stored_at", "store_key"):
        doc.pop(extra, None)
    return json.dumps(doc)


def _pack(ns: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from cluster.packing import PackInput, pack

    path = Path(ns.input)
    if not path.is_file():
        raise CliError(f"{path}: no such file")
    try:
        spec = PackInput.model_validate(_with_plans_as_demands(json.loads(path.read_text())))
    except json.JSONDecodeError as exc:
        raise CliError(f"{path}: not valid JSON ({exc})") from None
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:5])
        raise CliError(f"{path}: {problems}") from None
    print(pack(spec).model_dump_json(indent=2), flush=True)
    return 0


def _with_plans_as_demands(doc):
    """`plateau pack` also takes plans (`plateau plan` output, measured or predicted): a models[]
    entry {"plan": PLAN, "target_tokens_per_s": T} or {"plan": PLAN, "replicas": R} becomes the
    demand the packer places: R (or enough replicas for T at the plan's predicted tokens/s per
    replica) replicas of the plan's share and memory."""
    import math

    from advisor.planner import ReplicaPlan

    if not isinstance(doc, dict) or not isinstance(doc.get("models"), list):
        return doc
    models = []
    for i, entry in enumerate(doc["models"]):
        if not (isinstance(entry, dict) and "plan" in entry):
            models.append(entry)
            continue
        unknown = set(entry) - {"plan", "name", "replicas", "target_tokens_per_s"}
        if unknown:
            raise CliError(f"models[{i}]: unknown keys {sorted(unknown)}; a plan entry takes plan, name, replicas "
                           "or target_tokens_per_s")
        plan = ReplicaPlan.model_validate(entry["plan"])
        if entry.get("replicas") is not None:
            replicas = int(entry["replicas"])
        elif entry.get("target_tokens_per_s") is not None:
            replicas = math.ceil(float(entry["target_tokens_per_s"]) / plan.predicted_tokens_per_s_per_replica)
        else:
            replicas = plan.replicas_per_device
        share = plan.num_gpus_per_replica if plan.device_kind == "cuda" else 1.0 / plan.replicas_per_device
        models.append({"model": entry.get("name") or plan.model, "kind": plan.device_kind, "replicas": replicas,
                       "share": share, "memory_per_replica_bytes": plan.memory_per_replica_bytes})
    return {**doc, "models": models}


def _add_profile_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="embedded name, model folder or hub id")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:INDEX] (INDEX counts the GPUs CUDA_VISIBLE_DEVICES "
                   "makes visible); `plan` also takes a device of advisor/perf_constants.json (h100-sxm, l4, ...): a "
                   "stored profile if any, else the prediction")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--output-tokens", type=int, default=64)
    p.add_argument("--max-batch", type=int, default=128, help="largest batch the sweep may try")
    p.add_argument("--max-points", type=int, default=8, help="batch sizes in the main sweep, at most")
    p.add_argument("--max-kv-bytes", type=int, default=None,
                   help="cap on the profiling engine's KV pool (default: 4 GiB on CPU, what the free GPU memory holds on CUDA)")
    p.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=None,
                   help="profile without CUDA graphs / torch.compile (default: eager on CPU, CUDA graphs on CUDA, "
                   "as replicas serve by default); use the same setting as the model config you serve")
    p.add_argument("--tpot-slo-ms", type=float, default=None, help="TPOT p99 limit that caps B*")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--dummy", action="store_true", help="random weights (load_format=dummy), token-id prompts")
    p.add_argument("--store", default=None, help="profile store folder or s3:// URL (default $PLATEAU_HOME/profiles)")
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
    plan.add_argument("--validate", action="store_true",
                      help="start the planned N replicas on the device and measure them against one engine")
    plan.set_defaults(func=_plan)

    pred = sub.add_parser("predict", help="predicted curve, B*, memory per replica and N-replica gain on a named "
                          "device, from the model's config.json alone (no engine, no weights)")
    pred.add_argument("model", help="embedded name, Hugging Face config folder or hub id")
    pred.add_argument("--device", required=True, help="a device of advisor/perf_constants.json: h100-sxm, h100-pcie, "
                      "h200, a100-40gb, a100-80gb, l4, l40s, cpu (this machine, bandwidth measured now)")
    pred.add_argument("--prompt-tokens", type=int, default=128)
    pred.add_argument("--output-tokens", type=int, default=64, help="mean generated tokens per request")
    pred.add_argument("--output-cv", type=float, default=0.0,
                      help="spread of the output lengths, standard deviation over mean (default 0: all alike; "
                      "chat traffic such as ShareGPT ~1.2): long requests fill the running batch, raising its KV reads")
    pred.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,2,4,...,512)")
    pred.add_argument("--replicas", type=int, default=None, help="also predict N engines at once on the device")
    pred.add_argument("--sharing", choices=["mps", "time-slice", "exclusive"], default="mps",
                      help="how the N engines share a GPU: mps (an MPS daemon serves it), time-slice (no MPS), "
                      "exclusive (compute mode EXCLUSIVE_PROCESS: one engine); the notes say what each number rests on")
    pred.add_argument("--dtype", default="auto")
    pred.add_argument("--store", default=None, help="profile store whose calibrations.json recalibrates the device")
    pred.set_defaults(func=_predict)

    report = sub.add_parser("report", help="PNG + HTML of a profile (`plateau profile` JSON output)")
    report.add_argument("profile", help="JSON file written by `plateau profile`")
    report.add_argument("--out", required=True, help="folder for profile.png and index.html")
    report.set_defaults(func=_report)

    packer = sub.add_parser("pack", help="capacity planning: place replicas of many models on devices")
    packer.add_argument("input", help='JSON: {"devices": [{name, kind, memory_bytes}], "models": '
                        '[{model, kind, replicas, share, memory_per_replica_bytes} or '
                        '{plan: `plateau plan` output, target_tokens_per_s or replicas}]}')
    packer.set_defaults(func=_pack)

    status = sub.add_parser("status", help="placement, variants, live readings and last decisions of running apps")
    status.add_argument("--address", default="auto", help="Ray cluster address (default: auto)")
    status.add_argument("--app", default=None, help="only this application")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=_status)

    stop = sub.add_parser("stop", help="delete the running apps, then end the `serve run` that started them (and the "
                                        "local Ray it started): the stop for a `make run` in the background")
    stop.add_argument("--address", default="auto", help="Ray cluster address (default: auto)")
    stop.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for each `serve run` to end on "
                                                                 "SIGTERM before it and its process tree are killed")
    stop.set_defaults(func=_stop)

    doctor = sub.add_parser("doctor", help="check a GPU machine for plateau-serve (PASS/FAIL/SKIP per check; exit 1 on "
                            "any FAIL); paste its output into bug reports")
    doctor.add_argument("--device", default="cuda:0", help="cuda[:INDEX] (INDEX counts the GPUs CUDA_VISIBLE_DEVICES "
                        "makes visible)")
    doctor.add_argument("--model", default=None, help="model of the engine checks: embedded name, folder or hub id "
                        "(default smollm2-135m)")
    doctor.add_argument("--json", action="store_true", help="a JSON list of {name, status, detail, fix}")
    doctor.add_argument("--quick", action="store_true", help="skip the engine checks (engine_memory, profile, "
                        "two_engines): under a minute")
    doctor.set_defaults(func=_doctor)
    return parser


def restrict_to_device(device: str, env: Mapping[str, str]) -> tuple[str, dict[str, str]]:
    """`--device cuda:N` as (device name for this process, environment to set first).

    Nothing else tells vLLM which GPU to use: it runs on the first visible one. So the process is
    restricted to GPU N (`CUDA_VISIBLE_DEVICES` = its entry, taken from the current visible list
    when one is set), and inside it that GPU is `cuda`: the engine runs on it and NVML reads it.
    """
    from advisor.nvml import CUDA_VISIBLE_DEVICES, cuda_index, physical_entry

    if device == "cpu":
        return device, {}
    entry = physical_entry(cuda_index(device), env.get(CUDA_VISIBLE_DEVICES))
    return "cuda", {CUDA_VISIBLE_DEVICES: entry}


def main(argv: Optional[Sequence[str]] = None) -> int:
    ns = build_parser().parse_args(argv)
    if ns.command in ("profile", "plan"):
        from advisor.nvml import GpuSelectionError
        from deployments.install_check import BrokenInstall, check_install

        # vLLM logs every engine start in detail; the CLI reports its own progress.
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
        try:
            check_install()
            # a device of the performance model's data file is planned from the prediction: no GPU to pick
            ns.device, env = (ns.device, {}) if _named_device(ns.device) else restrict_to_device(ns.device, os.environ)
        except (BrokenInstall, GpuSelectionError) as exc:
            return _err(str(exc))
        os.environ.update(env)
    try:
        return int(ns.func(ns))
    except CliError as exc:
        return _err(str(exc))


if __name__ == "__main__":
    sys.exit(main())
