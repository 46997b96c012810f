"""Initial noise, img2img noising and the NewBie latent normalisation (spec §4, §2.11).

Noise is drawn on the CPU in float32 from a private ``torch.Generator`` and only then cast and
moved, so a seed gives the same picture whether the run is on CPU or GPU, and in any model
dtype. For a float32 latent this is the same stream ComfyUI's ``prepare_noise`` draws.
"""

from __future__ import annotations

import torch

# FLUX VAE latent statistics, hard-coded in the official training/demo code (spec §4).
LATENT_SHIFT = 0.1159
LATENT_SCALE = 0.3611

_SEED_MIN = -(2**63)
_SEED_MAX = 2**64 - 1


def initial_noise(
    seed: int,
    shape: tuple[int, ...] | torch.Size,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Standard normal noise of ``shape`` for ``seed``, independent of device placement."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {type(seed).__name__} {seed!r}")
    if not _SEED_MIN <= seed <= _SEED_MAX:
        raise ValueError(f"seed must be in [{_SEED_MIN}, {_SEED_MAX}] (64-bit), got {seed}")
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    noise = torch.randn(tuple(shape), generator=gen, dtype=torch.float32, device="cpu")
    return noise.to(device=device, dtype=dtype)


def noise_latent(x0_norm: torch.Tensor, noise: torch.Tensor, sigma0: float) -> torch.Tensor:
    """Put a normalised clean latent at noise level σ0: x = (1 − σ0)·x0 + σ0·noise (img2img)."""
    if x0_norm.shape != noise.shape:
        raise ValueError(
            f"latent and noise shapes differ: {tuple(x0_norm.shape)} vs {tuple(noise.shape)}")
    sigma0 = float(sigma0)
    if not 0.0 <= sigma0 <= 1.0:
        raise ValueError(f"sigma0 must be in [0, 1], got {sigma0}")
    return (1.0 - sigma0) * x0_norm + sigma0 * noise.to(x0_norm.dtype)


def normalize_latent(raw: torch.Tensor) -> torch.Tensor:
    """Raw VAE latent (what ComfyUI's LATENT holds) → the DiT's latent space."""
    return (raw - LATENT_SHIFT) * LATENT_SCALE


def denormalize_latent(z: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`normalize_latent`: DiT latent → raw VAE latent for decoding."""
    return z / LATENT_SCALE + LATENT_SHIFT
