"""Flow-matching noise schedules with the NewBie time shift (spec §5.1).

Conventions (spec §2.11): σ = 1 − t, where t is the DiT's model time (0 = noise, 1 = clean).
A latent at level σ is x_σ = (1 − σ)·x_clean + σ·noise. Schedules here run from σ = 1 (or less
for img2img) down to exactly 0.
"""

from __future__ import annotations

import math
from typing import overload

import torch

DEFAULT_SHIFT = 6.0


@overload
def shift_sigma(sigma: float, shift: float) -> float: ...
@overload
def shift_sigma(sigma: torch.Tensor, shift: float) -> torch.Tensor: ...


def shift_sigma(sigma, shift):
    """Time shift σ' = s·σ / (1 + (s − 1)·σ); s > 1 spends more steps at high noise.

    Equivalent to t' = t / (t + s·(1 − t)). Keeps 0 → 0 and 1 → 1.
    """
    if not shift > 0:
        raise ValueError(f"shift must be > 0 (NewBie uses 6.0), got {shift!r}")
    return shift * sigma / (1 + (shift - 1) * sigma)


def _simple_sigmas(steps: int, shift: float) -> torch.Tensor:
    """σ_i = shift(1 − i/n) for i = 0..n−1, then 0: ComfyUI's "simple" scheduler in closed form.

    ComfyUI reads these values from a 1000-entry table, so it matches this exactly when 1000/n is
    an integer and to within one table entry (Δσ ≤ 1e-3 before the shift) otherwise.
    """
    i = torch.arange(steps, dtype=torch.float64)
    sig = shift_sigma(1.0 - i / steps, shift)  # (steps,)
    return torch.cat([sig, torch.zeros(1, dtype=torch.float64)])


def flow_sigmas(steps: int, shift: float = DEFAULT_SHIFT, denoise: float = 1.0) -> torch.Tensor:
    """The σ levels of a run: a float32 tensor of shape (steps + 1,) ending at exactly 0.

    ``steps`` counts solver intervals. For ``denoise < 1`` (img2img) this follows ComfyUI's
    KSampler rule: build the schedule for ``int(steps / denoise)`` steps and keep its last
    ``steps + 1`` values, so the run starts part-way down the same curve. (ComfyUI truncates with
    ``int()``, not ``round()``; we do the same so a given denoise value starts at the same σ.)
    Computed in float64 and cast once, so σ_0 is exactly 1.0 for a full run.
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if not (0.0 < denoise <= 1.0) or math.isnan(denoise):
        raise ValueError(
            f"denoise must be in (0, 1] (1.0 = start from pure noise), got {denoise!r}")
    if denoise > 0.9999:  # ComfyUI treats values this close to 1 as a full run
        return _simple_sigmas(steps, shift).float()
    total = int(steps / denoise)
    return _simple_sigmas(total, shift)[-(steps + 1):].float()
