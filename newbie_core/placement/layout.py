"""How one block's tensors are packed into one contiguous byte buffer.

Every placed block (resident, streamed, bf16 or fp8) lives in a single ``uint8`` buffer with its
parameters and buffers at offsets aligned to :data:`ALIGN` (256 B, what cudaMalloc gives a
standalone tensor). The model sees them as views. Resident and streamed blocks use the same
compute layout, so kernels see the same alignment and produce the same bits.

A *storage* layout may differ from the compute layout: with fp8 storage the matrices are
``float8_e4m3fn`` plus one bf16 scale each, the rest keeps its compute dtype. With *packed*
storage (codecs.py) a tensor is an opaque run of bytes that its codec decodes into the
compute-dtype tensor; the rest keeps its compute dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .budget import ALIGN, align_up

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


@dataclass(frozen=True)
class Entry:
    name: str                 # relative to the block, as functional_call wants it
    shape: tuple[int, ...]
    dtype: torch.dtype        # dtype as stored in this layout
    offset: int
    scale_offset: int | None = None   # fp8 entries: offset of their 0-dim bf16 scale
    codec: str | None = None          # packed entries: shape (nbytes,), uint8, decoded by this codec

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * self.dtype.itemsize


@dataclass(frozen=True)
class BlockLayout:
    entries: tuple[Entry, ...]
    nbytes: int
    scale_dtype: torch.dtype = torch.bfloat16

    def __post_init__(self) -> None:
        # Layouts key per-layout caches on the hot path (fp8_cuda's row tables): hash once.
        object.__setattr__(self, "_hash", hash((self.entries, self.nbytes, self.scale_dtype)))

    def __hash__(self) -> int:
        return self._hash

    @property
    def is_fp8(self) -> bool:
        return any(e.scale_offset is not None for e in self.entries)

    @property
    def is_packed(self) -> bool:
        return any(e.codec is not None for e in self.entries)

    @property
    def needs_upcast(self) -> bool:
        """Whether the stored bytes must be turned into the compute layout before each use."""
        return self.is_fp8 or self.is_packed

    def views(self, buf: torch.Tensor) -> dict[str, torch.Tensor]:
        """name -> view of ``buf`` (a 1-D uint8 tensor of at least ``nbytes``)."""
        return {e.name: view(buf, e.offset, e.shape, e.dtype) for e in self.entries}

    def scale(self, buf: torch.Tensor, entry: Entry) -> torch.Tensor:
        return view(buf, entry.scale_offset, (), self.scale_dtype)


def view(buf: torch.Tensor, offset: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    n = 1
    for d in shape:
        n *= d
    return buf[offset:offset + n * dtype.itemsize].view(dtype).view(shape)


def default_keep_high_precision(name: str, shape: tuple[int, ...]) -> bool:
    """Default fp8 rule: only matrices go to fp8; norms, biases and adaLN modulation stay."""
    return len(shape) < 2 or "adaLN" in name or "norm" in name


def block_tensors(block: nn.Module, compute_dtype: torch.dtype) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """(name, shape, compute dtype) of every parameter and buffer; floating params take the
    compute dtype, buffers and integer tensors keep theirs (rotary tables stay fp32)."""
    out = []
    for name, p in block.named_parameters():
        out.append((name, tuple(p.shape), compute_dtype if p.is_floating_point() else p.dtype))
    for name, b in block.named_buffers():
        out.append((name, tuple(b.shape), b.dtype))
    return out


def compute_layout(tensors: Iterable[tuple[str, tuple[int, ...], torch.dtype]]) -> BlockLayout:
    entries, off = [], 0
    for name, shape, dtype in tensors:
        entries.append(Entry(name, tuple(shape), dtype, off))
        off = align_up(off + entries[-1].nbytes, ALIGN)
    return BlockLayout(tuple(entries), max(off, ALIGN))


def fp8_layout(compute: BlockLayout,
               keep_high_precision: Callable[[str, tuple[int, ...]], bool] = default_keep_high_precision
               ) -> BlockLayout:
    """Storage layout with floating matrices as e4m3fn (one bf16 scale each after the data)."""
    entries, off, quantised = [], 0, []
    for e in compute.entries:
        to_fp8 = e.dtype.is_floating_point and e.dtype.itemsize > 1 and not keep_high_precision(e.name, e.shape)
        entries.append(Entry(e.name, e.shape, FP8 if to_fp8 else e.dtype, off))
        if to_fp8:
            quantised.append(len(entries) - 1)
        off = align_up(off + entries[-1].nbytes, ALIGN)
    for i in quantised:   # scales packed together at the end, 2 bytes each (aligned as a group)
        e = entries[i]
        entries[i] = Entry(e.name, e.shape, e.dtype, e.offset, off)
        off += torch.bfloat16.itemsize
    return BlockLayout(tuple(entries), max(align_up(off, ALIGN), ALIGN))


@dataclass(frozen=True)
class PackedTensor:
    """One tensor stored packed: the codec that decodes it and its packed size in bytes."""
    codec: str
    nbytes: int


def packed_layout(compute: BlockLayout, packed: Mapping[str, PackedTensor]) -> BlockLayout:
    """Storage layout with the ``packed`` tensors as codec bytes, the others at compute dtype."""
    entries, off = [], 0
    for e in compute.entries:
        p = packed.get(e.name)
        if p is None:
            entries.append(Entry(e.name, e.shape, e.dtype, off))
        else:
            entries.append(Entry(e.name, (p.nbytes,), torch.uint8, off, codec=p.codec))
        off = align_up(off + entries[-1].nbytes, ALIGN)
    unknown = set(packed) - {e.name for e in compute.entries}
    if unknown:
        raise ValueError(f"packed tensors {sorted(unknown)[:3]} are not parameters of the block.")
    return BlockLayout(tuple(entries), max(off, ALIGN))
