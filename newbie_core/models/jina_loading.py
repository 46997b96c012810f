"""Open a Jina CLIP v2 text tower (ComfyUI single file or original HF folder) and build it.

Official key names are transformers' ``JinaEmbeddingsV3Model`` ones (``embeddings.*``,
``layers.{i}.self_attn.{q,k,v,o}_proj``, ``post_attention_layernorm``, ``mlp.fc1/fc2``,
``post_mlp_layernorm``). Two stored layouts map onto them (spec §3.2, §3.5):

* ComfyUI ``jina_clip_v2_bf16.safetensors``: ``model.`` keys with a fused ``mixer.Wqkv`` (rows
  q | k | v), ``norm1``/``norm2``, ``emb_ln``; the LoRA is already merged;
* the original jina-clip-v2 ``model.safetensors``: ``text_model.transformer.roberta.`` keys whose
  weights are ``parametrizations.weight.original`` plus per-task ``lora_A``/``lora_B``. We merge
  the ``retrieval.query`` adapter (index 0, scale alpha/rank = 1) as the Jina wrapper applies it:
  linear W + B0 @ A0, embedding W + A0 @ B0, in fp32.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import JinaEmbeddingsV3Config

from .checkpoint import CheckpointError, Derived, TensorSource, assign_parameter, check_keys
from .jina import JinaTextEncoder, make_jina_text_config
from .text_encoder_files import describe_checkpoint, read_json, spiece_bytes
from .tokenizers import JinaTokenizer, jina_tokenizer_from_bytes, tokenizer_from_folder

log = logging.getLogger(__name__)

METADATA_PREFIX = "newbie.jina."
_ORIGINAL_PREFIXES = ("text_model.transformer.roberta.", "roberta.", "")
_PARAM = ".parametrizations.weight.original"
_RENAMES = (("mixer.out_proj", "self_attn.o_proj"), ("norm1", "post_attention_layernorm"),
            ("norm2", "post_mlp_layernorm"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2"))


@dataclass(frozen=True)
class JinaCheckpoint:
    source: TensorSource        # official keys -> stored tensors (lazy, LoRA merged on read)
    config: JinaEmbeddingsV3Config
    tokenizer: JinaTokenizer
    path: Path


@dataclass(frozen=True)
class _Layout:
    """Where a module's weight lives: ``stem`` under ``prefix``, plain or LoRA-parametrised."""
    prefix: str
    lora: bool
    adapter: int = 0
    scale: float = 1.0


def _weight_recipe(src: TensorSource, layout: _Layout, stem: str) -> tuple[tuple[str, ...], Callable, tuple[int, ...]]:
    """Stored keys, a combine function and the shape of ``stem``'s (possibly merged) weight."""
    key = layout.prefix + stem
    if not layout.lora or key + _PARAM not in src.raw_keys():
        return (key + ".weight",), lambda ts: ts[0], src.raw_shape(key + ".weight")
    lora = key + ".parametrizations.weight.0.lora_"
    embedding, idx, scale = "embeddings." in stem, layout.adapter, layout.scale

    def merge(ts: list[torch.Tensor]) -> torch.Tensor:
        w, a, b = (t.float() for t in ts)
        delta = a[idx] @ b[idx] if embedding else b[idx] @ a[idx]  # (rows, cols) either way
        return w + scale * delta

    return (key + _PARAM, lora + "A", lora + "B"), merge, src.raw_shape(key + _PARAM)


def _rows(combine: Callable, start: int, stop: int) -> Callable:
    return lambda ts: combine(ts)[start:stop].clone()  # clone: do not keep the fused tensor alive


def _mapping(src: TensorSource, layout: _Layout, n_layers: int) -> dict[str, str | Derived]:
    p = layout.prefix
    out: dict[str, str | Derived] = {}

    def weight(official: str, stem: str) -> None:
        sources, combine, shape = _weight_recipe(src, layout, stem)
        out[official] = sources[0] if len(sources) == 1 else Derived(sources, combine, shape)

    weight("embeddings.word_embeddings.weight", "embeddings.word_embeddings")
    weight("embeddings.token_type_embeddings.weight", "embeddings.token_type_embeddings")
    out["embeddings.LayerNorm.weight"], out["embeddings.LayerNorm.bias"] = p + "emb_ln.weight", p + "emb_ln.bias"
    for i in range(n_layers):
        stem, dst = f"encoder.layers.{i}.", f"layers.{i}."
        sources, combine, (rows, cols) = _weight_recipe(src, layout, stem + "mixer.Wqkv")
        h = rows // 3
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            out[dst + f"self_attn.{name}.weight"] = Derived(sources, _rows(combine, j * h, (j + 1) * h), (h, cols))
            out[dst + f"self_attn.{name}.bias"] = Derived(
                (p + stem + "mixer.Wqkv.bias",), _rows(lambda ts: ts[0], j * h, (j + 1) * h), (h,))
        for old, new in _RENAMES:
            if old.startswith("norm"):
                out[dst + new + ".weight"] = p + stem + old + ".weight"
            else:
                weight(dst + new + ".weight", stem + old)
            out[dst + new + ".bias"] = p + stem + old + ".bias"
    return out


