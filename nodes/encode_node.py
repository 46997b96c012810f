"""Text Encode then Unload: Gemma 3 + Jina CLIP v2 under a placement plan, then both leave the GPU.

Outputs are standard CONDITIONING laid out as ComfyUI's native NewBie support does
(comfy/text_encoders/newbie.py + model_base's ``pooled_output``/``attention_mask`` keys):
``[[cap_feats (1, L, C_cap), {"pooled_output": (1, C_pool), "attention_mask": (1, L)}]]`` on the
CPU. An unchanged prompt is answered from newbie_core's conditioning cache without running the
encoders, also when ComfyUI's own output cache was dropped.
"""

from __future__ import annotations

import logging

import torch

from ..newbie_core.pipeline import (CONDITIONING_CACHE, Conditioning, MemorySettings, TextEncoderHandle,
                                    encode_texts)
from ..newbie_core.pipeline.encode import conditioning_keys, plan_gemma, plan_jina
from ..newbie_core.placement import Report
from ..newbie_core.prompt import AUTO_SYSTEM_PROMPT, EncoderTexts, PromptWeights, WeightingMode, prepare_weighted_texts
from . import comfy_adapter as adapter
from .settings_node import resolve_memory, plan_weight_bytes, vram_for_stage
from ..newbie_core.validate import check_budget, check_prompt
from .types import CATEGORY, NEWBIE_MEMORY, NEWBIE_TEXT_ENCODERS
from .validation import queue_check

log = logging.getLogger(__name__)


def to_comfy_conditioning(cond: Conditioning, device: torch.device | None = None) -> list:
    """Conditioning -> ComfyUI CONDITIONING (one entry, batch 1, all tokens valid)."""
    device = device or torch.device("cpu")
    feats = cond.cap_feats.to(device).unsqueeze(0)                              # (1, L, C_cap)
    mask = torch.ones(1, feats.shape[1], dtype=torch.long, device=device)       # (1, L)
    pooled = cond.pooled.to(device).reshape(1, -1)                               # (1, C_pool)
    return [[feats, {"pooled_output": pooled, "attention_mask": mask}]]


def from_comfy_conditioning(conditioning, which: str, cap_dim: int | None = None,
                            pooled_dim: int | None = None) -> Conditioning:
    """ComfyUI CONDITIONING -> Conditioning (features trimmed by the mask, pooled as (C,)).

    Accepts ours and ComfyUI's native NewBie encode; anything else gets an error that says what
    is missing. Only the first entry is used (combined/area conditioning is not supported).
    """
    if not isinstance(conditioning, (list, tuple)) or not conditioning:
        raise ValueError(f"{which}: empty CONDITIONING; connect a NewBie Text Encode output.")
    if len(conditioning) > 1:
        log.warning("%s: %d conditioning entries; NewBie uses only the first", which, len(conditioning))
    feats, extra = conditioning[0][0], conditioning[0][1]
    if feats.ndim == 3:
        if feats.shape[0] != 1:
            raise ValueError(f"{which}: conditioning batch of {feats.shape[0]}; NewBie expects one prompt per input.")
        feats = feats[0]                                                         # (L, C_cap)
    pooled = extra.get("pooled_output")
    if pooled is None:
        raise ValueError(f"{which}: the conditioning has no 'pooled_output' (the Jina CLIP v2 vector NewBie needs). "
                         "Encode the prompt with NewBie Text Encode (or ComfyUI's NewBie CLIP), not another model's.")
    mask = extra.get("attention_mask")
    if mask is not None:
        mask = mask.reshape(-1).bool()
        if mask.numel() != feats.shape[0]:
            raise ValueError(f"{which}: attention_mask has {mask.numel()} entries for {feats.shape[0]} tokens.")
        feats = feats[mask]
    pooled = pooled.reshape(-1)                                                  # (C_pool,)
    if cap_dim is not None and feats.shape[-1] != cap_dim:
        raise ValueError(f"{which}: caption features are {feats.shape[-1]} wide but this DiT expects {cap_dim} "
                         "(Gemma 3 hidden size). Was the prompt encoded by another model's text encoder?")
    if pooled_dim is not None and pooled.shape[0] != pooled_dim:
        raise ValueError(f"{which}: pooled vector has {pooled.shape[0]} values but this DiT expects {pooled_dim} "
                         "(Jina CLIP v2).")
    return Conditioning(feats.float(), pooled.float())


def _cached(handle: TextEncoderHandle, texts: EncoderTexts, weights: PromptWeights | None = None) -> bool:
    """True when both prompts are in the conditioning cache (then no GPU work happens)."""
    return all(CONDITIONING_CACHE.get(key) is not None for key in conditioning_keys(handle, texts, weights))


