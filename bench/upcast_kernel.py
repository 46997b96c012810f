"""The fp8 -> bf16 block upcast in isolation: fused kernel variants against the torch path.

One full-size Next-DiT layer (87 M parameters) packed in fp8, upcast on an idle GPU. Prints
milliseconds per block and effective bandwidth (fp8 bytes read + bf16 bytes written).

    python bench/upcast_kernel.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from newbie_core.models.dit import DiTConfig, build_dit  # noqa: E402
from newbie_core.placement import fp8_cuda  # noqa: E402
from newbie_core.placement.fp8 import pack_block, upcast_block  # noqa: E402
from newbie_core.placement.session import block_layouts  # noqa: E402


def timed(fn, repeat: int = 20) -> float:
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeat):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / repeat / 1e3


def main() -> None:
    dev = torch.device("cuda")
    model = build_dit(DiTConfig.newbie_exp01(), "meta", torch.bfloat16)
    _, block = model.block_sequence()[10]
    layouts = block_layouts(block, "fp8")
    storage, compute = layouts.storage, layouts.compute
    tensors = {e.name: torch.randn(e.shape) * 0.02 for e in compute.entries}
    packed = torch.zeros(storage.nbytes, dtype=torch.uint8)
    pack_block(tensors, storage, packed)
    src = packed.to(dev)
    ref = torch.zeros(compute.nbytes, dtype=torch.uint8, device=dev)
    out = torch.zeros_like(ref)
    moved = storage.nbytes + compute.nbytes
    t = timed(lambda: upcast_block(storage, compute, src, ref))
    print(f"torch path: {t * 1e3:.3f} ms/block, {moved / t / 1e9:.0f} GB/s", flush=True)
    for row in (4096, 8192, 16384):
        table = fp8_cuda.build_table(storage, compute, dev, row)
        for warps in (4, 8, 16):
            out.zero_()
            t = timed(lambda: fp8_cuda.launch(table, storage, compute, src, out, row, warps))
            same = all(torch.equal(out[e.offset:e.offset + e.nbytes], ref[e.offset:e.offset + e.nbytes])
                       for e in compute.entries)
            print(f"fused ROW={row} warps={warps}: {t * 1e3:.3f} ms/block, {moved / t / 1e9:.0f} GB/s, "
                  f"bitwise={same}", flush=True)


if __name__ == "__main__":
    main()
