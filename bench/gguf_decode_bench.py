"""How fast can one joint layer's GGUF weights be decoded on the GPU? (issue 13)

Under a 2 GB budget every block is decoded per use. The first kernels read one byte per load and
ran 8 Q8_0 blocks (or one Q4_K super-block) per program: 0.211 ms a layer, most of the gap between
the Q8_0 2 GB row and its roofline then (1.077x); the fp8 upcast, which moves about the same
bytes, needs 0.08 ms per block. This times both kernel forms of
triton_dequant.py (bytes, and words: 16/32-bit loads, several blocks per program) at several
launch shapes beside a plain copy of the same bytes, and the layer decoded tensor by tensor as
placement did it first (``per-tensor``: one launch each), checking each against the torch path,
and prints one line per variant: µs per layer, GB/s (packed read + bf16 write) and × the copy.
Then placement's own upcast of a packed joint block (``block/per-tensor``: 13 launches, against
``block/one-launch``: the whole-block kernel), with the host µs it takes to issue one block.

    python bench/gguf_decode_bench.py             # CUDA + Triton
    python bench/gguf_decode_bench.py --smoke     # CPU: the torch path on a small layer (CI)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from gguf import GGMLQuantizationType as T

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from fp8_quant_bench import median_ms  # noqa: E402
from newbie_core.models.dit import DiTConfig, build_dit  # noqa: E402
from newbie_core.models.gguf.dequant import block_geometry, dequantize  # noqa: E402

# (kernel form, blocks or super-blocks per program, warps); triton_dequant.LAUNCH holds the chosen one
SHAPES = {T.Q8_0: [("bytes", 8, 4), ("bytes", 64, 4), ("bytes", 128, 8), ("words", 16, 4), ("words", 32, 4),
                   ("words", 64, 4), ("words", 64, 8), ("words", 128, 8), ("words", 256, 8)],
          T.Q4_K: [("bytes", 1, 4), ("bytes", 1, 8), ("words", 2, 4), ("words", 4, 4), ("words", 4, 8),
                   ("words", 8, 4), ("words", 8, 8), ("words", 16, 8)]}

# The whole-block kernel's (GGML blocks per table row, warps); triton_dequant.BLOCK_ROW holds the chosen one
BLOCK_SHAPES = {T.Q8_0: [(16, 2), (32, 2), (32, 4), (64, 2), (64, 4), (64, 8), (128, 4), (256, 8)],
                T.Q4_K: [(4, 4), (8, 4), (8, 8), (16, 8), (16, 16)]}


def random_blocks(qtype: T, elements: int, device: str) -> torch.Tensor:
    """Packed random blocks with finite fp16 scales (the first bytes of each block)."""
    per, nbytes = block_geometry(qtype)
    raw = torch.randint(0, 256, (elements // per, nbytes), dtype=torch.uint8, device=device)
    scales = 4 if qtype is T.Q4_K else 2
    raw[:, :scales] = torch.full((raw.shape[0], scales // 2), 0.01, device=device).half().view(torch.uint8)
    return raw.reshape(-1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, torch path, a layer / 256 (CI)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    sizes = [p.numel() for n, p in build_dit(DiTConfig.newbie_exp01(), "meta").named_parameters()
             if n.startswith("layers.0.") and p.ndim == 2]               # one joint layer's matrices
    layer = sum(sizes)
    device, elements = ("cpu", layer // 256 // 256 * 256) if args.smoke else ("cuda", layer // 256 * 256)
    if args.smoke:
        timer = lambda fn: median_ms(fn, 5)  # noqa: E731
    else:
        from triton.testing import do_bench
        timer = lambda fn: do_bench(fn, warmup=25, rep=100, return_mode="median")  # noqa: E731
    for qtype in (T.Q8_0, T.Q4_K):
        src = random_blocks(qtype, elements, device)
        out = torch.empty(elements, dtype=torch.bfloat16, device=device)
        want = dequantize(qtype, src, (elements,)).to(torch.bfloat16)
        moved = src.numel() + out.numel() * 2                    # packed read + bf16 write
        a = torch.empty(moved // 4, dtype=torch.bfloat16, device=device)   # a copy of the same bytes
        b = torch.empty_like(a)
        variants = {"copy": lambda: b.copy_(a), "torch": lambda: out.copy_(dequantize(qtype, src, (elements,)))}
        if not args.smoke:
            from newbie_core.models.gguf.triton_dequant import _launch
            for form, blocks, warps in SHAPES[qtype]:
                variants[f"{form}/b{blocks}/w{warps}"] = (lambda f=form, bl=blocks, w=warps: _launch(qtype, src, out, f, bl, w))
            # What placement does today: one launch per tensor of the layer (the runs above are one
            # launch for the whole layer); the difference is the per-tensor launch cost.
            per, nbytes = block_geometry(qtype)
            pieces, at = [], 0
            for n in sizes:
                pieces.append((src[at // per * nbytes:(at + n) // per * nbytes], out[at:at + n]))
                at += n
            variants["per-tensor"] = lambda: [_launch(qtype, a, b) for a, b in pieces]
        copy_ms = None
        for label, fn in variants.items():
            ms = timer(fn)
            copy_ms = copy_ms or ms
            same = label == "copy" or torch.equal(out, want)
            print(f"{qtype.name:5} {label:24} {ms * 1e3:8.1f} us  {moved / ms / 1e6:6.0f} GB/s  {ms / copy_ms:5.2f}x copy"
                  + ("" if same else "  DIFFERS from the torch decode"), flush=True)
        if not args.smoke:
            whole_block(qtype, timer, copy_ms)
    return 0


def whole_block(qtype: T, timer, copy_ms: float) -> None:
    """Placement's real upcast of a joint block held packed (its 6 matrices in ``qtype``, 7 plain
    tensors): per tensor (13 launches) against the one-launch block kernel, in GPU µs and in host
    µs to issue one block's decode (the thread that issues them also drives the forward)."""
    import importlib
    import time

    from newbie_core.models.gguf import codec_name, packed_nbytes, triton_dequant
    from newbie_core.placement.fp8 import upcast_block
    from newbie_core.placement.fp8_cuda import FusedUpcast
    from newbie_core.placement.layout import PackedTensor, block_tensors, compute_layout, packed_layout

    importlib.import_module("newbie_core.pipeline.placed")     # registers the GGUF codecs and block fuser
    block = build_dit(DiTConfig.newbie_exp01(), "meta").layers[0]
    compute = compute_layout(block_tensors(block, torch.bfloat16))
    storage = packed_layout(compute, {e.name: PackedTensor(codec_name(qtype), packed_nbytes(qtype, e.nbytes // 2))
                                      for e in compute.entries if len(e.shape) == 2})
    src = torch.zeros(storage.nbytes, dtype=torch.uint8, device="cuda")
    for e, c in zip(storage.entries, compute.entries):
        if e.codec:
            src[e.offset:e.offset + e.shape[0]] = random_blocks(qtype, c.nbytes // 2, "cuda")
        else:
            src[e.offset:e.offset + e.nbytes] = torch.randn(e.nbytes // 2, device="cuda").bfloat16().view(torch.uint8)
    want, got = (torch.zeros(compute.nbytes, dtype=torch.uint8, device="cuda") for _ in range(2))
    chosen = triton_dequant.BLOCK_ROW[qtype]
    fusers = {}
    for shape in [chosen] + [s for s in BLOCK_SHAPES[qtype] if s != chosen]:
        triton_dequant.BLOCK_ROW[qtype] = shape          # block_table reads it when the fuser is built
        fusers[shape] = FusedUpcast([(storage, compute)], "cuda")
    triton_dequant.BLOCK_ROW[qtype] = chosen
    variants = {"block/per-tensor": lambda: upcast_block(storage, compute, src, want)}
    for (per, warps), fused in fusers.items():
        variants[f"block/one-launch/r{per}/w{warps}"] = lambda fused=fused: fused(storage, compute, src, got)
    moved = storage.nbytes + compute.nbytes
    for label, fn in variants.items():
        got.zero_()
        ms = timer(fn)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(50):                     # 50 x 13 launches stay below the launch queue's depth
            fn()
        host_us = (time.perf_counter() - start) / 50 * 1e6
        torch.cuda.synchronize()
        same = all(torch.equal(got[c.offset:c.offset + c.nbytes], want[c.offset:c.offset + c.nbytes])
                   for c in compute.entries) if "one-launch" in label else True
        print(f"{qtype.name:5} {label:24} {ms * 1e3:8.1f} us  {moved / ms / 1e6:6.0f} GB/s  {ms / copy_ms:5.2f}x copy"
              f"  host {host_us:.1f} us" + ("" if same else "  DIFFERS from the per-tensor decode")
              + ("" if label.endswith("per-tensor") or fusers[chosen]._fused else "  (block kernel stood down)"), flush=True)


if __name__ == "__main__":
    sys.exit(main())
