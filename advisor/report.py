"""`plateau report`: a profile as a PNG (four panels) and a small HTML page around it.

Panels: decode throughput vs batch with the knee marked and the step-time fit drawn; TPOT p50/p99
vs batch; KV usage vs batch; DRAM bandwidth utilisation vs batch (where NVML GPM measured it).
"""

from __future__ import annotations

import html
from pathlib import Path

from advisor.profiler import Profile


def write_report(profile: Profile, out_dir: Path) -> tuple[Path, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    pts = sorted(profile.points, key=lambda p: p.batch)
    batches = [p.batch for p in pts]
    ctx = profile.shape.context_tokens
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    ax = axes[0][0]
    ax.plot(batches, [p.tokens_per_s for p in pts], "o-", label="measured")
    fine = [b for b in range(1, max(batches) + 1)]
    ax.plot(fine, [profile.step_model.tokens_per_s(b, ctx) for b in fine], "--", alpha=0.7,
            label=f"fit (error {profile.step_model.mape:.1f}%)")
    ax.axvline(profile.b_star, color="red", alpha=0.6, label=f"B* = {profile.b_star}")
    ax.set(xscale="log", xlabel="batch (concurrent sequences)", ylabel="decode tokens/s",
           title="throughput vs batch")
    ax.legend()
    ax = axes[0][1]
    ax.plot(batches, [p.tpot_p50_ms for p in pts], "o-", label="TPOT p50")
    ax.plot(batches, [p.tpot_p99_ms for p in pts], "s--", label="TPOT p99")
    if profile.rules.tpot_p99_slo_ms:
        ax.axhline(profile.rules.tpot_p99_slo_ms, color="red", alpha=0.5, label="SLO")
    ax.axvline(profile.b_star, color="red", alpha=0.3)
    ax.set(xscale="log", xlabel="batch", ylabel="ms per output token", title="latency vs batch")
    ax.legend()
    ax = axes[1][0]
    ax.plot(batches, [100 * p.kv_usage for p in pts], "o-")
    ax.axvline(profile.b_star, color="red", alpha=0.3)
    ax.set(xscale="log", xlabel="batch", ylabel="% of profiling KV pool", title="KV cache usage")
    ax = axes[1][1]
    bw = [(p.batch, p.dram_bw_util) for p in pts if p.dram_bw_util is not None]
    if bw:
        ax.plot([b for b, _ in bw], [u for _, u in bw], "o-")
        ax.set(xscale="log", xlabel="batch", ylabel="% of peak DRAM bandwidth", title="DRAM bandwidth (NVML GPM)")
    else:
        ax.text(0.5, 0.5, "DRAM bandwidth not measured\n(needs an NVIDIA GPU with GPM)", ha="center", va="center")
        ax.set_axis_off()
    fig.suptitle(f"{profile.model} on {profile.device_name} — vLLM {profile.engine_version}, {profile.dtype}, "
                 f"prompt {profile.shape.prompt_tokens} / output {profile.shape.output_tokens} tokens")
    fig.tight_layout()
    png = out_dir / "profile.png"
    fig.savefig(png, dpi=110)
    plt.close(fig)

    rows = "".join(
        f"<tr><td>{p.batch}</td><td>{p.tokens_per_s:.1f}</td><td>{p.tpot_p50_ms:.1f}</td><td>{p.tpot_p99_ms:.1f}</td>"
        f"<td>{p.ttft_ms:.0f}</td><td>{100 * p.kv_usage:.1f}%</td>"
        f"<td>{'' if p.dram_bw_util is None else f'{p.dram_bw_util:.1f}%'}</td></tr>"
        for p in pts
    )
    m = profile.step_model
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>plateau profile: {html.escape(profile.model)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}td,th{{padding:2px 10px;text-align:right}}</style></head>
<body><h1>{html.escape(profile.model)} on {html.escape(profile.device_name)}</h1>
<p><b>B* = {profile.b_star}</b>: {html.escape(profile.knee.reason)}</p>
<p>step time fit: t(B, ctx) = {m.a_ms:.3f} + {m.b_ms:.5f}·B + {m.c_ms:.7f}·B·ctx ms ({m.points} points, error {m.mape:.1f}%)</p>
<img src="profile.png" width="100%">
<table><tr><th>batch</th><th>tokens/s</th><th>TPOT p50 ms</th><th>TPOT p99 ms</th><th>TTFT ms</th><th>KV</th><th>DRAM BW</th></tr>
{rows}</table><p>profiled in {profile.seconds:.0f} s with vLLM {html.escape(profile.engine_version)}</p></body></html>"""
    page_path = out_dir / "index.html"
    page_path.write_text(page)
    return png, page_path
