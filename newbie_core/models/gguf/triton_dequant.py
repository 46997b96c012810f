"""GGML block decode on CUDA with Triton: Q8_0 and Q4_K, one program per run of blocks.

Two forms per type: ``bytes`` loads one byte at a time (any alignment), ``words`` reads the packed
blocks as 16-bit (Q8_0) or 32-bit (Q4_K) words and runs many blocks per program, about 3x faster
(``LAUNCH`` has the figures); both do the same arithmetic.

Each kernel does the torch path's float32 arithmetic in the same order (dequant.py), so on one
device the two agree; each is checked against the torch path once per process and stands down
(with a warning) if it ever differs or fails (checked_kernel.py). Other types, CPU tensors and
installs without Triton use the torch path. On the H200 both pass, and streamed runs are bitwise
equal to resident ones (test_gguf_cuda.py).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from gguf import GGMLQuantizationType as T

from ...checked_kernel import CheckedKernel
from .dequant import block_geometry, dequantize, packed_nbytes

try:
    import triton
    import triton.language as tl
except ImportError:      # CPU-only installs
    triton = None


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

    @triton.jit
    def _q8_0_words(src16_ptr, out_ptr, blk, ok, BLOCKS: tl.constexpr):
        """Q8_0 read as 16-bit words (a block is 17 of them: the f16 scale, then 16 pairs of
        int8): half the loads of the byte kernel, same arithmetic. ``blk``: (BLOCKS, 1) indices."""
        base = src16_ptr + blk * 17
        d = tl.load(base, mask=ok, other=0).to(tl.float16, bitcast=True).to(tl.float32)
        w = tl.load(base + 1 + tl.arange(0, 16)[None, :], mask=ok, other=0)              # (BLOCKS, 16) int16
        lo = (w << 8) >> 8                        # the low byte, sign-extended (element 2k)
        hi = w >> 8                               # the high byte, signed (element 2k + 1)
        q = tl.reshape(tl.join(lo, hi), (BLOCKS, 32)).to(tl.float32)
        tl.store(out_ptr + blk * 32 + tl.arange(0, 32)[None, :], (d * q).to(out_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _q8_0_words_kernel(src16_ptr, out_ptr, n_blocks, BLOCKS: tl.constexpr):
        blk = tl.program_id(0).to(tl.int64) * BLOCKS + tl.arange(0, BLOCKS)[:, None]      # (BLOCKS, 1)
        _q8_0_words(src16_ptr, out_ptr, blk, blk < n_blocks, BLOCKS)

    @triton.jit
    def _q4_k_words(src8_ptr, src32_ptr, out_ptr, sb, ok, SUPER: tl.constexpr):
        """Q4_K, ``SUPER`` super-blocks (256 elements, 36 32-bit words) at indices ``sb``; the 128
        bytes of nibbles read as 32 words, each giving 4 elements of two sub-blocks."""
        head = tl.load(src32_ptr + sb * 36, mask=ok, other=0)                            # d | dmin << 16
        d = (head & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
        dmin = ((head >> 16) & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
        sub = tl.arange(0, 8)[None, :]                                                  # sub-block j
        low4 = sub % 4
        okj = ok[:, None]
        b8 = src8_ptr + sb[:, None] * 144
        a = tl.load(b8 + 4 + low4, mask=okj, other=0).to(tl.int32)
        m = tl.load(b8 + 8 + low4, mask=okj, other=0).to(tl.int32)
        h = tl.load(b8 + 12 + low4, mask=okj, other=0).to(tl.int32)
        first = sub < 4
        sc = tl.where(first, a & 63, (h & 15) | ((a >> 2) & 48))
        mn = tl.where(first, m & 63, (h >> 4) | ((m >> 2) & 48))
        dj = tl.reshape(d[:, None] * sc.to(tl.float32), (SUPER, 4, 2))                   # (c, half)
        mj = tl.reshape(dmin[:, None] * mn.to(tl.float32), (SUPER, 4, 2))
        c = tl.arange(0, 4)[None, :, None]
        wi = tl.arange(0, 8)[None, None, :]
        words = tl.load(src32_ptr + sb[:, None, None] * 36 + 4 + c * 8 + wi, mask=ok[:, None, None], other=0)
        half = tl.arange(0, 2)[None, None, :, None, None]
        byte = tl.arange(0, 4)[None, None, None, None, :]
        q = (words[:, :, None, :, None] >> (8 * byte + 4 * half)) & 15                   # (SUPER, 4, 2, 8, 4)
        x = dj[:, :, :, None, None] * q.to(tl.float32) - mj[:, :, :, None, None]
        e = tl.arange(0, 256)[None, :]
        tl.store(out_ptr + sb[:, None] * 256 + e, tl.reshape(x, (SUPER, 256)).to(out_ptr.dtype.element_ty),
                 mask=ok[:, None])

    @triton.jit
    def _q4_k_words_kernel(src8_ptr, src32_ptr, out_ptr, n_blocks, SUPER: tl.constexpr):
        sb = tl.program_id(0).to(tl.int64) * SUPER + tl.arange(0, SUPER)                 # (SUPER,)
        _q4_k_words(src8_ptr, src32_ptr, out_ptr, sb, sb < n_blocks, SUPER)

    @triton.jit
    def _block_kernel(src8_ptr, src16_ptr, src32_ptr, srcd_ptr, dst_ptr, table_ptr, QTYPE: tl.constexpr,
                      PER: tl.constexpr, ELEMS: tl.constexpr):
        """One packed block in one launch: each table row (packed?, source offset, destination
        element offset, count) is ``PER`` GGML blocks of ``ELEMS`` elements each, or as many elements of a
        plain (compute-dtype) tensor. Offsets are bytes for packed rows and elements for plain
        ones; every row starts 256-byte aligned in both layouts (layout.py), hence the hints."""
        row = table_ptr + tl.program_id(0) * 4
        packed = tl.load(row)
        src = tl.multiple_of(tl.load(row + 1), 128)
        dst = tl.multiple_of(tl.load(row + 2), 128)
        n = tl.load(row + 3)
        if packed != 0:
            if QTYPE == 8:          # GGMLQuantizationType.Q8_0
                blk = tl.arange(0, PER)[:, None].to(tl.int64)
                _q8_0_words(src16_ptr + src // 2, dst_ptr + dst, blk, blk < n, PER)
            else:                   # Q4_K
                sb = tl.arange(0, PER).to(tl.int64)
                _q4_k_words(src8_ptr + src, src32_ptr + src // 4, dst_ptr + dst, sb, sb < n, PER)
        else:
            # Shaped like the packed rows' output, (PER, ELEMS): a flat (PER * ELEMS,) copy with
            # contiguity hints on its length miscompiled beside the Q4_K branch (Triton 3.x on an
            # H200: some elements loaded from the wrong address).
            offs = tl.arange(0, PER)[:, None] * ELEMS + tl.arange(0, ELEMS)[None, :]
            keep = offs < n
            tl.store(dst_ptr + dst + offs, tl.load(srcd_ptr + src + offs, mask=keep), mask=keep)

# The launch shape used in production: (kernel form, blocks or super-blocks per program, warps).
# Chosen on an H200 with bench/gguf_decode_bench.py, one joint layer (87 M weights), µs against a
# copy of the same bytes: Q8_0 bytes/8/4 (the first kernel) 209.9, words/256/8 70.8 (copy 68.2);
# Q4_K bytes/1/4 (the first kernel) 210.8, words/8/4 69.6 (copy 58.6). All bitwise equal to the
# torch path.
LAUNCH = {T.Q8_0: ("words", 256, 8), T.Q4_K: ("words", 8, 4)}


def _launch(qtype: T, src: torch.Tensor, out: torch.Tensor, form: str | None = None, blocks: int | None = None,
            num_warps: int | None = None) -> None:
    """Decode ``src`` into ``out`` with the kernel ``form`` ("bytes" or "words") at a launch shape
    (``LAUNCH`` by default; open for bench/gguf_decode_bench.py). The words form needs the packed
    bytes aligned to its word size; otherwise the bytes form runs (same bits)."""
    d_form, d_blocks, d_warps = LAUNCH[qtype]
    form, blocks, num_warps = form or d_form, blocks or d_blocks, num_warps or d_warps
    flat = out.view(-1)
    word = 2 if qtype is T.Q8_0 else 4
    if form == "words" and src.data_ptr() % word:
        form = "bytes"
    if qtype is T.Q8_0:
        n = src.numel() // 34
        if form == "words":
            _q8_0_words_kernel[(triton.cdiv(n, blocks),)](src.view(torch.int16), flat, n, BLOCKS=blocks,
                                                         num_warps=num_warps)
        else:
            _q8_0_kernel[(triton.cdiv(n, blocks),)](src, flat, n, BLOCKS=blocks, num_warps=num_warps)
    else:
        n = src.numel() // 144
        if form == "words":
            _q4_k_words_kernel[(triton.cdiv(n, blocks),)](src, src.view(torch.int32), flat, n, SUPER=blocks,
                                                         num_warps=num_warps)
        else:
            _q4_k_kernel[(n,)](src, flat, num_warps=num_warps)


# Whole-block decode (_block_kernel): GGML blocks per table row and warps, the LAUNCH shapes.
BLOCK_ROW = {T.Q8_0: (64, 4), T.Q4_K: (8, 4)}
_ALIGN = 256                      # every piece starts here in both layouts (placement/layout.py)


@dataclass(frozen=True)
class Piece:
    """One tensor of a packed block: GGML-packed (``qtype``) or plain at the output dtype
    (``qtype`` None, copied). Offsets are bytes into the packed and the decoded block."""
    qtype: T | None
    src: int
    dst: int
    elements: int


def block_decoder(pieces: Sequence[Piece], dtype: torch.dtype,
                  device: torch.device) -> Callable[[torch.Tensor, torch.Tensor], None] | None:
    """One launch that decodes a whole block of ``pieces`` (all packed ones of one type with a
    kernel, the plain ones at ``dtype``), or None when the block does not qualify. Launching per
    tensor costs about 14 launches per DiT block, on the thread that also drives the forward."""
    qtypes = {p.qtype for p in pieces if p.qtype is not None}
    if (device.type != "cuda" or len(qtypes) != 1 or dtype not in (torch.bfloat16, torch.float16)
            or any(p.src % _ALIGN or p.dst % _ALIGN for p in pieces)):
        return None
    qtype = T(qtypes.pop())
    if qtype not in BLOCK_ROW or not BLOCK_KERNEL.usable(device):
        return None
    shape = BLOCK_ROW[qtype]                  # read once: the table and the launches must agree
    table = block_table(pieces, dtype, device, shape[0])

    def decode(src: torch.Tensor, dst: torch.Tensor) -> None:
        if src.data_ptr() % _ALIGN or dst.data_ptr() % _ALIGN:
            decode_pieces(pieces, src, dst, dtype)           # same bits, one launch per tensor
        else:
            _launch_block(qtype, table, src, dst, dtype, shape)
    return decode


def _launch_block(qtype: T, table: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, dtype: torch.dtype,
                  shape: tuple[int, int]) -> None:
    """Run _block_kernel with ``shape`` (GGML blocks per row, warps); ``src`` and ``dst`` are 256-byte
    aligned uint8 buffers."""
    src, dst = src[: src.numel() // _ALIGN * _ALIGN], dst[: dst.numel() // _ALIGN * _ALIGN]
    per, warps = shape
    _block_kernel[(table.shape[0],)](src, src.view(torch.int16), src.view(torch.int32), src.view(dtype),
                                     dst.view(dtype), table, QTYPE=int(qtype), PER=per, ELEMS=block_geometry(qtype)[0],
                                     num_warps=warps, enable_fp_fusion=False)   # d*q - m: no FMA, as torch


def block_table(pieces: Sequence[Piece], dtype: torch.dtype, device: torch.device | str,
                per_row: int | None = None) -> torch.Tensor:
    """Rows (packed?, source offset, destination element offset, count) for _block_kernel: packed
    rows hold ``per_row`` GGML blocks (``BLOCK_ROW``'s by default; source offset in bytes), plain
    rows as many elements as those decode to (source offset in elements, count padded to 16: the
    padding is in the gap to the next 256-byte boundary)."""
    rows = []
    size = dtype.itemsize
    packed = T(next(p.qtype for p in pieces if p.qtype is not None))
    per_row = per_row or BLOCK_ROW[packed][0]
    step = per_row * block_geometry(packed)[0]                  # elements a packed row decodes to
    for p in pieces:
        if p.qtype is None:
            for start in range(0, p.elements, step):
                rows.append((0, p.src // size + start, p.dst // size + start, -(-min(step, p.elements - start) // 16) * 16))
            continue
        per, nbytes = block_geometry(p.qtype)
        blocks = p.elements // per
        for start in range(0, blocks, per_row):
            rows.append((1, p.src + start * nbytes, p.dst // size + start * per, min(per_row, blocks - start)))
    return torch.tensor(rows, dtype=torch.int64).to(device)


def decode_pieces(pieces: Sequence[Piece], src: torch.Tensor, dst: torch.Tensor, dtype: torch.dtype) -> None:
    """The per-tensor path the block kernel must equal: each packed piece decoded on its own."""
    size = dtype.itemsize
    for p in pieces:
        out = dst[p.dst:p.dst + p.elements * size].view(dtype)
        if p.qtype is None:
            out.copy_(src[p.src:p.src + p.elements * size].view(dtype))
        else:
            packed = src[p.src:p.src + packed_nbytes(p.qtype, p.elements)]
            if not try_decode_into(p.qtype, packed, out):
                out.copy_(dequantize(p.qtype, packed, (p.elements,)))


def _check_block(device: torch.device) -> None:
    """The block kernel against the per-tensor path, on a block of every kind of row (a plain
    tensor longer than one row, packed tensors of one and of several rows), both output dtypes."""
    g = torch.Generator().manual_seed(0)
    for qtype in BLOCK_ROW:
        per, nbytes = block_geometry(qtype)
        sizes = [(qtype, per * (BLOCK_ROW[qtype][0] * 2 + 3)), (None, 9000), (qtype, per * 5), (None, 24)]
        for dtype in (torch.bfloat16, torch.float16):
            pieces, src_at, dst_at, chunks = [], 0, 0, []
            for q, n in sizes:
                raw = torch.randint(0, 256, (n // per * nbytes if q else n * dtype.itemsize,), generator=g,
                                    dtype=torch.uint8)
                if q:
                    view = raw.view(-1, nbytes)
                    view[:, 0:4] = (torch.rand(view.shape[0], 2, generator=g) * 0.02).half().view(torch.uint8)
                else:
                    raw = (torch.randn(n, generator=g) * 3).to(dtype).view(torch.uint8)
                pieces.append(Piece(q, src_at, dst_at, n))
                chunks.append((src_at, raw))
                src_at = -(-(src_at + raw.numel()) // _ALIGN) * _ALIGN
                dst_at = -(-(dst_at + n * dtype.itemsize) // _ALIGN) * _ALIGN
            src = torch.zeros(src_at, dtype=torch.uint8)
            for at, raw in chunks:
                src[at:at + raw.numel()] = raw
            src = src.to(device)
            want = torch.zeros(dst_at, dtype=torch.uint8, device=device)
            decode_pieces(pieces, src, want, dtype)
            got = torch.zeros_like(want)
            _launch_block(qtype, block_table(pieces, dtype, device), src, got, dtype, BLOCK_ROW[qtype])
            for p in pieces:       # the gaps between pieces are scratch
                span = slice(p.dst, p.dst + p.elements * dtype.itemsize)
                if not torch.equal(got[span], want[span]):
                    raise RuntimeError(f"the {qtype.name} block kernel differs from the per-tensor path ({dtype})")


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
        for form in ("bytes", "words"):          # production may fall back to bytes (alignment)
            got = torch.empty_like(want)
            _launch(qtype, src, got, form)
            if not torch.equal(got, want):
                raise RuntimeError(f"result of the {form} kernel differs from the torch path ({dtype})")


def try_decode_into(qtype: T, src: torch.Tensor, out: torch.Tensor) -> bool:
    """Decode with a Triton kernel; False when there is none for ``qtype`` (use the torch path)."""
    kernel = KERNELS.get(qtype)
    if kernel is None or not out.is_contiguous() or not kernel.usable(src.device):
        return False
    _launch(qtype, src, out)
    return True


BLOCK_KERNEL = CheckedKernel("GGUF whole-block Triton decode", triton is not None, _check_block,
                             "one decode launch per tensor")
KERNELS = {q: CheckedKernel(f"GGUF {q.name} Triton decode", triton is not None, functools.partial(_check, q),
                            "the torch path") for q in (T.Q8_0, T.Q4_K)}
