"""Render the benchmark JSON (results.json with our rows and the peer rows, extra.json,
calibration.json) as BENCHMARKS.md, and the chart docs/benchmark_chart.png. bench/peers.json
keeps the peer run's own output, with the commands of each child process.

    python bench/report.py > BENCHMARKS.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
STAGES = ("encode:gemma", "encode:jina", "sample", "decode")


def _gb(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _peaks(row: dict) -> str:
    return " / ".join(f"{_gb(row['stage_peaks_gb'].get(s))}" for s in STAGES)


def _pred(row: dict) -> str:
    return " / ".join(f"{_gb(row['predicted_peaks_gb'].get(s))}" for s in STAGES)


def _warm_resident_whole(rows: list[dict], size: str, cfg: bool) -> float:
    """The whole-generation time of the fastest all-resident bf16 row: the resident row itself
    may carry a host-cache rebuild (the cache keeps one copy per model file, see BENCHMARKS.md)."""
    return min(r["whole_s"] for r in rows if r["size"] == size and r["cfg"] == cfg and r["dtype"] == "bf16"
               and r["resident_blocks"] == r.get("n_blocks", 40) and r["row"] in ("resident", "ours"))


def rows_table(rows: list[dict], size: str, cfg: bool) -> list[str]:
    out = ["| row | storage | budget GB | s/step | ×resident | roofline s/step | ×roofline | TFLOP/s | whole s | "
           "×warm resident (whole) | peak GB | stage peaks GB (gemma / jina / sample / decode) | predicted GB | "
           "resident blocks (at compute dtype) | CUDA graphs | bitwise = resident |",
           "|" + "---|" * 16]
    warm = _warm_resident_whole(rows, size, cfg)
    for r in rows:
        if r["size"] != size or r["cfg"] != cfg or r["row"] not in ("resident", "ours") or r["dtype"] == "fp16":
            continue
        out.append(
            f"| {r['row']} | {r['dtype']} | {r['budget_gb'] if r['budget_gb'] is not None else 'none'} | "
            f"{r['s_per_step']:.4f} | {r['ratio_to_resident']:.3f} | {r['roofline_s_per_step']:.4f} | "
            f"{r['s_per_step'] / r['roofline_s_per_step']:.3f} | {r['tflops']:.0f} | {r['whole_s']:.2f} | "
            f"{r['whole_s'] / warm:.3f} | {r['peak_vram_gb']:.2f} | {_peaks(r)} | {_pred(r)} | "
            f"{r['resident_blocks']}/{r.get('n_blocks', 40)} "
            f"({r.get('materialized_blocks', 0) if r['dtype'] == 'fp8' else r['resident_blocks']}) | "
            f"{'on' if r.get('cuda_graphs') else 'off'} | {r['bitwise_equal_to_resident']} |")
    return out


def calibration_table(rows: list[dict]) -> list[str]:
    out = ["| size | cfg | storage | budget GB | stage | measured GB | predicted GB | predicted / measured |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for s in STAGES:
            m, p = r["stage_peaks_gb"].get(s), r["predicted_peaks_gb"].get(s)
            if m:
                out.append(f"| {r['size']} | {r['cfg']} | {r['dtype']} | {r['budget_gb']} | {s} | {m:.2f} | {p:.2f} | "
                           f"{p / m:.3f} |")
    return out


def _ms(x: float) -> str:
    return f"{1e3 * x:.1f}"


def peers_table(peers: list[dict], rows: list[dict]) -> list[str]:
    """Forward-only peer rows next to our resident forward and our sampling steps, 1024² CFG."""
    ours_fwd = next((p for p in peers if p["row"] == "ours-resident-forward" and "error" not in p), None)
    comfy = next((p for p in peers if p["row"] == "comfyui-full" and "error" not in p), None)
    out = ["| row | what is timed | budget GB | ms/step (median) | min-max, n | TFLOP/s | peak reserved / allocated GB | "
           "× ours resident | × comfyui-full | rel L2 vs ours | bitwise = ours |", "|" + "---|" * 11]
    for p in peers:
        if "error" in p:
            out.append(f"| {p['row']} | forward | {p.get('budget_gb') or 'none'} | failed: {p['error'][:90]} |"
                       + " |" * 7)
            continue
        out.append(f"| {p['row']} | forward | {p.get('budget_gb') or 'none'} | {p['ms_per_step']:.1f} | "
                   f"{p['ms_min']:.1f}-{p['ms_max']:.1f}, {p['n']} | {p['tflops']:.0f} | "
                   f"{p['peak_reserved_gb']:.2f} / {p['peak_allocated_gb']:.2f} | "
                   f"{p['ms_per_step'] / ours_fwd['ms_per_step']:.3f} | "
                   f"{p['ms_per_step'] / comfy['ms_per_step']:.3f} | {p['rel_l2_vs_ours']:.1e} | "
                   f"{p['bitwise_equal_to_ours']} |")
    for r in rows:
        if r["size"] != "1024x1024" or not r["cfg"] or r["row"] not in ("resident", "ours"):
            continue
        ms = 1e3 * r["s_per_step"]
        out.append(f"| ours pipeline, {r['dtype']} | sampling step | {r['budget_gb'] or 'none'} | {ms:.1f} | "
                   f"{_ms(r['s_step_min'])}-{_ms(r['s_step_max'])}, {r['steady_steps']} | {r['tflops']:.0f} | "
                   f"{r['stage_peaks_gb']['sample']:.2f} / {r['stage_peaks_allocated_gb']['sample']:.2f} | "
                   f"{r['ratio_to_resident']:.3f} | {ms / comfy['ms_per_step']:.3f} | - | "
                   f"{r['bitwise_equal_to_resident']} (vs resident) |")
    return out


def targets(rows: list[dict], peers: list[dict]) -> list[str]:
    """Issue 10's targets beside what this visit measured."""
    def row(size, dtype, budget, name=("resident", "ours")):
        return next((r for r in rows if r["size"] == size and r["dtype"] == dtype and r["budget_gb"] == budget
                     and r["row"] in name and r["cfg"] == (size == "1024x1024")), None)
    comfy = next((p for p in peers if p["row"] == "comfyui-full" and "error" not in p), None)
    res, fp8_2 = row("1024x1024", "bf16", None), row("1024x1024", "fp8", 2)
    out = ["| target | measured | met |", "|---|---|---|"]
    if res and comfy:
        ms = 1e3 * res["s_per_step"]
        out.append(f"| resident 1024² CFG bf16 <= 105 ms/step | {ms:.1f} ms ({res['tflops']:.0f} TFLOP/s) | "
                   f"{'yes' if ms <= 105 else f'no, {ms / 105:.2f}x'} |")
        out.append(f"| resident <= 0.75x comfyui-full (same visit) | {ms / comfy['ms_per_step']:.3f}x "
                   f"({comfy['ms_per_step']:.1f} ms) | {'yes' if ms <= 0.75 * comfy['ms_per_step'] else 'no'} |")
    if res and fp8_2 and comfy:
        ms8 = 1e3 * fp8_2["s_per_step"]
        out.append(f"| fp8 under 2 GB: sampling <= 1.05x resident | {fp8_2['ratio_to_resident']:.3f}x | "
                   f"{'yes' if fp8_2['ratio_to_resident'] <= 1.05 else 'no'} |")
        out.append(f"| fp8 under 2 GB: faster than comfyui-full | {ms8:.1f} vs {comfy['ms_per_step']:.1f} ms | "
                   f"{'yes' if ms8 < comfy['ms_per_step'] else 'no'} |")
        out.append(f"| fp8 under 2 GB: whole generation <= 1.08x | {fp8_2['whole_ratio_to_resident']:.3f}x | "
                   f"{'yes' if fp8_2['whole_ratio_to_resident'] <= 1.08 else 'no'} |")
    ours = [r for r in rows if r["row"] in ("resident", "ours") and r["dtype"] in ("bf16", "fp8")]
    worst = max(ours, key=lambda r: r["s_per_step"] / r["roofline_s_per_step"])
    out.append(f"| every ours row within 1.05x of its roofline | worst {worst['s_per_step'] / worst['roofline_s_per_step']:.3f}x "
               f"({worst['size']} {worst['dtype']} {worst['budget_gb']} GB) | "
               f"{'yes' if worst['s_per_step'] / worst['roofline_s_per_step'] <= 1.05 else 'no'} |")
    over = [r for r in ours if r["budget_gb"] and r["peak_vram_gb"] > r["budget_gb"]]
    out.append(f"| peak never above the budget | {'none above' if not over else len(over)} | {'yes' if not over else 'no'} |")
    failed = [p["row"] for p in peers if "error" in p]
    out.append(f"| faster than every peer at an equal or higher peak | comfyui-full only; not measured: "
               f"{', '.join(failed) or '-'}, diffusers-group-block/leaf, accelerate-sequential | not shown |")
    return out