class NewBieTextEncode:
    TITLE = "NewBie Text Encode then Unload"
    DESCRIPTION = ("Encodes the positive and negative prompts with Gemma 3 4B and Jina CLIP v2, streaming their "
                   "layers within the VRAM budget, then frees the GPU. XML prompts are validated (errors give "
                   "line and column); the system prefix is added here. Unchanged prompts come from a cache.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("positive", "negative")
    OUTPUT_TOOLTIPS = ("Positive conditioning (Gemma features, mask, Jina pooled), on the CPU.",
                       "Negative conditioning, same layout.")
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "text_encoders": (NEWBIE_TEXT_ENCODERS, {"tooltip": "From NewBie Text Encoder Loader."}),
                "positive": ("STRING", {"multiline": True, "default": "", "tooltip":
                             "XML prompt (from NewBie XML Prompt Builder or typed) or plain tags/text. Do not add "
                             "a system prompt: the node adds the official one."}),
                "negative": ("STRING", {"multiline": True, "default": "", "tooltip":
                             "Negative prompt (plain text). Empty is fine."}),
                "compat": ("BOOLEAN", {"default": False, "tooltip":
                           "Off: official recipe (Jina reads the prompt without the system prefix). On: as "
                           "ComfyUI's native NewBie support does (Jina reads Gemma's full text)."}),
            },
            "optional": {
                "memory": (NEWBIE_MEMORY, {"tooltip": "From NewBie Memory Settings (optional)."}),
                "vram_budget_gb": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 256.0, "step": 0.25, "tooltip":
                                   "Overrides the memory settings' VRAM budget for this node. 0 = use the settings "
                                   "(or auto)."}),
                "weighting": ([m.value for m in WeightingMode], {"default": WeightingMode.OFFICIAL.value, "tooltip":
                              "official: (text:1.2), (text) = x1.1, [text] = x0.9, {text} = x1.2, \\( \\) for "
                              "literal parentheses, as the official NewBie nodes read them (weights act on the "
                              "Gemma features). off: the text goes to the encoders verbatim."}),
                "system_prompt": ("STRING", {"multiline": True, "default": AUTO_SYSTEM_PROMPT, "tooltip":
                                  "auto: the training prefix (XML or text, by the prompt). Empty: no system prompt, "
                                  "as the official node's default. Other text: put in front of both prompts."}),
            },
        }


    @classmethod
    def VALIDATE_INPUTS(cls, positive=None, negative=None, vram_budget_gb=None):
        checks = [lambda: check_budget(vram_budget_gb, "vram_budget_gb", zero_is_auto=True)]
        if positive is not None:
            checks.append(lambda: check_prompt(positive, "positive"))
        if negative is not None:
            checks.append(lambda: check_prompt(negative, "negative", allow_empty=True))
        return queue_check(cls, {"vram_budget_gb": vram_budget_gb}, *checks)

    def encode(self, text_encoders: TextEncoderHandle, positive: str, negative: str, compat: bool = False,
               memory: MemorySettings | None = None, vram_budget_gb: float = 0.0,
               weighting: str = WeightingMode.OFFICIAL.value,
               system_prompt: str = AUTO_SYSTEM_PROMPT) -> tuple[list, list]:
        if not isinstance(text_encoders, TextEncoderHandle):
            raise ValueError("text_encoders must come from NewBie Text Encoder Loader.")
        settings = resolve_memory(memory, vram_budget_gb)
        # PromptSyntaxError names line and column
        texts, weights = prepare_weighted_texts(positive, negative, compat=compat, weighting=weighting,
                                                system_prompt=system_prompt)
        device = adapter.compute_device()
        report = Report()
        if _cached(text_encoders, texts, weights):
            pos, neg = encode_texts(text_encoders, texts, settings, device, report, None, weights=weights)
        else:
            def plans(budget):
                gemma = plan_gemma(text_encoders, [texts.gemma_pos, texts.gemma_neg], settings, budget)[2]
                jina = plan_jina(text_encoders, [texts.jina_pos, texts.jina_neg], settings, budget)[2]
                return gemma, jina

            with vram_for_stage("NewBie text encoders", device, settings,
                                lambda: max(p.predicted_peak for p in plans(None)),
                                lambda budget: max(plan_weight_bytes(p) for p in plans(budget)),
                                host_files=text_encoders.files) as budget:
                pos, neg = encode_texts(text_encoders, texts, settings, device, report, budget, weights=weights,
                                        interrupt_check=adapter.check_interrupted)   # Cancel within one block
        out = adapter.intermediate_device()
        return to_comfy_conditioning(pos, out), to_comfy_conditioning(neg, out)
