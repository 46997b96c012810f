"""Probe: does a streamed stage still need a third ring slot now that staged copies never wait
for compute? (planner.py, "What shrinks first").

The planner keeps three ring slots while residents go for upcast-per-use storage (fp8, GGUF):
the third was worth more than the residents it cost when copies waited for their slot. Since
each slot has its own staging buffer, a copy lands there while the slot's previous block still
computes, so two slots may overlap as well, and the slot's bytes would keep 3-5 more blocks
resident under 2 GB. This runs the same rows planned with at most 3 and at most 2 slots, at
the H200's own link and through a copy engine throttled to a slower one, and prints s/step
and bytes per step for each, so the planner's order is chosen from measurements.

    python bench/ring_slots.py /tmp/full --out $OUT/ring_slots.json
    python bench/ring_slots.py --smoke           # CPU: the plumbing on tiny files
"""

from __future__ import annotations

import datetime
import functools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from newbie_core.pipeline import placed  # noqa: E402
from newbie_core.placement import use_expandable_segments  # noqa: E402

from gguf_bench import sample_row  # noqa: E402
from row_timing import sampling_bench_parser  # noqa: E402
from link_throttle_bench import file_for, throttle_rates, throttled_copies  # noqa: E402
from tiny_files import tiny_checkpoints  # noqa: E402

# storage, VRAM budget GB, image side, link GB/s (None: this machine's own)
ROWS = (("fp8", 2.0, 1024, None), ("gguf-q4_k", 2.0, 1024, None), ("gguf-q8_0", 2.0, 1024, None),
        ("bf16", 2.0, 1024, None), ("fp8", 4.0, 1024, None),
        ("fp8", 2.0, 512, None), ("gguf-q4_k", 2.0, 512, None), ("gguf-q8_0", 2.0, 512, None),
        ("fp8", 2.0, 1024, 12), ("gguf-q4_k", 2.0, 1024, 12))


def run_row(root: Path, device: torch.device, storage: str, budget: float | None, size: int, link: float | None,
            steps: int, slots: int, native_bps: float, cycles: float) -> dict:
    path, dtype = file_for(root, storage)
    plan_stage = placed.plan_stage
    placed.plan_stage = functools.partial(plan_stage, max_slots=slots, staged_slots=slots)
    try:
        with throttled_copies(device, link, native_bps, cycles):
            row = sample_row(path, device, budget, size, steps, storage=dtype, link_gbps=link)
    finally:
        placed.plan_stage = plan_stage
    plan = row["_plan"]
    return {"storage": storage, "budget_gb": budget, "size": f"{size}x{size}", "cfg": True, "steps": steps,
            "link_gbps": link, "max_slots": slots, "slots": plan.slots, "resident_blocks": row["resident_blocks"],
            "chunks": row["chunks"], "s_per_step": row["s_per_step"], "s_step_min": row["s_step_min"],
            "s_step_max": row["s_step_max"], "bytes_h2d_per_step": row["bytes_h2d_per_step"],
            "predicted_step_s": row["predicted_step_s"], "peak_reserved_gb": row["peak_reserved_gb"],
            "predicted_peak_gb": row["predicted_peak_gb"]}


def main(argv: list[str] | None = None) -> int:
    args = sampling_bench_parser(__doc__, steps=8).parse_args(argv)
    use_expandable_segments()            # as the CLI runs: before the first CUDA allocation
    if args.smoke:
        root, device, steps, rows = tiny_checkpoints("ring_slots_").root, torch.device("cpu"), 2, (("fp8", None, 64, None),)
    else:
        root, device, steps, rows = Path(args.root), torch.device("cuda"), args.steps, ROWS
    native, cycles = throttle_rates(device)
    stamp = {"machine": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
             "native_link_gbps": native / 1e9, "date": datetime.date.today().isoformat()}
    out = []
    for storage, budget, size, link in rows:
        for slots in (3, 2):
            out.append({**run_row(root, device, storage, budget, size, link, steps, slots, native, cycles), **stamp})
            print(json.dumps(out[-1]), flush=True)
            if args.out:
                args.out.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
