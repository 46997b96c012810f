"""Empty Latent at NewBie's training resolutions, in core EmptySD3LatentImage's convention.

Zeros (B, 16, H/8, W/8): the sampler replaces them with noise at denoise 1, and core
EmptySD3LatentImage latents are interchangeable with these.
"""

from __future__ import annotations

import torch

from ..newbie_core.sampling import parse_size, preset_names, validate_size
from ..newbie_core.validate import check_size
from . import comfy_adapter as adapter
from .types import CATEGORY
from .validation import queue_check

CUSTOM = "custom (width x height below)"


class NewBieEmptyLatent:
    TITLE = "NewBie Empty Latent (resolution buckets)"
    DESCRIPTION = ("An empty latent at one of NewBie's 51 training resolutions (or a custom size, multiples of 16). "
                   "Same format as core EmptySD3LatentImage.")
    CATEGORY = f"{CATEGORY}/latent"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("Zeros (B, 16, H/8, W/8) for the NewBie sampler.",)
    FUNCTION = "generate"

    @classmethod
    def INPUT_TYPES(cls):
        presets = preset_names()
        return {"required": {
            "resolution": (presets + [CUSTOM], {"default": presets[0], "tooltip":
                           "Training resolution bucket (width x height). Pick the custom entry to use width/height."}),
            "width": ("INT", {"default": 1024, "min": 16, "max": 8192, "step": 16, "tooltip":
                      "Width in px, used only with the custom resolution. Multiple of 16."}),
            "height": ("INT", {"default": 1024, "min": 16, "max": 8192, "step": 16, "tooltip":
                       "Height in px, used only with the custom resolution. Multiple of 16."}),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 64, "tooltip": "Images per run."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, resolution=None, width=None, height=None, batch_size=None):
        custom = resolution == CUSTOM and width is not None and height is not None
        return queue_check(cls, {"width": width, "height": height, "batch_size": batch_size},
                           *([lambda: check_size(width, height)] if custom else []))

    def generate(self, resolution: str, width: int, height: int, batch_size: int) -> tuple[dict]:
        w, h = (width, height) if resolution == CUSTOM else parse_size(resolution)
        w, h = validate_size(w, h)
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
        samples = torch.zeros(batch_size, 16, h // 8, w // 8, device=adapter.intermediate_device())
        return ({"samples": samples},)
