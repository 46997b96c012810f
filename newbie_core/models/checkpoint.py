"""Lazy, renamed, validated access to safetensors checkpoints.

Every loader in ``newbie_core.models`` reads weights through a :class:`TensorSource`: one or
more ``.safetensors`` files opened with safetensors' lazy ``safe_open`` (memory-mapped, nothing
read until asked), seen through a key mapping that turns whatever layout is on disk (a
``model.diffusion_model.`` prefix, a diffusers port's names, split q/k/v) into the official key
names that our modules use. Nothing here unpickles anything.

Errors are :class:`CheckpointError`, a ``ValueError`` whose message says which file, what was
expected and what was found, because that text is what a ComfyUI user sees in the error dialog.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from .file_format import is_pickle_file, pickle_message

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used, with a message meant for the user."""


# A derived tensor: the official key is built from one or more stored keys by `combine`.
@dataclass(frozen=True)
class Derived:
    sources: tuple[str, ...]
    combine: Callable[[list[torch.Tensor]], torch.Tensor]
    shape: tuple[int, ...]


def _read_header(path: Path) -> dict:
    """Parse a safetensors header ourselves so a truncated file gets a precise message."""
    size = path.stat().st_size
    if is_pickle_file(path):
        raise CheckpointError(pickle_message(path, "checkpoint"))
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes).")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100 * 2**20:
            raise CheckpointError(
                f"{path}: not a safetensors file, or a truncated one: its header claims {n} bytes "
                f"but the file has {size}.")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: the safetensors header is not valid JSON ({e}).") from e
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise CheckpointError(
            f"{path}: the file is truncated: its tensors need {8 + n + end:,} bytes but the file "
            f"has {size:,}. Download it again.")
    return header


class OfficialKeys:
    """What every weight source shares: ``stored`` maps official keys to what the files hold,
    and another mapping gives another view of the same open files."""
    stored: dict

    def with_mapping(self, stored: Mapping) -> "OfficialKeys":
        """The same files seen through another key mapping (no file is reopened)."""
        other = object.__new__(type(self))
        other.__dict__.update(self.__dict__)
        other.stored = dict(stored)
        return other

    def keys(self) -> list[str]:
        return list(self.stored)

    def __contains__(self, key: object) -> bool:
        return key in self.stored

    def __len__(self) -> int:
        return len(self.stored)


class TensorSource(OfficialKeys):
    """A read-only mapping of official key -> tensor over lazily opened safetensors files.

    ``stored`` maps each official key to the stored key it comes from, or to a
    :class:`Derived` recipe. Tensors come back on the CPU in their stored dtype; casting is the
    caller's decision (placement decides storage dtypes).
    """

    def __init__(self, files: Iterable[os.PathLike | str], stored: Mapping[str, str | Derived] | None = None):
        self.files = [Path(p) for p in files]
        self._where: dict[str, Path] = {}
        self._info: dict[str, dict] = {}
        self.metadata: dict[str, str] = {}
        for path in self.files:
            if not path.is_file():
                raise CheckpointError(f"{path}: no such file.")
            header = _read_header(path)
            self.metadata.update(header.pop("__metadata__", None) or {})
            for key, info in header.items():
                self._where[key] = path
                self._info[key] = info
        self.stored: dict[str, str | Derived] = dict(stored) if stored is not None else {k: k for k in self._where}
        self._handles: dict[Path, object] = {}

    # -- what is on disk ------------------------------------------------------------------
    def raw_keys(self) -> list[str]:
        return list(self._where)

    def raw_shape(self, raw_key: str) -> tuple[int, ...]:
        return tuple(self._info[raw_key]["shape"])

    def raw_dtype(self, raw_key: str) -> str:
        """safetensors dtype string, e.g. ``BF16``, ``F8_E4M3``."""
        return self._info[raw_key]["dtype"]

    # -- the official view ----------------------------------------------------------------
    def shape(self, key: str) -> tuple[int, ...]:
        src = self.stored[key]
        return src.shape if isinstance(src, Derived) else self.raw_shape(src)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: self.shape(k) for k in self.stored}

    def nbytes(self, key: str) -> int:
        src = self.stored[key]
        raws = src.sources if isinstance(src, Derived) else (src,)
        return sum(self._info[r]["data_offsets"][1] - self._info[r]["data_offsets"][0] for r in raws)

    def get(self, key: str) -> torch.Tensor:
        src = self.stored[key]
        if isinstance(src, Derived):
            return src.combine([self._get_raw(r) for r in src.sources])
        return self._get_raw(src)

    def _get_raw(self, raw_key: str) -> torch.Tensor:
        path = self._where[raw_key]
        handle = self._handles.get(path)
        if handle is None:
            handle = self._handles[path] = safe_open(str(path), framework="pt", device="cpu")
        return handle.get_tensor(raw_key)

    def close(self) -> None:
        """Drop the memory maps; tensors already returned stay valid."""
        self._handles.clear()


@dataclass
class KeyCheck:
    """Result of comparing a source's keys and shapes with what a model expects."""
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    wrong_shape: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)

    def raise_if_bad(self, what: str, path: os.PathLike | str, allow_missing: Iterable[str] = ()) -> None:
        missing = [k for k in self.missing if k not in set(allow_missing)]
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing tensor(s), e.g. {', '.join(missing[:3])}")
        if self.wrong_shape:
            k, want, got = self.wrong_shape[0]
            problems.append(f"{len(self.wrong_shape)} tensor(s) of the wrong shape, e.g. {k}: "
                            f"expected {list(want)}, found {list(got)}")
        if self.unexpected:
            problems.append(f"{len(self.unexpected)} unexpected tensor(s), e.g. {', '.join(self.unexpected[:3])}")
        if problems:
            raise CheckpointError(f"{path}: not a complete {what} checkpoint: " + "; ".join(problems) + ".")


def check_keys(expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]]) -> KeyCheck:
    check = KeyCheck()
    for key, shape in expected.items():
        if key not in found:
            check.missing.append(key)
        elif tuple(found[key]) != tuple(shape):
            check.wrong_shape.append((key, tuple(shape), tuple(found[key])))
    check.unexpected = [k for k in found if k not in expected]
    return check


def assign_parameter(root: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Replace the (meta) parameter ``name`` by ``tensor`` without copying it."""
    *parents, leaf = name.split(".")
    module = root
    for part in parents:
        module = getattr(module, part)
    setattr(module, leaf, nn.Parameter(tensor, requires_grad=False))


def strip_prefix(keys: Iterable[str], prefixes: Iterable[str]) -> dict[str, str]:
    """Map official key -> stored key, removing the first matching prefix when every key has it."""
    keys = list(keys)
    for prefix in prefixes:
        if keys and all(k.startswith(prefix) for k in keys):
            return {k[len(prefix):]: k for k in keys}
    return {k: k for k in keys}


SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
