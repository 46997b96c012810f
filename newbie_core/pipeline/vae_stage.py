"""The VAE stages: decode a raw latent to an image, encode an image for img2img.

The FLUX VAE is small (84 M params) and stays resident for its stage; what needs planning is its
activations (a 1024² decode peaks about 2.5 GB above the weights), so the tile size comes from the
budget: untiled when it fits, else the largest tile that does. Tiles overlap and are blended.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..models.vae import FluxVAE, build_vae, from_image_01, to_image_01
from ..models.vae_memory import DEFAULT_OVERLAP_LATENT, choose_tile, estimate_decode_bytes, estimate_encode_bytes
from ..models.vae_tiling import decode_tiled, encode_tiled
from ..placement import HOST_CACHE, Report, fmt_bytes, measure_stage, run_with_oom_retry, stage_guard
from ..placement.host_budget import HostModel
from ..placement.budget import MiB, segment_bytes
from .handles import VaeHandle
from .host_ram import check_stage, copy_key
from .settings import MemorySettings

log = logging.getLogger(__name__)

VAE_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# The estimate counts allocated bytes (it matched peak allocated within 2% on an H200); the
# caching allocator reserved up to 1.84x that for whole decodes at 512²-1024² (conv
# activations of many sizes fragment its segments). Reserved is what the budget limits.
VAE_RESERVED_FACTOR = 1.9


@dataclass(frozen=True)
class VaePlan:
    stage: str
    tile_latent: int | None       # None = untiled
    overlap_latent: int
    weight_bytes: int
    predicted_peak: int

    def render(self) -> str:
        tiles = "untiled" if self.tile_latent is None else f"{self.tile_latent * 8} px tiles, {self.overlap_latent * 8} px overlap"
        return (f"stage           {self.stage}\npredicted peak  {fmt_bytes(self.predicted_peak)}\n"
                f"weights         {fmt_bytes(self.weight_bytes)} (resident)\ntiling          {tiles}")


def vae_dtype(handle: VaeHandle, device: torch.device) -> torch.dtype:
    """The handle's dtype on a GPU; fp32 on the CPU, where bf16 convolutions are many times slower."""
    return VAE_DTYPES[handle.dtype] if device.type == "cuda" else torch.float32


