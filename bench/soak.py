"""Full-size soak (issue 11, item 5): consecutive whole generations with changing prompts, sizes
and VRAM budgets in one process; VRAM (allocated, reserved), pinned host memory and RSS after
each. Nothing may grow after the first run, which fills the host caches and compiles.

    python bench/full_size.py /tmp/full
    python bench/soak.py /tmp/full --runs 30 --out $OUT/soak.json
    python bench/soak.py --smoke                      # tiny models on the CPU
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from newbie_core.pipeline import (GenerationRequest, MemorySettings, Models, SamplingSettings, generate,  # noqa: E402
                                  load_dit_handle, load_text_encoder_handle, load_vae_handle)
from newbie_core.placement.host_budget import pinned_bytes  # noqa: E402
from tiny_files import tiny_checkpoints  # noqa: E402

MIB = 2**20
SIZES = [(512, 512), (640, 512), (512, 640)]
BUDGETS = [None, 4.0, 2.0]
PROMPTS = ["1girl, solo, smile", "2girls, beach, sunset", "a cat on a windowsill, rain",
           "<character_1>\n<n>miku</n>\n<gender>1girl</gender>\n</character_1>", "city at night, neon, masterpiece"]
# Growth allowed between the first and the last snapshot: the CUDA caching allocator and glibc
# keep small amounts around (the CUDA tier's tolerances).
SLACK = {"allocated_mib": 8, "reserved_mib": 8, "pinned_mib": 8, "rss_mib": 256}


def heap_in_use() -> int:
    """Bytes glibc's malloc has handed out and not taken back (mallinfo2), 0 where there is no
    glibc: set beside RSS it tells live native allocations from pages the allocator keeps."""
    try:
        import ctypes

        class MallInfo2(ctypes.Structure):
            _fields_ = [(name, ctypes.c_size_t) for name in
                        ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                         "fordblks", "keepcost")]
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = MallInfo2
        info = libc.mallinfo2()
        return info.uordblks + info.hblkhd
    except (OSError, AttributeError):
        return 0


def compiled_graphs() -> int:
    """How many graphs torch.compile has built in this process (a new shape that recompiles
    shows here)."""
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


def snapshot(device: torch.device) -> dict[str, float]:
    gc.collect()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
    with open("/proc/self/statm") as f:
        rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return {"allocated_mib": (torch.cuda.memory_allocated(device) if cuda else 0) / MIB,
            "reserved_mib": (torch.cuda.memory_reserved(device) if cuda else 0) / MIB,
            "pinned_mib": pinned_bytes() / MIB, "rss_mib": rss / MIB, "heap_in_use_mib": heap_in_use() / MIB,
            "compiled_graphs": compiled_graphs()}


def soak(models: Models, device: torch.device, runs: int, steps: int, sizes, budgets) -> dict:
    rows = []
    for i in range(runs):
        (w, h), budget = sizes[i % len(sizes)], budgets[(i // len(sizes)) % len(budgets)]
        request = GenerationRequest(prompt=PROMPTS[i % len(PROMPTS)], width=w, height=h,
                                    sampling=SamplingSettings(steps=steps, seed=i),
                                    memory=MemorySettings(vram_budget_gb=budget))
        start = time.perf_counter()
        generate(models, request, device)
        rows.append({"run": i, "size": f"{w}x{h}", "budget_gb": budget, "seconds": time.perf_counter() - start,
                     **snapshot(device)})
        print(json.dumps(rows[-1]), flush=True)
    return summarize(rows)


def summarize(rows: list[dict]) -> dict:
    """The runs, what grew from the first to the last, and from run 5 on (every size and budget
    seen once) to the last; ``grew`` names what grew past its slack after the first run."""
    first, last, cycle = rows[0], rows[-1], rows[min(5, len(rows) - 1)]
    growth = {k: last[k] - first[k] for k in SLACK}
    peak_after_first = {k: max(r[k] for r in rows[1:]) - first[k] for k in SLACK} if len(rows) > 1 else {}
    return {"runs": rows, "growth_after_first_mib": growth, "max_above_first_mib": peak_after_first,
            "growth_after_first_cycle_mib": {k: last[k] - cycle[k] for k in SLACK},
            "rss_steps": rss_steps(rows), "grew": [k for k, v in growth.items() if v > SLACK[k]]}


def rss_steps(rows: list[dict], threshold_mib: float = 16) -> list[dict]:
    """The runs after the first whose RSS rose by more than ``threshold_mib``, each with whether
    its size was new, and what malloc's live bytes and the compiled-graph count did meanwhile."""
    steps, seen = [], {rows[0].get("size")} if rows else set()
    for before, row in zip(rows, rows[1:]):
        delta = row["rss_mib"] - before["rss_mib"]
        if delta > threshold_mib:
            steps.append({"run": row["run"], "size": row.get("size"), "budget_gb": row.get("budget_gb"),
                          "new_size": row.get("size") not in seen, "rss_mib": round(delta, 1),
                          "heap_in_use_mib": round(row.get("heap_in_use_mib", 0) - before.get("heap_in_use_mib", 0), 1),
                          "new_graphs": row.get("compiled_graphs", 0) - before.get("compiled_graphs", 0)})
        seen.add(row.get("size"))
    return steps


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", nargs="?", default="/tmp/full")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args(argv)
    if args.smoke:
        paths = tiny_checkpoints("soak_")
        files = (paths.dit, paths.gemma, paths.jina, paths.vae)
        device, sizes, budgets, runs, steps = torch.device("cpu"), [(64, 64), (96, 64), (64, 96)], [None], 6, 2
    else:
        root = Path(args.root)
        files = (root / "diffusion_models/NewBie-Image-Exp0.1-bf16.safetensors",
                 root / "text_encoders/gemma_3_4b_it_bf16.safetensors",
                 root / "text_encoders/jina_clip_v2_bf16.safetensors", root / "vae/ae.safetensors")
        device, sizes, budgets, runs, steps = torch.device("cuda"), SIZES, BUDGETS, args.runs, args.steps
    models = Models(load_dit_handle(files[0]), load_text_encoder_handle(files[1], files[2]), load_vae_handle(files[3]))
    result = soak(models, device, runs, steps, sizes, budgets)
    print("growth after the first run (MiB):", json.dumps(result["growth_after_first_mib"]),
          "grew:", result["grew"] or "nothing", flush=True)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 1 if result["grew"] else 0


if __name__ == "__main__":
    sys.exit(main())
