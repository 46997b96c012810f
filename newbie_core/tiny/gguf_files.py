"""Tiny GGUF files for tests: a NewBie DiT as ComfyUI-GGUF's convert tool lays it out.

The tool's rules are followed: arch ``lumina2``, official key names, GGUF dims reversed;
embedders, refiners, the final layer and every tensor that is not 2-D stay unquantised (1-D as
F32, the rest F16 or BF16); a matrix whose rows a quant type's block does not divide falls back
to F16. Quantisation goes through models.gguf.quantize (gguf.quants where it can).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T, GGUFWriter

from ..models.dit.config import DiTConfig
from ..models.dit.loading import AXES_METADATA_KEY
from ..models.gguf import spm
from ..models.gguf.quantize import quantize
from .dit import tiny_dit_state

UNQUANTISED_PREFIXES = ("t_embedder.", "x_embedder.", "final_layer.", "cap_embedder.", "context_refiner.",
                        "noise_refiner.")


def dit_tensor_type(name: str, shape: tuple[int, ...], qtype: T) -> T:
    """The type ComfyUI-GGUF's tool gives one DiT tensor when asked for ``qtype``."""
    if len(shape) != 2 or name.startswith(UNQUANTISED_PREFIXES):
        return T.F32 if len(shape) == 1 else T.F16
    if shape[-1] % GGML_QUANT_SIZES[qtype][0]:
        return T.F16
    return qtype


def encode_tensor(value: torch.Tensor, qtype: T) -> tuple[np.ndarray, T | None]:
    """A tensor as the array GGUFWriter stores, and its raw type: F32/F16 as is, else quantised."""
    x = value.float().numpy()
    if qtype is T.F32:
        return x, None
    if qtype is T.F16:
        return x.astype(np.float16), None
    return quantize(x, qtype), qtype


def add_tensor(writer: GGUFWriter, name: str, value: torch.Tensor, qtype: T) -> None:
    array, raw = encode_tensor(value, qtype)
    writer.add_tensor(name, array, raw_dtype=raw)


def write_gguf(path: Path, arch: str, tensors: Mapping[str, torch.Tensor], types: Mapping[str, T],
               strings: Mapping[str, str] = ()) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = GGUFWriter(str(path), arch)
    for key, value in dict(strings).items():
        writer.add_string(key, value)
    return _write_tensors(writer, tensors, types, path)


def write_tiny_dit_gguf(path: Path, qtype: T | str, seed: int = 0, prefix: str = "",
                        drop: tuple[str, ...] = (), arch: str = "lumina2") -> Path:
    """The tiny NewBie DiT quantised to ``qtype`` the way ComfyUI-GGUF would (see module docstring).
    ``drop`` removes keys by prefix (e.g. ``clip_text_pooled_proj.`` makes it look like Lumina 2)."""
    qtype = T[qtype] if isinstance(qtype, str) else T(qtype)
    config = DiTConfig.tiny()
    state = {k: v for k, v in tiny_dit_state(config, seed).items() if not k.startswith(drop)}
    types = {prefix + k: dit_tensor_type(k, tuple(v.shape), qtype) for k, v in state.items()}
    return write_gguf(path, arch, {prefix + k: v for k, v in state.items()}, types,
                      {AXES_METADATA_KEY: json.dumps(list(config.axes_dims))})


# -- Gemma 3, as llama.cpp's converter writes it ------------------------------------------------

