"""Key-name knowledge: Disty0's diffusers names -> official names, and what a foreign file is.

The diffusers port (spec §2.14, end) renames every module and splits ``attention.qkv`` into
to_q/to_k/to_v; we map it back so the rest of the code sees one layout. The qkv weight becomes a
:class:`Derived` tensor, concatenated (q, k, v rows) when read.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..checkpoint import CheckpointError, Derived

# diffusers prefix -> official prefix, outside the blocks
_TOP_LEVEL = {
    "time_caption_embed.caption_embedder.": "cap_embedder.",
    "time_caption_embed.timestep_embedder.linear_1.": "t_embedder.mlp.0.",
    "time_caption_embed.timestep_embedder.linear_2.": "t_embedder.mlp.2.",
    "time_caption_embed.clip_text_pooled_proj.": "clip_text_pooled_proj.",
    "time_caption_embed.time_text_embed.": "time_text_embed.",
    "norm_out.linear_1.": "final_layer.adaLN_modulation.1.",
    "norm_out.linear_2.": "final_layer.linear.",
    "x_embedder.": "x_embedder.",
}
# diffusers suffix -> official suffix, inside a block prefix such as "layers.3."
_IN_BLOCK = {
    "attn.to_out.0.weight": "attention.out.weight",
    "attn.norm_q.weight": "attention.q_norm.weight",
    "attn.norm_k.weight": "attention.k_norm.weight",
    "feed_forward.linear_1.weight": "feed_forward.w1.weight",
    "feed_forward.linear_2.weight": "feed_forward.w2.weight",
    "feed_forward.linear_3.weight": "feed_forward.w3.weight",
    "norm1.linear.weight": "adaLN_modulation.1.weight",
    "norm1.linear.bias": "adaLN_modulation.1.bias",
    "norm1.norm.weight": "attention_norm1.weight",
    "norm1.weight": "attention_norm1.weight",          # context_refiner (no modulation)
    "norm2.weight": "attention_norm2.weight",
    "ffn_norm1.weight": "ffn_norm1.weight",
    "ffn_norm2.weight": "ffn_norm2.weight",
}
DIFFUSERS_TOP_LEVEL = _TOP_LEVEL     # public: the LoRA key mapper (models/lora) reuses it
_QKV_PARTS = ("attn.to_q.weight", "attn.to_k.weight", "attn.to_v.weight")
_BLOCK = re.compile(r"^((?:layers|noise_refiner|context_refiner)\.\d+\.)(.+)$")


def _cat_rows(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(tensors, dim=0)


def diffusers_to_official(mapping: dict[str, str], shapes: dict[str, tuple[int, ...]],
                          path: Path) -> dict[str, str | Derived]:
    """Turn {diffusers key: stored key} into {official key: stored key or Derived qkv}."""
    out: dict[str, str | Derived] = {}
    unknown: list[str] = []
    qkv_blocks: set[str] = set()
    for name, stored in mapping.items():
        block = _BLOCK.match(name)
        if block:
            prefix, rest = block.groups()
            if rest in _QKV_PARTS:
                qkv_blocks.add(prefix)
            elif rest in _IN_BLOCK:
                out[prefix + _IN_BLOCK[rest]] = stored
            else:
                unknown.append(name)
            continue
        top = next((p for p in _TOP_LEVEL if name.startswith(p)), None)
        if top is None:
            unknown.append(name)
        else:
            out[_TOP_LEVEL[top] + name[len(top):]] = stored
    for prefix in sorted(qkv_blocks):
        parts = [prefix + p for p in _QKV_PARTS]
        absent = [p for p in parts if p not in mapping]
        if absent:
            raise CheckpointError(f"{path}: diffusers-layout NewBie DiT is missing {', '.join(absent)}.")
        rows = sum(shapes[p][0] for p in parts)
        out[prefix + "attention.qkv.weight"] = Derived(
            sources=tuple(mapping[p] for p in parts), combine=_cat_rows, shape=(rows, shapes[parts[0]][1]))
    if unknown:
        raise CheckpointError(f"{path}: diffusers-layout DiT with {len(unknown)} key(s) that NewBie does "
                              f"not have, e.g. {', '.join(unknown[:3])}.")
    return out


_FOREIGN = (  # (test on the key list, description); first match wins
    (lambda ks: any(k.startswith(("double_blocks.", "single_blocks.")) for k in ks),
     "it looks like a FLUX transformer (double_blocks/single_blocks)"),
    (lambda ks: any(k.startswith("single_transformer_blocks.") for k in ks),
     "it looks like a FLUX transformer in diffusers layout"),
    (lambda ks: any(k.startswith("joint_blocks.") for k in ks),
     "it looks like an SD3 MMDiT (joint_blocks)"),
    (lambda ks: any(".input_blocks." in "." + k for k in ks) and any("label_emb" in k for k in ks),
     "it looks like an SDXL checkpoint (input_blocks + label_emb)"),
    (lambda ks: any(".input_blocks." in "." + k for k in ks),
     "it looks like an SD1/SD2 UNet checkpoint (input_blocks)"),
    (lambda ks: any(k.startswith("down_blocks.") for k in ks) and not any("decoder." in k for k in ks),
     "it looks like a diffusers UNet (down_blocks)"),
    (lambda ks: any(re.match(r"(first_stage_model\.)?(en|de)coder\.", k) for k in ks),
     "it looks like a VAE (encoder/decoder)"),
    (lambda ks: any(re.search(r"(^|\.)layers\.\d+\.self_attn\.", k) for k in ks),
     "it looks like a Gemma/LLM text encoder (layers.N.self_attn); load it as the text encoder"),
    (lambda ks: any(("mixer.Wqkv" in k) or k.startswith("roberta.") or "encoder.layer." in k for k in ks),
     "it looks like a Jina CLIP / XLM-RoBERTa text encoder"),
    (lambda ks: "cap_embedder.1.weight" in ks or "time_caption_embed.caption_embedder.1.weight" in ks,
     "it looks like a Lumina-Image 2.0 / Z-Image NextDiT: it has no clip_text_pooled_proj "
     "(the Jina pooled-text projection NewBie needs)"),
)


def detect_foreign(keys: list[str]) -> str:
    """One sentence saying what a non-NewBie key set looks like instead."""
    for test, description in _FOREIGN:
        if test(keys):
            return description + "."
    return f"unknown layout ({len(keys)} tensors, e.g. {', '.join(sorted(keys)[:3])})."
