"""Offloaded VAE Decode / Encode: the FLUX VAE for one stage, tiled when the budget says so.

LATENT is raw (no NewBie normalisation), IMAGE is (B, H, W, 3) float in [0, 1] on the CPU, so
these interoperate with core VAEDecode/VAEEncode on the same FLUX VAE.
"""

from __future__ import annotations

import torch

from ..newbie_core.pipeline import MemorySettings, VaeHandle, decode_latent, encode_image
from ..newbie_core.pipeline.vae_stage import plan_vae
from ..newbie_core.placement import Report
from . import comfy_adapter as adapter
from .sampler_node import raw_samples
from .settings_node import budget_note, resolve_memory, vram_for_stage
from .types import CATEGORY, NEWBIE_MEMORY, NEWBIE_REPORT, NEWBIE_VAE, StageReport

_MEMORY_INPUTS = {
    "memory": (NEWBIE_MEMORY, {"tooltip": "From NewBie Memory Settings (optional)."}),
    "vram_budget_gb": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 256.0, "step": 0.25, "tooltip":
                       "Overrides the memory settings' VRAM budget for this node. 0 = use the settings (or auto)."}),
}


def _check_vae(vae) -> None:
    if not isinstance(vae, VaeHandle):
        raise ValueError("vae must come from NewBie VAE Loader.")


class NewBieVAEDecode:
    TITLE = "NewBie Offloaded VAE Decode"
    DESCRIPTION = ("Decodes a latent with the FLUX VAE, which is on the GPU only for this node. Untiled when the "
                   "budget allows, else in overlapping tiles sized to fit.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE", NEWBIE_REPORT)
    RETURN_NAMES = ("image", "report")
    OUTPUT_TOOLTIPS = ("Decoded images (B, H, W, 3), values in [0, 1].", "Plan and measured peak of the decode.")
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "vae": (NEWBIE_VAE, {"tooltip": "From NewBie VAE Loader."}),
                "latent": ("LATENT", {"tooltip": "Raw latent from the NewBie sampler (or any FLUX-VAE latent)."}),
                "tile_size": ("INT", {"default": 0, "min": 0, "max": 4096, "step": 64, "tooltip":
                              "Tile size in pixels. 0 = from the memory settings (auto: untiled if it fits)."}),
                "overlap": ("INT", {"default": 64, "min": 0, "max": 512, "step": 8, "tooltip":
                            "Tile overlap in pixels (blended). 0 = from the memory settings."}),
            },
            "optional": dict(_MEMORY_INPUTS),
        }

    def decode(self, vae: VaeHandle, latent: dict, tile_size: int, overlap: int,
               memory: MemorySettings | None = None, vram_budget_gb: float = 0.0) -> tuple[torch.Tensor, StageReport]:
        _check_vae(vae)
        if tile_size % 8 or overlap % 8:
            raise ValueError(f"tile_size and overlap must be multiples of 8 px, got {tile_size} and {overlap}.")
        settings = resolve_memory(memory, vram_budget_gb, vae_tile=tile_size, vae_overlap=overlap)
        raw = raw_samples(latent, for_sampling=False)
        b, _, h, w = raw.shape
        device = adapter.compute_device()

        def plan(budget):
            return plan_vae(vae, settings, b, h, w, budget, device)

        report = Report()
        with vram_for_stage("NewBie VAE", device, settings, lambda: plan(None).predicted_peak,
                            lambda budget: plan(budget).weight_bytes) as budget:
            image = decode_latent(vae, raw, settings, device, report, budget)
        note = budget_note("decode", device, budget)
        return (image.to(adapter.intermediate_device()),
                StageReport.from_run("decode", plan(budget).render(), report, note))


class NewBieVAEEncode:
    TITLE = "NewBie Offloaded VAE Encode"
    DESCRIPTION = ("Encodes images to a raw latent with the FLUX VAE (for img2img: feed the sampler and set "
                   "denoise below 1). Sides must be multiples of 16 px.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("Raw latent (B, 16, H/8, W/8) for the NewBie sampler.",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "vae": (NEWBIE_VAE, {"tooltip": "From NewBie VAE Loader."}),
                "image": ("IMAGE", {"tooltip": "Images to encode (e.g. from Load Image); sides multiples of 16 px."}),
            },
            "optional": dict(_MEMORY_INPUTS),
        }

    def encode(self, vae: VaeHandle, image: torch.Tensor, memory: MemorySettings | None = None,
               vram_budget_gb: float = 0.0) -> tuple[dict]:
        _check_vae(vae)
        if image.ndim != 4 or image.shape[-1] < 3:
            raise ValueError(f"image must be an IMAGE (B, H, W, 3), got shape {tuple(image.shape)}.")
        pixels = image[..., :3].float().cpu()
        settings = resolve_memory(memory, vram_budget_gb)
        b, height, width, _ = pixels.shape
        device = adapter.compute_device()

        def plan(budget):
            return plan_vae(vae, settings, b, height // 8, width // 8, budget, device, encode=True)

        with vram_for_stage("NewBie VAE", device, settings, lambda: plan(None).predicted_peak,
                            lambda budget: plan(budget).weight_bytes) as budget:
            raw = encode_image(vae, pixels, settings, device, Report(), budget)
        return ({"samples": raw.to(adapter.intermediate_device())},)
