"""Norms and the grouped-query attention of the Next-DiT blocks (spec §2.7, §2.12).

The reference path is ``torch.nn.functional.scaled_dot_product_attention`` with grouped-query
heads passed as they are (``enable_gqa``: no repeated K/V copies) and right-padded samples run
on their valid prefix. When ``flash_attn`` is importable and the tensors are CUDA bf16/fp16, the
varlen kernel is used instead (same math; the official bf16 path). Query chunking bounds the
attention workspace of the SDPA math/efficient kernels: each chunk of query rows attends to all
keys, so the result equals the unchunked one up to float rounding.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .fused import EAGER, Kernels, norm_scale

log = logging.getLogger(__name__)

try:  # optional fast path, never required
    from flash_attn import flash_attn_func, flash_attn_varlen_func
    HAS_FLASH_ATTN = True
    log.info("flash_attn found: bf16/fp16 CUDA attention uses its varlen kernel.")
except ImportError:
    flash_attn_func = flash_attn_varlen_func = None
    HAS_FLASH_ATTN = False
    log.debug("flash_attn not installed: attention uses torch SDPA.")


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * weight, in float32, rounded once to x's dtype.

    Inside the blocks the norms are fused with what follows them (``fused.py``) and this module
    only holds the weight under its checkpoint key; ``forward`` serves the embedders.
    """

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return norm_scale(x, self.weight, None, self.eps)


@dataclass(frozen=True)
class KeyPadding:
    """Right-padded keys: sample i attends to its first ``lengths[i]`` tokens.

    The lengths are Python ints known before the blocks run, so attention can split the batch
    without a device-to-host sync per block. ``mask`` is the same information as a (B, S) bool
    tensor, for the flash-attn varlen path.
    """
    lengths: tuple[int, ...]
    mask: torch.Tensor


def _use_flash(q: torch.Tensor) -> bool:
    return HAS_FLASH_ATTN and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)


def _flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """q (B,S,H,D), k/v (B,S,Hkv,D) -> (B,S,H,D); padding rows come back as zeros."""
    if mask is None:
        return flash_attn_func(q, k, v, softmax_scale=scale, causal=False)
    b, s, h, d = q.shape
    flat = mask.reshape(-1)
    idx = torch.nonzero(flat, as_tuple=False).flatten()
    lens = mask.sum(dim=1, dtype=torch.int32)
    cu = F.pad(torch.cumsum(lens, dim=0, dtype=torch.int32), (1, 0))
    max_len = int(lens.max())
    q_u, k_u, v_u = (t.reshape(b * s, *t.shape[2:])[idx] for t in (q, k, v))
    out_u = flash_attn_varlen_func(q_u, k_u, v_u, cu_seqlens_q=cu, cu_seqlens_k=cu,
                                   max_seqlen_q=max_len, max_seqlen_k=max_len,
                                   softmax_scale=scale, causal=False)
    out = q.new_zeros(b * s, h, d)
    out[idx] = out_u
    return out.view(b, s, h, d)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   mask: KeyPadding | torch.Tensor | None, scale: float,
                   query_chunk: int | None = None) -> torch.Tensor:
    """q (B,S,H,D), k/v (B,S,Hkv,D), valid keys (KeyPadding, (B,S) bool, or None) -> (B,S,H,D).

    KV head g serves query heads g*rep .. g*rep+rep-1 (spec §2.7), which is what SDPA's
    ``enable_gqa`` does without materialising the repeated heads. With a KeyPadding each sample
    runs on its own valid prefix with no mask at all, which lets SDPA pick its fastest (flash)
    kernel; padded query rows come back as zeros (they are discarded).
    """
    if isinstance(mask, KeyPadding):
        out = q.new_empty(q.shape)          # zeroing only the padding: a full fill was 0.5 ms a step
        for i, n in enumerate(mask.lengths):
            out[i, n:] = 0
            out[i:i + 1, :n] = sdpa_attention(q[i:i + 1, :n], k[i:i + 1, :n], v[i:i + 1, :n], None, scale,
                                              query_chunk)
        return out
    gqa = q.shape[2] != k.shape[2]
    qh = q.transpose(1, 2)                                             # (B, H, S, D)
    kh, vh = k.transpose(1, 2), v.transpose(1, 2)                      # (B, Hkv, S, D)
    attn_mask = None if mask is None else mask[:, None, None, :]       # (B, 1, 1, S)
    s = q.shape[1]
    if not query_chunk or query_chunk >= s:
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=attn_mask, scale=scale, enable_gqa=gqa)
        return out.transpose(1, 2)
    out = q.new_empty(q.shape)                                         # (B, S, H, D)
    for start in range(0, s, query_chunk):
        rows = slice(start, min(start + query_chunk, s))
        out[:, rows] = F.scaled_dot_product_attention(
            qh[:, :, rows], kh, vh, attn_mask=attn_mask, scale=scale, enable_gqa=gqa).transpose(1, 2)
    return out


class JointAttention(nn.Module):
    """Fused-qkv GQA with QK-RMSNorm and 3-axis RoPE; no biases (keys ``attention.*``)."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, norm_eps: float):
        super().__init__()
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = dim // n_heads
        self.qkv = nn.Linear(dim, (n_heads + 2 * n_kv_heads) * self.head_dim, bias=False)
        self.out = nn.Linear(n_heads * self.head_dim, dim, bias=False)
        self.q_norm = RMSNorm(self.head_dim, eps=norm_eps)
        self.k_norm = RMSNorm(self.head_dim, eps=norm_eps)
        self.query_chunk: int | None = None        # set by NextDiT.set_chunking
        self.kernels: Kernels = EAGER               # set by NextDiT.set_kernels

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, cos: torch.Tensor,
                sin: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        hd, eps = self.head_dim, self.q_norm.eps
        qkv = self.kernels.linear(x, self.qkv).view(b, s, -1, hd)                  # (B, S, H+2Hkv, hd)
        q, k, v = self.kernels.qkv_norm_rope(qkv, self.q_norm.weight, self.k_norm.weight, cos, sin, eps,
                                             self.n_heads)                     # (B,S,H,hd), 2x (B,S,Hkv,hd)
        scale = 1.0 / math.sqrt(hd)
        if _use_flash(q):
            out = _flash_attention(q, k, v, mask.mask if isinstance(mask, KeyPadding) else mask, scale)
        else:
            out = sdpa_attention(q, k, v, mask, scale, self.query_chunk)
        return self.kernels.linear(out.reshape(b, s, self.n_heads * hd), self.out)   # (B, S, dim)
