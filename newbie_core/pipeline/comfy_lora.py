"""ComfyUI-style weight patches (what core ``LoraLoaderModelOnly`` adds to a MODEL) -> placement.

ComfyUI keeps ``ModelPatcher.patches`` as {``diffusion_model.<key>``: [(strength_patch, adapter,
strength_model, offset, function), ...]} where ``adapter`` is a weight-adapter object (``.name``
and ``.weights``, ComfyUI >= 0.3.3x) or an older ``(name, weights)`` tuple. This module turns the
kinds placement can apply exactly (lora, lokr, loha, diff) into :class:`LoraPatch` records with
ComfyUI's own scale (``strength_patch * alpha / rank``), and refuses everything else with one
message that points at the pack's LoRA node, so an image is never silently left unpatched.

GQA guard: ComfyUI's Lumina-2 key map slices ``to_k``/``to_v`` onto the fused qkv as if the
key/value width were the model width (offsets (dim, dim) and (2 dim, dim)). NewBie has 8 KV heads
(768 rows at 2304 and 3072), so any qkv offset that is not exactly one of NewBie's q/k/v ranges
is refused. Nothing here imports ComfyUI: the objects are read by duck typing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..models.dit import DiTConfig
from ..models.lora import LoraPatch, qkv_rows
from ..models.lora.formats import DELTAS, LOW_RANK

USE_PACK_NODE = ("Use the pack's 'NewBie LoRA Loader' on the NEWBIE_DIT handle instead of core "
                 "LoraLoaderModelOnly.")


class UnsupportedComfyPatch(ValueError):
    """A ComfyUI patch placement cannot apply exactly; the message says what to use instead."""


def _adapter(v: Any) -> tuple[str, tuple]:
    if hasattr(v, "name") and hasattr(v, "weights"):
        return str(v.name), tuple(v.weights)
    if isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], str):
        return v[0], tuple(v[1]) if isinstance(v[1], (tuple, list)) else (v[1],)
    if isinstance(v, torch.Tensor):
        return "diff", (v,)
    raise UnsupportedComfyPatch(f"a ComfyUI patch of type {type(v).__name__} cannot be applied. {USE_PACK_NODE}")


def _factors(name: str, w: tuple, key: str) -> tuple[str, dict[str, torch.Tensor], float | None, int | None]:
    """(kind, factors, alpha, rank) from ComfyUI's weight tuples (layouts of comfy/weight_adapter)."""
    def refuse(what: str):
        raise UnsupportedComfyPatch(f"{key}: ComfyUI patch uses {what}, which this pack does not apply. {USE_PACK_NODE}")
    if name == "lora":
        up, down, alpha, mid, dora = (list(w) + [None] * 6)[:5]
        if mid is not None or dora is not None:
            refuse("a LoCon mid factor or DoRA")
        return "lora", {"up": up, "down": down}, alpha, int(down.shape[0])
    if name == "lokr":
        w1, w2, alpha, w1_a, w1_b, w2_a, w2_b, t2, dora = (list(w) + [None] * 9)[:9]
        if t2 is not None or dora is not None:
            refuse("Tucker factors or DoRA")
        f = {k: t for k, t in (("w1", w1), ("w2", w2), ("w1_a", w1_a), ("w1_b", w1_b), ("w2_a", w2_a),
                               ("w2_b", w2_b)) if t is not None}
        rank = int(w1_b.shape[0]) if w1_b is not None else int(w2_b.shape[0]) if w2_b is not None else None
        return "lokr", f, alpha, rank
    if name == "loha":
        w1a, w1b, alpha, w2a, w2b, t1, t2, dora = (list(w) + [None] * 8)[:8]
        if t1 is not None or t2 is not None or dora is not None:
            refuse("Tucker factors or DoRA")
        return "loha", {"w1_a": w1a, "w1_b": w1b, "w2_a": w2a, "w2_b": w2b}, alpha, int(w1b.shape[0])
    if name == "diff":
        return "diff", {"diff": w[0]}, None, None
    refuse(f"the '{name}' adapter")
    raise AssertionError


def comfy_patches_to_lora(patches: Mapping[str, Sequence[tuple]], config: DiTConfig,
                          shapes: Mapping[str, tuple[int, ...]]) -> dict[str, list[LoraPatch]]:
    """{official parameter name: [LoraPatch]} from a ModelPatcher's ``patches``; raises
    :class:`UnsupportedComfyPatch` on anything placement would not apply exactly."""
    qkv = {(start, stop - start) for start, stop in qkv_rows(config).values()}
    out: dict[str, list[LoraPatch]] = {}
    for raw_key, entries in patches.items():
        key = raw_key[len("diffusion_model."):] if raw_key.startswith("diffusion_model.") else raw_key
        if key not in shapes:
            raise UnsupportedComfyPatch(f"ComfyUI patch for {raw_key}, which the NewBie DiT does not have. "
                                        f"{USE_PACK_NODE}")
        for entry in entries:
            strength, v, strength_model, offset, function = (list(entry) + [1.0, None, None])[:5]
            if function is not None or float(strength_model) != 1.0:
                raise UnsupportedComfyPatch(f"{raw_key}: ComfyUI patch with a strength_model or a function "
                                            f"cannot be applied here. {USE_PACK_NODE}")
            rows = None
            if offset is not None:
                dim, start, length = offset
                if not key.endswith("attention.qkv.weight") or dim != 0 or (start, length) not in qkv:
                    raise UnsupportedComfyPatch(
                        f"{raw_key}: ComfyUI patch slices rows {start}..{start + length} of dim {dim}; NewBie's "
                        f"fused qkv has (start, rows) {sorted(qkv)} for q/k/v ({config.n_kv_heads} KV heads). ComfyUI's Lumina-2 key map "
                        f"assumes key/value width = model width, which is wrong for NewBie. {USE_PACK_NODE}")
                rows = (start, start + length)
            kind, factors, alpha, rank = _factors(*_adapter(v), raw_key)
            scale = float(strength) * (float(alpha) / rank if alpha is not None and rank else 1.0)
            full = shapes[key]
            want = full if rows is None else (rows[1] - rows[0],) + tuple(full[1:])
            out.setdefault(key, []).append(LoraPatch(target=key, factors=factors, delta=DELTAS[kind], scale=scale,
                                                     shape=tuple(want), rows=rows, source=f"comfy:{raw_key}",
                                                     low_rank=LOW_RANK.get(kind)))
    return out
