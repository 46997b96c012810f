"""The DiT's LoRAs as placement patches: blocks get theirs in placement, the rest on load.

Block patches go to placement (``BlockPatches``): added on the device after each block's weights
land in compute layout, so streamed and resident runs stay bitwise equal and the host copy stays
the file's. The few small modules outside the blocks (``time_text_embed``,
``clip_text_pooled_proj``, ...) are materialised fresh every stage; their patches are added to
that fresh copy with the same arithmetic.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import fields, replace

import torch
from torch import nn

from ..models.dit import DiTConfig
from ..models.lora import DitPatches, LoraPatch, LoraSpec, dit_lora_patches
from ..placement.patches import BlockPatches, WeightPatch, apply_patches


def to_weight_patch(patch: LoraPatch) -> WeightPatch:
    return WeightPatch(**{f.name: getattr(patch, f.name) for f in fields(LoraPatch)})


def dit_patches(loras: Sequence[LoraSpec], model: nn.Module, config: DiTConfig,
                param_patches: Sequence[tuple[str, LoraPatch]] = ()
                ) -> tuple[BlockPatches | None, dict[str, list[WeightPatch]]]:
    """(block patches for placement or None, non-block patches by parameter name).

    ``param_patches``: (official parameter name, patch) pairs from elsewhere, e.g. ComfyUI's own
    LoRA patches converted by ``comfy_lora.comfy_patches_to_lora``; they follow the files'."""
    if not loras and not param_patches:
        return None, {}
    mapped: DitPatches = dit_lora_patches(list(loras), model, config) if loras else DitPatches()
    blocks_by_name = {name: i for i, (name, _) in enumerate(model.block_sequence())}
    for key, patch in param_patches:
        block = next((b for b in blocks_by_name if key.startswith(b + ".")), None)
        if block is None:
            mapped.non_blocks.setdefault(key, []).append(patch)
        else:
            mapped.blocks.setdefault(blocks_by_name[block], []).append(replace(patch, target=key[len(block) + 1:]))
    blocks = BlockPatches({i: [to_weight_patch(p) for p in ps] for i, ps in mapped.blocks.items()})
    rest = {k: [to_weight_patch(p) for p in ps if p.scale != 0.0] for k, ps in mapped.non_blocks.items()}
    return (blocks if blocks else None), {k: ps for k, ps in rest.items() if ps}


def patched_value(name: str, value: torch.Tensor, patches: Mapping[str, Sequence[WeightPatch]]) -> torch.Tensor:
    """``value`` with its patches added (a new tensor: the source may be a read-only file map)."""
    ps = patches.get(name)
    if not ps:
        return value
    out = value.clone()
    apply_patches({name: out}, [(p, {k: t.to(out.device) for k, t in p.factors.items()}) for p in ps])
    return out
