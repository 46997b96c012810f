"""Where a streamed sampling step loses time against its resident run: the compute stream's idle
gaps, each put down to what compute was waiting for.

The steady steps run under the torch profiler (the first two are skipped: uploads, compiles).
Its trace gives every kernel and copy with its stream. The compute stream is the one with the
most kernel time. A gap on it longer than ``--min-gap-us`` is put down to:

- a **copy**, when a host-to-device copy on another stream ended at the gap's end (within
  ``--slack-us``): compute waited for a block's bytes;
- an **upcast**, when a kernel on another stream (fp8 upcast, GGUF decode) ended there: compute
  waited for a block's decode;
- the **host** otherwise: nothing on the GPU was holding compute back, so the next kernel had
  not been launched yet.

Also per step: the time upcast kernels ran beside compute kernels (they share the SMs) and the
compute kernels' own time. Two runs of the same file, resident and under a budget, show where
the difference goes.

    python bench/stream_gaps.py /tmp/full --file NewBie-Image-Exp0.1-Q8_0.gguf --budgets none,2
    python bench/stream_gaps.py /tmp/full --file NewBie-Image-Exp0.1-bf16.safetensors --storage fp8
"""

from __future__ import annotations

import argparse
import bisect
import gzip
import json
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

GB = 2**30


def kernel_names(events: Iterable[dict], top: int = 8) -> dict:
    """Kernel time by name on each stream, the ``top`` names of each, in µs: which decode, upcast
    or compute kernels a streamed step spends its time on."""
    by_stream: dict[str, dict[str, list[float]]] = {}
    for e in events:
        if e.get("ph") == "X" and "dur" in e and e.get("cat") == "kernel":
            per = by_stream.setdefault(str(e.get("tid")), {}).setdefault(e.get("name", "?")[:90], [0.0, 0])
            per[0] += float(e["dur"])
            per[1] += 1
    return {tid: sorted(([n, round(us, 1), c] for n, (us, c) in names.items()), key=lambda r: -r[1])[:top]
            for tid, names in by_stream.items()}


def _intervals(events: Iterable[dict]) -> tuple[dict, list]:
    """Chrome-trace device events -> (kernel spans by stream, host-to-device copy spans), in µs."""
    kernels: dict[object, list[tuple[float, float]]] = {}
    copies = []
    for e in events:
        if e.get("ph") != "X" or "dur" not in e:
            continue
        span = (float(e["ts"]), float(e["ts"]) + float(e["dur"]))
        cat = e.get("cat", "")
        if cat == "kernel":
            kernels.setdefault(e.get("tid"), []).append(span)
        elif cat == "gpu_memcpy" and "HtoD" in e.get("name", ""):
            copies.append(span)
    return kernels, copies


