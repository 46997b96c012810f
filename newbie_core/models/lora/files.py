"""Reading LoRA files (safetensors only) with the alpha sources beside them, cached per file.

A LoRA is small (MBs to a few hundred MB), so it is read whole into host RAM once and kept in a
small LRU keyed by (path, size, mtime): changing only a strength re-reads neither the LoRA nor
the base model. Alpha can come from three places, in this order of precedence per module:
1. a per-key ``<module>.alpha`` tensor (kohya, LyCORIS);
2. ``adapter_config.json`` beside the file (PEFT, the official trainer's output): ``lora_alpha``
   (and ``alpha_pattern``), ``use_rslora``;
3. the safetensors metadata: ``lora_alpha`` (the official trainer's LoKr) or ``ss_network_alpha``
   (kohya).
Only the first one found is used, so no module is ever scaled twice.
"""

from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ...file_identity import file_identity
from ..checkpoint import CheckpointError, TensorSource

log = logging.getLogger(__name__)

MAX_CACHED_FILES = 8


@dataclass(frozen=True)
class FileAlpha:
    """The file-level alpha sources of one LoRA (see module docstring)."""
    config_alpha: float | None = None
    config_patterns: tuple[tuple[str, float], ...] = ()
    rslora: bool = False
    metadata_alpha: float | None = None
    where: str = "none"

    def for_module(self, module: str) -> float | None:
        for pattern, alpha in self.config_patterns:    # PEFT alpha_pattern: a key suffix match
            if module == pattern or module.endswith("." + pattern):
                return alpha
        return self.config_alpha if self.config_alpha is not None else self.metadata_alpha


@dataclass
class LoraFile:
    path: Path
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    alpha: FileAlpha = field(default_factory=FileAlpha)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def _file_alpha(path: Path, metadata: dict[str, str]) -> FileAlpha:
    config = path.parent / "adapter_config.json"
    meta_alpha = None
    for key in ("lora_alpha", "ss_network_alpha"):
        if key in metadata:
            try:
                meta_alpha = float(metadata[key])
                break
            except ValueError:
                log.warning("%s: metadata %s=%r is not a number; ignored", path, key, metadata[key])
    if config.is_file():
        try:
            cfg = json.loads(config.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{config}: cannot read the PEFT adapter config beside the LoRA ({e}).") from e
        alpha = cfg.get("lora_alpha")
        patterns = tuple((str(k), float(v)) for k, v in (cfg.get("alpha_pattern") or {}).items())
        if alpha is not None:
            return FileAlpha(float(alpha), patterns, bool(cfg.get("use_rslora", False)), meta_alpha,
                             f"{config.name} (lora_alpha {alpha}, r {cfg.get('r')})")
    if meta_alpha is not None:
        return FileAlpha(metadata_alpha=meta_alpha, where=f"safetensors metadata (alpha {meta_alpha:g})")
    return FileAlpha()


_CACHE: OrderedDict[tuple[str, int, int], LoraFile] = OrderedDict()
READS = {"files": 0}     # how many LoRA files were read from disk (tests and reports)


def read_lora(path: os.PathLike | str) -> LoraFile:
    """The LoRA at ``path``, from the cache when the file is unchanged."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"LoRA {path}: no such file.")
    if path.suffix.lower() != ".safetensors":
        raise CheckpointError(f"LoRA {path}: only .safetensors LoRA files are read (no pickle/.ckpt/.pt).")
    key = file_identity(path)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    source = TensorSource([path])
    tensors = {k: source.get(k).clone() for k in source.raw_keys()}   # own memory: the map can go
    source.close()
    READS["files"] += 1
    lora = LoraFile(path, tensors, dict(source.metadata), _file_alpha(path, source.metadata))
    _CACHE[key] = lora
    while len(_CACHE) > MAX_CACHED_FILES:
        _CACHE.popitem(last=False)
    return lora


def clear_cache() -> None:
    _CACHE.clear()
