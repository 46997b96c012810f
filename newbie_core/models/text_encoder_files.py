"""File-level helpers shared by the Gemma and Jina loaders.

Both loaders accept a ComfyUI single file (weights plus a ``spiece_model`` uint8 tensor holding
the SentencePiece model) or an HF folder (config.json, sharded safetensors, tokenizer files).
What they share lives here: reading the tokenizer bytes out of a tensor, listing a folder's
shards, and naming what a wrong file looks like so the error tells the user which slot it
belongs in.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from .checkpoint import CheckpointError, TensorSource

SPIECE_KEY = "spiece_model"

# (marker key suffix, description); the first match wins, so the order matters.
_KIND_MARKERS: tuple[tuple[str, str], ...] = (
    ("cap_embedder.1.weight", "the NewBie/Lumina 2 diffusion model (DiT)"),
    ("noise_refiner.0.attention.qkv.weight", "a Lumina-family diffusion model (DiT)"),
    ("mixer.Wqkv.weight", "the Jina CLIP v2 text encoder"),
    ("mixer.Wqkv.parametrizations.weight.original", "the original jina-clip-v2 checkpoint"),
    ("decoder.conv_in.weight", "a VAE"),
    ("double_blocks.0.img_attn.qkv.weight", "a FLUX diffusion model"),
    ("self_attn.q_norm.weight", "a Gemma 3 text encoder"),
    ("pre_feedforward_layernorm.weight", "a Gemma 2 text encoder (no QK-norm, not Gemma 3)"),
    ("self_attn.q_proj.weight", "a Llama/Qwen-style language model"),
    ("encoder.block.0.layer.0.SelfAttention.q.weight", "a T5 text encoder"),
    ("text_model.encoder.layers.0.self_attn.q_proj.weight", "a CLIP text encoder"),
)


def describe_checkpoint(keys: Iterable[str]) -> str:
    """A short human name for what a set of keys looks like ("a VAE", ...)."""
    keys = list(keys)
    for marker, what in _KIND_MARKERS:
        if any(k.endswith(marker) for k in keys):
            return what
    return f"an unknown checkpoint ({len(keys)} tensors, e.g. {', '.join(keys[:3])})"


def spiece_bytes(source: TensorSource, path: Path) -> bytes:
    """The SentencePiece model stored as a uint8 tensor (ComfyUI's packaging)."""
    if SPIECE_KEY not in source.raw_keys():
        raise CheckpointError(
            f"{path}: no '{SPIECE_KEY}' tensor, so the tokenizer is missing. Use the ComfyUI "
            "text-encoder file that embeds it, or an HF folder with tokenizer files.")
    tensor = source.with_mapping({SPIECE_KEY: SPIECE_KEY}).get(SPIECE_KEY)
    return tensor.contiguous().numpy().tobytes()


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read this JSON file ({e}).") from e


def folder_shards(folder: Path) -> list[Path]:
    """The safetensors files of an HF folder: the index's shards, else every .safetensors."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(read_json(index).get("weight_map", {}).values()))
        files = [folder / n for n in names]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{folder}: the index lists shard(s) that are missing: {', '.join(missing)}.")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no .safetensors files in this folder.")
    return files
