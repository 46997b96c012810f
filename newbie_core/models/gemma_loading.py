"""Open a Gemma 3 4B-it checkpoint (ComfyUI single file or HF folder) and build the encoder.

Official key names are ComfyUI's: ``model.embed_tokens.weight``, ``model.layers.{i}.…``,
``model.norm.weight`` (spec §3.5). HF folders store the same tensors under
``language_model.model.`` (older transformers) or ``model.language_model.`` (newer); the vision
tower and projector are ignored. Dimensions come from tensor shapes; what shapes cannot tell
(rope bases, sliding window, ...) comes from the HF config.json, from ``newbie.gemma.*`` entries
of the safetensors ``__metadata__`` (tiny test files), or from the 4B defaults.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import Gemma3TextConfig
from transformers.models.gemma3.modeling_gemma3 import Gemma3DecoderLayer

from .checkpoint import CheckpointError, TensorSource, assign_parameter, check_keys
from .gemma import GemmaTextEncoder, make_gemma3_text_config
from .text_encoder_files import SPIECE_KEY, describe_checkpoint, folder_shards, read_json, spiece_bytes
from .tokenizers import GemmaTokenizer, gemma_tokenizer_from_bytes, tokenizer_from_folder

log = logging.getLogger(__name__)

_PREFIXES = ("language_model.model.", "model.language_model.", "model.")
_MARKER = "model.layers.0.self_attn.q_norm.weight"
METADATA_PREFIX = "newbie.gemma."
# config.json text_config fields that shapes cannot give us.
_CONFIG_FIELDS = ("sliding_window", "sliding_window_pattern", "rope_theta", "rope_local_base_freq",
                  "query_pre_attn_scalar", "rms_norm_eps", "max_position_embeddings", "hidden_activation")


@dataclass(frozen=True)
class GemmaCheckpoint:
    source: TensorSource        # official keys -> stored tensors (lazy); a GGUFSource for .gguf files
    config: Gemma3TextConfig
    tokenizer: GemmaTokenizer
    path: Path

    @property
    def is_packed(self) -> bool:
        """Whether the blocks come packed (a GGUF file) and stay so in placement."""
        return hasattr(self.source, "packed")


def _official_mapping(raw_keys: list[str]) -> dict[str, str]:
    """official key -> stored key, for the text decoder only (vision tower etc. dropped)."""
    mapping = {}
    for key in raw_keys:
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                mapping["model." + key[len(prefix):]] = key
                break
    return mapping


def _config_overrides_from_hf(config_json: dict) -> dict:
    text = config_json.get("text_config", config_json)
    out = {k: text[k] for k in _CONFIG_FIELDS if text.get(k) is not None}
    scaling = text.get("rope_scaling") or {}
    if scaling.get("factor") is not None:
        out["rope_scaling_factor"] = float(scaling["factor"])
    params = text.get("rope_parameters") or {}
    if params.get("full_attention"):
        out["rope_theta"] = params["full_attention"].get("rope_theta", out.get("rope_theta"))
        out["rope_scaling_factor"] = float(params["full_attention"].get("factor", 1.0))
    if params.get("sliding_attention"):
        out["rope_local_base_freq"] = params["sliding_attention"].get("rope_theta")
    return {k: v for k, v in out.items() if v is not None}


def _config_from_shapes(source: TensorSource, overrides: dict, path: Path) -> Gemma3TextConfig:
    vocab, hidden = source.shape("model.embed_tokens.weight")
    layers = {int(m.group(1)) for k in source.keys() if (m := re.match(r"model\.layers\.(\d+)\.", k))}
    n_layers = max(layers) + 1
    if layers != set(range(n_layers)) or n_layers < 2:
        raise CheckpointError(f"{path}: Gemma layers are not numbered 0..N-1 (found {sorted(layers)[:5]}...).")
    (head_dim,) = source.shape(_MARKER)
    dims = dict(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=n_layers, head_dim=head_dim,
        num_attention_heads=source.shape("model.layers.0.self_attn.q_proj.weight")[0] // head_dim,
        num_key_value_heads=source.shape("model.layers.0.self_attn.k_proj.weight")[0] // head_dim,
        intermediate_size=source.shape("model.layers.0.mlp.gate_proj.weight")[0],
    )
    if hidden != 2560 or n_layers != 34:
        log.info("%s: Gemma with hidden %d and %d layers (the real 4B has 2560 and 34).", path, hidden, n_layers)
    return make_gemma3_text_config(**{**overrides, **dims})


def _expected_shapes(config: Gemma3TextConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        layer = Gemma3DecoderLayer(config, 0)
    per_layer = {k: tuple(v.shape) for k, v in layer.state_dict().items()}
    shapes = {"model.embed_tokens.weight": (config.vocab_size, config.hidden_size),
              "model.norm.weight": (config.hidden_size,)}
    for i in range(config.num_hidden_layers):
        shapes.update({f"model.layers.{i}.{k}": s for k, s in per_layer.items()})
    return shapes


def _refuse_if_not_gemma3(path: Path, source: TensorSource, mapping: dict[str, str]) -> None:
    if _MARKER not in mapping or "model.embed_tokens.weight" not in mapping:
        raise CheckpointError(
            f"{path}: this is not a Gemma 3 text encoder: it looks like "
            f"{describe_checkpoint(source.raw_keys())}. Expected ComfyUI's gemma_3_4b_it_bf16.safetensors "
            "or an HF gemma-3-4b-it folder.")


def _open_folder(folder: Path) -> tuple[TensorSource, dict, GemmaTokenizer]:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{folder}: an HF Gemma folder needs config.json; none found.")
    config_json = read_json(config_path)
    model_type = config_json.get("model_type")
    if model_type not in ("gemma3", "gemma3_text"):
        raise CheckpointError(f"{folder}: config.json says model_type={model_type!r}; expected a Gemma 3 "
                              "model ('gemma3' or 'gemma3_text').")
    source = TensorSource(folder_shards(folder))
    try:
        tokenizer = tokenizer_from_folder(folder, "gemma")
    except ValueError as e:
        raise CheckpointError(str(e)) from e
    return source, _config_overrides_from_hf(config_json), tokenizer


def _overrides_from_metadata(metadata: dict[str, str]) -> dict:
    return {k[len(METADATA_PREFIX):]: json.loads(v) for k, v in metadata.items() if k.startswith(METADATA_PREFIX)}


def open_gemma(path: os.PathLike | str) -> GemmaCheckpoint:
    """Validate a Gemma 3 checkpoint and read its config and tokenizer; no weights are loaded."""
    path = Path(path)
    if path.suffix.lower() == ".gguf" and path.is_file():
        return _open_gguf(path)
    if path.is_dir():
        source, overrides, tokenizer = _open_folder(path)
    elif path.is_file():
        source = TensorSource([path])
        overrides, tokenizer = {}, None
    else:
        raise CheckpointError(f"{path}: no such file or folder.")
    mapping = _official_mapping([k for k in source.raw_keys() if k != SPIECE_KEY])
    _refuse_if_not_gemma3(path, source, mapping)
    if tokenizer is None:
        try:
            tokenizer = gemma_tokenizer_from_bytes(spiece_bytes(source, path))
        except ValueError as e:
            raise CheckpointError(f"{path}: {e}") from e
    source = source.with_mapping(mapping)
    config = _config_from_shapes(source, {**overrides, **_overrides_from_metadata(source.metadata)}, path)
    check_keys(_expected_shapes(config), source.shapes()).raise_if_bad("Gemma 3 text encoder", path)
    if tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(f"{path}: the tokenizer has {tokenizer.vocab_size} pieces but the embedding "
                              f"table only {config.vocab_size} rows.")
    return GemmaCheckpoint(source=source, config=config, tokenizer=tokenizer, path=path)


def _open_gguf(path: Path) -> GemmaCheckpoint:
    """A llama.cpp Gemma 3 GGUF (models.gguf.gemma): names, norms, config and tokenizer from it."""
    from .gguf.gemma import config_overrides, open_gemma_source, tokenizer_model_bytes
    source = open_gemma_source(path)
    if _MARKER not in source or "model.embed_tokens.weight" not in source:
        raise CheckpointError(f"{path}: a 'gemma3' GGUF without the Gemma 3 decoder tensors (token_embd, "
                              f"blk.0.attn_q_norm ...); it may be a vision projector (mmproj) file.")
    try:
        tokenizer = gemma_tokenizer_from_bytes(tokenizer_model_bytes(source.fields, path))
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from e
    config = _config_from_shapes(source, config_overrides(source.fields), path)
    check_keys(_expected_shapes(config), source.shapes()).raise_if_bad("Gemma 3 text encoder", path)
    if tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(f"{path}: the tokenizer has {tokenizer.vocab_size} pieces but the embedding "
                              f"table only {config.vocab_size} rows.")
    return GemmaCheckpoint(source=source, config=config, tokenizer=tokenizer, path=path)


def build_gemma_encoder(ckpt: GemmaCheckpoint, device: torch.device | str = "cpu",
                        dtype: torch.dtype = torch.bfloat16,
                        embed_device: torch.device | str | None = None) -> GemmaTextEncoder:
    """Load the first N-1 layers and the embedding, one tensor at a time (no second full copy).

    ``embed_device`` (default: ``device``) may be the CPU: the 1.34 GB table then stays in RAM.
    """
    device = torch.device(device)
    embed_device = torch.device(embed_device) if embed_device is not None else device
    encoder = GemmaTextEncoder(ckpt.config, ckpt.tokenizer)
    names = [name for name, _ in encoder.named_parameters()]
    for name in names:
        where = embed_device if name.startswith("model.embed_tokens.") else device
        assign_parameter(encoder, name, ckpt.source.get(name).to(device=where, dtype=dtype))
    encoder.rotary_emb.to(device)
    encoder.compute_device = device
    log.info("Gemma text encoder: %d of %d layers loaded (%s, %s), embedding on %s.",
             encoder.n_run, ckpt.config.num_hidden_layers, device, dtype, embed_device)
    return encoder.eval()
