"""Gemma 3 text encoder from a llama.cpp GGUF file: names, norm offsets, config, tokenizer.

llama.cpp's converter (convert_hf_to_gguf.py, Gemma3Model) renames the decoder's tensors
(``token_embd``, ``blk.N.attn_q`` ..., ``output_norm``) and adds 1 to every RMSNorm weight, since
Gemma's norm computes ``x * (1 + w)`` and llama.cpp's ``x * w``. Our encoder is the transformers
Gemma 3 (``1 + w``), so names go back to transformers' and each norm weight gets 1 subtracted.
Nothing is permuted (llama.cpp only permutes q/k for its ``llama`` architecture).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ..checkpoint import CheckpointError
from .reader import GGUFSource
from .spm import build_spm_model

ARCHITECTURE = "gemma3"

_TOP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}
_BLOCK = {
    "attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_BLOCK_KEY = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.weight$")


def official_name(gguf_name: str) -> str | None:
    """llama.cpp tensor name -> transformers (ComfyUI) name, None for tensors the encoder lacks."""
    if gguf_name in _TOP:
        return _TOP[gguf_name]
    m = _BLOCK_KEY.match(gguf_name)
    if m and m.group(2) in _BLOCK:
        return f"model.layers.{m.group(1)}.{_BLOCK[m.group(2)]}.weight"
    return None


def gemma_mapping(raw_keys: list[str]) -> dict[str, str]:
    return {name: raw for raw in raw_keys if (name := official_name(raw)) is not None}


def is_norm(official: str) -> bool:
    return official.endswith("norm.weight")


def open_gemma_source(path: Path) -> GGUFSource:
    """The GGUF file seen under transformers names, norms shifted back by -1."""
    raw = GGUFSource(path)
    if raw.architecture != ARCHITECTURE:
        raise CheckpointError(
            f"{path}: a GGUF file of architecture {raw.architecture!r}; the NewBie text encoder is Gemma 3 4B "
            f"('{ARCHITECTURE}', e.g. gemma-3-4b-it-Q8_0.gguf from llama.cpp's converter).")
    mapping = gemma_mapping(raw.raw_keys())
    source = raw.with_mapping(mapping)
    source.adjust = {k: (lambda t: t.float() - 1.0) for k in mapping if is_norm(k)}
    for key in source.adjust:
        if source.packed(key) is not None:
            raise CheckpointError(f"{path}: norm weight {mapping[key]} is quantised; llama.cpp keeps norms in "
                                  f"F32. The file is not from a known converter.")
    return source


def config_overrides(fields: dict[str, Any]) -> dict:
    """Gemma3TextConfig fields the GGUF metadata records (shapes give the rest)."""
    a = ARCHITECTURE
    names = {f"{a}.attention.sliding_window": "sliding_window", f"{a}.rope.freq_base": "rope_theta",
             f"{a}.attention.layer_norm_rms_epsilon": "rms_norm_eps",
             f"{a}.context_length": "max_position_embeddings", f"{a}.rope.scaling.factor": "rope_scaling_factor"}
    out = {ours: fields[theirs] for theirs, ours in names.items() if theirs in fields}
    for key, value in fields.items():        # tiny test files: newbie.gemma.<field> = JSON
        if key.startswith("newbie.gemma.") and isinstance(value, str):
            out[key[len("newbie.gemma."):]] = json.loads(value)
    return out


def tokenizer_model_bytes(fields: dict[str, Any], path: Path) -> bytes:
    """The SentencePiece model the GGUF's tokenizer metadata describes (spm.py)."""
    kind = fields.get("tokenizer.ggml.model")
    if kind != "llama" or "tokenizer.ggml.tokens" not in fields:
        raise CheckpointError(f"{path}: the GGUF has no SentencePiece tokenizer (tokenizer.ggml.model is {kind!r}, "
                              f"expected 'llama' with tokenizer.ggml.tokens), so Gemma's tokens cannot be rebuilt.")
    ids = {name: int(fields[f"tokenizer.ggml.{key}_token_id"])
           for name, key in (("unk", "unknown"), ("bos", "bos"), ("eos", "eos"), ("pad", "padding"))
           if f"tokenizer.ggml.{key}_token_id" in fields}
    return build_spm_model(fields["tokenizer.ggml.tokens"], fields.get("tokenizer.ggml.scores"),
                           fields.get("tokenizer.ggml.token_type"), ids)
