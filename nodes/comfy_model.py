"""A standard ComfyUI MODEL whose DiT runs through placement (core KSampler & co. on NewBie).

ComfyUI's samplers drive a `ModelPatcher` around a `model_base.BaseModel`. Ours holds no
weights: its `diffusion_model` is a parameterless module that forwards to a `PlacedDiT`
(newbie_core), so ComfyUI's loader has nothing to move or partially load, and the VRAM budget of
the Memory Settings (or auto) plans every session. While a session is open, the weights it
places are announced to ComfyUI by the usual weightless handle (`vram_for_stage`), so ComfyUI's
accounting sees them and may evict them. The session opens at the first forward of a sampling
run and closes in `ModelPatcher.cleanup`, which every core sampler path calls when it ends.

The comfy classes are built lazily from the modules `comfy_adapter.comfy_modules()` hands over,
so this module imports nothing from ComfyUI and the node classes import without it. Version
differences are feature-detected there and here (never by version number):
`ModelPatcher.__init__`/`clone` gained keywords upstream (disable_dynamic, model_override,
force_deepcopy), and newer ComfyUI asks `is_dynamic()` (Dynamic VRAM); we pass unknown keywords
through, drop force_deepcopy (nothing to copy) and answer False.

Conventions bridged (comfyui-notes §2.3, lora-gguf-prompt §4): ComfyUI's flow models take
`timestep = sigma` (multiplier 1) and return `-velocity` (denoised = x - out * sigma); the DiT
takes t = 1 - sigma and returns the velocity. The Flux latent format applies NewBie's
normalisation, exactly as the pack's sampler does.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch

from ..newbie_core.pipeline import DiTHandle, MemorySettings
from ..newbie_core.pipeline.dit_session import PlacedDiT
from ..newbie_core.placement import Report
from . import comfy_adapter as adapter
from .settings_node import vram_for_stage

log = logging.getLogger(__name__)

LORA_NODE_HINT = ("NewBie LoRAs on the pack's MODEL go through the pack's LoRA loader node (placement merges "
                  "them into the streamed weights); ComfyUI's own LoRA loaders cannot patch weights they do not hold.")


def core_lora_patches(patcher: Any, patches: dict, strength_patch: float, strength_model: float) -> list:
    """>>> LoRA seam (branch lora12): core `add_patches` on the pack's MODEL lands here.

    Until the LoRA library function is merged, every patch is refused with a clear message, so a
    core LoRA loader never yields a silently unpatched image. That includes an empty `patches`:
    the core loaders call `add_patches` even when their key map matched nothing (our MODEL
    exposes no weights), which would otherwise leave the image unpatched with only log lines.
    Returns the keys taken, like `ModelPatcher.add_patches`.
    """
    if strength_patch == 0:
        return []
    what = f"{len(patches)} weight patches" if patches else "a LoRA (none of whose keys matched any weight)"
    raise ValueError(f"{what} reached the NewBie MODEL through a core node. " + LORA_NODE_HINT)


def _pad_tokens(t: torch.Tensor, length: int) -> torch.Tensor:
    """Right-pad (B, L, ...) along L with zeros (a padded mask entry is 0 = not a token)."""
    if t.shape[1] == length:
        return t
    pad = torch.zeros((t.shape[0], length - t.shape[1]) + tuple(t.shape[2:]), dtype=t.dtype, device=t.device)
    return torch.cat([t, pad], dim=1)


@functools.lru_cache(maxsize=1)
def _classes() -> Any:
    comfy = adapter.comfy_modules()
    mp = comfy.model_patcher

    class PaddedTokens(comfy.conds.CONDRegular):
        """Caption features or mask (B, L, ...) that concatenate across lengths by right-padding:
        cond and uncond then run as one batch, as in the pack's sampler (two passes would copy
        every streamed block twice)."""

        def can_concat(self, other):
            a, b = self.cond.shape, other.cond.shape
            return a[0] == b[0] and a[2:] == b[2:] and self.cond.device == other.cond.device

        def concat(self, others):
            conds = [self.cond] + [o.cond for o in others]
            length = max(c.shape[1] for c in conds)
            return torch.cat([_pad_tokens(c, length) for c in conds])

    class NewBieDiffusionModel(torch.nn.Module):
        """Parameterless stand-in for the DiT: ComfyUI's calls go to the placed DiT."""

        def __init__(self, placed: PlacedDiT):
            super().__init__()
            self.placed = placed          # a plain object, not a submodule: .to() never reaches it

        @property
        def dtype(self) -> torch.dtype:
            return self.placed.compute_dtype

        def forward(self, x, timesteps, context=None, attention_mask=None, clip_text_pooled=None,
                    transformer_options=None, **kwargs):
            adapter.check_interrupted()                      # Cancel stops within one forward
            if context is None or clip_text_pooled is None:
                raise ValueError("the NewBie MODEL needs NewBie conditioning (Gemma features plus the Jina "
                                 "'pooled_output'); connect NewBie Text Encode to the sampler.")
            if attention_mask is None:
                attention_mask = torch.ones(context.shape[:2], dtype=torch.long, device=context.device)
            t = 1.0 - timesteps.float()
            v = self.placed(x, t, context, attention_mask.reshape(context.shape[:2]), clip_text_pooled)
            return -v

    class NewBieBaseModel(comfy.model_base.BaseModel):
        """Lumina-2 family sampling (flow, shift 6, Flux latents) with the placed NewBie DiT."""

        def __init__(self, placed: PlacedDiT, device=None):
            config = comfy.supported_models.Lumina2({"image_model": "lumina2", "disable_unet_model_creation": True})
            super().__init__(config, comfy.model_base.ModelType.FLOW, device=device)
            self.diffusion_model = NewBieDiffusionModel(placed)
            self.placed = placed

        def get_dtype(self):
            return self.placed.compute_dtype

        def extra_conds(self, **kwargs):
            out = super().extra_conds(**kwargs)
            cross = kwargs.get("cross_attn")
            pooled = kwargs.get("pooled_output")
            if cross is None or pooled is None:
                raise ValueError("the NewBie MODEL got conditioning without Gemma features or 'pooled_output' "
                                 "(Jina CLIP v2); encode the prompt with NewBie Text Encode.")
            mask = kwargs.get("attention_mask")
            if mask is None:
                mask = torch.ones(cross.shape[:2], dtype=torch.long)
            out["c_crossattn"] = PaddedTokens(cross)
            out["attention_mask"] = PaddedTokens(mask.reshape(cross.shape[:2]).long())
            out["clip_text_pooled"] = comfy.conds.CONDRegular(pooled.reshape(cross.shape[0], -1))
            return out

        def memory_required(self, input_shape, cond_shapes=None):
            # Placement plans the activations for the whole cond+uncond batch and frees VRAM for
            # them when the session opens; telling ComfyUI only the latents keeps it from
            # splitting cond and uncond into two passes over the (possibly streamed) weights.
            n = 1
            for d in input_shape:
                n *= int(d)
            return 4 * n * 4

    class NewBieModelPatcher(mp.ModelPatcher):
        """ModelPatcher of a weightless model: loading moves nothing (there is nothing to move)."""

        def __init__(self, model, load_device, offload_device, size=0, *args, **kwargs):
            super().__init__(model, load_device, offload_device, size, *args, **kwargs)

        def is_dynamic(self) -> bool:     # newer ComfyUI (Dynamic VRAM): placement owns the weights
            return False

        def clone(self, *args, **kwargs):
            # Some ComfyUI versions build clones as plain ModelPatcher(...), others via
            # self.__class__ with extra keywords (disable_dynamic, model_override, ...): pass
            # whatever comes, and keep our class either way (its cleanup closes the session).
            # A deep copy (force_deepcopy, newer ComfyUI) needs the loader's cached_patcher_init
            # and would copy weights: this model has none, so a plain clone is the same thing.
            if kwargs.pop("force_deepcopy", False):
                log.debug("NewBie MODEL: force_deepcopy ignored (the model holds no weights)")
            n = super().clone(*args, **kwargs)
            if not isinstance(n, NewBieModelPatcher):
                n.__class__ = NewBieModelPatcher
            return n

        def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
            return core_lora_patches(self, patches, strength_patch, strength_model)

        def add_hook_patches(self, hook, patches, strength_patch=1.0, strength_model=1.0):
            # Hook LoRAs (CreateHookLora & co.) would match no weight here and leave the image
            # unpatched, like add_patches: refuse them the same way.
            return core_lora_patches(self, patches, strength_patch, strength_model)

        def cleanup(self):
            super().cleanup()
            self.model.placed.close()     # every core sampler path calls this when sampling ends

        def detach(self, unpatch_all=True):
            if unpatch_all:
                self.model.placed.close()
            return super().detach(unpatch_all)

    return type("NewBieComfyClasses", (), {"PaddedTokens": PaddedTokens, "BaseModel": NewBieBaseModel,
                                            "Patcher": NewBieModelPatcher, "DiffusionModel": NewBieDiffusionModel})


