"""Render the benchmark JSON (results.json with our rows and the peer rows, extra.json,
calibration.json) as BENCHMARKS.md, and the chart docs/benchmark_chart.png. bench/peers.json
keeps the peer run's own output, with the commands of each child process. The small-PC sections
(GGUF, host RAM, LoRA, soak, the throttled link) come from bench/report_small_pc.py.

    python bench/report.py > BENCHMARKS.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from report_small_pc import _ms, _when, small_pc_sections, throttle_section  # noqa: E402
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


def _earlier_note(rows: list[dict]) -> str:
    """', an earlier visit (...)' for a section whose rows collect.py --keep-rows kept."""
    visits = sorted({r["earlier_visit"] for r in rows if r.get("earlier_visit")})
    return f" (an earlier visit: {', '.join(visits)})" if visits else ""


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
            f"| {r['row']}{' (earlier visit)' if r.get('earlier_visit') else ''} | {r['dtype']} | "
            f"{r['budget_gb'] if r['budget_gb'] is not None else 'none'} | "
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
        if r["size"] != "1024x1024" or not r["cfg"] or r["row"] not in ("resident", "ours") or r["dtype"] == "fp16":
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
    out.append(beats_peers(rows, peers))
    return out


def beats_peers(rows: list[dict], peers: list[dict]) -> str:
    """The target row: at each of our 1024² CFG budgets, faster than every measured peer whose
    peak is equal or higher (our sampling-stage peak against the peer's forward peak)."""
    measured = [p for p in peers if "error" not in p and not p["row"].startswith("ours")]
    losses, checks = [], 0
    for r in rows:
        if r["size"] != "1024x1024" or not r["cfg"] or r["row"] not in ("resident", "ours") or r["dtype"] == "fp16":
            continue
        ms, peak = 1e3 * r["s_per_step"], r["stage_peaks_gb"]["sample"]
        for p in measured:
            if p["peak_reserved_gb"] >= peak:
                checks += 1
                if p["ms_per_step"] <= ms:
                    losses.append(f"{r['dtype']} {r['budget_gb']} GB vs {p['row']}")
    failed = [p["row"] for p in peers if "error" in p]
    return (f"| faster than every peer at an equal or higher peak | {checks} pairs, {len(losses)} lost"
            f"{': ' + ', '.join(losses) if losses else ''}; peers without figures: {', '.join(failed) or 'none'} | "
            f"{'yes, for the peers measured' if not losses else 'no'} |")


def peer_notes(peers: list[dict]) -> list[str]:
    """Say which peers have no figures and why, from the rows' own errors."""
    out = []
    for p in peers:
        err = p.get("error", "")
        if not err:
            continue
        if p["row"].startswith("comfyui-lowvram") and "OutOfMemoryError" in err:
            out.append(f"{p['row']}: out of memory under the 4 GiB cap. The harness of this visit gave "
                       f"ModelPatcher lowvram_model_memory = budget - its own activation estimate "
                       f"({p.get('notes', '').split('; ')[2]}), and ComfyUI's forward at 1024² CFG needed more "
                       "than the rest. bench/peers.py now uses ComfyUI's own rule from load_models_gpu (free "
                       "VRAM - max(minimum_inference_memory, memory_required + reserve): 2867 MiB of weights at "
                       "4 GiB, 819 MiB at 2 GiB); not re-run yet.")
        elif p["row"] == "diffusers-group-leaf" and "same device" in err:
            out.append("diffusers-group-leaf: leaf-level offloading onloads a leaf module's weights when that "
                       "module's forward is called. Our blocks pass the RMSNorm weights to fused kernels "
                       "without calling the norm modules, so those weights stay on the CPU (`_fused_rms_norm` "
                       "device error). Block-level offloading works and is the row above. bench/peers.py now "
                       "keeps those 0.1 MiB-a-block norm weights on the GPU and offloads every other leaf; "
                       "not re-run yet.")
        else:
            out.append(f"{p['row']}: failed ({err[:160]}).")
    return [line for note in out for line in ("", note)]


def chart(rows: list[dict], peers: list[dict], path: Path, machine: str) -> None:
    """Peak VRAM against ms per step at 1024² CFG: our rows, and the peers apart."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    for r in rows:
        if r["size"] != "1024x1024" or not r["cfg"] or r["dtype"] == "fp16" or \
                r["row"] not in ("resident", "ours", "ours-fp8-compute"):
            continue
        x, y = r["stage_peaks_gb"]["sample"], 1e3 * r["s_per_step"]
        fp8c = r["row"] == "ours-fp8-compute"
        color = "tab:purple" if fp8c else ("tab:blue" if r["dtype"] == "bf16" else "tab:green")
        ax.scatter(x, y, c=color, marker="o", s=50, zorder=3)
        label = f"{r['dtype']}{' fp8-compute' if fp8c else ''} {r['budget_gb'] or 'resident'}"
        dy = -13 if fp8c else {"bf16": 8, "fp8": -11}[r["dtype"]]   # fp8 compute sits below, its label too
        ax.annotate(label, (x, y), fontsize=7, xytext=(4, dy), textcoords="offset points", color=color)
    for p in peers:
        if "error" in p or p["row"].startswith("ours"):
            continue
        x, y = p["peak_reserved_gb"], p["ms_per_step"]
        ax.scatter(x, y, c="tab:red", marker="s", s=50, zorder=3)
        ax.annotate(p["row"], (x, y), fontsize=7, xytext=(6, -12 if p["row"].endswith(("async", "leaf")) else -3),
                    textcoords="offset points", color="tab:red")
    ax.set_yscale("log")
    ax.set_xlabel("peak reserved VRAM of the sampling stage (GiB)")
    ax.set_ylabel("ms per sampling step (1024², CFG batch 2)")
    ax.set_title(f"NewBie DiT on an {machine.removeprefix('NVIDIA ')}: ours (circles: bf16 blue, fp8 green) "
                 "vs peers (red squares, forward only)", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.set_xlim(left=0, right=9.5)
    ax.set_ylim(80, 2500)                    # room for the labels under the lowest points
    fig.tight_layout()
    fig.savefig(path)


def fp8_compute_section(rows: list[dict], peers: list[dict], extra: dict) -> list[str]:
    """The optional fp8 compute rows (off by default) and every latent drift against bf16."""
    comfy = next((p for p in peers if p["row"] == "comfyui-full" and "error" not in p), None)
    fp8c = [r for r in rows if r["row"] == "ours-fp8-compute"]
    out = []
    if fp8c:
        earlier = _earlier_note(fp8c)
        out += ["", "## Optional fp8 compute (`--fp8-compute`, off by default), 1024² CFG" + earlier, "",
                "Row-wise scaled e4m3 operands through `torch._scaled_mm` for the blocks' linears; the "
                "activations and the weights are quantised on the fly at every use."
                + (" × comfyui-full divides by this visit's ComfyUI row." if earlier else ""), "",
                "| weights | budget GB | ms/step (min-max) | × resident | × comfyui-full | TFLOP/s | peak GB | "
                "bitwise = its resident | final latent vs bf16 (rel L2) |", "|---|---|---|---|---|---|---|---|---|"]
        for r in fp8c:
            ms = 1e3 * r["s_per_step"]
            out.append(f"| {r['dtype']} | {r['budget_gb'] or 'none'} | {ms:.1f} ({_ms(r['s_step_min'])}-"
                       f"{_ms(r['s_step_max'])}) | {r['ratio_to_resident']:.3f} | "
                       f"{ms / comfy['ms_per_step'] if comfy else float('nan'):.3f} | {r['tflops']:.0f} | "
                       f"{r['peak_vram_gb']:.2f} | {r['bitwise_equal_to_resident']} | {r['drift_vs_bf16']['rel_l2']:.3f} |")
    quant = extra.get("fp8_quant")
    if quant:
        per_block = quant["per_block_us"]
        copy = per_block["copy"]
        out += ["", "What one block's nine quantisations cost (`bench/fp8_quant_bench.py`, one call each on the "
                "operand shapes of a 1024² CFG step; `copy` moves the same bytes; div = an IEEE division per "
                "element, rcp = one reciprocal per row then a multiply; w = warps; the last number = elements "
                "per program; an earlier visit). The fp8 compute rows above run rcp/w4/4096, bitwise equal "
                "to the torch path on the H200 (CUDA tier); with the first kernel (div/w8/4096) the resident "
                "fp8-compute step was 121.3 ms.", "",
                "| variant | µs per block | × copy |", "|---|---|---|"]
        for v in quant["variants"]:
            out.append(f"| {v} | {per_block[v]:.1f} | {per_block[v] / copy:.2f} |")
    drift = extra.get("drift", {})
    if drift:
        when = f"; {_when(extra, 'drift')}" if "drift_visit" in extra else ""
        out += ["", f"Final-latent drift against the bf16 resident row (28 steps, 1024² CFG, random weights{when}):", "",
                "| variant | rel L2 | mean abs / RMS | max abs / RMS |", "|---|---|---|---|"]
        labels = {"fp16": "fp16 compute", "fp8": "fp8 storage (bf16 compute)"}
        for k, d in drift.items():
            out.append(f"| {labels.get(k, k)} | {d['rel_l2']:.3f} | {d['mean_abs_rel']:.3f} | {d['max_abs_rel']:.3f} |")
        for r in fp8c[:1]:
            d = r["drift_vs_bf16"]
            out.append(f"| fp8 compute (bf16 weights) | {d['rel_l2']:.3f} | {d['mean_abs_rel']:.3f} | {d['max_abs_rel']:.3f} |")
        out += ["", "Random weights are far less forgiving than trained ones: small per-layer errors grow "
                    "through 36 random layers and 28 steps, so these figures are upper bounds of what the "
                    "formats cost, useful to compare with each other."]
    return out


def forward_section(extra: dict) -> list[str]:
    """The DiT forward alone (bench/forward_bench.py): launched op by op against one CUDA graph,
    with the host's issue time, so launch cost and host-bound stretches show."""
    fwd = extra.get("forward_variants")
    if not fwd:
        return []
    out = ["", f"## The forward alone, 1024² CFG (`bench/forward_bench.py --host`, {_when(extra, 'forward_variants')})",
           "", "Resident full-size random weights, the sampler's input shapes, median of 10 forwards. *graph* = the "
           "whole forward replayed as one CUDA graph (what launch cost and idle gaps take); host issue = how long "
           "the host needs to enqueue one forward when nothing waits for the GPU.", "",
           "| variant | ms (min-max) | TFLOP/s | host issue ms | rel L2 vs eager |", "|---|---|---|---|---|"]
    for r in fwd + extra.get("forward_host", {}).get("rows", []):
        host = r.get("host", {}).get("issue_ms")
        name = r["row"].removeprefix("ours-forward-").removesuffix("-nohand")
        out.append(f"| {name} | {r['ms']:.1f} ({r['ms_min']:.1f}-{r['ms_max']:.1f}) | "
                   f"{r['tflops']:.0f} | {'-' if host is None else host} | {r['rel_l2_vs_eager']:.1e} |")
    if extra.get("forward_host"):
        out += ["", extra["forward_host"]["note"]]
    return out


def main() -> None:
    rows = json.loads((HERE / "results.json").read_text())
    extra = json.loads((HERE / "extra.json").read_text())
    peers = [r for r in rows if r.get("forward_only")]        # peer rows (bench/peers.py), same visit
    rows = [r for r in rows if not r.get("forward_only")]
    calib_path = HERE / "calibration.json"
    calib = json.loads(calib_path.read_text()) if calib_path.exists() else []
    if peers:
        chart(rows, peers, HERE.parent / "docs" / "benchmark_chart.png", extra["machine"])
    first = rows[0]
    lines = [
        "# Benchmarks",
        "",
        f"Generated by `python bench/report.py > BENCHMARKS.md` from `bench/results.json` (our rows and the "
        f"peer rows, `forward_only`) and `bench/extra.json`. Machine: {first['machine']} (one GPU, 16 CPU cores), torch {extra['torch']}, "
        f"date {first['date']}; every speed row below comes from ONE GPU visit, except "
        "the sections that give an earlier date or mark rows from an earlier visit. Commands:",
        "",
        "```",
        *extra.get("commands", []),
        "python bench/collect.py ...                  # the visit's outputs into bench/, then this report",
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
        *([extra["visit_note"], ""] if extra.get("visit_note") else []),
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
        empty = c.get("inductor_cache", "empty") == "empty"
        lines += ["", "## First run: torch.compile of the fused kernels"
                  + (" (cold inductor cache)" if empty else " (inductor cache already on disk)")
                  + _earlier_note(cold), "",
                  "1024² CFG 5, resident bf16, the first generation of a fresh process "
                  + ("with an empty cache" if empty else f"whose cache was {c['inductor_cache']}") + ": "
                  f"**{c['whole_s']:.1f} s** whole, of which **{c['compile_s']:.1f} s** is "
                  + ("compilation" if empty else "the cache read") + " and first "
                  f"use (the same row warm: {c['whole_s'] - c['compile_s']:.2f} s). The cache lives in the user "
                  "cache dir (`TORCHINDUCTOR_CACHE_DIR` overrides it), so later processes pay a cache read; "
                  "`--compile off` runs the eager bodies instead."
                  + ("" if empty else " The cold figure of the visit before: 42 s; run_benchmarks.py now points "
                     "this row at fresh cache folders.")]
    resident = next((r for r in rows if r["row"] == "resident" and r["size"] == "1024x1024"), None)
    if resident and "repeat_s_per_step" in resident:
        lines += ["", f"Resident row repeated in the same visit: {_ms(resident['s_per_step'])} and "
                      f"{_ms(resident['repeat_s_per_step'])} ms/step (bitwise equal: "
                      f"{resident['repeat_bitwise_equal']})."]
    seeds = [r for r in rows if r["row"].startswith("seed-")]
    if seeds:
        lines += ["", "## The seed article's recipes on our pipeline" + _earlier_note(seeds), "",
                  "| recipe | ms/step | whole s (28 steps) | peak GB | article: peak GB / s per image (RTX 3090, 50 steps, CFG 7) |",
                  "|---|---|---|---|---|"]
        for r in seeds:
            lines.append(f"| {r['row']} | {_ms(r['s_per_step'])} | {r['whole_s']:.2f} | {r['peak_vram_gb']:.2f} | "
                         f"{r['seed_article_peak_gb']} / {r['seed_article_s_per_image']} |")
        lines += ["", "seed-full-gpu (every model on the GPU at once) has no staged equivalent: its step is the "
                      "resident row's, its peak the sum of the four models (about 16 GB of weights)."]
    lines += ["", "## Where a sampling step's time goes (torch profiler, 1024² CFG, ms per step)", "",
              "Four profiled steps per row, " + (f"in {_when(extra, 'profiles')} (the forward may have changed "
                                                 "since, the plans may differ)" if "profiles_visit" in extra
                                                 else "in the same visit") + ". GEMM, attention and elementwise are kernel time; "
              "copies run on the side streams, overlapped with compute; idle is the rest of the wall time and "
              "here includes the stage's own setup (host-cache rebuild, first-step uploads), so the steady-state "
              "gap is the row's s/step above minus the three kernel columns.", "",
              "| row | GEMM | attention | elementwise | copies (side streams) | idle + setup | kernels per step |",
              "|---|---|---|---|---|---|---|"]
    for pr in extra.get("profiles", []):
        m = pr["per_step_ms"]
        label = f"{pr['storage']} {pr['budget_gb'] or 'resident'}" + (" fp8 compute" if pr.get("fp8_compute") else "")
        lines.append(f"| {label} | {m['gemm']} | {m['attention']} | {m['elementwise']} | {m['copies']} | {m['idle']} | "
                     f"{m['kernels']} |")
    lines += forward_section(extra)
    lines += fp8_compute_section(rows, peers, extra)
    parts = extra.get("parts", {})
    if parts.get("attention"):
        lines += ["", f"One sample's attention at 1024² (24 query heads, 8 KV heads, 4352 tokens; "
                      f"visit of {parts.get('attention_date', '')}):", "",
                  "| SDPA backend | K/V | ms | TFLOP/s |", "|---|---|---|---|"]
        for a in parts["attention"]:
            lines.append(f"| {a['backend']} | {a['mode']} | {a.get('ms', float('nan')):.3f} | "
                         f"{a.get('tflops', 0):.0f} |" if "ms" in a else f"| {a['backend']} | {a['mode']} | no kernel | |")
    if parts.get("fused"):
        lines += ["", f"Each fused block function at 1024² CFG sizes (`forward_bench.py --parts`, "
                      f"{_when(extra, 'parts') if 'parts_visit' in extra else 'same visit'}); the last column is "
                      "the largest difference from the reference body run op by op:", "",
                  "| function | variant | µs | TB/s | max abs vs reference |", "|---|---|---|---|---|"]
        for f in parts["fused"]:
            lines.append(f"| {f['fn']} | {f['variant']} | {f.get('us')} | {f.get('tb_s')} | {f.get('vs_ref_max_abs', '-')} |")
    par = extra.get("official_parity_cuda", [])
    if par:
        lines += ["", "## Numerics against the official `NextDiT_CLIP` (`bench/official_parity.py`, padded CFG pair, "
                      f"visit of {extra.get('official_parity_date', '')})", "",
                  "| model | device | fp32 ours vs official (rel L2) | bf16 official vs fp32 (rel L2, max/RMS) | "
                  "bf16 ours vs fp32 (rel L2, max/RMS) |", "|---|---|---|---|---|"]
        for r in par:
            o, u = r["bf16_official_vs_fp32"], r["bf16_ours_vs_fp32"]
            lines.append(f"| {r['model']} | {r['device']} ({r['kernels']}) | {r['fp32_ours_vs_official']['rel_l2']:.1e} | "
                         f"{o['rel_l2']:.2e}, {o['max_abs_over_rms']:.2e} | {u['rel_l2']:.2e}, {u['max_abs_over_rms']:.2e} |")
        if extra.get("official_parity_note"):
            lines += ["", extra["official_parity_note"]]
    lines += small_pc_sections()
    sys.path.insert(0, str(HERE))
    import fits
    pipeline = fits.load_rows(HERE / "results.json")
    lines += ["", fits.render(pipeline + fits.load_gguf_rows(pipeline), loss=fits.overlap_loss(HERE / "throttle.json"),
                           machine=extra["machine"]),
              *throttle_section()]
    if calib:
        lines += ["", "## Predicted vs measured stage peaks (`--calibrate`, 2026-11-29, before the fused kernels)", "",
                  "The fused kernels hold fewer float32 temporaries, so today's measured peaks sit further under these "
                  "predictions (see each row's measured/predicted columns above).", "",
                  *calibration_table(calib)]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
