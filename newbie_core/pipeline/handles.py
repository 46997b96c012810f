"""Model handles: opened checkpoints plus how to store them. Opening reads headers only.

A handle is what the loader nodes return and what the CLI builds from paths. Nothing touches a
GPU here; weights are read (once, into the host cache) when a stage first needs them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

from ..models.checkpoint import CheckpointError
from ..models.dit import DiTCheckpoint, open_dit
from ..models.gemma_loading import GemmaCheckpoint, open_gemma
from ..models.lora import LoraPatch, LoraSpec
from ..models.jina_loading import JinaCheckpoint, open_jina
from ..models.vae_loading import VaeCheckpoint, open_vae
from .settings import StorageDType


def _existing(path: os.PathLike | str, what: str) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        folder = path.parent if path.parent != Path("") else Path.cwd()
        listing = ", ".join(sorted(p.name for p in folder.iterdir())[:8]) if folder.is_dir() else "(folder missing)"
        raise CheckpointError(f"{what}: {path} does not exist. Looked in {folder.resolve()}: {listing or '(empty)'}.")
    return path


@dataclass(frozen=True)
class DiTHandle:
    ckpt: DiTCheckpoint
    storage: StorageDType = StorageDType.BF16
    loras: tuple[LoraSpec, ...] = ()          # applied in this order by placement (pipeline/lora.py)
    param_patches: tuple[tuple[str, LoraPatch], ...] = ()   # e.g. ComfyUI's patches (comfy_lora.py)

    def with_lora(self, path: os.PathLike | str, strength: float = 1.0) -> "DiTHandle":
        """A handle with one more LoRA (the file is only read when a stage plans)."""
        return replace(self, loras=self.loras + (LoraSpec(str(_existing(path, "LoRA")), float(strength)),))

    def with_param_patches(self, patches: dict[str, list[LoraPatch]]) -> "DiTHandle":
        """A handle with patches by official parameter name added after its LoRA files."""
        pairs = tuple((key, p) for key, ps in patches.items() for p in ps)
        return replace(self, param_patches=self.param_patches + pairs)

    @property
    def files(self) -> tuple[Path, ...]:
        return tuple(self.ckpt.source.files)


@dataclass(frozen=True)
class TextEncoderHandle:
    gemma: GemmaCheckpoint
    jina: JinaCheckpoint
    gemma_storage: StorageDType = StorageDType.BF16

    @property
    def files(self) -> tuple[Path, ...]:
        return tuple(self.gemma.source.files) + tuple(self.jina.source.files)


@dataclass(frozen=True)
class VaeHandle:
    ckpt: VaeCheckpoint
    dtype: str = "bf16"


def load_dit_handle(path: os.PathLike | str, storage: StorageDType | str = StorageDType.BF16) -> DiTHandle:
    return DiTHandle(open_dit(_existing(path, "DiT")), StorageDType(storage))


def load_text_encoder_handle(gemma_path: os.PathLike | str, jina_path: os.PathLike | str,
                             gemma_storage: StorageDType | str = StorageDType.BF16) -> TextEncoderHandle:
    storage = StorageDType(gemma_storage)
    if storage is StorageDType.FP16:
        raise ValueError("Gemma storage must be bf16 or fp8 (Gemma 3 overflows in fp16).")
    return TextEncoderHandle(open_gemma(_existing(gemma_path, "Gemma 3 text encoder")),
                             open_jina(_existing(jina_path, "Jina CLIP v2 text encoder")), storage)


def load_vae_handle(path: os.PathLike | str, dtype: str = "bf16") -> VaeHandle:
    if dtype not in ("bf16", "fp32"):
        raise ValueError(f"VAE dtype must be bf16 or fp32, got {dtype!r}.")
    return VaeHandle(open_vae(_existing(path, "VAE")), dtype)
