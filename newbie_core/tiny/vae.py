"""A tiny FLUX-layout VAE, written in both real layouts, for CPU tests.

Same key LAYOUT as the real FLUX VAE (4 down/up blocks, 2 resnets per encoder block, 3 per
decoder block, mid-block attention, 16 latent channels, no quant convs) with narrow channels, so
every loader path runs on it in milliseconds. The BFL file is enumerated from the BFL structure
itself (not by renaming a diffusers model), so a wrong renaming rule in the loader shows up as a
missing or misshaped tensor rather than cancelling out.

Files (relative to `root`):
  vae/ae.safetensors                                        BFL / ComfyUI layout, float32
  hf/NewBie-image-Exp0.1/vae/config.json                    diffusers config
  hf/NewBie-image-Exp0.1/vae/diffusion_pytorch_model.safetensors  diffusers layout, same weights
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..models.vae_loading import FLUX_VAE_CONFIG, bfl_to_diffusers_key

TINY_VAE_CHANNELS = (32, 32, 32, 32)  # GroupNorm needs multiples of 32 groups
LATENT_CHANNELS = 16


def _resnet(prefix: str, c_in: int, c_out: int) -> dict[str, tuple[int, ...]]:
    shapes = {f"{prefix}.norm1.weight": (c_in,), f"{prefix}.norm1.bias": (c_in,),
              f"{prefix}.conv1.weight": (c_out, c_in, 3, 3), f"{prefix}.conv1.bias": (c_out,),
              f"{prefix}.norm2.weight": (c_out,), f"{prefix}.norm2.bias": (c_out,),
              f"{prefix}.conv2.weight": (c_out, c_out, 3, 3), f"{prefix}.conv2.bias": (c_out,)}
    if c_in != c_out:
        shapes |= {f"{prefix}.nin_shortcut.weight": (c_out, c_in, 1, 1), f"{prefix}.nin_shortcut.bias": (c_out,)}
    return shapes


def _mid(prefix: str, c: int) -> dict[str, tuple[int, ...]]:
    shapes = _resnet(f"{prefix}.block_1", c, c) | _resnet(f"{prefix}.block_2", c, c)
    shapes |= {f"{prefix}.attn_1.norm.weight": (c,), f"{prefix}.attn_1.norm.bias": (c,)}
    for part in ("q", "k", "v", "proj_out"):  # 1x1 convs in the BFL layout
        shapes |= {f"{prefix}.attn_1.{part}.weight": (c, c, 1, 1), f"{prefix}.attn_1.{part}.bias": (c,)}
    return shapes


def bfl_vae_shapes(channels: Sequence[int] = TINY_VAE_CHANNELS, layers: int = 2,
                   latent: int = LATENT_CHANNELS) -> dict[str, tuple[int, ...]]:
    """Every key and shape of a BFL-layout (LDM) VAE; channels=(128,256,512,512) gives the real one."""
    n = len(channels)
    s: dict[str, tuple[int, ...]] = {"encoder.conv_in.weight": (channels[0], 3, 3, 3),
                                     "encoder.conv_in.bias": (channels[0],)}
    c_in = channels[0]
    for i, c in enumerate(channels):  # encoder: down.0 is the full resolution
        for j in range(layers):
            s |= _resnet(f"encoder.down.{i}.block.{j}", c_in if j == 0 else c, c)
        c_in = c
        if i < n - 1:
            s |= {f"encoder.down.{i}.downsample.conv.weight": (c, c, 3, 3),
                  f"encoder.down.{i}.downsample.conv.bias": (c,)}
    s |= _mid("encoder.mid", channels[-1])
    s |= {"encoder.norm_out.weight": (channels[-1],), "encoder.norm_out.bias": (channels[-1],),
          "encoder.conv_out.weight": (2 * latent, channels[-1], 3, 3), "encoder.conv_out.bias": (2 * latent,)}
    s |= {"decoder.conv_in.weight": (channels[-1], latent, 3, 3), "decoder.conv_in.bias": (channels[-1],)}
    s |= _mid("decoder.mid", channels[-1])
    c_in = channels[-1]
    for i in reversed(range(n)):  # decoder: up.{n-1} runs first, at the lowest resolution
        c = channels[i]
        for j in range(layers + 1):
            s |= _resnet(f"decoder.up.{i}.block.{j}", c_in if j == 0 else c, c)
        c_in = c
        if i > 0:
            s |= {f"decoder.up.{i}.upsample.conv.weight": (c, c, 3, 3), f"decoder.up.{i}.upsample.conv.bias": (c,)}
    s |= {"decoder.norm_out.weight": (channels[0],), "decoder.norm_out.bias": (channels[0],),
          "decoder.conv_out.weight": (3, channels[0], 3, 3), "decoder.conv_out.bias": (3,)}
    return s


def _init(key: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Small, varied values: finite, non-constant decodes, and no two tensors alike (swaps show)."""
    if len(shape) == 1:
        is_norm_scale = ("norm" in key) and key.endswith("weight")
        return (1.0 if is_norm_scale else 0.0) + 0.1 * torch.randn(shape, generator=gen)
    fan_in = shape[1] * (shape[2] * shape[3] if len(shape) == 4 else 1)
    # Residual branches start small, as in a trained net that refines an identity path: decodes
    # stay bounded and tile-edge effects stay local, as they are in the real VAE.
    gain = 0.2 if (".conv2." in key or "proj_out" in key) else 1.0
    return torch.randn(shape, generator=gen) * (gain / fan_in ** 0.5)


def tiny_vae_tensors(seed: int = 0, channels: Sequence[int] = TINY_VAE_CHANNELS) -> dict[str, torch.Tensor]:
    """BFL-named float32 tensors of a tiny FLUX-layout VAE, deterministic in `seed`."""
    gen = torch.Generator().manual_seed(seed)
    return {k: _init(k, shape, gen) for k, shape in sorted(bfl_vae_shapes(channels).items())}


def write_tiny_vae(root: str | Path, seed: int = 0,
                   channels: Sequence[int] = TINY_VAE_CHANNELS) -> dict[str, Path]:
    """Write the tiny VAE in the BFL and diffusers layouts under `root`; returns their paths."""
    root = Path(root)
    bfl = tiny_vae_tensors(seed, channels)
    ae = root / "vae" / "ae.safetensors"
    ae.parent.mkdir(parents=True, exist_ok=True)
    save_file(bfl, str(ae), metadata={"format": "pt"})

    folder = root / "hf" / "NewBie-image-Exp0.1" / "vae"
    folder.mkdir(parents=True, exist_ok=True)
    diffusers: dict[str, torch.Tensor] = {}
    for key, tensor in bfl.items():
        name = bfl_to_diffusers_key(key, n_up=len(channels))
        if ".attentions.0.to_" in name and tensor.ndim == 4:
            tensor = tensor[:, :, 0, 0]  # 1x1 conv -> Linear
        diffusers[name] = tensor.contiguous()
    save_file(diffusers, str(folder / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    config = dict(FLUX_VAE_CONFIG, block_out_channels=list(channels),
                  down_block_types=["DownEncoderBlock2D"] * len(channels),
                  up_block_types=["UpDecoderBlock2D"] * len(channels))
    config = {"_class_name": "AutoencoderKL", **config}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return {"vae": ae, "vae_diffusers": folder}
