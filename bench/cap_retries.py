"""Why a streamed row under a budget cap runs slower than the same plan without one.

The H200 visit of 2026-12-07 timed fp8 under 2 GB at 150.9 ms/step in the pipeline bench
(whole generations, budget enforced with ``set_per_process_memory_fraction``) and at 119.5 ms in
the GGUF bench (sampling alone, the budget only planned for), on the same 8-resident plan. This
script runs that plan uncapped, capped at the budget and capped 0.25 GB above it, on fixed
random conditioning and on conditioning the encoders just made, and gives per run the step median, the
caching allocator's free-the-cache-and-retry count (each one synchronizes every stream) and
the peak reserved bytes; and, at the sampling stage's entry, the CUDA segments with the live
blocks that sit inside them (what could split a segment so a large activation no longer fits).

    python bench/cap_retries.py /tmp/full --out $OUT/cap_retries.json
    python bench/cap_retries.py --smoke          # tiny files on the CPU: the runs, no allocator
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from newbie_core.pipeline import (MemorySettings, Models, SamplingSettings, StorageDType, load_dit_handle,  # noqa: E402
                                  load_text_encoder_handle, load_vae_handle)
from newbie_core.pipeline.conditioning import ConditioningCache  # noqa: E402
from newbie_core.pipeline.encode import encode_texts  # noqa: E402
from newbie_core.pipeline.sample import run_sampling  # noqa: E402
from newbie_core.placement import Report, active_allocator, use_expandable_segments  # noqa: E402
from newbie_core.prompt import prepare_texts  # noqa: E402

from lora_bench import _conds  # noqa: E402
from row_timing import GB, PROMPT, load_models, sampling_bench_parser, set_budget, steady_steps  # noqa: E402
from tiny_files import tiny_checkpoints  # noqa: E402


def segment_layout(device: torch.device) -> list[dict]:
    """Each reserved segment's size and stream, with the live blocks inside it (offset, bytes)."""
    if device.type != "cuda":
        return []
    out = []
    for seg in torch.cuda.memory_snapshot():
        live = [(b.get("address", 0) - seg["address"], b["size"]) for b in seg["blocks"]
                if b["state"] == "active_allocated"]
        out.append({"stream": seg.get("stream", 0), "segment_type": seg.get("segment_type"),
                    "total_mib": seg["total_size"] / 2**20, "live_mib": sum(s for _, s in live) / 2**20,
                    "live_blocks": [[round(o / 2**20, 1), round(s / 2**20, 2)] for o, s in live][:24]})
    return out


COUNTERS = ("num_alloc_retries", "num_sync_all_streams", "num_device_alloc", "num_device_free")


def counters(device: torch.device) -> dict[str, int]:
    """The allocator's running counts: full retries, all-stream syncs (every cache release does
    one), and segment allocations / frees (with expandable segments, page maps / unmaps)."""
    stats = torch.cuda.memory_stats(device) if device.type == "cuda" else {}
    return {k: int(stats.get(k, 0)) for k in COUNTERS}


def sample_once(models, conds, device, budget_gb: float | None, slack_gb: float | None, size: int,
                steps: int) -> dict:
    """One sampling run of the fp8 DiT planned for ``budget_gb``; with a ``slack_gb`` the process
    is capped at the budget plus that much (0: as a card of exactly the budget's size would be)."""
    cap = slack_gb is not None and budget_gb is not None
    memory = MemorySettings(vram_budget_gb=budget_gb, fp8_streaming=True)
    report = Report()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        layout = segment_layout(device)
        set_budget(device, budget_gb + slack_gb if cap else None)
    before = counters(device)
    try:
        result = run_sampling(models.dit, *conds, torch.zeros(1, 16, size // 8, size // 8),
                              SamplingSettings(steps=steps, cfg=5.0, seed=0), memory, device, report,
                              None if budget_gb is None else int(budget_gb * GB))
    finally:
        if cuda:
            set_budget(device, None)
    after = counters(device)
    steady = steady_steps(result.step_seconds)
    rec = report.records[-1]
    return {"budget_gb": budget_gb, "cap_gb": budget_gb + slack_gb if cap and cuda else None, "s_per_step": statistics.median(steady),
            "s_step_min": min(steady), "s_step_max": max(steady), "alloc_retries": rec.alloc_retries,
            "allocator_counts": {k: after[k] - before[k] for k in COUNTERS},
            "peak_reserved_gb": (rec.peak_reserved or 0) / GB, "predicted_peak_gb": (rec.predicted_peak or 0) / GB,
            "resident_blocks": len(result.plan.resident), "segments_at_entry": layout if cuda else []}


def main(argv: list[str] | None = None) -> None:
    ap = sampling_bench_parser(__doc__, steps=12)
    ap.add_argument("--budgets", default="2")
    args = ap.parse_args(argv)
    use_expandable_segments()
    if args.smoke:
        tiny = tiny_checkpoints("cap_retries_")
        models = Models(load_dit_handle(tiny.dit, StorageDType.FP8),
                        load_text_encoder_handle(tiny.gemma, tiny.jina), load_vae_handle(tiny.vae))
        device, size, steps, budgets = torch.device("cpu"), 64, 3, [None]
    else:
        models = load_models(Path(args.root), "fp8")
        device, size, steps = torch.device("cuda"), 1024, args.steps
        budgets = [float(b) for b in args.budgets.split(",")]
    fixed = _conds(models.dit.ckpt.config, 300 if device.type == "cuda" else 7)
    rows = []
    for source in ("random", "encoded"):
        for budget in budgets:
            for slack in (None, 0.0, 0.25):
                if source == "encoded":      # the encoders run first, as in a whole generation
                    conds = encode_texts(models.encoders, prepare_texts(PROMPT), MemorySettings(
                        vram_budget_gb=budget, fp8_streaming=True), device, Report(),
                        None if budget is None else int(budget * GB), cache=ConditioningCache())
                else:
                    conds = fixed
                row = {"conditioning": source, **sample_once(models, conds, device, budget, slack, size, steps)}
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "segments_at_entry"}), flush=True)
    if args.out:
        stamp = {"machine": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                 "allocator": active_allocator(device).value, "torch": torch.__version__}
        args.out.write_text(json.dumps({**stamp, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
