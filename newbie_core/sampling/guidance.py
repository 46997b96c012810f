"""Classifier-free guidance on the velocity, with the official renorm and truncation (spec §5.2).

CFG on the velocity equals CFG on the denoised estimate (x̂0 is affine in v for fixed x, σ), so
results match ComfyUI's standard CFG. The cond and uncond halves always go through the model as
ONE batch of two: when the DiT's weights are streamed, two passes would copy every block twice.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable

import torch

logger = logging.getLogger(__name__)

# batched_model(x2, t2) -> v2 with x2 = [x ; x] (cond rows first, uncond rows second).
PairModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# single_model(x, t) -> v with the positive conditioning only.
SingleModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class GuidanceConfig:
    """How to combine cond and uncond velocities.

    scale: CFG scale w; 1.0 means no guidance (the uncond half is never evaluated).
    renorm: official ``renorm_cfg`` r; > 0 clamps ‖v‖ to r·‖v_cond‖ per sample (0 = off).
    trunc: official ``cfg_trunc`` τ; CFG only while model time t < τ, afterwards the cond branch
        alone (batch 1). None = always guide (the official method default τ = 100 is the same).
    """

    scale: float = 5.0
    renorm: float = 0.0
    trunc: float | None = None

    def __post_init__(self) -> None:
        if not math.isfinite(self.scale):
            raise ValueError(f"cfg scale must be a finite number, got {self.scale!r}")
        if self.renorm < 0:
            raise ValueError(f"cfg renorm must be >= 0 (0 = off), got {self.renorm!r}")
        if self.trunc is not None and not self.trunc > 0:
            raise ValueError(
                f"cfg trunc must be > 0 (CFG runs while t < trunc) or None for always, "
                f"got {self.trunc!r}")

    def guides_at(self, t: float) -> bool:
        """True when the uncond branch is needed at model time ``t``."""
        if self.scale == 1.0:
            return False
        return self.trunc is None or t < self.trunc


def cfg_velocity(v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """v = v_u + w·(v_c − v_u)."""
    return v_uncond + scale * (v_cond - v_uncond)


def renorm_velocity(v: torch.Tensor, v_cond: torch.Tensor, renorm: float) -> torch.Tensor:
    """Official CFG renormalisation: if ‖v‖ ≥ r·‖v_c‖ scale v down to r·‖v_c‖; never scale up.

    Norms are L2 over all non-batch dims of each sample. The official code only handled batch 1;
    this applies the same rule per sample.
    """
    if renorm <= 0:
        return v
    dims = tuple(range(1, v.ndim))
    limit = torch.linalg.vector_norm(v_cond.float(), dim=dims, keepdim=True) * renorm
    norm = torch.linalg.vector_norm(v.float(), dim=dims, keepdim=True)
    factor = torch.where(norm >= limit, limit / norm.clamp_min(torch.finfo(torch.float32).tiny),
                         torch.ones_like(norm))
    return (v.float() * factor).to(v.dtype)


class GuidedVelocity:
    """velocity_fn(x, σ) for the samplers: runs the model and applies CFG.

    The caller prepares conditioning: ``batched_model`` sees x2 = cat([x, x]) with the positive
    conditioning for the first B rows and the negative for the last B; ``single_model`` sees x
    with the positive conditioning only. Model time t = 1 − σ is passed as a float32 (B,) or
    (2B,) tensor. The result is float32.
    """

    def __init__(self, batched_model: PairModel, single_model: SingleModel,
                 config: GuidanceConfig) -> None:
        self.batched_model = batched_model
        self.single_model = single_model
        self.config = config
        self.calls_pair = 0  # model evaluations, for tests and reports
        self.calls_single = 0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        t = 1.0 - float(sigma)
        b = x.shape[0]
        if not self.config.guides_at(t):
            self.calls_single += 1
            t1 = torch.full((b,), t, dtype=torch.float32, device=x.device)
            return self.single_model(x, t1).float()
        self.calls_pair += 1
        t2 = torch.full((2 * b,), t, dtype=torch.float32, device=x.device)
        v2 = self.batched_model(torch.cat([x, x], dim=0), t2).float()  # (2B, C, H, W)
        if v2.shape[0] != 2 * b:
            raise ValueError(
                f"batched_model returned batch {v2.shape[0]}, expected {2 * b} (cond + uncond)")
        v_cond, v_uncond = v2[:b], v2[b:]
        v = cfg_velocity(v_cond, v_uncond, self.config.scale)
        return renorm_velocity(v, v_cond, self.config.renorm)
