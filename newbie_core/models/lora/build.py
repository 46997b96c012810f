"""LoRA files + strengths -> placement's weight patches for the NewBie DiT.

Strength semantics: strength 1.0 applies a LoRA at its *trained* scale, the one the official
trainer's merge (PEFT ``merge_and_unload``, LyCORIS ``merge_to``) gives:
``W + strength * alpha / rank * delta`` (``alpha / sqrt(rank)`` with rsLoRA; exactly ``delta``
for a LoKr with both sides full, as LyCORIS does). The official ComfyUI nodes differ (see the
README): they apply PEFT files at scale 1 (2x the default trained 0.5) and factorised LoKr at
(alpha / rank) squared.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from torch import nn

from ..checkpoint import CheckpointError
from ..dit.config import DiTConfig
from .files import LoraFile, read_lora
from .formats import DELTAS, LOW_RANK, Adapter, group_modules
from .keymap import describe_layout, lora_targets, resolve

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA to apply: a file and a strength (1.0 = the trained scale)."""
    path: str
    strength: float = 1.0

    @classmethod
    def parse(cls, text: str) -> "LoraSpec":
        """``FILE[:STRENGTH]``; a Windows drive colon is part of the path."""
        path, sep, tail = text.rpartition(":")
        if sep and path and not tail.startswith(("\\", "/")):
            try:
                return cls(path, float(tail))
            except ValueError:
                pass
        return cls(text, 1.0)


@dataclass(frozen=True)
class LoraPatch:
    """``scale * delta(factors)`` for rows ``rows`` of one parameter; the pipeline hands it to
    placement as a ``WeightPatch`` (same fields), so models/ does not import placement."""
    target: str                            # parameter name (relative to its block, if in one)
    factors: dict[str, torch.Tensor]
    delta: Callable[[Mapping[str, torch.Tensor]], torch.Tensor]
    scale: float
    shape: tuple[int, ...]
    rows: tuple[int, int] | None = None
    source: str = ""
    low_rank: Callable[[Mapping[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]] | None = None


@dataclass
class DitPatches:
    """Patches for the blocks (by block index, targets relative to the block) and the rest."""
    blocks: dict[int, list[LoraPatch]] = field(default_factory=dict)
    non_blocks: dict[str, list[LoraPatch]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.blocks or self.non_blocks)


def _scale(adapter: Adapter, lora: LoraFile, logged: set) -> float:
    """alpha / rank for one module, alpha from exactly one source (files.py)."""
    rank = adapter.rank
    if rank is None:
        return 1.0
    alpha = adapter.alpha
    rslora = False
    if alpha is None:
        alpha = lora.alpha.for_module(adapter.module)
        rslora = lora.alpha.rslora
        if alpha is None:
            if "none" not in logged:
                logged.add("none")
                log.warning("LoRA %s: no alpha anywhere (no per-key .alpha, no adapter_config.json beside it, no "
                            "metadata); applying its deltas at scale 1 x strength", lora.path.name)
            return 1.0
        if "file" not in logged:
            logged.add("file")
            log.info("LoRA %s: alpha from %s", lora.path.name, lora.alpha.where)
    return alpha / (math.sqrt(rank) if rslora else rank)


def dit_lora_patches(specs: list[LoraSpec] | tuple[LoraSpec, ...], model: nn.Module, config: DiTConfig) -> DitPatches:
    """Read (cached) and map every LoRA; raise before any DiT weight is read when one is unusable."""
    table = lora_targets(model, config)
    blocks = {name: i for i, (name, _) in enumerate(model.block_sequence())}
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    out = DitPatches()
    for spec in specs:
        lora = read_lora(spec.path)
        adapters, unknown = group_modules(lora.tensors, str(lora.path))
        unmatched = list(unknown)
        matched, logged = 0, set()
        kinds = sorted({a.kind for a in adapters})
        for adapter in adapters:
            target = resolve(adapter.module, table)
            if target is None:
                unmatched.append(adapter.module)
                continue
            key = f"{target.module}.{adapter.param}"
            if key not in shapes:
                unmatched.append(adapter.module)
                continue
            full = shapes[key]
            want = full if target.rows is None else (target.rows[1] - target.rows[0],) + full[1:]
            if tuple(adapter.delta_shape) != tuple(want):
                raise CheckpointError(
                    f"LoRA {lora.path}: {adapter.module} gives a {list(adapter.delta_shape)} change for "
                    f"{key} {list(want)}; the LoRA was made for a model of another size.")
            scale = spec.strength * _scale(adapter, lora, logged)
            block = _block_of(target.module, blocks)
            name = key if block is None else key[len(block[0]) + 1:]
            patch = LoraPatch(target=name, factors=dict(adapter.factors), delta=DELTAS[adapter.kind],
                                scale=scale, shape=tuple(want), rows=target.rows,
                                source=f"{lora.path.name}:{adapter.module}", low_rank=LOW_RANK.get(adapter.kind))
            if block is None:
                out.non_blocks.setdefault(key, []).append(patch)
            else:
                out.blocks.setdefault(block[1], []).append(patch)
            matched += 1
        if not matched:
            raise CheckpointError(f"LoRA {lora.path}: none of its {len(adapters)} modules matches the NewBie DiT; "
                                  f"it looks like {describe_layout([a.module for a in adapters] + unknown)}.")
        if unmatched:
            log.warning("LoRA %s: %d of its keys/modules match no NewBie DiT layer and are ignored: %s%s",
                        lora.path.name, len(unmatched), ", ".join(unmatched[:5]),
                        ", ..." if len(unmatched) > 5 else "")
        log.info("LoRA %s: %s, %d modules at strength %g", lora.path.name, "/".join(kinds), matched, spec.strength)
    return out


def _block_of(module: str, blocks: dict[str, int]) -> tuple[str, int] | None:
    parts = module.split(".")
    for cut in range(1, len(parts)):
        prefix = ".".join(parts[:cut])
        if prefix in blocks:
            return prefix, blocks[prefix]
    return None