_GEMMA_TO_GGUF = {"input_layernorm": "attn_norm", "post_attention_layernorm": "post_attention_norm",
                  "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
                  "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                  "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
                  "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                  "mlp.down_proj": "ffn_down"}


def _gemma_gguf_name(key: str) -> str:
    if key == "model.embed_tokens.weight":
        return "token_embd.weight"
    if key == "model.norm.weight":
        return "output_norm.weight"
    layer, rest = key[len("model.layers."):].split(".", 1)
    return f"blk.{layer}.{_GEMMA_TO_GGUF[rest[:-len('.weight')]]}.weight"


def _wire_fields(data: bytes) -> list[tuple[int, object]]:
    """(field number, value) of one protobuf message: varints as ints, the rest as bytes."""
    def varint(i: int) -> tuple[int, int]:
        value = shift = 0
        while True:
            byte = data[i]
            i += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return value, i
    out, i = [], 0
    while i < len(data):
        key, i = varint(i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = varint(i)
        elif wire == 2:
            n, i = varint(i)
            value, i = data[i:i + n], i + n
        else:
            size = 4 if wire == 5 else 8
            value, i = data[i:i + size], i + size
        out.append((field, value))
    return out


def spm_vocabulary(model_file: Path) -> tuple[list[str], list[float], list[int]]:
    """(pieces, scores, types) of a SentencePiece model, read from its proto as llama.cpp's
    converter reads them (types are SentencePiece's: 1 normal, 2 unknown, 3 control, 4 user
    defined, 5 unused, 6 byte)."""
    pieces, scores, types = [], [], []
    for field, value in _wire_fields(Path(model_file).read_bytes()):
        if field != 1:
            continue
        sub = dict(_wire_fields(value))
        pieces.append(sub[1].decode("utf-8"))
        scores.append(struct.unpack("<f", sub[2])[0] if 2 in sub else 0.0)
        types.append(int(sub.get(3, 1)))
    return pieces, scores, types


def with_gemma_normalizer(model_file: Path) -> bytes:
    """A SentencePiece model's proto with its normaliser (and denormaliser) swapped for Gemma's,
    the one a rebuild from GGUF metadata assumes (models/gguf/spm.py): the reference when another
    model's vocabulary goes through that rebuild."""
    drop = (spm.MODEL_NORMALIZER, spm.MODEL_DENORMALIZER)
    kept = b"".join(spm.length_delimited(f, v) for f, v in _wire_fields(Path(model_file).read_bytes())
                    if f not in drop)
    return kept + spm.length_delimited(spm.MODEL_NORMALIZER, spm.gemma_normalizer())


def gemma_tensor_type(key: str, shape: tuple[int, ...], qtype: T) -> T:
    """The type llama.cpp's converter gives one Gemma tensor (HF ``key``) when asked for ``qtype``:
    norms F32, matrices ``qtype``, F16 where its block does not divide a row."""
    if key.endswith("norm.weight"):
        return T.F32
    return qtype if shape[-1] % GGML_QUANT_SIZES[qtype][0] == 0 else T.F16


GEMMA_SPECIAL_IDS = {"pad": 0, "eos": 1, "bos": 2, "unk": 3}


def add_spm_tokenizer(writer: GGUFWriter, model_file: Path, ids: Mapping[str, int] = GEMMA_SPECIAL_IDS) -> None:
    """A SentencePiece model as llama.cpp's tokenizer metadata; special token ids Gemma's unless
    ``ids`` (keys pad, eos, bos, unk) says otherwise."""
    tokens, scores, token_types = spm_vocabulary(model_file)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(token_types)
    add = {"pad": writer.add_pad_token_id, "eos": writer.add_eos_token_id, "bos": writer.add_bos_token_id,
           "unk": writer.add_unk_token_id}
    for name, token_id in ids.items():
        add[name](token_id)


def write_tiny_gemma_gguf(path: Path, qtype: T | str = T.Q8_0, seed: int = 0) -> Path:
    """The tiny Gemma in llama.cpp's layout: llama.cpp names, norms +1, matrices in ``qtype``
    (F16 where its block does not divide a row), norms F32, tokenizer in the metadata."""
    from .text_encoders import FIXTURES, GEMMA_TINY, tiny_gemma_weights
    qtype = T[qtype] if isinstance(qtype, str) else T(qtype)
    weights = tiny_gemma_weights(seed)
    tensors, types = {}, {}
    for key, value in weights.items():
        name = _gemma_gguf_name(key)
        types[name] = gemma_tensor_type(key, tuple(value.shape), qtype)
        tensors[name] = value.float() + 1.0 if key.endswith("norm.weight") else value
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = GGUFWriter(str(path), "gemma3")
    add_spm_tokenizer(writer, FIXTURES / "gemma_tiny.model")
    writer.add_uint32("gemma3.attention.sliding_window", GEMMA_TINY["sliding_window"])
    writer.add_string("newbie.gemma.query_pre_attn_scalar", json.dumps(GEMMA_TINY["head_dim"]))
    return _write_tensors(writer, tensors, types, path)


def _write_tensors(writer: GGUFWriter, tensors: dict, types: dict, path: Path) -> Path:
    """Add the tensors in their GGUF types, then write header, metadata and data, and close."""
    for name, value in tensors.items():
        add_tensor(writer, name, value, types[name])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