def make_model(dit: DiTHandle, memory: MemorySettings, report: Report | None = None) -> Any:
    """A ComfyUI MODEL (ModelPatcher) for `dit` under `memory`'s budget."""
    classes = _classes()
    mm = adapter.comfy_modules().model_management
    device = adapter.compute_device()

    def budget_scope(ideal_peak, weight_bytes):
        # Our MODEL (and its clones, e.g. after ModelSamplingAuraFlow) stays loaded: evicting it
        # mid-run would undo its object patches.
        ours = [lm.model for lm in mm.current_loaded_models if getattr(lm.model, "model", None) is base]
        return vram_for_stage("NewBie DiT (MODEL)", device, memory, ideal_peak, weight_bytes, keep=ours,
                              host_files=dit.files)

    placed = PlacedDiT(dit, memory, device, report, budget_scope)
    base = classes.BaseModel(placed, device=mm.unet_offload_device())
    return classes.Patcher(base, load_device=device, offload_device=mm.unet_offload_device())


def placed_dit_of(model: Any) -> PlacedDiT | None:
    """The PlacedDiT behind a MODEL made by `make_model` (clones included), else None."""
    inner = getattr(model, "model", None)
    placed = getattr(inner, "placed", None)
    return placed if isinstance(placed, PlacedDiT) else None


def sample_with_core_sampler(model: Any, positive: list, negative: list, cfg: float, sampler: Any,
                             sigmas: torch.Tensor, raw_latent: torch.Tensor, seed: int) -> torch.Tensor:
    """Run a core SAMPLER on the pack's MODEL with ComfyUI's own CFG guider (as
    SamplerCustomAdvanced does), reporting progress and previews like the pack's sampler.
    Returns the raw latent."""
    from ..newbie_core.sampling import initial_noise
    comfy = adapter.comfy_modules()
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    total = len(sigmas) - 1
    bar = adapter.progress_bar(total)

    def on_step(step, denoised, x, steps):
        bar.update_absolute(step + 1, steps, adapter.preview_image_from_latent(denoised))

    noise = initial_noise(seed, tuple(raw_latent.shape))       # = ComfyUI's prepare_noise for fp32
    out = guider.sample(noise, raw_latent.float(), sampler, sigmas, callback=on_step, disable_pbar=True, seed=seed)
    return out.float().cpu()
