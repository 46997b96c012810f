"""Small modules around the block stack: timestep embedder, final layer, patchify (spec §2.3-2.6).

These stay plain submodules of ``NextDiT`` (never streamed): together they are ~13 M parameters.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn


@functools.lru_cache(maxsize=8)
def _frequencies(half: int, max_period: float, device: torch.device) -> torch.Tensor:
    """Computed on the CPU (the same bits on every device), kept on ``device``: a forward then
    copies nothing from the host, so it can be captured as a CUDA graph."""
    return torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half).to(device)


def timestep_features(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """(B,) flow time in [0, 1] (not scaled by 1000) -> (B, dim) float32, cosine half first."""
    args = t.float()[:, None] * _frequencies(dim // 2, max_period, t.device)[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    """Sinusoidal features -> Linear -> SiLU -> Linear (keys ``t_embedder.mlp.0/.2``)."""

    def __init__(self, out_dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_features(t, self.freq_dim).to(self.mlp[0].weight.dtype))


class FinalLayer(nn.Module):
    """LayerNorm (no affine, eps 1e-6) scaled by 1 + adaLN(c), then Linear to patch vectors."""

    def __init__(self, dim: int, adaln_dim: int, patch_features: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_features)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(adaln_dim, dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        scale = self.adaLN_modulation(c).unsqueeze(1)                    # (B, 1, dim)
        return self.linear(self.norm_final(x) * (1 + scale))             # (B, N, p*p*C)


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, (H/p)(W/p), p*p*C); token row-major, feature index ph*p*C + pw*C + c."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // p, p, w // p, p)                               # (B, C, Hp, ph, Wp, pw)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(tokens: torch.Tensor, p: int, channels: int, h: int, w: int) -> torch.Tensor:
    """Exact inverse of :func:`patchify`: (B, N, p*p*C) -> (B, C, H, W)."""
    b = tokens.shape[0]
    x = tokens.view(b, h // p, w // p, p, p, channels)                    # (B, Hp, Wp, ph, pw, C)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, channels, h, w)