def _weight_bytes(handle: VaeHandle, dtype: torch.dtype) -> int:
    """Reserved bytes of the weights, loaded one after another: tensors up to 1 MiB share 2 MiB
    segments, those below 10 MiB share 20 MiB segments, larger ones get their own."""
    sizes = [int(torch.Size(handle.ckpt.source.shape(k)).numel()) * dtype.itemsize for k in handle.ckpt.source.keys()]
    rounded = [-(-n // 512) * 512 for n in sizes]
    small = sum(n for n in rounded if n <= MiB)
    medium = sum(n for n in rounded if MiB < n < 10 * MiB)
    return (-(-small // (2 * MiB)) * 2 * MiB + -(-medium // (20 * MiB)) * 20 * MiB
            + sum(segment_bytes(n) for n in rounded if n >= 10 * MiB))


def plan_vae(handle: VaeHandle, memory: MemorySettings, batch: int, latent_h: int, latent_w: int,
             budget: int | None, device: torch.device, encode: bool = False) -> VaePlan:
    """Tile size from the budget (or the user's fixed tile), and the predicted peak."""
    dtype = vae_dtype(handle, device)
    config = handle.ckpt.config
    weights = _weight_bytes(handle, dtype)
    overlap = max(1, memory.vae_overlap_px // 8) if memory.vae_overlap_px else DEFAULT_OVERLAP_LATENT
    if memory.vae_tile_px > 0:
        tile = memory.vae_tile_px // 8
    elif memory.vae_tile_px < 0 or budget is None:
        tile = None
    else:
        tile = choose_tile(int((budget - weights) / VAE_RESERVED_FACTOR), latent_h, latent_w, dtype, config, batch=batch, encode=encode)
    if tile is not None and tile >= max(latent_h, latent_w):
        tile = None
    estimate = estimate_encode_bytes if encode else estimate_decode_bytes
    act = estimate(config, batch, latent_h, latent_w, dtype, tile)
    return VaePlan("encode:vae" if encode else "decode", tile, overlap, weights, weights + int(VAE_RESERVED_FACTOR * act))


def decode_latent(handle: VaeHandle, raw_latent: torch.Tensor, memory: MemorySettings, device: torch.device,
                  report: Report, budget: int | None) -> torch.Tensor:
    """Raw latent (B, 16, h, w) -> IMAGE (B, 8h, 8w, 3) float32 in [0, 1] on the CPU.
    A CUDA OOM retries once at half the budget (smaller tiles), as the other stages do."""
    b, _, h, w = raw_latent.shape
    return _vae_stage("decode", handle, memory, device, report, budget, b, h, w,
                      lambda vae, plan: _decode_on_device(vae, raw_latent, plan))


def _vae_stage(stage: str, handle: VaeHandle, memory: MemorySettings, device: torch.device, report: Report,
               budget: int | None, batch: int, latent_h: int, latent_w: int,
               work: Callable[[FluxVAE, VaePlan], torch.Tensor]) -> torch.Tensor:
    """One VAE stage (decode, or encode:vae for img2img) under its plan, resident VAE, with the
    half-budget OOM retry every stage has; ``work`` does the tiles."""
    _vae_host_room(handle, memory, device)

    def attempt(budget_now: int | None) -> torch.Tensor:
        plan = plan_vae(handle, memory, batch, latent_h, latent_w, budget_now, device, encode=stage == "encode:vae")
        log.info("VAE %s plan:\n%s", stage, plan.render())
        with stage_guard(stage, device) as guard, measure_stage(report, stage, device, plan.predicted_peak):
            vae = guard.hold(_resident_vae(handle, device))
            with torch.inference_mode():
                out = work(vae, plan)
            del vae
        return out

    return run_with_oom_retry(attempt, budget, stage=stage, device=device, advice=VAE_ADVICE)


def _decode_on_device(vae: FluxVAE, raw_latent: torch.Tensor, plan: VaePlan) -> torch.Tensor:
    latent = raw_latent.to(device=vae.device, dtype=vae.dtype)
    if plan.tile_latent is None:
        image = vae.decode(latent)
    else:
        image = decode_tiled(vae, latent, plan.tile_latent, plan.overlap_latent)
    return to_image_01(image)


def encode_image(handle: VaeHandle, image01: torch.Tensor, memory: MemorySettings, device: torch.device,
                 report: Report, budget: int | None) -> torch.Tensor:
    """IMAGE (B, H, W, 3) in [0, 1] -> raw latent (B, 16, H/8, W/8) float32 on the CPU (posterior mode).
    A CUDA OOM retries once at half the budget (smaller tiles)."""
    b, height, width, _ = image01.shape
    if height % 16 or width % 16:
        raise ValueError(f"the init image is {width}x{height}; NewBie needs sides that are multiples of 16 px. "
                         f"Resize or crop it (e.g. to {width // 16 * 16}x{height // 16 * 16}).")
    return _vae_stage("encode:vae", handle, memory, device, report, budget, b, height // 8, width // 8,
                      lambda vae, plan: _encode_on_device(vae, image01, plan))


def _encode_on_device(vae: FluxVAE, image01: torch.Tensor, plan: VaePlan) -> torch.Tensor:
    pixels = from_image_01(image01).to(device=vae.device, dtype=vae.dtype)
    if plan.tile_latent is None:
        latent = vae.encode(pixels)
    else:
        latent = encode_tiled(vae, pixels, plan.tile_latent * 8, plan.overlap_latent * 8)
    return latent.float().cpu()


# The VAE has no streaming or fp8 to fall back on; its memory is the tile's activations.
VAE_ADVICE = ("Something outside this stage probably holds VRAM (another program, other models). Try: a smaller "
              "VAE tile (--vae-tile or the settings node's vae_tile, e.g. 512), a lower resolution, or closing "
              "other GPU programs.")


def _resident_vae(handle: VaeHandle, device: torch.device) -> FluxVAE:
    return build_vae(handle.ckpt, device, vae_dtype(handle, device))


def vae_host_model(handle: VaeHandle, device: torch.device) -> HostModel:
    """The VAE in the host plan: no host copy of its own, but its weights pass through host RAM
    (the file's mapped pages, or all of them on the CPU) beside whatever the cache holds."""
    dtype = vae_dtype(handle, device)
    src = handle.ckpt.source
    weights = sum(int(torch.Size(src.shape(k)).numel()) * dtype.itemsize for k in src.keys())
    return HostModel("decode:vae", 0, 0, 0, extra_bytes=weights, key=copy_key(handle.ckpt.source.files))


def _vae_host_room(handle: VaeHandle, memory: MemorySettings, device: torch.device) -> None:
    """Refuse a RAM budget the VAE cannot fit, and evict older host copies to make its room."""
    HOST_CACHE.make_room(check_stage(vae_host_model(handle, device), memory, device))
