"""Why a streamed row under a budget cap runs slower than the same plan without one.

The H200 visit of 2026-12-07 timed fp8 under 2 GB at 150.9 ms/step in the pipeline bench
(whole generations, budget enforced with ``set_per_process_memory_fraction``) and at 119.5 ms in
the GGUF bench (sampling alone, the budget only planned for), on the same 8-resident plan. This
script runs that plan (the GGUF bench's sampling row) uncapped, capped at the budget and capped
0.25 GB above it, on fixed random conditioning and on conditioning the encoders just made. Per
run: the step median, the caching allocator's free-the-cache-and-retry count (each one
synchronizes every stream), its segment maps and frees, and the peak reserved bytes; and, at
the sampling stage's entry, the CUDA segments with the live blocks inside them (what could
split a segment so a large activation no longer fits).

    python bench/cap_retries.py /tmp/full --out $OUT/cap_retries.json
    python bench/cap_retries.py --smoke          # tiny files on the CPU: the runs, no allocator
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from newbie_core.pipeline import MemorySettings, StorageDType, load_text_encoder_handle  # noqa: E402
from newbie_core.pipeline.conditioning import ConditioningCache  # noqa: E402
from newbie_core.pipeline.encode import encode_texts  # noqa: E402
from newbie_core.placement import Report, active_allocator, use_expandable_segments  # noqa: E402
from newbie_core.prompt import prepare_texts  # noqa: E402

from gguf_bench import sample_row  # noqa: E402
from row_timing import GB, PROMPT, load_models, sampling_bench_parser  # noqa: E402
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


# the full retries are in the row already (the stage record's alloc_retries)
COUNTERS = ("num_sync_all_streams", "num_device_alloc", "num_device_free")


def counters(device: torch.device) -> dict[str, int]:
    """The allocator's running counts: all-stream syncs (every cache release does one) and
    segment allocations / frees (with expandable segments, page maps / unmaps)."""
    stats = torch.cuda.memory_stats(device) if device.type == "cuda" else {}
    return {k: int(stats.get(k, 0)) for k in COUNTERS}


def sample_once(path: Path, conds, device, budget_gb: float | None, slack_gb: float | None, size: int,
                steps: int) -> dict:
    """The GGUF bench's sampling row of the fp8 DiT (gguf_bench.sample_row) planned for
    ``budget_gb`` and capped ``slack_gb`` above it (None: uncapped), with the allocator's counts
    over the run and the segments it starts from."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
    layout, before = segment_layout(device), counters(device)
    row = sample_row(path, device, budget_gb, size, steps, storage=StorageDType.FP8, conds=conds, cap_slack_gb=slack_gb)
    after = counters(device)
    return {**{k: v for k, v in row.items() if not k.startswith("_")},
            "allocator_counts": {k: after[k] - before[k] for k in COUNTERS}, "segments_at_entry": layout}


def main(argv: list[str] | None = None) -> None:
    ap = sampling_bench_parser(__doc__, steps=12)
    ap.add_argument("--budgets", default="2")
    args = ap.parse_args(argv)
    use_expandable_segments()
    if args.smoke:
        tiny = tiny_checkpoints("cap_retries_")
        dit, encoders = tiny.dit, load_text_encoder_handle(tiny.gemma, tiny.jina)
        device, size, steps, budgets = torch.device("cpu"), 64, 3, [None]
    else:
        root = Path(args.root)
        dit, encoders = root / "diffusion_models" / "NewBie-Image-Exp0.1-bf16.safetensors", load_models(root, "fp8").encoders
        device, size, steps = torch.device("cuda"), 1024, args.steps
        budgets = [float(b) for b in args.budgets.split(",")]
    rows = []
    for source in ("random", "encoded"):
        for budget in budgets:
            for slack in (None, 0.0, 0.25):
                if source == "encoded":      # the encoders run first, as in a whole generation
                    conds = encode_texts(encoders, prepare_texts(PROMPT), MemorySettings(
                        vram_budget_gb=budget, fp8_streaming=True), device, Report(),
                        None if budget is None else int(budget * GB), cache=ConditioningCache())
                else:
                    conds = None             # gguf_bench's fixed random conditioning
                row = {"conditioning": source, **sample_once(dit, conds, device, budget, slack, size, steps)}
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "segments_at_entry"}), flush=True)
    if args.out:
        stamp = {"machine": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                 "allocator": active_allocator(device).value, "torch": torch.__version__}
        args.out.write_text(json.dumps({**stamp, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
