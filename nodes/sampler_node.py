"""Next-DiT Sampler: the DiT under a placement plan, driven by a flow sampler with CFG.

LATENT in and out is raw (ComfyUI convention, same as core EmptySD3LatentImage and VAEEncode);
NewBie's normalisation happens inside newbie_core. Each step reports progress (with a latent
preview when ComfyUI has previews on) and checks ComfyUI's Cancel flag, so a cancel stops within
one step and the stage guard gives the VRAM back.
"""

from __future__ import annotations

import torch

from ..newbie_core.pipeline import DiTHandle, MemorySettings, SamplingSettings, run_sampling
from ..newbie_core.pipeline.sample import plan_sampling
from ..newbie_core.placement import Report
from ..newbie_core.sampling import flow_sigmas, sampler_names, validate_size
from ..newbie_core.validate import check_budget, check_sampling
from . import comfy_adapter as adapter
from .encode_node import from_comfy_conditioning
from .settings_node import (ATTENTION_CHOICES, FFN_CHOICES, FROM_SETTINGS, budget_note, plan_weight_bytes,
                            resolve_memory, vram_for_stage)
from .validation import queue_check
from .types import CATEGORY, NEWBIE_DIT, NEWBIE_MEMORY, NEWBIE_REPORT, StageReport

MAX_SEED = 0xFFFFFFFFFFFFFFFF


def raw_samples(latent, what: str = "latent", for_sampling: bool = True) -> torch.Tensor:
    """The (B, 16, h, w) tensor of a LATENT dict, checked. For sampling, sides must be multiples
    of 16 px (2x2 DiT patches) and inpainting masks are refused; decoding needs neither."""
    if not isinstance(latent, dict) or "samples" not in latent:
        raise ValueError(f"{what} must be a LATENT (a dict with 'samples').")
    samples = latent["samples"]
    if samples.ndim != 4 or samples.shape[1] != 16:
        raise ValueError(f"{what} has shape {tuple(samples.shape)}; NewBie needs (B, 16, H/8, W/8) FLUX-VAE latents. "
                         "Use NewBie Empty Latent or EmptySD3LatentImage (16 channels), not Empty Latent Image (4).")
    if not for_sampling:
        return samples.float().cpu()
    validate_size(int(samples.shape[3]) * 8, int(samples.shape[2]) * 8)
    if latent.get("noise_mask") is not None:
        raise ValueError(f"{what} carries a noise_mask (inpainting), which the NewBie sampler does not support.")
    return samples.float().cpu()


