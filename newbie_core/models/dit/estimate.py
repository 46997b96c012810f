"""Analytic activation-memory and FLOP estimates for one Next-DiT forward.

These feed the placement planner before any GPU is touched; the lead calibrates the constants on
a GPU. Notation: B batch, Lc caption tokens (padded), N image tokens, S = Lc + N joint tokens,
D dim, H/Hkv heads, d head dim, F ffn dim, e bytes per element of the compute dtype,
q = attention query chunk (<= S), f = FFN token chunk (<= B*S).

Peak = max over the phases of a joint block (the longest sequence), plus what lives across the
whole forward (RoPE cos/sin for three sequences, caption + image streams while packing):

  attention phase  = 2*B*S*D*e              residual x + normed branch input
                   + B*S*(H+2Hkv)*d*e       fused qkv output (v is read from it in place)
                   + B*S*(H+Hkv)*d*e        q and k after QK-norm + RoPE (one fused kernel)
                   + B*S*H*d*e + S*H*d*e    attention output, and one sample's SDPA result
                   + B*S*D*e                ``out`` projection result
                   + workspace               math: B*H*q*S*(2e+1) scores, softmax, mask
                                             efficient/flash: B*H*S*4 (log-sum-exp)
  ffn phase        = 3*B*S*D*e              residual, h, normed h
                   + 2*f*F*e                w1 out, w3 out (silu(w1) * w3 is written over w1's)
                   + f*D*e                  w2 chunk output
                   + B*S*D*e  (if f < B*S)  the output the chunks are written into
  fp8 compute      + 3*D*F + f*(D + F)       the FFN's e4m3 weights, and its inputs in e4m3
  packing          = B*(Lc + N + S)*D*e     caption, image and joint streams together
  persistent       = 2*B*(Lc + N + S)*(d/2)*4   cos/sin

GQA heads are never repeated (SDPA's ``enable_gqa``) and RoPE makes no float32 temporaries (it
is fused with the QK-norm), so neither is counted.
"""

from __future__ import annotations

from enum import Enum

import torch

from .config import DiTConfig


class AttentionKernel(str, Enum):
    MATH = "math"              # SDPA math fallback (CPU, or CUDA when no fused kernel applies)
    EFFICIENT = "efficient"    # SDPA memory-efficient kernel (CUDA with a boolean mask)
    FLASH = "flash"            # flash-attn varlen / SDPA flash (no S x S workspace)


def _elem(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def estimate_activation_bytes(config: DiTConfig, batch: int, cap_tokens: int, image_tokens: int,
                              dtype: torch.dtype, attn_query_chunk: int | None = None,
                              ffn_token_chunk: int | None = None,
                              kernel: AttentionKernel = AttentionKernel.EFFICIENT,
                              fp8_compute: bool = False) -> int:
    """Largest set of simultaneously live activation bytes in one forward (formula above)."""
    e, b = _elem(dtype), batch
    d_model, h, hkv, hd, f_dim = config.dim, config.n_heads, config.n_kv_heads, config.head_dim, config.ffn_dim
    s = cap_tokens + image_tokens
    q = min(attn_query_chunk or s, s)
    f = min(ffn_token_chunk or b * s, b * s)

    if AttentionKernel(kernel) is AttentionKernel.MATH:
        workspace = b * h * q * s * (2 * e + 1)
    else:
        workspace = b * h * s * 4
    attention = (2 * b * s * d_model * e + b * s * (h + 2 * hkv) * hd * e + b * s * (h + hkv) * hd * e
                 + (b + 1) * s * h * hd * e + b * s * d_model * e + workspace)
    chunked_out = b * s * d_model * e if f < b * s else 0
    ffn = 3 * b * s * d_model * e + 2 * f * f_dim * e + f * d_model * e + chunked_out
    if fp8_compute:
        ffn += 3 * d_model * f_dim + f * (d_model + f_dim)
    packing = b * (cap_tokens + image_tokens + s) * d_model * e
    persistent = 2 * b * (cap_tokens + image_tokens + s) * (hd // 2) * 4
    return int(max(attention, ffn, packing) + persistent)


def _block_flops(config: DiTConfig, batch: int, seq: int, modulated: bool) -> int:
    t = batch * seq
    d_model, hd, f_dim = config.dim, config.head_dim, config.ffn_dim
    flops = 2 * t * d_model * config.qkv_rows            # qkv
    flops += 2 * t * d_model * d_model                   # out
    flops += 3 * 2 * t * d_model * f_dim                 # w1, w3, w2
    flops += 2 * 2 * batch * config.n_heads * seq * seq * hd   # QK^T and PV
    if modulated:
        flops += 2 * batch * config.adaln_dim * 4 * d_model
    return flops


def joint_block_flops(config: DiTConfig, batch: int, seq: int) -> int:
    """Matmul FLOPs of one joint (modulated) block over ``batch`` sequences of ``seq`` tokens:
    what the planner weighs a block's copy against."""
    return int(_block_flops(config, batch, seq, True))


def flops_per_forward(config: DiTConfig, batch: int, cap_tokens: int, image_tokens: int,
                      caption_refined: bool = False) -> int:
    """Matmul FLOPs (2*m*n*k) of one forward, attention QK and PV included. ``caption_refined``:
    the forward is given its refined caption (NextDiT.refine_caption, once per conditioning), so
    the cap embedder and the context refiner are not part of it."""
    b, a, d_model, clip = batch, config.adaln_dim, config.dim, config.clip_text_dim
    s = cap_tokens + image_tokens
    flops = 0
    if not caption_refined:
        flops += config.n_context_refiner * _block_flops(config, b, cap_tokens, False)
        flops += 2 * b * cap_tokens * config.cap_feat_dim * d_model             # cap_embedder
    flops += config.n_noise_refiner * _block_flops(config, b, image_tokens, True)
    flops += config.n_layers * _block_flops(config, b, s, True)
    flops += 2 * b * image_tokens * config.patch_features * d_model             # x_embedder
    flops += 2 * b * (config.timestep_freq_dim * a + a * a)                      # t_embedder
    flops += 2 * b * (clip * clip + (a + clip) * a)                             # pooled proj + time_text
    flops += 2 * b * (a * d_model + image_tokens * d_model * config.patch_features)  # final layer
    return int(flops)
