"""Text conditioning as data, and the cache that lets an unchanged prompt skip both encoders.

A :class:`Conditioning` is what the DiT needs from one prompt: Gemma features for its valid
tokens, their mask, and the Jina pooled vector. It lives on the CPU between stages (and between
ComfyUI nodes) until the sampler's plan moves it.

The cache key is every input that changes the result: the exact texts each encoder sees (so the
system prefixes and the compat flag are in it), the max lengths, the dtype, and each encoder
file's identity as (path, size, mtime). Files are never hashed: hashing 9 GB per run would cost
more than encoding.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..file_identity import file_identity

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Conditioning:
    """One prompt's conditioning, trimmed to its valid caption tokens."""
    cap_feats: torch.Tensor   # (L, C_cap) Gemma hidden_states[-2] of the valid tokens
    pooled: torch.Tensor      # (C_pool,) Jina mean-pooled text embedding

    @property
    def length(self) -> int:
        return self.cap_feats.shape[0]

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "Conditioning":
        return Conditioning(self.cap_feats.to(device=device, dtype=dtype), self.pooled.to(device=device, dtype=dtype))


def batch_conditionings(conds: list[Conditioning], device: torch.device | str, dtype: torch.dtype
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad a list of conditionings into the DiT's (cap_feats, cap_mask, pooled) batch."""
    length = max(c.length for c in conds)
    dim = conds[0].cap_feats.shape[-1]
    feats = torch.zeros(len(conds), length, dim, dtype=dtype, device=device)      # (B, L, C)
    mask = torch.zeros(len(conds), length, dtype=torch.bool, device=device)       # (B, L)
    for i, c in enumerate(conds):
        feats[i, : c.length] = c.cap_feats.to(device=device, dtype=dtype)
        mask[i, : c.length] = True
    pooled = torch.stack([c.pooled for c in conds]).to(device=device, dtype=dtype)  # (B, C_pool)
    return feats, mask, pooled


def conditioning_key(gemma_text: str, jina_text: str, *, gemma_max: int, jina_max: int, dtype: str,
                     encoder_files: list[os.PathLike | str]) -> str:
    """A stable hex key for one prompt's conditioning."""
    payload = {
        "gemma": gemma_text, "jina": jina_text, "gemma_max": gemma_max, "jina_max": jina_max,
        "dtype": dtype, "files": [file_identity(p) for p in encoder_files],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


class ConditioningCache:
    """In-process LRU of conditionings, optionally mirrored to a directory of safetensors files."""

    def __init__(self, capacity: int = 64, directory: os.PathLike | str | None = None):
        self.capacity = capacity
        self.directory = Path(directory) if directory else None
        self._items: OrderedDict[str, Conditioning] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: str, directory: os.PathLike | str | None = None) -> Conditioning | None:
        """Memory first, then ``directory`` (or the cache's own) when one is set."""
        folder = Path(directory) if directory else self.directory
        cond = self._items.get(key)
        if cond is None and folder is not None:
            cond = self._read_disk(folder, key)
            if cond is not None:
                self._remember(key, cond)
        if cond is None:
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return cond

    def put(self, key: str, cond: Conditioning, directory: os.PathLike | str | None = None) -> None:
        cond = Conditioning(cond.cap_feats.detach().cpu().contiguous(), cond.pooled.detach().cpu().contiguous())
        self._remember(key, cond)
        folder = Path(directory) if directory else self.directory
        if folder is not None:
            _check_key(key)
            folder.mkdir(parents=True, exist_ok=True)
            tmp = folder / f"{key}.tmp"
            try:
                save_file({"cap_feats": cond.cap_feats, "pooled": cond.pooled}, str(tmp))
                os.replace(tmp, folder / f"{key}.safetensors")   # atomic: a reader never sees half a file
            except OSError as e:   # a full disk costs the disk copy only: the run goes on from memory
                tmp.unlink(missing_ok=True)
                log.warning("could not write the conditioning cache file in %s (%s); continuing without it",
                            folder, e.strerror or e)

    def clear(self) -> None:
        self._items.clear()

    def _remember(self, key: str, cond: Conditioning) -> None:
        self._items[key] = cond
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def _read_disk(self, folder: Path, key: str) -> Conditioning | None:
        _check_key(key)
        path = folder / f"{key}.safetensors"
        if not path.is_file():
            return None
        try:
            tensors = load_file(str(path))
        except (OSError, ValueError, KeyError, SafetensorError) as e:   # a damaged cache file is a miss, not a failure
            log.warning("ignoring unreadable conditioning cache file %s: %s", path, e)
            return None
        if set(tensors) != {"cap_feats", "pooled"} or tensors["cap_feats"].ndim != 2 or tensors["pooled"].ndim != 1:
            log.warning("ignoring conditioning cache file %s: unexpected contents %s", path,
                        {k: tuple(t.shape) for k, t in tensors.items()})
            return None
        return Conditioning(tensors["cap_feats"], tensors["pooled"])


_KEY = re.compile(r"[0-9a-f]{64}")


def _check_key(key: str) -> None:
    """Cache file names are sha256 hex digests and nothing else, so a key can never name a path."""
    if not _KEY.fullmatch(key):
        raise ValueError(f"conditioning cache key {key[:80]!r} is not a sha256 hex digest.")


# The process-wide cache: survives across CLI calls in one process and across ComfyUI node runs.
CONDITIONING_CACHE = ConditioningCache()