def _overlap(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """Total time two sorted lists of disjoint intervals overlap."""
    total, j = 0.0, 0
    for start, end in a:
        while j < len(b) and b[j][1] <= start:
            j += 1
        k = j
        while k < len(b) and b[k][0] < end:
            total += max(0.0, min(end, b[k][1]) - max(start, b[k][0]))
            k += 1
    return total


def classify_gaps(events: Iterable[dict], min_gap_us: float = 5.0, slack_us: float = 10.0) -> dict:
    """Seconds of compute-stream idle time put down to copies, upcasts and the host, plus the
    compute kernels' time and the upcast kernels' time beside them (see module docstring)."""
    kernels, copies = _intervals(events)
    if not kernels:
        return {"compute_s": 0.0, "gap_copy_s": 0.0, "gap_upcast_s": 0.0, "gap_host_s": 0.0,
                "upcast_beside_compute_s": 0.0, "gaps": 0}
    main = max(kernels, key=lambda t: sum(e - s for s, e in kernels[t]))
    compute = sorted(kernels[main])
    upcasts = sorted(span for t, spans in kernels.items() if t != main for span in spans)
    ends = sorted([(e, "copy") for _, e in copies] + [(e, "upcast") for _, e in upcasts])
    end_times = [e for e, _ in ends]
    out = {"compute_s": sum(e - s for s, e in compute) / 1e6, "gap_copy_s": 0.0, "gap_upcast_s": 0.0,
           "gap_host_s": 0.0, "upcast_beside_compute_s": _overlap(compute, upcasts) / 1e6, "gaps": 0}
    for (_, prev_end), (start, _) in zip(compute, compute[1:]):
        gap = start - prev_end
        if gap < min_gap_us:
            continue
        out["gaps"] += 1
        # the last copy or upcast to end just before compute resumed (2 µs of clock skew allowed)
        i = bisect.bisect_right(end_times, start + 2.0) - 1
        cause = "host"
        if i >= 0 and ends[i][0] >= max(start - slack_us, prev_end):
            cause = ends[i][1]
        out[f"gap_{cause}_s"] += gap / 1e6
    return out


def profile_row(path: Path, storage: str, budget_gb: float | None, steps: int, size: int,
                trace: Path | None = None) -> dict:
    """One sampling run under the profiler; the steady steps' gaps per step, in ms. ``trace``: also
    keep the profiler's chrome trace there, gzipped, to read offline."""
    import torch
    from lora_bench import _conds
    from newbie_core.pipeline import MemorySettings, SamplingSettings, StorageDType, load_dit_handle
    from newbie_core.pipeline.sample import run_sampling
    from newbie_core.placement import Report
    device = torch.device("cuda")
    handle = load_dit_handle(path, StorageDType(storage))
    conds = _conds(handle.ckpt.config, 300)
    skipped = 2
    sched = torch.profiler.schedule(wait=1, warmup=skipped - 1, active=steps - skipped)
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts, schedule=sched) as prof:
        result = run_sampling(handle, *conds, torch.zeros(1, 16, size // 8, size // 8),
                              SamplingSettings(steps=steps, cfg=5.0), MemorySettings(), device, Report(),
                              None if budget_gb is None else int(budget_gb * GB),
                              callback=lambda i, n, x, d: prof.step())
        torch.cuda.synchronize()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        text = Path(f.name).read_text()
    events = json.loads(text)["traceEvents"]
    if trace is not None:
        trace.write_bytes(gzip.compress(text.encode(), 6))
    gaps = classify_gaps(events)
    active = steps - skipped
    names = {tid: [[n, round(us / 1e3 / active, 3), c / active] for n, us, c in rows]
             for tid, rows in kernel_names(events).items()}
    return {"file": path.name, "storage": storage, "budget_gb": budget_gb, "size": f"{size}x{size}",
            "steps_profiled": active, "resident_blocks": len(result.plan.resident),
            **{k.replace("_s", "_ms_per_step"): round(v * 1e3 / active, 3) for k, v in gaps.items() if k != "gaps"},
            "gaps_per_step": gaps["gaps"] / active,
            "kernels_ms_per_step": names}    # stream -> [name, ms per step, launches per step]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", nargs="?", default="/tmp/full")
    ap.add_argument("--file", default="NewBie-Image-Exp0.1-Q8_0.gguf", help="a file under ROOT/diffusion_models")
    ap.add_argument("--storage", default="bf16", choices=["bf16", "fp8"], help="fp8: stream a bf16 file as fp8")
    ap.add_argument("--budgets", default="none,2")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--trace-dir", type=Path, help="keep each row's chrome trace here (gzipped)")
    ap.add_argument("--trace-budgets", default="2", help="the budgets whose trace is kept")
    args = ap.parse_args(argv)
    path = Path(args.root) / "diffusion_models" / args.file
    rows = []
    for b in args.budgets.split(","):
        trace = None
        if args.trace_dir and b in args.trace_budgets.split(","):
            args.trace_dir.mkdir(parents=True, exist_ok=True)
            trace = args.trace_dir / f"trace_{path.stem}_{args.storage}_{b}.json.gz"
        rows.append(profile_row(path, args.storage, None if b == "none" else float(b), args.steps, args.size,
                                trace))
        print(json.dumps(rows[-1]), flush=True)
        if args.out:
            args.out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
