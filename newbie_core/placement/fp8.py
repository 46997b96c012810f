"""fp8 (e4m3fn) block storage: packing on the host, upcast into a bf16 slot on the device.

Quantisation is per tensor: ``scale = bf16(amax / 448)`` and ``q = e4m3(w / scale)``; tensors
already stored in fp8 keep their bytes with scale 1. The scale is rounded to bf16 *before*
quantising, so the upcast ``bf16(q) * scale`` is one bf16 multiply (computed in fp32, rounded
once) and equals :func:`dequantize` exactly, on CPU and CUDA alike.

The upcast runs on its own stream (copy_engine.py), after the H2D copy into the slot's staging
buffer and before the event the compute stream waits on (runner.py). Kept off the copy stream,
it never holds back the next H2D copy, and off the compute stream it overlaps the blocks.
"""

from __future__ import annotations

from collections.abc import MutableMapping

import torch

from .codecs import decode_into
from .layout import FP8, FP8_MAX, BlockLayout, view


def fp8_scale(w: torch.Tensor) -> torch.Tensor:
    """0-dim bf16 scale amax/448 (1 for an all-zero tensor)."""
    amax = w.detach().abs().max().float()
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    return scale.to(torch.bfloat16)


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3fn tensor, 0-dim bf16 scale). fp8 input keeps its bytes and gets scale 1."""
    if w.dtype == FP8:
        return w, torch.ones((), dtype=torch.bfloat16)
    scale = fp8_scale(w)
    q = (w.float() / scale.float()).clamp_(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The reference the upcast must equal bit for bit."""
    return (q.float() * scale.float()).to(dtype)


def pack_block(tensors: MutableMapping[str, torch.Tensor], storage: BlockLayout, out: torch.Tensor) -> None:
    """Write one block's tensors into ``out`` (uint8, ``storage.nbytes``) in storage layout.

    Entries are popped from ``tensors`` one by one, so the caller's mmap-backed copies are
    dropped as soon as they are packed: at most one source tensor is alive beside ``out``.
    """
    missing = [e.name for e in storage.entries if e.name not in tensors]
    if missing:
        raise ValueError(f"read_block gave no tensor for {', '.join(missing[:4])} "
                         f"({len(missing)} missing); it must return every parameter and buffer of the block "
                         f"by its name relative to the block.")
    for e in storage.entries:
        src = tensors.pop(e.name)
        if tuple(src.shape) != e.shape:
            raise ValueError(f"read_block gave {e.name} with shape {list(src.shape)}, "
                             f"the block expects {list(e.shape)}.")
        dst = view(out, e.offset, e.shape, e.dtype)
        if e.scale_offset is None:
            dst.copy_(src)
        else:
            q, scale = quantize(src)
            dst.copy_(q)
            view(out, e.scale_offset, (), storage.scale_dtype).copy_(scale)
        del src


def upcast_block(storage: BlockLayout, compute: BlockLayout, src: torch.Tensor, dst: torch.Tensor) -> None:
    """Fill compute-layout ``dst`` from storage-layout ``src`` (both uint8, same device) on the
    current stream: per tensor, an exact e4m3 -> compute cast, then one scale multiply. The
    reference path; fp8_cuda.FusedUpcast is the one-launch CUDA path with the same bits.
    Packed entries are decoded by their codec (codecs.py)."""
    for s, c in zip(storage.entries, compute.entries):
        out = view(dst, c.offset, c.shape, c.dtype)
        if s.codec is not None:
            decode_into(s.codec, view(src, s.offset, s.shape, s.dtype), out)
            continue
        out.copy_(view(src, s.offset, s.shape, s.dtype))     # e4m3 -> bf16 is exact
        if s.scale_offset is not None:
            out.mul_(storage.scale(src, s))                  # bf16 * bf16 scale, one rounding
