"""BENCHMARKS.md's sections for small PCs (issues 11-13), each from its own file in bench/:
GGUF rows, decode shapes, host RAM, the LoRA cost, the soak, and the throttled-link check; and
the helpers that load those files and say which visit measured them. bench/report.py renders
the rest and calls these.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _ms(x: float) -> str:
    return f"{1e3 * x:.1f}"


def _load(name: str):
    path = HERE / name
    return json.loads(path.read_text()) if path.exists() else None


def _visit(doc: dict) -> str:
    """Whether ``doc`` was written by the collect that wrote extra.json (the visit of the rows
    above) or is kept from an earlier one."""
    this = (_load("extra.json") or {}).get("visit")
    if this and doc.get("visit") == this:
        return "same visit"
    return doc.get("visit_label") or "an earlier visit"


def _when(extra: dict, key: str) -> str:
    """"same visit" as the rows, or which earlier visit (collect.py --earlier names it)."""
    when = extra.get(key + "_visit")
    if when == extra.get("visit"):
        return "same visit"
    return when if when and not when[:4].isdigit() else "an earlier visit"


def decode_section(extra: dict) -> list[str]:
    """GGUF decode launch shapes (bench/gguf_decode_bench.py)."""
    dec = extra.get("gguf_decode")
    if not dec:
        return []
    out = ["", f"GGUF decode of one joint layer (87 M weights) on the GPU (`bench/gguf_decode_bench.py`, "
               f"{_when(extra, 'gguf_decode')}); bytes = one byte per load, words = 16/32-bit loads and many "
               "blocks per program (form/blocks per program/warps); the production shape is "
               "`triton_dequant.LAUNCH`. The `block/` rows are placement's upcast of a whole packed joint "
               "block (13 tensors) tensor by tensor or in one launch, with the host time to issue it:", "",
           "| type | variant | µs | GB/s | × copy | host µs | = torch decode |", "|---|---|---|---|---|---|---|"]
    for r in dec:
        host = f"{r['host_us']:.1f}" if "host_us" in r else "-"
        out.append(f"| {r['qtype']} | {r['variant']} | {r['us']:.1f} | {r['gbps']:.0f} | {r['x_copy']:.2f} | {host} | "
                   f"{'-' if r['variant'] in ('copy', 'torch') else ('no' if r['differs'] else 'yes')} |")
    return out


def throttle_section() -> list[str]:
    """The link projection checked on the GPU machine with a throttled copy stream."""
    doc = _load("throttle.json")
    if not doc:
        return ["", "Not yet checked against a throttled link (`bash bench/gpu_visit.sh throttle`)."]
    runs = sorted({r.get("run", 1) for r in doc["rows"]})
    out = ["", f"Checked at a few points by throttling the copy stream to the link's speed "
               f"(`bench/link_throttle_bench.py`, {doc['date']}, {_visit(doc)}, {len(runs)} run(s)). Each throttled "
               "row is planned for its link, as a machine with that link plans it; the projection is the "
               "unthrottled row's max(step, MB/step over the link):", "",
           "| storage | budget GB | link GB/s | chunks (attention / FFN) | resident blocks | measured s/step "
           + "/ ".join(f"run {k}" for k in runs) + " | projected s/step | measured / projected |",
           "|---|---|---|---|---|---|---|---|"]
    key = lambda r: (r["storage"], r["budget_gb"], r["link_gbps"])     # noqa: E731
    groups: dict = {}
    for r in doc["rows"]:
        groups.setdefault(key(r), []).append(r)
    for rows in groups.values():
        r = rows[0]
        chunks = " / ".join(str(c) for c in r["chunks"]) if r.get("chunks") else "-"
        ratios = [x["x_projection"] for x in rows]
        out.append(f"| {r['storage']} | {r['budget_gb']} | {r['link_gbps']} | {chunks} | "
                   f"{r.get('resident_blocks', '-')} | "
                   + " / ".join(f"{x['s_per_step']:.3f}" for x in rows) + f" | {r['projected_s_per_step']:.3f} | "
                   + " / ".join(f"{x:.2f}" for x in ratios) + " |")
    worst = max(doc["rows"], key=lambda r: r["x_projection"])
    out += ["", f"Worst {worst['x_projection']:.2f}x ({worst['storage']}, {worst['budget_gb']} GB, "
                f"{worst['link_gbps']} GB/s): the projection is optimistic where copy and compute are nearly equal. "
                "Below 1 the throttled plan kept more blocks resident than the unthrottled one whose bytes the "
                "projection uses."]
    if doc.get("before"):
        before = {key(r): r for r in doc["before"]}
        lines = [f"{k[0]} {k[1]} GB at {k[2]} GB/s {before[k]['s_per_step']:.3f} -> "
                 f"{min(x['s_per_step'] for x in rows):.3f}-{max(x['s_per_step'] for x in rows):.3f} s"
                 for k, rows in groups.items() if k in before]
        out += ["", f"Before: {doc.get('before_note', '')} " + "; ".join(lines) + "."]
    return out


def activation_section() -> list[str]:
    """Where a small budget's peak goes, per allocator (bench/activation_memory.json), and what
    each run's plan copies: the Q4_K against fp8 bytes under each allocator's plan."""
    doc = _load("activation_memory.json")
    if not doc:
        return []
    rows = [r for r in doc["rows"] if "error" not in r]
    out = ["", f"## Allocators and activation memory (`bench/activation_memory.py`, {doc['date']}, {_visit(doc)})", "",
           "The sampling stage of one file for 4 steps with torch's allocator history on (step times carry its "
           "cost: not speed rows), each allocator in a fresh process. Peaks in MiB: live (allocated) and reserved "
           "(what a budget counts), beside the plan's prediction. Each allocator gets its own plan "
           "(placement/allocator.py), so the resident blocks differ. MB/forward = what every step copies; "
           "MB/step (28 steps) adds the one-time uploads and once blocks spread over a 28-step generation.", "",
           "| file | storage | budget GB | size | allocator | resident | live peak | reserved peak | predicted | "
           "under prediction by | MB/forward | MB/step (28 steps) |", "|" + "---|" * 12]
    for r in rows:
        reserved, predicted = 1024 * r["peak_reserved_gib"], 1024 * r["predicted_peak_gib"]
        per28 = (r["upload_mb"] + r["once_mb"] + 28 * r["per_forward_mb"] + r["ahead_mb"]) / 28
        storage = f"gguf-{r['file'].rsplit('-', 1)[-1][:-5].lower()}" if r["file"].endswith(".gguf") else r["storage"]
        out.append(f"| {r['file'].removeprefix('NewBie-Image-Exp0.1-')} | {storage} | {r['budget_gb'] or 'none'} | "
                   f"{r['size']}² | {r['allocator']} | {r['resident_blocks']} | {1024 * r['peak_allocated_gib']:.0f} | "
                   f"{reserved:.0f} | {predicted:.0f} | {predicted - reserved:.0f} | {r['per_forward_mb']:.0f} | {per28:.0f} |")
    pairs = {}
    for r in rows:
        if r["budget_gb"] == 2 and r["size"] == 1024:
            kind = "Q4_K" if "Q4_K" in r["file"] else "fp8" if r["storage"] == "fp8" else None
            if kind:
                pairs.setdefault(r["allocator"], {})[kind] = r["per_forward_mb"]
    ratios = [f"{a}: {p['Q4_K']:.0f} against {p['fp8']:.0f} MB, **{p['Q4_K'] / p['fp8']:.2f}×**"
              for a, p in pairs.items() if {"Q4_K", "fp8"} <= set(p)]
    if ratios:
        out += ["", "Q4_K against fp8 under 2 GB at 1024² CFG, bytes every step copies, each allocator's plan: "
                + "; ".join(ratios) + "."]
    site_rows = [r for r in rows if r.get("live_at_peak")]
    if site_rows:
        r = site_rows[0]
        out += ["", f"What is live at the peak of the first run ({r['file'].removeprefix('NewBie-Image-Exp0.1-')}, "
                f"{r['storage']}, {r['budget_gb']} GB, {r['allocator']}), by the line that allocated it:", "",
                "| MiB | tensors | allocated at |", "|---|---|---|"]
        out += [f"| {s['mib']} | {s['n']} | `{s['site']}` |" for s in r["live_at_peak"]]
    out += [line for note in doc.get("notes", []) for line in ("", note)]
    return out


def ring_slots_section() -> list[str]:
    """Streamed rows planned with at most three against at most two ring slots
    (bench/ring_slots.json): the measurement behind planner.STAGED_SLOTS."""
    doc = _load("ring_slots.json")
    if not doc:
        return []
    out = ["", f"## Ring depth: three slots against two (`bench/ring_slots.py`, {doc['date']}, {_visit(doc)})", "",
           "The same rows planned with at most 3 and at most 2 ring slots, CFG, 8 steps; a link figure means the "
           "copy engine throttled to that rate (`bench/link_throttle_bench.py`'s engine) and the plan made for it. "
           "With 2 slots the bytes of the third keep blocks resident.", "",
           "| storage | budget GB | size | link GB/s | 3 slots: ms/step (resident, MB/step) | "
           "2 slots: ms/step (resident, MB/step) | 2 against 3 |", "|" + "---|" * 7]
    rows = doc["rows"]

    def cell(r: dict) -> str:
        return f"{1e3 * r['s_per_step']:.1f} ({r['resident_blocks']}, {r['bytes_h2d_per_step'] / 1e6:.0f})"
    for three in (r for r in rows if r["max_slots"] == 3):
        two = next((r for r in rows if r["max_slots"] == 2 and all(
            r[k] == three[k] for k in ("storage", "budget_gb", "size", "link_gbps"))), None)
        if two is None:
            continue
        link = three["link_gbps"] or f"own ({three['native_link_gbps']:.0f})"
        out.append(f"| {three['storage']} | {three['budget_gb']} | {three['size']} | {link} | {cell(three)} | "
                   f"{cell(two)} | {two['s_per_step'] / three['s_per_step']:.3f} |")
    out += [line for note in doc.get("notes", []) for line in ("", note)]
    return out


def small_pc_sections() -> list[str]:
    """GGUF rows, host-RAM rows, the LoRA cost and the soak (issues 11-13)."""
    out = []
    extra = _load("extra.json") or {}
    gguf = _load("gguf.json")
    if gguf:
        out += ["", f"## GGUF and fp8 DiT files, sampling only (`bench/gguf_bench.py`, {gguf[0]['date']}, "
                f"{_visit(gguf[0])})", "",
                "1024² CFG, 28 steps, fixed random conditioning. MB/step = bytes copied to the GPU per step "
                "(the first step's uploads included); roofline = max(the same file's resident step, MB/step over "
                f"{gguf[0]['bandwidth_gbps']:.1f} GB/s). Dequant = Triton decode of one joint layer's weights.", "",
                "| storage | budget GB | ms/step (min-max) | × bf16 resident | × roofline | peak GB (predicted) | "
                "MB/step | resident blocks | bitwise = its resident | latent vs bf16 (rel L2) | dequant ms/layer |",
                "|" + "---|" * 11]
        base = gguf[0]
        for r in gguf:
            drift = r.get("drift_vs_bf16", {}).get("rel_l2")
            out.append(f"| {r['storage']} | {r['budget_gb'] or 'none'} | {1e3 * r['s_per_step']:.1f} "
                       f"({_ms(r['s_step_min'])}-{_ms(r['s_step_max'])}) | {r['s_per_step'] / base['s_per_step']:.3f} | "
                       f"{r.get('x_roofline', 1.0):.3f} | {r['peak_reserved_gb']:.2f} ({r['predicted_peak_gb']:.2f}) | "
                       f"{r['bytes_h2d_per_step'] / 1e6:.0f} | {r['resident_blocks']}/{r['n_blocks']} | "
                       f"{r.get('bitwise_equal_to_resident', '-')} | {'-' if drift is None else f'{drift:.3f}'} | "
                       f"{r.get('dequant_ms_per_layer', '-') if r.get('dequant_ms_per_layer') is None else round(r['dequant_ms_per_layer'], 3)} |")
        if extra.get("gguf_note"):
            out += ["", extra["gguf_note"]]
        if extra.get("gguf_peers") and extra.get("gguf_peers_visit") == gguf[0].get("visit"):
            out += ["", "Measured in the same visit as these GGUF rows (`bench/peers.py`, bf16 forward, 1024² CFG):", "",
                    "| row | budget GB | ms/step (min-max) | TFLOP/s | peak GB |", "|---|---|---|---|---|"]
            for r in extra["gguf_peers"]:
                tflops = "-" if r["tflops"] is None else f"{r['tflops']:.0f}"
                out.append(f"| {r['row']} | {r['budget_gb'] or 'none'} | {r['ms_per_step']:.1f} "
                           f"({r['ms_min']:.1f}-{r['ms_max']:.1f}) | {tflops} | {r['peak_reserved_gb']:.2f} |")
        if extra.get("gguf_commands"):
            out += ["", "This partial visit's commands:", ""] + [f"    {c}" for c in extra["gguf_commands"]]
    out += activation_section()
    out += ring_slots_section()
    out += decode_section(extra)
    ram = _load("host_ram.json")
    if ram:
        earlier = any(r.get("earlier_visit") for r in ram["rows"])
        out += ["", f"## Host RAM (`bench/host_ram_bench.py`, {ram['date']}, {_visit(ram)}"
                + ("; rows marked * from an earlier run (`--resume`)" if earlier else "") + ")", "",
                "Whole generations at 1024² CFG, 4 steps, one fresh process per row; cold = the model files "
                "evicted from the page cache first. RAM budgets and peaks in GiB (what `--ram-budget` counts). "
                "× unlimited compares with the unlimited-RAM row of the same VRAM budget and temperature. "
                "A row marked *same plan* was not run: every stage's VRAM plan and the host plan equal those of "
                "the row it names (`--same-plan`: a budget with room to spare changes nothing), so that row's "
                "figures are its own.", "",
                "| storage | RAM budget | VRAM budget | cold/warm | s/step | generation s | × unlimited | VmHWM GiB | "
                "predicted GiB | pinned GiB | read from disk GB | within budget |", "|" + "---|" * 12]
        for r in ram["rows"]:
            if "same_plan_as" in r:
                twin = r["same_plan_as"]
                out.append(f"| {r['storage']} | {r['ram_budget_gb']} | {r['vram_budget_gb']} | {r['temperature']} | "
                           f"same plan as {twin['storage']} at "
                           f"{'unlimited' if twin['ram_budget_gb'] is None else twin['ram_budget_gb']} GB RAM / "
                           f"{twin['vram_budget_gb']} GB VRAM |" + " |" * 7)
                continue
            if "error" in r:
                out.append(f"| {r['storage']} | {r['ram_budget_gb']} | {r['vram_budget_gb']} | {r['temperature']} | "
                           f"failed: {r['error'][:80]} |" + " |" * 7)
                continue
            x = r.get("x_unlimited_generation")
            predicted = r.get("predicted_host_peak_gb")
            out.append(f"| {r['storage']} | {r['ram_budget_gb'] or 'auto (unlimited)'} | {r['vram_budget_gb']} | "
                       f"{r['temperature']}{' *' if r.get('earlier_visit') else ''} | {r['s_per_step']:.3f} | "
                       f"{r['generation_s']:.1f} | {'-' if x is None else f'{x:.3f}'} | {r['host_ram_peak_gb']:.2f} | "
                       f"{'not recorded' if predicted is None else f'{predicted:.2f}'} | {r['pinned_gb']:.2f} | "
                       f"{r['bytes_read_gb']:.1f} | {r.get('within_ram_budget', '-')} |")
        out += [line for note in ram.get("notes", []) for line in ("", note)]
    lora = _load("lora.json")
    if lora:
        first = lora["rows"][0]
        out += ["", f"## LoRA cost (`bench/lora_bench.py`, rank-32 PEFT LoRA on every linear, {lora['date']}, "
                f"{_visit(lora)})", "",
                f"Reading and mapping the LoRA: {first['lora_read_map_s']:.2f} s the first time, "
                f"{first['lora_cached_map_s']:.3f} s from the cache (a strength change reads no file).", "",
                "| budget | resident blocks | ms/step without | with LoRA | per-step cost |", "|---|---|---|---|---|"]
        for r in lora["rows"]:
            out.append(f"| {r['budget']} | {r['resident_blocks']}/{r['n_blocks']} | {1e3 * r['step_s']:.1f} | "
                       f"{1e3 * r['step_s_lora']:.1f} | {100 * r['overhead']:+.1f} % |")
    soak = _load("soak.json")
    if soak:
        g, c = soak["growth_after_first_mib"], soak.get("growth_after_first_cycle_mib", {})
        runs = soak["runs"]
        out += ["", f"## Soak (`bench/soak.py`, full-size files, {soak['date']}, {_visit(soak)})", "",
                f"{len(runs)} consecutive whole generations in one process (sizes 512², 640×512, 512×640; budgets "
                f"none / 4 / 2 GB; five prompts; 2 steps). After each: VRAM allocated/reserved, pinned host "
                f"memory, RSS (MiB).", "",
                "| | allocated | reserved | pinned | RSS |", "|---|---|---|---|---|",
                f"| run 0 | {runs[0]['allocated_mib']:.0f} | {runs[0]['reserved_mib']:.0f} | {runs[0]['pinned_mib']:.0f} | "
                f"{runs[0]['rss_mib']:.0f} |",
                f"| run {len(runs) - 1} | {runs[-1]['allocated_mib']:.0f} | {runs[-1]['reserved_mib']:.0f} | "
                f"{runs[-1]['pinned_mib']:.0f} | {runs[-1]['rss_mib']:.0f} |",
                f"| growth after run 0 | {g['allocated_mib']:+.1f} | {g['reserved_mib']:+.1f} | {g['pinned_mib']:+.1f} | "
                f"{g['rss_mib']:+.1f} |"]
        if c:
            out.append(f"| growth after run 5 (each size and budget seen once) | {c['allocated_mib']:+.1f} | "
                       f"{c['reserved_mib']:+.1f} | {c['pinned_mib']:+.1f} | {c['rss_mib']:+.1f} |")
    return out