def peer_notes(peers: list[dict]) -> list[str]:
    """Say which peers have no figures and why, from the rows' own errors."""
    expected = ("comfyui-full", "comfyui-lowvram-4gb", "comfyui-lowvram-4gb-async", "comfyui-lowvram-2gb",
                "comfyui-lowvram-2gb-async", "diffusers-group-block", "diffusers-group-leaf", "accelerate-sequential")
    out = []
    if any("specified index" in p.get("error", "") for p in peers):
        out.append("The comfyui-lowvram rows failed in our harness, not in ComfyUI: it handed ComfyUI's memory calls "
                   "a CUDA device without an index (fixed in bench/peers.py after this visit, not re-run).")
    missing = [name for name in expected if not any(p["row"] == name for p in peers)]
    if missing:
        out.append(f"Not measured in this visit (its time ran out first): {', '.join(missing)}.")
    return [line for note in out for line in ("", note)]


def chart(rows: list[dict], peers: list[dict], path: Path) -> None:
    """Peak VRAM against ms per step at 1024² CFG: our rows, and the peers apart."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    for r in rows:
        if r["size"] == "1024x1024" and r["cfg"] and r["row"] in ("resident", "ours"):
            x, y = r["stage_peaks_gb"]["sample"], 1e3 * r["s_per_step"]
            ax.scatter(x, y, c="tab:blue" if r["dtype"] == "bf16" else "tab:green", marker="o", s=50, zorder=3)
            ax.annotate(f"ours {r['dtype']} {r['budget_gb'] or 'resident'}", (x, y), fontsize=7,
                        xytext=(4, 4), textcoords="offset points")
    for p in peers:
        if "error" in p or p["row"].startswith("ours"):
            continue
        x, y = p["peak_reserved_gb"], p["ms_per_step"]
        ax.scatter(x, y, c="tab:red", marker="s", s=50, zorder=3)
        ax.annotate(p["row"], (x, y), fontsize=7, xytext=(4, -10), textcoords="offset points")
    ax.set_xlabel("peak reserved VRAM of the sampling stage (GiB)")
    ax.set_ylabel("ms per sampling step (1024², CFG batch 2)")
    ax.set_title("NewBie DiT on an H200: ours (circles) vs peers (red squares, forward only)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    rows = json.loads((HERE / "results.json").read_text())
    extra = json.loads((HERE / "extra.json").read_text())
    peers = [r for r in rows if r.get("forward_only")]        # peer rows (bench/peers.py), same visit
    rows = [r for r in rows if not r.get("forward_only")]
    calib_path = HERE / "calibration.json"
    calib = json.loads(calib_path.read_text()) if calib_path.exists() else []
    if peers:
        chart(rows, peers, HERE.parent / "docs" / "benchmark_chart.png")
    first = rows[0]
    lines = [
        "# Benchmarks",
        "",
        f"Generated by `python bench/report.py > BENCHMARKS.md` from `bench/results.json` (our rows and the "
        f"peer rows, `forward_only`) and `bench/extra.json`. Machine: {first['machine']} (one GPU, 16 CPU cores), torch {extra['torch']}, "
        f"date {first['date']}; every row below comes from ONE GPU visit. Commands:",
        "",
        "```",
        "python bench/full_size.py /tmp/full          # full-size random-weight checkpoints, real layouts",
        "python bench/run_benchmarks.py --models /tmp/full --out $OUT --final",
        "python bench/peers.py --out $OUT --with-ours --passes 1024x2",
        "python bench/forward_bench.py --out $OUT [--parts]   # forward breakdown (earlier visit, same day)",
        "```",
        "",
        "Pipeline rows are whole generations (encode + sample + decode), 28 steps, Euler, host cache warm, "
        "conditioning cache cold; the budget is enforced with `torch.cuda.set_per_process_memory_fraction`. "
        "`s/step` is the median over the steady steps (the first two left out: uploads, eager warm-up, graph "
        "captures), with min-max. Peaks are torch's peak *reserved* bytes per stage (CUDA context excluded), GiB. "
        "Roofline = max(resident s/step, streamed bytes per step / pinned bandwidth measured in the same run: "
        f"**{extra['bandwidth_gbps']:.1f} GB/s**). TFLOP/s counts the DiT's matmul and attention FLOPs. "
        "Peer rows are forward passes of the same seeded weights (`forward_only`), timed in the same visit.",
        "",
        "![peak VRAM vs ms per step](docs/benchmark_chart.png)",
        "",
        "## Issue 10's targets",
        "",
        *targets(rows, peers),
        "",
        "## Against the peers (1024×1024, CFG batch 2, 256 caption tokens)",
        "",
        *peers_table(peers, rows),
        *peer_notes(peers),
        "",
        "## 1024×1024, CFG 5 (cond + uncond in one batch)",
        "",
        *rows_table(rows, "1024x1024", True),
        "",
        "## 512×512, no CFG (transfer-bound when streaming)",
        "",
        *rows_table(rows, "512x512", False),
    ]
    cold = [r for r in rows if "first run" in r["row"]]
    if cold:
        c = cold[0]
        lines += ["", "## First run: torch.compile of the fused kernels (cold inductor cache)", "",
                  f"1024² CFG 5, resident bf16, the first generation of a fresh process with an empty cache: "
                  f"**{c['whole_s']:.1f} s** whole, of which **{c['compile_s']:.1f} s** is compilation and first "
                  f"use (the same row warm: {c['whole_s'] - c['compile_s']:.2f} s). The cache lives in the user "
                  "cache dir (`TORCHINDUCTOR_CACHE_DIR` overrides it), so later processes pay a cache read; "
                  "`--compile off` runs the eager bodies instead."]
    resident = next((r for r in rows if r["row"] == "resident" and r["size"] == "1024x1024"), None)
    if resident and "repeat_s_per_step" in resident:
        lines += ["", f"Resident row repeated in the same visit: {_ms(resident['s_per_step'])} and "
                      f"{_ms(resident['repeat_s_per_step'])} ms/step (bitwise equal: "
                      f"{resident['repeat_bitwise_equal']})."]
    seeds = [r for r in rows if r["row"].startswith("seed-")]
    if seeds:
        lines += ["", "## The seed article's recipes on our pipeline", "",
                  "| recipe | ms/step | whole s (28 steps) | peak GB | article: peak GB / s per image (RTX 3090, 50 steps, CFG 7) |",
                  "|---|---|---|---|---|"]
        for r in seeds:
            lines.append(f"| {r['row']} | {_ms(r['s_per_step'])} | {r['whole_s']:.2f} | {r['peak_vram_gb']:.2f} | "
                         f"{r['seed_article_peak_gb']} / {r['seed_article_s_per_image']} |")
        lines += ["", "seed-full-gpu (every model on the GPU at once) has no staged equivalent: its step is the "
                      "resident row's, its peak the sum of the four models (about 16 GB of weights)."]
    lines += ["", "## Where the resident forward's time goes (torch profiler, ms per forward, 1024² CFG)", "",
              extra.get("forward_breakdown_note", ""), "",
              "| forward | ms | GEMM | attention | elementwise | copies | idle | kernels |", "|---|---|---|---|---|---|---|---|"]
    for f in extra.get("forward_breakdown", []):
        pr = f.get("profile_ms", {})
        lines.append(f"| {f['row']} {f['size']} cfg={f['cfg']} | {f['ms']:.1f} | {pr.get('gemm')} | {pr.get('attention')} | "
                     f"{pr.get('elementwise')} | {pr.get('copies')} | {pr.get('idle')} | {pr.get('kernels')} |")
    parts = extra.get("parts", {})
    if parts:
        lines += ["", "One sample's attention at 1024² (24 query heads, 8 KV heads, 4352 tokens):", "",
                  "| SDPA backend | K/V | ms | TFLOP/s |", "|---|---|---|---|"]
        for a in parts["attention"]:
            lines.append(f"| {a['backend']} | {a['mode']} | {a.get('ms', float('nan')):.3f} | "
                         f"{a.get('tflops', 0):.0f} |" if "ms" in a else f"| {a['backend']} | {a['mode']} | no kernel | |")
        lines += ["", "Each fused block function at 1024² CFG sizes:", "", "| function | variant | µs | TB/s |",
                  "|---|---|---|---|"]
        for f in parts["fused"]:
            lines.append(f"| {f['fn']} | {f['variant']} | {f.get('us')} | {f.get('tb_s')} |")
    par = extra.get("official_parity_cuda", [])
    if par:
        lines += ["", "## Numerics against the official `NextDiT_CLIP` (`bench/official_parity.py`, padded CFG pair)", "",
                  "| model | device | fp32 ours vs official (rel L2) | bf16 official vs fp32 (rel L2, max/RMS) | "
                  "bf16 ours vs fp32 (rel L2, max/RMS) |", "|---|---|---|---|---|"]
        for r in par:
            o, u = r["bf16_official_vs_fp32"], r["bf16_ours_vs_fp32"]
            lines.append(f"| {r['model']} | {r['device']} ({r['kernels']}) | {r['fp32_ours_vs_official']['rel_l2']:.1e} | "
                         f"{o['rel_l2']:.2e}, {o['max_abs_over_rms']:.2e} | {u['rel_l2']:.2e}, {u['max_abs_over_rms']:.2e} |")
    sys.path.insert(0, str(HERE))
    import fits
    lines += ["", fits.render(fits.load_rows(HERE / "results.json"))]
    if calib:
        lines += ["", "## Predicted vs measured stage peaks (`--calibrate`, 2026-11-29, before the fused kernels)", "",
                  "The fused kernels hold fewer float32 temporaries, so today's measured peaks sit further under these "
                  "predictions (see each row's measured/predicted columns above).", "",
                  *calibration_table(calib)]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
