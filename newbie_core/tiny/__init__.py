"""Tiny, deterministic, random-weight NewBie checkpoints in every real file layout.

The files use the real key names, layouts and formats (ComfyUI single files with embedded
SentencePiece models, HF/diffusers folders), only with small dims. Tests run the real loading
code on them, and the CLI uses them as its embedded default when no model paths are given.
Per-part writers live beside this file; this module assembles them and caches the result.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from .dit import write_tiny_dit
from .lora import write_tiny_loras
from .text_encoders import write_tiny_gemma, write_tiny_jina
from .vae import write_tiny_vae

log = logging.getLogger(__name__)

# Bump when any writer's output changes, so cached copies are rebuilt.
TINY_FORMAT_VERSION = "2"


@dataclass(frozen=True)
class TinyPaths:
    """The ComfyUI-layout files the CLI and the node tests point at, plus every variant."""
    root: Path
    dit: Path
    gemma: Path
    jina: Path
    vae: Path
    variants: dict[str, Path]


def build_tiny_checkpoints(root: os.PathLike | str, seed: int = 0) -> TinyPaths:
    """Write every tiny checkpoint layout under ``root`` (ComfyUI model-folder names)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    variants: dict[str, Path] = {}
    for writer in (write_tiny_dit, write_tiny_gemma, write_tiny_jina, write_tiny_vae, write_tiny_loras):
        variants.update(writer(root, seed=seed))
    return _paths(root, variants)


def default_tiny_checkpoints() -> TinyPaths:
    """The embedded default: built once into the user cache dir, then reused."""
    from platformdirs import user_cache_dir

    root = Path(user_cache_dir("newbie_core")) / f"tiny-v{TINY_FORMAT_VERSION}"
    stamp = root / ".complete"
    if not stamp.exists():
        log.info("building the tiny random-weight default checkpoints in %s", root)
        paths = build_tiny_checkpoints(root)
        stamp.write_text(TINY_FORMAT_VERSION)
        return paths
    return _paths(root, {})


def _paths(root: Path, variants: dict[str, Path]) -> TinyPaths:
    return TinyPaths(
        root=root,
        dit=root / "diffusion_models" / "NewBie-Image-Exp0.1-bf16.safetensors",
        gemma=root / "text_encoders" / "gemma_3_4b_it_bf16.safetensors",
        jina=root / "text_encoders" / "jina_clip_v2_bf16.safetensors",
        vae=root / "vae" / "ae.safetensors",
        variants=variants,
    )