def _find_layout(src: TensorSource, config_json: dict, path: Path) -> _Layout:
    keys = set(src.raw_keys())
    if "model.encoder.layers.0.mixer.Wqkv.weight" in keys:
        return _Layout(prefix="model.", lora=False)
    for prefix in _ORIGINAL_PREFIXES:
        if prefix + "encoder.layers.0.mixer.Wqkv" + _PARAM in keys:
            text = config_json.get("text_config", {})
            kwargs = {**text.get("hf_model_config_kwargs", {}), **text}
            tasks = kwargs.get("lora_adaptations") or ["retrieval.query"]
            task = kwargs.get("default_lora_task") or "retrieval.query"
            adapter = tasks.index(task) if task in tasks else 0
            rank = src.raw_shape(prefix + "encoder.layers.0.mixer.Wqkv.parametrizations.weight.0.lora_A")[1]
            scale = float(kwargs.get("lora_alpha", rank)) / float(kwargs.get("lora_rank", rank))
            log.info("%s: merging LoRA adapter %d (%s), scale %.3g.", path, adapter, task, scale)
            return _Layout(prefix=prefix, lora=True, adapter=adapter, scale=scale)
    if prefix_match := next((p for p in _ORIGINAL_PREFIXES if p + "encoder.layers.0.mixer.Wqkv.weight" in keys), None):
        return _Layout(prefix=prefix_match, lora=False)
    raise CheckpointError(
        f"{path}: this is not a Jina CLIP v2 text encoder: it looks like {describe_checkpoint(keys)}. "
        "Expected ComfyUI's jina_clip_v2_bf16.safetensors or an HF jina-clip-v2 folder.")


def _heads(src: TensorSource, config_json: dict, hidden: int) -> int:
    if METADATA_PREFIX + "num_attention_heads" in src.metadata:
        return int(json.loads(src.metadata[METADATA_PREFIX + "num_attention_heads"]))
    text = config_json.get("text_config", {})
    for where in (text.get("hf_model_config_kwargs", {}), text):
        if where.get("num_attention_heads"):
            return int(where["num_attention_heads"])
    return max(1, hidden // 64)  # Jina XLM-R: head dim 64 (16 heads at 1024)


def open_jina(path: os.PathLike | str) -> JinaCheckpoint:
    """Validate a Jina CLIP v2 text checkpoint and read its config and tokenizer; no weights loaded."""
    path = Path(path)
    config_json: dict = {}
    if path.is_dir():
        if (path / "config.json").is_file():
            config_json = read_json(path / "config.json")
        single = path / "model.safetensors"
        files = [single] if single.is_file() else sorted(path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{path}: no .safetensors files in this folder.")
        raw = TensorSource(files)
    elif path.is_file():
        raw = TensorSource([path])
    else:
        raise CheckpointError(f"{path}: no such file or folder.")
    layout = _find_layout(raw, config_json, path)
    try:
        if path.is_dir():
            tokenizer = tokenizer_from_folder(path, "jina")
        else:
            tokenizer = jina_tokenizer_from_bytes(spiece_bytes(raw, path))
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from e
    layers = {int(m.group(1)) for k in raw.raw_keys()
              if (m := re.match(re.escape(layout.prefix) + r"encoder\.layers\.(\d+)\.", k))}
    n_layers = max(layers) + 1
    source = raw.with_mapping(_mapping(raw, layout, n_layers))
    vocab, hidden = source.shape("embeddings.word_embeddings.weight")
    config = make_jina_text_config(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=n_layers,
        num_attention_heads=_heads(raw, config_json, hidden),
        intermediate_size=source.shape("layers.0.mlp.fc1.weight")[0],
        type_vocab_size=source.shape("embeddings.token_type_embeddings.weight")[0])
    check_keys(_expected_shapes(config), source.shapes()).raise_if_bad("Jina CLIP v2 text", path)
    if tokenizer.vocab_size > vocab:
        raise CheckpointError(f"{path}: the tokenizer has {tokenizer.vocab_size} ids but the embedding table "
                              f"only {vocab} rows.")
    return JinaCheckpoint(source=source, config=config, tokenizer=tokenizer, path=path)


def _expected_shapes(config: JinaEmbeddingsV3Config) -> dict[str, tuple[int, ...]]:
    encoder = JinaTextEncoder(config)  # meta parameters: shapes only
    return {name: tuple(p.shape) for name, p in encoder.named_parameters()}


def build_jina_encoder(ckpt: JinaCheckpoint, device: torch.device | str = "cpu",
                       dtype: torch.dtype = torch.bfloat16,
                       embed_device: torch.device | str | None = None) -> JinaTextEncoder:
    """Load every weight one tensor at a time; ``embed_device`` may keep the word table on the CPU."""
    device = torch.device(device)
    embed_device = torch.device(embed_device) if embed_device is not None else device
    encoder = JinaTextEncoder(ckpt.config, ckpt.tokenizer)
    for name in [n for n, _ in encoder.named_parameters()]:
        where = embed_device if name.startswith("embeddings.word_embeddings.") else device
        assign_parameter(encoder, name, ckpt.source.get(name).to(device=where, dtype=dtype))
    encoder.rotary_emb.to(device)
    encoder.compute_device = device
    log.info("Jina text encoder: %d layers loaded (%s, %s), word embeddings on %s.",
             ckpt.config.num_hidden_layers, device, dtype, embed_device)
    return encoder.eval()
