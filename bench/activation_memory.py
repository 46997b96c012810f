"""Where a sampling stage's VRAM goes at its peak, and what the allocator reserves around it.

Under a 2 GB budget at 1024² with CFG the activations' share of the peak is about two thirds
(bench/gguf.json: 1.25 GiB of a 1.90 GiB Q4_K row), and the planner predicts them as an
analytic count times a fitted factor (pipeline/sample.py, DIT_ACTIVATION_FACTOR). This runs the
sampling stage of one file under one budget for a few steps with torch's allocator history on,
and prints:

- peak allocated and peak reserved (what a budget counts), and the plan's prediction;
- at the moment of peak allocated, the live bytes grouped by the line of this package that
  allocated them (weights, ring slots, activations by the op that made them);
- the same run's steady s/step, so an allocator setting's cost shows beside its bytes.

``--allocator`` runs each named ``PYTORCH_CUDA_ALLOC_CONF`` in its own process (the setting is
read once per process): ``native`` (unset), ``expandable`` (expandable_segments:True) and
``async`` (backend:cudaMallocAsync, what ComfyUI sets by default on CUDA builds of torch; it has
no allocator history, so only its peaks are printed).

    python bench/activation_memory.py /tmp/full --file NewBie-Image-Exp0.1-Q4_K.gguf --budget 2 \\
        --allocator native expandable async --out $OUT/act_q4k.json
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from newbie_core.pipeline import StorageDType  # noqa: E402

from gguf_bench import sample_row  # noqa: E402
from row_timing import dit_block_bytes  # noqa: E402

GiB = 2**30
ALLOCATORS = {"native": None, "expandable": "expandable_segments:True", "async": "backend:cudaMallocAsync"}
OURS = "newbie_core"


def _site(frames: list[dict]) -> str:
    """The innermost frame in this package (file:line function), else the innermost frame."""
    for frame in frames:
        if OURS in frame.get("filename", ""):
            name = frame["filename"].split(OURS, 1)[1].lstrip("/")
            return f"{name}:{frame['line']} {frame['name']}"
    return f"{frames[0]['filename']}:{frames[0]['line']} {frames[0]['name']}" if frames else "?"


def live_at_peak(snapshot: dict, device: int = 0) -> tuple[int, list[tuple[str, int, int]]]:
    """Replays the allocator trace: the peak of allocated bytes and, at that moment, the live
    bytes and allocation count per allocating site, largest first. Allocations older than the
    trace (none when recording starts before the run) are not seen."""
    live: dict[int, tuple[int, str]] = {}
    total = peak = 0
    at_peak: dict[int, tuple[int, str]] = {}
    for event in snapshot["device_traces"][device]:
        action = event["action"]
        if action == "alloc":
            live[event["addr"]] = (event["size"], _site(event.get("frames", [])))
            total += event["size"]
            if total > peak:
                peak, at_peak = total, dict(live)
        elif action == "free_completed" and event["addr"] in live:
            total -= live.pop(event["addr"])[0]
    sites: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for size, site in at_peak.values():
        sites[site][0] += size
        sites[site][1] += 1
    return peak, sorted(((s, b, n) for s, (b, n) in sites.items()), key=lambda r: -r[1])


def plan_bytes(handle, plan) -> dict:
    """What the plan copies, MB: the resident uploads, the once blocks, every forward's streamed
    blocks, and the prefetch past the last step. A run of ``n`` steps copies upload + once +
    n x per_forward + ahead, which the runner's counter (``bytes_h2d``) matches to the byte."""
    stored = dit_block_bytes(handle, plan)
    ahead = [i for i in plan.cycle_blocks[: plan.prefetch_depth + 1] if i not in plan.resident]
    return {k: sum(stored[i] for i in blocks) / 1e6 for k, blocks in (
        ("upload_mb", plan.resident), ("once_mb", [i for i in plan.streamed if i in plan.once]),
        ("per_forward_mb", plan.streamed_per_forward), ("ahead_mb", ahead))}


def one_run(args: argparse.Namespace) -> dict:
    device = torch.device("cuda")
    history = torch.cuda.memory.get_allocator_backend() != "cudaMallocAsync"    # it keeps no history
    if history:
        torch.cuda.memory._record_memory_history(max_entries=2_000_000)
    storage = StorageDType.FP8 if args.storage == "fp8" else StorageDType.BF16
    row = sample_row(Path(args.root) / "diffusion_models" / args.file, device, args.budget, args.size, args.steps,
                     storage=storage)
    out = {"machine": torch.cuda.get_device_name(device), "date": datetime.date.today().isoformat(),
           "file": args.file, "storage": args.storage, "budget_gb": args.budget, "size": args.size,
           "allocator": os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or "native",
           "s_per_step": row["s_per_step"], "s_step_min": row["s_step_min"], "s_step_max": row["s_step_max"],
           "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / GiB,
           "peak_allocated_gib": torch.cuda.max_memory_allocated(device) / GiB,
           "stage_peak_reserved_gib": row["peak_reserved_gb"], "predicted_peak_gib": row["predicted_peak_gb"],
           "resident_blocks": row["resident_blocks"], "chunks": row["chunks"],
           "bytes_h2d_per_step": row["bytes_h2d_per_step"], **plan_bytes(row["_handle"], row["_plan"])}
    if history:
        snapshot = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
        peak, sites = live_at_peak(snapshot)
        out["traced_peak_allocated_gib"] = peak / GiB
        out["live_at_peak"] = [{"site": s, "mib": round(b / 2**20, 1), "n": n} for s, b, n in sites[:args.top]]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", nargs="?", default="/tmp/full")
    ap.add_argument("--file", default="NewBie-Image-Exp0.1-bf16.safetensors")
    ap.add_argument("--storage", choices=("bf16", "fp8"), default="bf16")
    ap.add_argument("--budget", type=float, default=None, help="VRAM budget in GiB (default: none)")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--top", type=int, default=25, help="allocating sites listed at the peak")
    ap.add_argument("--allocator", nargs="+", choices=sorted(ALLOCATORS),
                    help="run each in its own process (default: this process's setting, once)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if not args.allocator:
        print(json.dumps(one_run(args)), flush=True)
        return 0
    rows = []
    for name in args.allocator:
        env = {k: v for k, v in os.environ.items() if k != "PYTORCH_CUDA_ALLOC_CONF"}
        if ALLOCATORS[name]:
            env["PYTORCH_CUDA_ALLOC_CONF"] = ALLOCATORS[name]
        cmd = [sys.executable, __file__, args.root, "--file", args.file, "--storage", args.storage,
               "--size", str(args.size), "--steps", str(args.steps), "--top", str(args.top)]
        if args.budget is not None:
            cmd += ["--budget", str(args.budget)]
        done = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True)
        lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
        if done.returncode or not lines:
            rows.append({"allocator": name, "error": (done.stderr or done.stdout)[-2000:]})
        else:
            rows.append({**json.loads(lines[-1]), "allocator": name})
        row = rows[-1]
        print(json.dumps({k: v for k, v in row.items() if k != "live_at_peak"}), flush=True)
        for site in row.get("live_at_peak", []):
            print(f"    {site['mib']:9.1f} MiB  x{site['n']:<4d} {site['site']}", flush=True)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
