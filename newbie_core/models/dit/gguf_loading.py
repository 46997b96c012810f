"""Open a NewBie DiT stored as GGUF, as ComfyUI-GGUF's convert tool writes it.

ComfyUI-GGUF files a NewBie (or any Lumina 2) DiT under architecture ``lumina2``, with the
official key names (a ``model.diffusion_model.`` prefix is stripped) and GGUF's reversed
dimension order. Its tool leaves the embedders, the refiners, the final layer and every 1-D
tensor unquantised (F32/F16/BF16), and falls back to F16 where a K-quant does not divide the
row, so files are mixed; every tensor is used as stored. NewBie and Lumina 2 share the
architecture name and are told apart by NewBie's ``clip_text_pooled_proj``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..checkpoint import CheckpointError, check_keys, strip_prefix
from ..gguf import GGUFSource, storage_name, summary
from .keymap import detect_foreign

log = logging.getLogger(__name__)

ARCHITECTURE = "lumina2"


def open_dit_gguf(path: Path, prefixes: tuple[str, ...], optional: tuple[str, ...]):
    """-> DiTCheckpoint over a GGUF file (validated like a safetensors one, nothing read)."""
    from .loading import DiTCheckpoint, expected_shapes, infer_config   # loading dispatches here

    raw = GGUFSource(path)
    mapping = strip_prefix(raw.raw_keys(), prefixes)
    arch = raw.architecture
    if arch != ARCHITECTURE:
        newbie_like = {"cap_embedder.1.weight", "clip_text_pooled_proj.0.weight"} <= mapping.keys()
        hint = ("its tensor names are a NewBie DiT's, so convert it again with ComfyUI-GGUF's tool (which "
                "writes 'lumina2')." if newbie_like else detect_foreign(list(mapping)))
        raise CheckpointError(
            f"{path}: a GGUF file of architecture {arch!r}, not a NewBie DiT ('{ARCHITECTURE}' as "
            f"ComfyUI-GGUF writes it); {hint}")
    if "cap_embedder.1.weight" not in mapping or "clip_text_pooled_proj.0.weight" not in mapping:
        raise CheckpointError(f"{path}: a '{ARCHITECTURE}' GGUF but not a NewBie-image DiT: "
                              f"{detect_foreign(list(mapping))}")
    source = raw.with_mapping(mapping)
    config = infer_config(source, path)
    check_keys(expected_shapes(config), source.shapes()).raise_if_bad(
        "NewBie DiT", path, allow_missing=optional)
    block_keys = [k for k in mapping if k.startswith("layers.")]
    storage = storage_name(source, block_keys)
    log.info("opened NewBie DiT GGUF %s (%s; %d blocks; tensors: %s)", path, storage, config.n_blocks,
             summary(raw))
    return DiTCheckpoint(path=path, source=source, config=config, layout="gguf", stored_dtype=torch.bfloat16,
                         storage=storage)
