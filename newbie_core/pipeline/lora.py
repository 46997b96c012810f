"""The DiT's LoRAs as placement patches: blocks get theirs in placement, the rest on load.

Block patches go to placement (``BlockPatches``): added on the device after each block's weights
land in compute layout, so streamed and resident runs stay bitwise equal and the host copy stays
the file's. The few small modules outside the blocks (``time_text_embed``,
``clip_text_pooled_proj``, ...) are materialised fresh every stage; their patches are added to
that fresh copy with the same arithmetic.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import fields

import torch
from torch import nn

from ..models.dit import DiTConfig
from ..models.lora import DitPatches, LoraPatch, LoraSpec, dit_lora_patches
from ..placement.patches import BlockPatches, WeightPatch, apply_patches


def to_weight_patch(patch: LoraPatch) -> WeightPatch:
    return WeightPatch(**{f.name: getattr(patch, f.name) for f in fields(LoraPatch)})


def dit_patches(loras: Sequence[LoraSpec], model: nn.Module,
                config: DiTConfig) -> tuple[BlockPatches | None, dict[str, list[WeightPatch]]]:
    """(block patches for placement or None, non-block patches by parameter name)."""
    if not loras:
        return None, {}
    mapped: DitPatches = dit_lora_patches(list(loras), model, config)
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