class NewBieSampler:
    TITLE = "NewBie Next-DiT Sampler"
    DESCRIPTION = ("Samples NewBie's Next-DiT with classifier-free guidance. Its blocks stay resident or stream "
                   "through a small GPU ring, as the VRAM budget allows. Text-to-image from an empty latent, "
                   "img2img from a VAE-encoded image with denoise < 1.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LATENT", NEWBIE_REPORT)
    RETURN_NAMES = ("latent", "report")
    OUTPUT_TOOLTIPS = ("The sampled raw latent (decode with NewBie Offloaded VAE Decode, or core VAE Decode with "
                       "the FLUX VAE).", "Plan and measured peaks, for NewBie Memory Report.")
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "dit": (NEWBIE_DIT, {"tooltip": "From NewBie DiT Loader."}),
                "positive": ("CONDITIONING", {"tooltip": "From NewBie Text Encode (positive)."}),
                "negative": ("CONDITIONING", {"tooltip": "From NewBie Text Encode (negative)."}),
                "latent": ("LATENT", {"tooltip": "Start latent: NewBie Empty Latent / EmptySD3LatentImage for "
                                                 "text-to-image, NewBie VAE Encode for img2img. Sets size and batch."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": MAX_SEED, "control_after_generate": True, "tooltip":
                                 "Noise seed (the noise is drawn on the CPU, so it does not depend on the GPU)."}),
                "steps": ("INT", {"default": 28, "min": 1, "max": 200, "tooltip":
                                  "Sampling steps (28 is the official default)."}),
                "cfg": ("FLOAT", {"default": 5.0, "min": 0.0, "max": 30.0, "step": 0.1, "round": 0.01, "tooltip":
                                  "Classifier-free guidance scale. 1.0 turns guidance (and the negative prompt) off "
                                  "and halves the work."}),
                "sampler": (sampler_names(), {"default": "euler", "tooltip": "Flow-matching sampler."}),
                "shift": ("FLOAT", {"default": 6.0, "min": 0.1, "max": 20.0, "step": 0.1, "tooltip":
                                    "Timestep shift of the flow schedule (6.0 is NewBie's default; higher spends "
                                    "more steps at high noise)."}),
                "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip":
                                      "1.0 for text-to-image. Below 1 (img2img) the input latent is re-noised only "
                                      "that far: 0.6 keeps its composition and redraws the details."}),
            },
            "optional": {
                "memory": (NEWBIE_MEMORY, {"tooltip": "From NewBie Memory Settings (optional)."}),
                "vram_budget_gb": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 256.0, "step": 0.25, "tooltip":
                                             "Overrides the memory settings' VRAM budget for sampling. 0 = use the "
                                             "settings (or auto)."}),
                "attention_slicing": ([FROM_SETTINGS] + ATTENTION_CHOICES, {"default": FROM_SETTINGS, "tooltip":
                                      "Overrides the settings' attention slicing: auto, off, or query rows per chunk."}),
                "ffn_chunking": ([FROM_SETTINGS] + FFN_CHOICES, {"default": FROM_SETTINGS, "tooltip":
                                 "Overrides the settings' feed-forward chunking: auto, off, or tokens per chunk."}),
                "sigmas": ("SIGMAS", {"tooltip": "Optional schedule from a core scheduler node (BasicScheduler, "
                                                 "BetaSamplingScheduler, ...). Replaces steps, shift and denoise; a "
                                                 "first sigma below 1 re-noises the input latent that far."}),
                "core_sampler": ("SAMPLER", {"tooltip": "Optional core sampler (KSamplerSelect, ...). Replaces the "
                                                        "sampler widget; the DiT still runs under this node's plan."}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, seed=None, steps=None, cfg=None, sampler=None, shift=None, denoise=None,
                        vram_budget_gb=None):
        values = {"seed": seed, "steps": steps, "cfg": cfg, "sampler": sampler, "shift": shift, "denoise": denoise}
        defaults = {"seed": 0, "steps": 28, "cfg": 5.0, "sampler": "euler", "shift": 6.0, "denoise": 1.0}
        known = {k: (defaults[k] if val is None else val) for k, val in values.items()}   # None: linked
        return queue_check(cls, {**values, "vram_budget_gb": vram_budget_gb},
                           lambda: check_sampling(**known),
                           lambda: check_budget(vram_budget_gb, "vram_budget_gb", zero_is_auto=True))

    def sample(self, dit: DiTHandle, positive, negative, latent: dict, seed: int, steps: int, cfg: float,
               sampler: str, shift: float, denoise: float, memory: MemorySettings | None = None,
               vram_budget_gb: float = 0.0, attention_slicing: str = FROM_SETTINGS,
               ffn_chunking: str = FROM_SETTINGS, sigmas: torch.Tensor | None = None,
               core_sampler=None) -> tuple[dict, StageReport]:
        if not isinstance(dit, DiTHandle):
            raise ValueError("dit must come from NewBie DiT Loader.")
        settings = resolve_memory(memory, vram_budget_gb, attention_slicing, ffn_chunking)
        if sigmas is not None:
            sigmas = checked_sigmas(sigmas)
        if core_sampler is not None:
            return self._sample_core(dit, positive, negative, latent, seed, steps, cfg, shift, denoise, settings,
                                     sigmas, core_sampler)
        sampling = SamplingSettings(steps=steps, cfg=cfg, shift=shift, sampler=sampler, seed=seed, denoise=denoise)
        config = dit.ckpt.config
        pos = from_comfy_conditioning(positive, "positive", config.cap_feat_dim, config.clip_text_dim)
        neg = from_comfy_conditioning(negative, "negative", config.cap_feat_dim, config.clip_text_dim)
        raw = raw_samples(latent)
        device = adapter.compute_device()
        guided = cfg != 1.0
        b, _, h, w = raw.shape
        batch, cap = (2 * b, max(pos.length, neg.length)) if guided else (b, pos.length)

        def plan(budget):
            return plan_sampling(dit, settings, batch, cap, w * 8, h * 8, device, budget)[2]

        report = Report()
        with vram_for_stage("NewBie DiT", device, settings, lambda: plan(None).predicted_peak,
                            lambda budget: plan_weight_bytes(plan(budget)), host_files=dit.files) as budget:
            result = run_sampling(dit, pos, neg, raw, sampling, settings, device, report, budget,
                                  callback=_step_reporter(steps if sigmas is None else len(sigmas) - 1),
                                  sigmas=sigmas)
        out = dict(latent)
        out["samples"] = result.latent.to(adapter.intermediate_device())
        note = budget_note("sample", device, budget)
        return out, StageReport.from_run("sample", result.plan.render(), report, note)


    def _sample_core(self, dit, positive, negative, latent, seed, steps, cfg, shift, denoise, settings, sigmas,
                     core_sampler) -> tuple[dict, StageReport]:
        """A core SAMPLER drives the DiT through the pack's MODEL (same placement, same budget)."""
        from .comfy_model import make_model, sample_with_core_sampler
        raw = raw_samples(latent)
        if sigmas is None:
            sigmas = flow_sigmas(steps, shift, denoise)
        report = Report()
        model = make_model(dit, settings, report)
        samples = sample_with_core_sampler(model, positive, negative, cfg, core_sampler, sigmas, raw, seed)
        out = dict(latent)
        out["samples"] = samples.to(adapter.intermediate_device())
        placed = model.model.placed
        plan_text = placed.last_plan.render() if placed.last_plan is not None else "(no forward ran)"
        note = budget_note("sample (core sampler)", adapter.compute_device(), placed.last_budget)
        return out, StageReport.from_run("sample", plan_text, report, note)


def checked_sigmas(sigmas) -> torch.Tensor:
    """A SIGMAS input as a float32 CPU tensor, or one clear error in sigma units."""
    if not isinstance(sigmas, torch.Tensor) or sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError("sigmas must be a SIGMAS tensor with at least 2 values (from a core scheduler node).")
    values = sigmas.detach().float().cpu()
    if not bool((values[1:] < values[:-1]).all()) or float(values[0]) > 1.0 or float(values[-1]) < 0.0:
        raise ValueError(f"sigmas must strictly decrease within [0, 1] (a flow schedule); got "
                         f"{[round(float(v), 4) for v in values[:3]]} ... {[round(float(v), 4) for v in values[-2:]]}. "
                         "Use a scheduler node on the NewBie MODEL (NewBie DiT to MODEL).")
    return values


def _step_reporter(steps: int):
    """Per-step callback: progress (+ preview) first, then the Cancel check, so a cancel pressed
    during step i stops before step i+1 starts."""
    bar = adapter.progress_bar(steps)

    def on_step(i: int, n: int, x: torch.Tensor, denoised: torch.Tensor) -> None:
        bar.update_absolute(i + 1, n, adapter.preview_image_from_latent(denoised))
        adapter.check_interrupted()
    return on_step
