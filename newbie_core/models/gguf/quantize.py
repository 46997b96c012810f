"""Float weights -> GGML blocks, for tests and the benchmark's GGUF files (not used at run time).

Types the ``gguf`` package quantises itself (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, BF16, F16) go
through ``gguf.quants.quantize``, the code llama.cpp's Python tools use. It has no K-quant
quantiser, so Q4_K, Q5_K and Q6_K are made here with the plain rounding scheme (min-max per
32-element sub-block, 6-bit sub-block scales against one f16 super-scale), not llama.cpp's
error-minimising search: the bytes are valid blocks of the format and decode with any GGML
reader, but the error is somewhat larger than a llama.cpp file of the same type.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import quants

QK_K = 256
K_TYPES = (T.Q4_K, T.Q5_K, T.Q6_K)


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).reshape(-1, 1).view(np.uint8)


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.divide(a, b, out=np.zeros_like(a), where=b != 0)


def _pack_k_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """(n, 8) 6-bit scales and mins -> (n, 12) bytes (the inverse of dequant.k_scale_min)."""
    lo = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    mid = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    hi = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    return np.concatenate([lo, mid, hi], axis=1).astype(np.uint8)


def _affine_k(x: np.ndarray, levels: int) -> tuple[np.ndarray, ...]:
    """Per super-block of 256: d, dmin (f16), 6-bit scales and mins, and q in [0, levels]."""
    n = x.shape[0]
    sub = x.reshape(n, 8, 32)
    low = np.minimum(sub.min(axis=2), 0.0)
    span = sub.max(axis=2) - low
    scale, minimum = span / levels, -low
    d = (scale.max(axis=1) / 63).astype(np.float16).astype(np.float32)
    dmin = (minimum.max(axis=1) / 63).astype(np.float16).astype(np.float32)
    sc = np.clip(np.rint(_safe_div(scale, d[:, None])), 0, 63).astype(np.uint8)
    mn = np.clip(np.rint(_safe_div(minimum, dmin[:, None])), 0, 63).astype(np.uint8)
    step = (d[:, None] * sc)[:, :, None]
    offset = (dmin[:, None] * mn)[:, :, None]
    q = np.clip(np.rint(_safe_div(sub + offset, np.broadcast_to(step, sub.shape).copy())), 0, levels)
    return d, dmin, sc, mn, q.astype(np.uint8)


def _nibble_pack(q: np.ndarray) -> np.ndarray:
    """(n, 8, 32) 4-bit values -> (n, 128): chunk c holds sub-block 2c low, 2c+1 high."""
    pairs = q.reshape(q.shape[0], 4, 2, 32)
    return (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(q.shape[0], 128)


def _q4_k(x: np.ndarray) -> np.ndarray:
    d, dmin, sc, mn, q = _affine_k(x, 15)
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), _pack_k_scales(sc, mn), _nibble_pack(q)], axis=1)


def _q5_k(x: np.ndarray) -> np.ndarray:
    d, dmin, sc, mn, q = _affine_k(x, 31)
    high = (q >> 4) & 1                                           # (n, 8, 32)
    qh = np.zeros((x.shape[0], 32), dtype=np.uint8)
    for j in range(8):
        qh |= (high[:, j] << j).astype(np.uint8)
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), _pack_k_scales(sc, mn), qh,
                           _nibble_pack(q & 0x0F)], axis=1)


def _q6_k(x: np.ndarray) -> np.ndarray:
    n = x.shape[0]
    sub = x.reshape(n, 16, 16)
    scale = np.abs(sub).max(axis=2) / 32
    d = (scale.max(axis=1) / 127).astype(np.float16).astype(np.float32)
    sc = np.clip(np.rint(_safe_div(scale, d[:, None])), -128, 127).astype(np.int8)
    step = np.broadcast_to((d[:, None] * sc)[:, :, None], sub.shape).copy()
    q = (np.clip(np.rint(_safe_div(sub, step)), -32, 31) + 32).astype(np.uint8).reshape(n, 2, 4, 32)
    low, high = q & 0x0F, q >> 4
    ql = np.concatenate([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], axis=2)
    qh = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)
    return np.concatenate([ql.reshape(n, 128), qh.reshape(n, 64), sc.view(np.uint8), _f16_bytes(d)], axis=1)


_K = {T.Q4_K: _q4_k, T.Q5_K: _q5_k, T.Q6_K: _q6_k}


def quantize(x: np.ndarray, qtype: T) -> np.ndarray:
    """float32 array (last dim a multiple of the block size) -> uint8 array of GGML blocks,
    shaped (*rows, bytes per row) as GGUFWriter takes it with ``raw_dtype``."""
    qtype = T(qtype)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if qtype not in _K:
        return quants.quantize(x, qtype)
    if x.shape[-1] % QK_K:
        raise ValueError(f"{qtype.name} needs a last dimension divisible by {QK_K}, got {x.shape}.")
    blocks = _K[qtype](x.reshape(-1, QK_K))
    return blocks.reshape(*x.shape[:-1], -1)
