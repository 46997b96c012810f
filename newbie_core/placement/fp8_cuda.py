"""One-launch fp8 -> bf16/fp16 block upcast for CUDA (Triton), bit-identical to the torch path.

Why one launch per block: the torch path (``copy_`` then ``mul_`` per tensor) makes two passes
and ~25 launches per block, and its e4m3 -> bf16 cast is slow: measured on an H200 it took about
2 ms per 87 M-parameter block, and at 512² the Python launch cost alone was the bound. Here a
table with one row per ``ROW`` elements of every tensor of the block (source offset,
destination offset, count, scale offset) drives one kernel over the whole block: fp8 rows are
multiplied by their scale in fp32 and rounded once to the compute dtype (the arithmetic of
:func:`newbie_core.placement.fp8.dequantize`, so the same bits); rows stored at the compute
dtype are copied. Row lengths are padded to 16 elements (entries are 256-byte aligned, so the
extra elements fall in padding) so that the masked accesses vectorise: measured on an H200, an
87 M-parameter block went from 0.285 ms with unpadded rows (1-byte loads) to 0.080 ms, about
3.3 TB/s of the fp8 read plus bf16 write. The source is read through typed views (bytes,
compute-dtype elements, bf16 scales) so every offset is an element offset. fp8 NaN bytes (never produced by quantize(),
which clamps) would come out as finite values here; the torch path keeps them NaN.

:class:`FusedUpcast` builds the tables of one stage's layouts (on the compute stream, before
the stage's activations) and owns them: they go when the stage ends. The kernel is checked
against the torch path once per process and stands down (with a warning) if they ever differ;
CPU-only installs have no Triton and use the torch path.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..checked_kernel import CheckedKernel
from .codecs import BlockDecode, fused_block_decode
from .fp8 import pack_block, upcast_block
from .layout import FP8, BlockLayout, compute_layout, fp8_layout

try:
    import triton
    import triton.language as tl
except ImportError:      # CPU-only installs: the torch path is used
    triton = None

ROW = 4096               # elements per table row (and per Triton program)
NUM_WARPS = 4

if triton is not None:
    @triton.jit
    def _block_upcast_kernel(src8_ptr, src16_ptr, scale_ptr, dst_ptr, table_ptr, ROW: tl.constexpr):
        row = table_ptr + tl.program_id(0) * 4
        src_off = tl.multiple_of(tl.load(row), 128)          # elements of the row's source view
        dst_off = tl.multiple_of(tl.load(row + 1), 128)
        n = tl.multiple_of(tl.load(row + 2), 16)              # rows are padded to 16 elements
        scale_idx = tl.load(row + 3)                         # bf16 element index; -1: a plain copy
        offs = tl.max_contiguous(tl.multiple_of(tl.arange(0, ROW), ROW), ROW)
        keep = offs < n
        out = dst_ptr + dst_off + offs
        if scale_idx >= 0:
            # e4m3fn -> fp16 by moving bits: sign to bit 15, exponent and mantissa up by 7. The
            # fp16 value is the fp8 value / 256 for normals and subnormals alike, so
            # fp32(h) * (scale * 256) rounds the same exact product as fp32(q) * scale. The
            # generic fp8 conversions measured 0.3 ms per block on an H200 (bench/upcast_kernel.py).
            b = tl.load(src8_ptr + src_off + offs, mask=keep).to(tl.uint16)
            h = (((b & 0x80) << 8) | ((b & 0x7F) << 7)).to(tl.float16, bitcast=True)
            scale = tl.load(scale_ptr + scale_idx).to(tl.float32) * 256.0
            tl.store(out, (h.to(tl.float32) * scale).to(dst_ptr.dtype.element_ty), mask=keep)
        else:
            tl.store(out, tl.load(src16_ptr + src_off + offs, mask=keep), mask=keep)


def build_table(storage: BlockLayout, compute: BlockLayout, device: torch.device,
                row: int = ROW) -> torch.Tensor | None:
    """The row table of one (storage, compute) layout pair, or None when the block holds
    tensors this kernel does not handle (other dtypes); those blocks use the torch path."""
    dtypes = {c.dtype for c in compute.entries}
    if len(dtypes) != 1 or storage.scale_dtype != torch.bfloat16:
        return None
    dtype = dtypes.pop()
    if dtype not in (torch.bfloat16, torch.float16):
        return None
    size = dtype.itemsize
    rows = []
    for s, c in zip(storage.entries, compute.entries):
        scaled = s.scale_offset is not None and s.dtype == FP8
        if not scaled and s.dtype != dtype:
            return None
        n = c.nbytes // size
        base = s.offset if scaled else s.offset // size
        for start in range(0, n, row):
            # A row's length is rounded up to 16 elements so that the kernel's masked loads and
            # stores vectorise (a run-time length that could be odd forces 1-element accesses).
            # Entries start 256-byte aligned, so the extra elements stay in padding.
            rows.append((base + start, c.offset // size + start, _round16(min(row, n - start)),
                         s.scale_offset // 2 if scaled else -1))
    return torch.tensor(rows, dtype=torch.int64).to(device) if rows else None


def _round16(n: int) -> int:
    return -(-n // 16) * 16


def launch(table: torch.Tensor, storage: BlockLayout, compute: BlockLayout, src: torch.Tensor, dst: torch.Tensor,
           row: int = ROW, num_warps: int = NUM_WARPS) -> None:
    dtype = compute.entries[0].dtype
    src = src[: storage.nbytes]
    _block_upcast_kernel[(table.shape[0],)](src, src.view(dtype), src.view(torch.bfloat16),
                                            dst[: compute.nbytes].view(dtype), table, ROW=row,
                                            num_warps=num_warps)


class FusedUpcast:
    """Upcasts one stage's fp8 and packed blocks: one launch per block where a fused kernel
    applies (this module's for fp8, a registered block fuser for packed layouts, codecs.py),
    else the per-tensor torch path."""

    def __init__(self, pairs: Iterable[tuple[BlockLayout, BlockLayout]], device: torch.device | str):
        self._tables: dict[tuple[BlockLayout, BlockLayout], torch.Tensor] = {}
        self._fused: dict[tuple[BlockLayout, BlockLayout], BlockDecode] = {}
        device = torch.device(device)
        if device.type != "cuda":
            return
        for storage, compute in pairs:
            key = (storage, compute)
            if key in self._tables or key in self._fused:
                continue
            if storage.is_packed:
                decode = fused_block_decode(storage, compute, device)
                if decode is not None:
                    self._fused[key] = decode
            elif KERNEL.usable(device):
                table = build_table(storage, compute, device)
                if table is not None:
                    self._tables[key] = table

    def __call__(self, storage: BlockLayout, compute: BlockLayout, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Fill compute-layout ``dst`` from storage-layout ``src`` (both uint8) on the current stream."""
        key = (storage, compute)
        table = self._tables.get(key)
        if table is not None:
            launch(table, storage, compute, src, dst)
            return
        decode = self._fused.get(key)
        if decode is not None:
            decode(src, dst)
        else:
            upcast_block(storage, compute, src, dst)

    def release(self) -> None:
        self._tables.clear()
        self._fused.clear()


def _self_check(device: torch.device) -> None:
    """The fused kernel against the torch path on a small block with every kind of row."""
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16):
        shapes = {"w1.weight": (3, 5000), "norm.weight": (9000,), "w2.weight": (77, 13)}
        compute = compute_layout([(n, shape, dtype) for n, shape in shapes.items()])
        storage = fp8_layout(compute)
        values = {n: (torch.randn(shape, generator=g) * 3).to(dtype) for n, shape in shapes.items()}
        src = torch.zeros(storage.nbytes, dtype=torch.uint8)
        pack_block(values, storage, src)
        src = src.to(device)
        reference = torch.zeros(compute.nbytes, dtype=torch.uint8, device=device)
        upcast_block(storage, compute, src, reference)
        table = build_table(storage, compute, device)
        if table is None:
            raise RuntimeError("no row table for the check block")
        out = torch.zeros_like(reference)
        launch(table, storage, compute, src, out)
        for c in compute.entries:        # padding between entries is scratch for the kernel
            if not torch.equal(out[c.offset:c.offset + c.nbytes], reference[c.offset:c.offset + c.nbytes]):
                raise RuntimeError(f"result differs from the torch upcast ({dtype}, {c.name})")


KERNEL = CheckedKernel("fp8 Triton upcast", triton is not None, _self_check, "the slower torch upcast")
