"""Tiny GGUF files for tests: a NewBie DiT as ComfyUI-GGUF's convert tool lays it out.

The tool's rules are followed: arch ``lumina2``, official key names, GGUF dims reversed;
embedders, refiners, the final layer and every tensor that is not 2-D stay unquantised (1-D as
F32, the rest F16 or BF16); a matrix whose rows a quant type's block does not divide falls back
to F16. Quantisation goes through models.gguf.quantize (gguf.quants where it can).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T, GGUFWriter

from ..models.dit.config import DiTConfig
from ..models.dit.loading import AXES_METADATA_KEY
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


def add_tensor(writer: GGUFWriter, name: str, value: torch.Tensor, qtype: T) -> None:
    x = value.float().numpy()
    if qtype is T.F32:
        writer.add_tensor(name, x)
    elif qtype is T.F16:
        writer.add_tensor(name, x.astype(np.float16))
    else:
        writer.add_tensor(name, quantize(x, qtype), raw_dtype=qtype)


def write_gguf(path: Path, arch: str, tensors: Mapping[str, torch.Tensor], types: Mapping[str, T],
               strings: Mapping[str, str] = ()) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = GGUFWriter(str(path), arch)
    for key, value in dict(strings).items():
        writer.add_string(key, value)
    for name, value in tensors.items():
        add_tensor(writer, name, value, types[name])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


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
