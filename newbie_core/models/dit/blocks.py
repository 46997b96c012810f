"""The Next-DiT transformer block and its SwiGLU feed-forward (spec §2.8, §2.9).

A block's ``forward`` takes only tensors and reads weights only through its own submodules, so
placement can run it with ``torch.func.functional_call`` and swapped-in weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import JointAttention, RMSNorm, clamp_fp16
from .config import DiTConfig


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x), no biases. Tokens may be processed in chunks."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.token_chunk: int | None = None        # set by NextDiT.set_chunking

    def _swiglu(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(clamp_fp16(F.silu(self.w1(x)) * self.w3(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        chunk = self.token_chunk
        flat = x.reshape(-1, x.shape[-1])                                  # (B*S, dim)
        if not chunk or chunk >= flat.shape[0]:
            return self._swiglu(x)
        out = torch.empty_like(flat)
        for start in range(0, flat.shape[0], chunk):
            out[start:start + chunk] = self._swiglu(flat[start:start + chunk])
        return out.view_as(x)


class JointTransformerBlock(nn.Module):
    """Sandwich-normed attention + SwiGLU with optional adaLN scale and tanh gates.

    Modulated (noise_refiner, layers): forward(x, mask, cos, sin, c).
    Unmodulated (context_refiner): forward(x, mask, cos, sin).
    """

    def __init__(self, config: DiTConfig, modulation: bool):
        super().__init__()
        dim, eps = config.dim, config.norm_eps
        self.attention = JointAttention(dim, config.n_heads, config.n_kv_heads, eps)
        self.feed_forward = FeedForward(dim, config.ffn_dim)
        self.attention_norm1 = RMSNorm(dim, eps)
        self.ffn_norm1 = RMSNorm(dim, eps)
        self.attention_norm2 = RMSNorm(dim, eps)
        self.ffn_norm2 = RMSNorm(dim, eps)
        self.modulation = modulation
        if modulation:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(config.adaln_dim, 4 * dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, cos: torch.Tensor,
                sin: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        if not self.modulation:
            attn = self.attention(self.attention_norm1(x), mask, cos, sin)
            x = clamp_fp16(x + self.attention_norm2(clamp_fp16(attn)))
            ffn = self.feed_forward(self.ffn_norm1(x))
            return clamp_fp16(x + self.ffn_norm2(clamp_fp16(ffn)))
        if c is None:
            raise ValueError("a modulated Next-DiT block needs the adaLN vector c.")
        # (B, 4*dim) -> four (B, 1, dim): scale_msa, gate_msa, scale_mlp, gate_mlp (spec §2.9)
        scale_a, gate_a, scale_f, gate_f = self.adaLN_modulation(c).unsqueeze(1).chunk(4, dim=-1)
        attn = self.attention(self.attention_norm1(x) * (1 + scale_a), mask, cos, sin)
        x = clamp_fp16(x + gate_a.tanh() * self.attention_norm2(clamp_fp16(attn)))
        ffn = self.feed_forward(self.ffn_norm1(x) * (1 + scale_f))
        return clamp_fp16(x + gate_f.tanh() * self.ffn_norm2(clamp_fp16(ffn)))
