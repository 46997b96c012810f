"""NewBie DiT to MODEL: the pack's DiT as a standard ComfyUI MODEL for the core sampler nodes."""

from __future__ import annotations

from ..newbie_core.pipeline import DiTHandle, MemorySettings
from .settings_node import ATTENTION_CHOICES, FFN_CHOICES, FROM_SETTINGS, resolve_memory
from .types import CATEGORY, NEWBIE_DIT, NEWBIE_MEMORY


class NewBieDiTToModel:
    TITLE = "NewBie DiT to MODEL"
    DESCRIPTION = ("Wraps the NewBie DiT as a standard MODEL for core KSampler, KSamplerAdvanced, "
                   "SamplerCustomAdvanced, schedulers and ModelSamplingAuraFlow (shift). The weights stay the "
                   "pack's: each sampling run places them within the VRAM budget (resident or streamed) and "
                   "frees them when it ends. Use NewBie Text Encode for the conditioning.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("A MODEL for the core sampler nodes (flow model, shift 6 by default; FLUX-VAE latents).",)
    FUNCTION = "convert"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {"dit": (NEWBIE_DIT, {"tooltip": "From NewBie DiT Loader."})},
            "optional": {
                "memory": (NEWBIE_MEMORY, {"tooltip": "From NewBie Memory Settings (optional): its VRAM budget "
                                                      "governs every sampling run on this MODEL."}),
                "vram_budget_gb": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 256.0, "step": 0.25, "tooltip":
                                             "Overrides the memory settings' VRAM budget. 0 = use the settings "
                                             "(or auto)."}),
                "attention_slicing": ([FROM_SETTINGS] + ATTENTION_CHOICES, {"default": FROM_SETTINGS, "tooltip":
                                      "Overrides the settings' attention slicing: auto, off, or query rows per chunk."}),
                "ffn_chunking": ([FROM_SETTINGS] + FFN_CHOICES, {"default": FROM_SETTINGS, "tooltip":
                                 "Overrides the settings' feed-forward chunking: auto, off, or tokens per chunk."}),
            },
        }

    def convert(self, dit: DiTHandle, memory: MemorySettings | None = None, vram_budget_gb: float = 0.0,
                attention_slicing: str = FROM_SETTINGS, ffn_chunking: str = FROM_SETTINGS) -> tuple:
        if not isinstance(dit, DiTHandle):
            raise ValueError("dit must come from NewBie DiT Loader.")
        from .comfy_model import make_model
        settings = resolve_memory(memory, vram_budget_gb, attention_slicing, ffn_chunking)
        return (make_model(dit, settings),)
