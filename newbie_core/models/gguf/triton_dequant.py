"""GGML block decode on CUDA with Triton: Q8_0 and Q4_K, one program per run of blocks.

Each kernel does the torch path's float32 arithmetic in the same order (dequant.py), so on one
device the two agree; each is checked against the torch path once per process and stands down
(with a warning) if it ever differs or fails (checked_kernel.py). Other types, CPU tensors and
installs without Triton use the torch path. On the H200 both pass, and streamed runs are bitwise
equal to resident ones (test_gguf_cuda.py; 0.211 ms per joint layer, BENCHMARKS.md).
"""

from __future__ import annotations

import functools

import torch
from gguf import GGMLQuantizationType as T

from ...checked_kernel import CheckedKernel
from .dequant import dequantize

try:
    import triton
    import triton.language as tl
except ImportError:      # CPU-only installs
    triton = None

BLOCKS_PER_PROGRAM = 8

if triton is not None:
    @triton.jit
    def _q8_0_kernel(src_ptr, out_ptr, n_blocks, BLOCKS: tl.constexpr):
        blk = tl.program_id(0) * BLOCKS + tl.arange(0, BLOCKS)[:, None]      # (BLOCKS, 1)
        j = tl.arange(0, 32)[None, :]
        ok = blk < n_blocks
        base = src_ptr + blk * 34
        lo = tl.load(base, mask=ok, other=0).to(tl.uint16)
        hi = tl.load(base + 1, mask=ok, other=0).to(tl.uint16)
        d = (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)
        q = tl.load(base + 2 + j, mask=ok, other=0).to(tl.int8, bitcast=True).to(tl.float32)
        tl.store(out_ptr + blk * 32 + j, (d * q).to(out_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _f16_at(ptr):
        lo = tl.load(ptr).to(tl.uint16)
        hi = tl.load(ptr + 1).to(tl.uint16)
        return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)

    @triton.jit
    def _q4_k_kernel(src_ptr, out_ptr):
        b = tl.program_id(0)
        base = src_ptr + b * 144
        d = _f16_at(base)
        dmin = _f16_at(base + 2)
        sub = tl.arange(0, 8)                                   # sub-block j
        low4 = sub % 4
        a = tl.load(base + 4 + low4).to(tl.int32)               # bytes 0-3 of the scales
        m = tl.load(base + 8 + low4).to(tl.int32)               # bytes 4-7
        h = tl.load(base + 12 + low4).to(tl.int32)              # bytes 8-11
        first = sub < 4
        sc = tl.where(first, a & 63, (h & 15) | ((a >> 2) & 48))
        mn = tl.where(first, m & 63, (h >> 4) | ((m >> 2) & 48))
        dj = (d * sc.to(tl.float32))[:, None]
        mj = (dmin * mn.to(tl.float32))[:, None]
        e = tl.arange(0, 32)[None, :]
        chunk = (sub // 2)[:, None]
        byte = tl.load(base + 16 + chunk * 32 + e).to(tl.int32)
        q = tl.where((sub % 2)[:, None] == 0, byte & 15, byte >> 4).to(tl.float32)
        tl.store(out_ptr + b * 256 + sub[:, None] * 32 + e, (dj * q - mj).to(out_ptr.dtype.element_ty))


def _launch(qtype: T, src: torch.Tensor, out: torch.Tensor, blocks: int = BLOCKS_PER_PROGRAM,
            num_warps: int = 4) -> None:
    """``blocks`` (Q8_0 blocks per program) and ``num_warps`` are open for bench/gguf_decode_bench.py."""
    flat = out.view(-1)
    if qtype is T.Q8_0:
        n = src.numel() // 34
        _q8_0_kernel[(triton.cdiv(n, blocks),)](src, flat, n, BLOCKS=blocks, num_warps=num_warps)
    else:
        _q4_k_kernel[(src.numel() // 144,)](src, flat, num_warps=num_warps)


def _check(qtype: T, device: torch.device) -> None:
    """The kernel against the torch path on random blocks with finite scales."""
    g = torch.Generator().manual_seed(0)
    size = {T.Q8_0: 34, T.Q4_K: 144}[qtype]
    raw = torch.randint(0, 256, (64, size), generator=g, dtype=torch.uint8)
    scales = (torch.rand(64, 2, generator=g) * 0.02).half().view(torch.uint8)
    raw[:, 0:4] = scales
    src = raw.reshape(-1).to(device)
    per = 32 if qtype is T.Q8_0 else 256
    for dtype in (torch.bfloat16, torch.float16):
        want = dequantize(qtype, src, (64 * per,)).to(dtype)
        got = torch.empty_like(want)
        _launch(qtype, src, got)
        if not torch.equal(got, want):
            raise RuntimeError(f"result differs from the torch path ({dtype})")


def try_decode_into(qtype: T, src: torch.Tensor, out: torch.Tensor) -> bool:
    """Decode with a Triton kernel; False when there is none for ``qtype`` (use the torch path)."""
    kernel = KERNELS.get(qtype)
    if kernel is None or not out.is_contiguous() or not kernel.usable(src.device):
        return False
    _launch(qtype, src, out)
    return True


KERNELS = {q: CheckedKernel(f"GGUF {q.name} Triton decode", triton is not None, functools.partial(_check, q),
                            "the torch path") for q in (T.Q8_0, T.Q4_K)}
