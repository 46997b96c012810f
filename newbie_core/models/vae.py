"""The FLUX VAE that NewBie decodes with (spec §4), as a thin wrapper over diffusers' AutoencoderKL.

The wrapper speaks RAW latents, the same ones ComfyUI's ``LATENT`` holds: ``encode`` returns the
posterior mode of the encoder, ``decode`` takes that space back to pixels. NewBie's normalisation
``(z - 0.1159) * 0.3611`` belongs to the sampler (going into the DiT and back out), not here, so
the same latent can be handed to ComfyUI's own VAE nodes.

Images are ``(B, 3, H, W)`` in [-1, 1] on the VAE side; :func:`to_image_01` and
:func:`from_image_01` convert to and from ComfyUI's ``IMAGE`` (``B, H, W, C`` float32 in [0, 1] on
the CPU).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .vae_loading import VaeCheckpoint

log = logging.getLogger(__name__)

DOWNSCALE = 8  # pixels per latent cell along each axis (3 downsamplers)


class FluxVAE(nn.Module):
    """Owns an AutoencoderKL; raw latents in, raw latents out, images in [-1, 1]."""

    def __init__(self, model: nn.Module, config: dict):
        super().__init__()
        self.model = model  # diffusers AutoencoderKL
        self.config = dict(config)

    @property
    def latent_channels(self) -> int:
        return int(self.config["latent_channels"])

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def decode(self, raw_latent: torch.Tensor) -> torch.Tensor:
        """(B, 16, h, w) raw latent -> (B, 3, 8h, 8w) float32 image, nominally in [-1, 1] (unclamped)."""
        if raw_latent.ndim != 4 or raw_latent.shape[1] != self.latent_channels:
            raise ValueError(f"decode expects a (B, {self.latent_channels}, h, w) latent, got "
                             f"{tuple(raw_latent.shape)}.")
        z = raw_latent.to(self.device, self.dtype)
        image = self.model.decode(z, return_dict=False)[0]  # (B, 3, 8h, 8w)
        return image.float()

    @torch.no_grad()
    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) image in [-1, 1] -> (B, 16, H/8, W/8) float32 raw latent (posterior mode)."""
        if image.ndim != 4 or image.shape[1] != 3:
            raise ValueError(f"encode expects a (B, 3, H, W) image, got {tuple(image.shape)}.")
        if image.shape[2] % DOWNSCALE or image.shape[3] % DOWNSCALE:
            raise ValueError(f"encode needs H and W divisible by {DOWNSCALE}, got {image.shape[2]}x"
                             f"{image.shape[3]}; crop or pad the image first.")
        x = image.to(self.device, self.dtype)
        posterior = self.model.encode(x, return_dict=False)[0]
        return posterior.mode().float()  # the mean: training used the mode, no sampling noise


def build_vae(ckpt: VaeCheckpoint, device: torch.device | str = "cpu",
              dtype: torch.dtype = torch.float32) -> FluxVAE:
    """Build the AutoencoderKL on meta and assign the checkpoint's tensors: one copy of the weights.

    fp16 is allowed but risky: the FLUX VAE's activations can overflow fp16 (its diffusers config
    says ``force_upcast``); bf16 or fp32 are the safe choices.
    """
    from diffusers import AutoencoderKL  # deferred: diffusers import is slow
    if dtype == torch.float16:
        log.warning("FLUX VAE in float16 may overflow to NaN/black images; prefer bfloat16 or float32.")
    with torch.device("meta"):
        model = AutoencoderKL(**ckpt.config)
    state = {k: ckpt.source.get(k).to(device=device, dtype=dtype) for k in ckpt.source.keys()}
    model.load_state_dict(state, strict=True, assign=True)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"VAE tensors left unloaded on the meta device: {left[:3]}")
    model.eval().requires_grad_(False)
    return FluxVAE(model, ckpt.config)


def to_image_01(image: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> ComfyUI IMAGE: (B, H, W, 3) float32 in [0, 1] on the CPU."""
    out = (image.detach().float().clamp(-1.0, 1.0) + 1.0) * 0.5
    return out.permute(0, 2, 3, 1).contiguous().cpu()


def from_image_01(image: torch.Tensor) -> torch.Tensor:
    """ComfyUI IMAGE (B, H, W, C>=3) in [0, 1] -> (B, 3, H, W) float32 in [-1, 1]; alpha is dropped."""
    if image.ndim != 4 or image.shape[-1] < 3:
        raise ValueError(f"expected an IMAGE of shape (B, H, W, 3), got {tuple(image.shape)}.")
    return image[..., :3].float().permute(0, 3, 1, 2).contiguous() * 2.0 - 1.0
