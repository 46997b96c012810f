"""The Next-DiT transformer block and its SwiGLU feed-forward (spec §2.8, §2.9).

A block's ``forward`` takes only tensors and reads weights only through its own submodules, so
placement can run it with swapped-in weights. The norms, gates, residuals and the SwiGLU product
run through ``self.kernels`` (``fused.py``): one fused kernel each where torch.compile can build
them, the same float32-inside math eagerly elsewhere.
"""

from __future__ import annotations

import torch
from torch import nn

from .attention import JointAttention, RMSNorm
from .config import DiTConfig
from .fused import EAGER, Kernels


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x), no biases. Tokens may be processed in chunks."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.token_chunk: int | None = None        # set by NextDiT.set_chunking
        self.kernels: Kernels = EAGER               # set by NextDiT.set_kernels

    def _swiglu(self, x: torch.Tensor, weights: tuple) -> torch.Tensor:
        """(T, dim) -> (T, dim); always 2-D, so a compiled product sees one dynamic dim.
        ``weights``: w1, w3, w2 as ``Kernels.weights`` gives them. The product is written over
        w1's output (``Kernels.swiglu``), and w3's is let go before w2 runs: two (T, hidden)
        tensors live at most, not three."""
        k = self.kernels
        gate, up = k.linears(x, weights[:2])
        hidden = k.swiglu(gate, up)
        del gate, up
        return k.linears(hidden, weights[2:])[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        chunk = self.token_chunk
        weights = self.kernels.weights((self.w1, self.w3, self.w2))         # once for every chunk
        flat = x.reshape(-1, x.shape[-1])                                  # (B*S, dim)
        if not chunk or chunk >= flat.shape[0]:
            return self._swiglu(flat, weights).view_as(x)
        out = torch.empty_like(flat)
        for start in range(0, flat.shape[0], chunk):
            out[start:start + chunk] = self._swiglu(flat[start:start + chunk], weights)
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
        self.kernels: Kernels = EAGER               # set by NextDiT.set_kernels

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, cos: torch.Tensor,
                sin: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        """x + tanh(g_a) * norm2(attn(norm1(x) * (1 + s_a))), then the same around the FFN."""
        if self.modulation:
            if c is None:
                raise ValueError("a modulated Next-DiT block needs the adaLN vector c.")
            # (B, 4*dim) -> four (B, 1, dim): scale_msa, gate_msa, scale_mlp, gate_mlp (spec §2.9);
            # the gates' tanh in float32, once per sample instead of once per token in the residuals
            mod = self.adaLN_modulation(c).unsqueeze(1)
            scale_a, _, scale_f, _ = mod.chunk(4, dim=-1)
            _, gate_a, _, gate_f = self.kernels.tanh_float(mod).chunk(4, dim=-1)
        else:
            scale_a = gate_a = scale_f = gate_f = None
        k, eps = self.kernels, self.attention_norm1.eps
        attn = self.attention(k.norm_scale(x, self.attention_norm1.weight, scale_a, eps), mask, cos, sin)
        # the attention's residual and the FFN's input norm in one pass over x
        x, h = k.residual_norm(x, attn, self.attention_norm2.weight, gate_a, self.ffn_norm1.weight, scale_f, eps)
        del attn        # not live through the FFN, the block's peak (one (B, S, dim) tensor)
        return k.gated_residual(x, self.feed_forward(h), self.ffn_norm2.weight, gate_f, eps)
