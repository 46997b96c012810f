"""ComfyUI's own Lumina-2 NextDiT as a peer (bench/peers.py): imported from a git-ignored snapshot
folder with its flags set first, built with NewBie's dims around our very tensors, and called in
our conventions. The ComfyUI code itself is never committed (peers.py's docstring says how to
extract it).
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path
from typing import Callable

import torch

from newbie_core.models.dit import DiTConfig, NextDiT

Forward = Callable[[dict], torch.Tensor]

_NEEDS_VISION = ["comfy.ldm.cosmos.model", "comfy.ldm.cosmos.predict2", "comfy.ldm.cascade.stage_c_coder",
                 "comfy.ldm.cascade.controlnet", "comfy.ldm.ace.vae.music_dcae_pipeline",
                 "comfy.audio_encoders.audio_encoders", "comfy.audio_encoders.whisper"]


class _AbsentModule(types.ModuleType):
    """Stands in for a ComfyUI model module whose own deps are missing; NextDiT never uses it."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (), {})


def import_comfy(path: Path, async_offload: bool, cpu: bool) -> tuple[types.ModuleType, list[str]]:
    """Import ComfyUI's model_management (with the flags set first) from a snapshot folder.

    Where torchvision/torchaudio are absent (the CPU dev box) the unrelated model modules that
    import them at top level are stubbed, so ``comfy.model_patcher`` (-> model_base) imports.
    """
    notes = []
    if not (path / "comfy" / "model_management.py").is_file():
        raise FileNotFoundError(f"--comfy {path}: no comfy/model_management.py there; extract a ComfyUI "
                                f"snapshot first (see this script's docstring).")
    if "comfy.model_management" in sys.modules:
        mm = sys.modules["comfy.model_management"]
        if (mm.NUM_STREAMS > 1) != async_offload:
            raise RuntimeError("comfy.model_management is already imported with another --async-offload "
                               "setting; run this peer in its own process.")
        return mm, notes
    sys.path.insert(0, str(path))
    missing = [m for m in ("torchvision", "torchaudio") if importlib.util.find_spec(m) is None]
    if missing:
        for name in _NEEDS_VISION:
            sys.modules.setdefault(name, _AbsentModule(name))
        notes.append(f"{'/'.join(missing)} absent: {len(_NEEDS_VISION)} unrelated comfy model modules stubbed")
    import comfy.cli_args
    comfy.cli_args.args.async_offload = async_offload
    comfy.cli_args.args.cpu = cpu
    import comfy.model_management as mm
    import comfy.model_patcher  # noqa: F401  (fails here, not mid-run, if a dependency is missing)
    return mm, notes


def comfy_nextdit(config: DiTConfig, ours: NextDiT, operations) -> torch.nn.Module:
    """ComfyUI's Lumina-2 NextDiT with NewBie dims, holding our very tensors."""
    from comfy.ldm.lumina.model import NextDiT as ComfyNextDiT
    # FeedForward: hidden = multiple_of * ceil(multiplier * 4 * dim / multiple_of) = ffn_dim.
    multiplier = config.ffn_dim / (4 * config.dim)
    with torch.device("meta"):
        model = ComfyNextDiT(patch_size=config.patch_size, in_channels=config.in_channels, dim=config.dim,
                             n_layers=config.n_layers, n_refiner_layers=config.n_noise_refiner,
                             n_heads=config.n_heads, n_kv_heads=config.n_kv_heads, multiple_of=256,
                             ffn_dim_multiplier=multiplier, norm_eps=config.norm_eps, qk_norm=True,
                             cap_feat_dim=config.cap_feat_dim, axes_dims=list(config.axes_dims),
                             axes_lens=[2048, 1024, 1024], dtype=ours.x_embedder.weight.dtype,
                             operations=operations)
    if config.n_context_refiner != config.n_noise_refiner:
        raise ValueError("ComfyUI's NextDiT has one refiner count for both refiners.")
    w1 = model.layers[0].feed_forward.w1.weight.shape[0]
    if w1 != config.ffn_dim:
        raise ValueError(f"ComfyUI FeedForward came out with {w1} rows, not {config.ffn_dim}.")
    state = {k: v for k, v in ours.state_dict().items()
             if not k.startswith(("clip_text_pooled_proj.", "time_text_embed."))}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def comfy_forward(model: torch.nn.Module) -> Forward:
    """Our convention in and out: ComfyUI takes 1 - t and returns -velocity; mask only if padded."""
    def run(i: dict) -> torch.Tensor:
        padded = i["cap_valid"] < i["cap"].shape[1]
        out = model(i["x"], 1.0 - i["t"], i["cap"], i["cap_valid"], attention_mask=i["mask"] if padded else None)
        return -out
    return run
