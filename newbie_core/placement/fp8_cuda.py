"""One-launch fp8 -> bf16/fp16 block upcast for CUDA (Triton), bit-identical to the torch path.

Why one launch per block: the torch path (``copy_`` then ``mul_`` per tensor) makes two passes
and ~25 launches per block, and its e4m3 -> bf16 cast is slow: measured on an H200 it took about
2 ms per 87 M-parameter block, and at 512² the Python launch cost alone was the bound. Here a
table of (source offset, destination offset, count, scale offset) rows, one row per 4096
elements of every tensor of the block, drives one kernel over the whole block: fp8 rows are
multiplied by their scale in fp32 and rounded once to the compute dtype (the arithmetic of
:func:`newbie_core.placement.fp8.dequantize`, so the same bits); rows stored at the compute dtype
are copied. The tables are built once per layout and device.

:func:`prepare` checks the kernel against the torch path once per process and stands it down
(with a warning) if the results ever differ; CPU-only installs have no Triton and use the torch
path.
"""

from __future__ import annotations

import logging

import torch

from .layout import FP8, BlockLayout

log = logging.getLogger(__name__)

try:
    import triton
    import triton.language as tl
except ImportError:      # CPU-only installs: the torch path is used
    triton = None

ROW = 4096               # elements per table row (and per Triton program)
_STATE = {"checked": False, "ok": triton is not None}
_TABLES: dict[tuple[BlockLayout, BlockLayout, torch.device], torch.Tensor | None] = {}

if triton is not None:
    @triton.jit
    def _block_upcast_kernel(src_ptr, dst_ptr, table_ptr, ROW: tl.constexpr):
        row = table_ptr + tl.program_id(0) * 4
        src_off = tl.multiple_of(tl.load(row), 256)          # bytes
        dst_off = tl.multiple_of(tl.load(row + 1), 128)      # elements of the compute dtype
        n = tl.load(row + 2)
        scale_off = tl.load(row + 3)                         # bytes; -1: stored at compute dtype
        offs = tl.max_contiguous(tl.arange(0, ROW), ROW)
        keep = offs < n
        out = dst_ptr + dst_off + offs
        if scale_off >= 0:
            q = tl.load((src_ptr + src_off).to(tl.pointer_type(tl.float8e4nv)) + offs, mask=keep)
            scale = tl.load((src_ptr + scale_off).to(tl.pointer_type(tl.bfloat16))).to(tl.float32)
            tl.store(out, (q.to(tl.float32) * scale).to(dst_ptr.dtype.element_ty), mask=keep)
        else:
            x = tl.load((src_ptr + src_off).to(tl.pointer_type(dst_ptr.dtype.element_ty)) + offs, mask=keep)
            tl.store(out, x, mask=keep)


def _table(storage: BlockLayout, compute: BlockLayout, device: torch.device) -> torch.Tensor | None:
    """The row table, or None when the block has tensors this kernel does not handle."""
    key = (storage, compute, device)
    if key in _TABLES:
        return _TABLES[key]
    dtypes = {c.dtype for c in compute.entries}
    table = None
    if len(dtypes) == 1 and next(iter(dtypes)) in (torch.bfloat16, torch.float16) \
            and storage.scale_dtype == torch.bfloat16:
        dtype = next(iter(dtypes))
        rows = []
        for s, c in zip(storage.entries, compute.entries):
            scaled = s.scale_offset is not None
            if not (scaled and s.dtype == FP8) and s.dtype != dtype:
                rows = None
                break
            n = c.nbytes // dtype.itemsize
            for start in range(0, n, ROW):
                src = s.offset + start * s.dtype.itemsize
                rows.append((src, c.offset // dtype.itemsize + start, min(ROW, n - start),
                             s.scale_offset if scaled else -1))
        if rows:
            table = torch.tensor(rows, dtype=torch.int64).to(device)
    _TABLES[key] = table
    return table


def _launch(table: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
    _block_upcast_kernel[(table.shape[0],)](src, dst, table, ROW=ROW)


def upcast_block_fused(storage: BlockLayout, compute: BlockLayout, src: torch.Tensor, dst: torch.Tensor) -> bool:
    """Fill compute-layout ``dst`` from storage-layout ``src`` (uint8) in one kernel.

    Returns False when the fast path is off (no Triton, CPU tensors, :func:`self_check` not run
    or failed, a block with tensors of other dtypes); the caller then uses the torch path.
    Allocates nothing (it runs on the copy stream).
    """
    if not (_STATE["ok"] and _STATE["checked"] and src.is_cuda):
        return False
    table = _TABLES.get((storage, compute, src.device))
    if table is None:
        return False
    _launch(table, src, dst[: compute.nbytes].view(compute.entries[0].dtype))
    return True


def prepare(layouts: list[tuple[BlockLayout, BlockLayout]], device: torch.device) -> None:
    """Check the kernel once per process and build the tables of these (storage, compute)
    layouts; call on the compute stream before a stage allocates its activations."""
    if not (_STATE["ok"] and torch.device(device).type == "cuda"):
        return
    if not _STATE["checked"]:
        _STATE["checked"] = True
        try:
            _self_check(torch.device(device))
        except Exception as e:   # noqa: BLE001 - any failure means: use the torch path
            _STATE["ok"] = False
            log.warning("fp8 Triton upcast disabled (%s); using the slower torch upcast", e)
            return
    for storage, compute in layouts:
        _table(storage, compute, torch.device(device))


def _self_check(device: torch.device) -> None:
    """The fused kernel against the torch path on a small block with every kind of row."""
    from .fp8 import pack_block, upcast_block_torch
    from .layout import compute_layout, fp8_layout
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16):
        tensors = {"w1.weight": (3, 5000), "norm.weight": (4100,), "w2.weight": (77, 13)}
        compute = compute_layout([(n, shape, dtype) for n, shape in tensors.items()])
        storage = fp8_layout(compute)
        values = {n: (torch.randn(shape, generator=g) * 3).to(dtype) for n, shape in tensors.items()}
        src = torch.zeros(storage.nbytes, dtype=torch.uint8)
        pack_block(values, storage, src)
        src = src.to(device)
        reference = torch.zeros(compute.nbytes, dtype=torch.uint8, device=device)
        upcast_block_torch(storage, compute, src, reference)
        table = _table(storage, compute, device)
        if table is None:
            raise RuntimeError("no row table for the check block")
        out = torch.zeros_like(reference)
        _launch(table, src, out[: compute.nbytes].view(dtype))
        if not torch.equal(out, reference):
            raise RuntimeError(f"result differs from the torch upcast ({dtype})")
