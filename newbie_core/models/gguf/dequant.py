"""GGML block formats -> float32, in torch, on whatever device the bytes are on.

This is the reference decode (CPU, and the GPU fallback when Triton is missing). Every format
stores fixed-size blocks along a tensor's last dimension; a block holds a little-endian f16
scale (and for some formats a minimum) plus packed integers. Arithmetic is done in float32 in
the same order as the ``gguf`` package's numpy reference (one rounding per multiply or
subtract, no fused multiply-add), so both give the same bits; tests check this per format.

Layouts (bytes per block / elements per block), from ggml's block structs:

- Q8_0 34/32: d, 32 x int8.                      x = d * q
- Q4_0 18/32: d, 16 B nibbles (low = first 16).  x = d * (q - 8)
- Q4_1 20/32: d, m, 16 B nibbles.                x = d * q + m
- Q5_0 22/32: d, 32-bit high bits, 16 B nibbles. x = d * (q - 16)
- Q5_1 24/32: d, m, 32-bit high bits, 16 B.      x = d * q + m
- Q4_K 144/256: d, dmin, 12 B of 6-bit (scale, min) pairs for 8 sub-blocks of 32, 128 B nibbles.
  x = (d * sc) * q - (dmin * m)
- Q5_K 176/256: as Q4_K plus 32 B holding bit 4 of every element.
- Q6_K 210/256: 128 B low nibbles, 64 B 2-bit highs, 16 int8 scales, d.  x = (d * sc) * (q - 32)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

QK_K = 256


def _f16(b: torch.Tensor) -> torch.Tensor:
    """(n, 2) uint8 -> (n, 1) float32 read as little-endian f16."""
    return b.contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(n, k) uint8 -> (n, 2k): all low nibbles first, then all high nibbles (per 32-element run)."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def _bits(word: torch.Tensor, count: int) -> torch.Tensor:
    """(n, 4) uint8 little-endian u32 -> (n, count) uint8 holding bit i of it at position i."""
    w = word.contiguous().view(torch.int32)                      # (n, 1); only bit tests follow
    shifts = torch.arange(count, device=word.device, dtype=torch.int32)
    return ((w >> shifts) & 1).to(torch.uint8)


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    return _f16(b[:, :2]) * b[:, 2:].contiguous().view(torch.int8).float()


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    return _f16(b[:, :2]) * (_nibbles(b[:, 2:]).to(torch.int8) - 8).float()


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    return _f16(b[:, :2]) * _nibbles(b[:, 4:]).float() + _f16(b[:, 2:4])


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    q = _nibbles(b[:, 6:]) | (_bits(b[:, 2:6], 32) << 4)
    return _f16(b[:, :2]) * (q.to(torch.int8) - 16).float()


def _q5_1(b: torch.Tensor) -> torch.Tensor:
    q = _nibbles(b[:, 8:]) | (_bits(b[:, 4:8], 32) << 4)
    return _f16(b[:, :2]) * q.float() + _f16(b[:, 2:4])


def k_scale_min(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 12) packed 6-bit scales -> (scale, min), each (n, 8) uint8, for 8 sub-blocks.

    Sub-blocks 0-3 keep their 6 bits in the low bits of bytes 0-3 (scales) and 4-7 (mins);
    sub-blocks 4-7 take their low 4 bits from bytes 8-11 and their top 2 bits from the spare
    top bits of bytes 0-3 (scales) and 4-7 (mins)."""
    a, m, hi = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    scale = torch.cat([a & 0x3F, (hi & 0x0F) | ((a >> 2) & 0x30)], dim=-1)
    minimum = torch.cat([m & 0x3F, (hi >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return scale, minimum


def _k_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(n, 128) -> (n, 8, 32): each 32-byte chunk gives two sub-blocks, low nibbles then high."""
    chunks = qs.reshape(qs.shape[0], 4, 1, 32)
    return torch.cat([chunks & 0x0F, chunks >> 4], dim=2).reshape(qs.shape[0], 8, 32)


def _k_affine(b: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    sc, mn = k_scale_min(b[:, 4:16])
    d = (_f16(b[:, 0:2]) * sc.float()).reshape(n, 8, 1)
    dm = (_f16(b[:, 2:4]) * mn.float()).reshape(n, 8, 1)
    return (d * q.float() - dm).reshape(n, QK_K)


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    return _k_affine(b, _k_nibbles(b[:, 16:144]))


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    qh = b[:, 16:48].reshape(n, 1, 32)
    shifts = torch.arange(8, device=b.device, dtype=torch.uint8).reshape(1, 8, 1)
    high = (qh >> shifts) & 1                                  # bit j belongs to sub-block j
    return _k_affine(b, _k_nibbles(b[:, 48:176]) | (high << 4))


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    ql = b[:, 0:128].reshape(n, 2, 1, 64)                       # two halves of 128 elements
    low = torch.cat([ql & 0x0F, ql >> 4], dim=2).reshape(n, 2, 4, 32)
    qh = b[:, 128:192].reshape(n, 2, 1, 32)
    shifts = torch.tensor([0, 2, 4, 6], device=b.device, dtype=torch.uint8).reshape(1, 1, 4, 1)
    high = (qh >> shifts) & 3
    q = ((low | (high << 4)).to(torch.int8) - 32).reshape(n, 16, 16)
    scales = b[:, 192:208].contiguous().view(torch.int8).float()
    d = (_f16(b[:, 208:210]) * scales).reshape(n, 16, 1)
    return (d * q.float()).reshape(n, QK_K)


def _bf16(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.bfloat16).float()


def _f16_plain(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float16).float()


def _f32(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float32)


BLOCK_DECODERS: dict[T, Callable[[torch.Tensor], torch.Tensor]] = {
    T.F32: _f32, T.F16: _f16_plain, T.BF16: _bf16,
    T.Q8_0: _q8_0, T.Q4_0: _q4_0, T.Q4_1: _q4_1, T.Q5_0: _q5_0, T.Q5_1: _q5_1,
    T.Q4_K: _q4_k, T.Q5_K: _q5_k, T.Q6_K: _q6_k,
}
QUANTISED = tuple(t for t in BLOCK_DECODERS if t not in (T.F32, T.F16, T.BF16))


def block_geometry(qtype: T) -> tuple[int, int]:
    """(elements per block, bytes per block)."""
    return GGML_QUANT_SIZES[qtype]


def packed_nbytes(qtype: T, n_elements: int) -> int:
    per, size = block_geometry(qtype)
    if n_elements % per:
        raise ValueError(f"{qtype.name} needs a multiple of {per} elements, got {n_elements}.")
    return n_elements // per * size


def dequantize(qtype: T, data: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Packed bytes (1-D or row-shaped uint8, any device) -> float32 tensor of ``shape``."""
    decode = BLOCK_DECODERS.get(T(qtype))
    if decode is None:
        raise ValueError(f"GGUF tensor type {T(qtype).name} is not supported; supported: "
                         f"{', '.join(t.name for t in BLOCK_DECODERS)}.")
    _, size = block_geometry(T(qtype))
    blocks = data.reshape(-1, size)
    return decode(blocks).reshape(shape)


def decode_into(qtype: T, src: torch.Tensor, out: torch.Tensor) -> None:
    """Fill ``out`` (compute dtype, its logical shape) from packed ``src`` on their device: the
    Triton kernel on CUDA where it exists and passed its check, else the torch path. Either way
    one float32 -> compute-dtype rounding per element."""
    if src.is_cuda:
        from .triton_dequant import try_decode_into   # guarded: absent Triton means the torch path
        if try_decode_into(qtype, src, out):
            return
    out.copy_(dequantize(qtype, src, tuple(out.shape)))
