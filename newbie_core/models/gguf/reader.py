"""Lazy access to a GGUF file's tensors, with the interface of checkpoint.TensorSource.

The file is memory-mapped by ``gguf.GGUFReader``; nothing is read until a tensor is asked for.
Torch shapes are GGUF's dimensions reversed (GGUF lists the fastest-moving dimension first).
Quantised tensors are handed out three ways: :meth:`GGUFSource.get` decodes them to float32 (for
the small always-resident modules), :meth:`GGUFSource.get_stored` gives their packed bytes (for
the blocks, which stay packed in host RAM and across the link and are decoded into the compute
slot), and :meth:`GGUFSource.decode_into` decodes a large one (Gemma's 671 M-element embedding
table) straight into its destination a few rows at a time. Decoded whole, that table passed
through float32 copies and the decoder's temporaries (several GB on a 16 GB PC) on its way to a
1.3 GB bf16 tensor (measured: 5.3 GB beyond the table); chunked, the extra is
:data:`DECODE_TRANSIENT_BYTES` at most (measured: 25 MB). Unquantised tensors (F32, F16, BF16)
come back in the dtype they are stored in.
"""

from __future__ import annotations

import logging
import mmap
import os
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader, GGUFValueType

from ..checkpoint import CheckpointError, OfficialKeys
from .dequant import BLOCK_DECODERS, QUANTISED, block_geometry, dequantize

log = logging.getLogger(__name__)

PLAIN_DTYPES = {T.F32: torch.float32, T.F16: torch.float16, T.BF16: torch.bfloat16}
CODEC_PREFIX = "gguf:"
# decode_into's chunk, in elements, and the host bytes a chunk may hold beside the destination
# (the decoders' float32 temporaries, the chunk's mapped pages, the allocator's slack). Measured
# (VmHWM beyond the table) on Gemma's 262208 x 2560 Q4_K table, 2026-12-02: 24.9 MB at 1 Mi
# elements (2 Mi: 29.3, 4 Mi: 69.6, 8 Mi: 167.5; decoded whole: 5308 MB), so 32 bytes per element.
DECODE_CHUNK_ELEMENTS = 2**20
DECODE_TRANSIENT_BYTES = 32 * DECODE_CHUNK_ELEMENTS


def codec_name(qtype: T) -> str:
    return CODEC_PREFIX + T(qtype).name


def read_fields(reader: GGUFReader) -> dict[str, Any]:
    """Every metadata key -> its Python value (strings, numbers, lists of them)."""
    out: dict[str, Any] = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or not field.types:
            continue
        if field.types[0] == GGUFValueType.ARRAY and field.types[-1] != GGUFValueType.STRING:
            out[name] = [v.item() if hasattr(v, "item") else v for v in field.contents()]
        else:
            value = field.contents()
            out[name] = value.item() if hasattr(value, "item") else value
    return out


class GGUFSource(OfficialKeys):
    """A read-only mapping of official key -> tensor over one GGUF file (see module docstring)."""

    def __init__(self, path: os.PathLike | str, stored: Mapping[str, str] | None = None):
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path}: no such file.")
        try:
            self._reader = GGUFReader(str(path), "r")
        except Exception as e:   # noqa: BLE001 - gguf raises ValueError/struct errors on bad files
            raise CheckpointError(f"{path}: not a readable GGUF file ({e}).") from e
        self.path = path
        self.files = [path]
        self.fields = read_fields(self._reader)
        self.metadata = {k: v for k, v in self.fields.items() if isinstance(v, str)}
        self._tensors = {t.name: t for t in self._reader.tensors}
        self.stored: dict[str, str] = dict(stored) if stored is not None else {k: k for k in self._tensors}
        # official key -> fix-up applied to the (unquantised) tensor, e.g. Gemma's norm offset
        self.adjust: dict[str, Any] = {}

    # -- what is on disk ------------------------------------------------------------------
    @property
    def architecture(self) -> str | None:
        return self.fields.get("general.architecture")

    def raw_keys(self) -> list[str]:
        return list(self._tensors)

    def raw_shape(self, raw_key: str) -> tuple[int, ...]:
        return tuple(int(d) for d in reversed(self._tensors[raw_key].shape.tolist()))

    def raw_type(self, raw_key: str) -> T:
        return T(self._tensors[raw_key].tensor_type)

    def type_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for t in self._tensors.values():
            name = T(t.tensor_type).name
            counts[name] = counts.get(name, 0) + 1
        return counts

    # -- the official view ----------------------------------------------------------------
    def shape(self, key: str) -> tuple[int, ...]:
        return self.raw_shape(self.stored[key])

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: self.shape(k) for k in self.stored}

    def qtype(self, key: str) -> T:
        return self.raw_type(self.stored[key])

    def nbytes(self, key: str) -> int:
        return int(self._tensors[self.stored[key]].n_bytes)

    def packed(self, key: str) -> tuple[str, int] | None:
        """(codec name, packed bytes) for a quantised tensor, None for a plain one."""
        qtype = self.qtype(key)
        return (codec_name(qtype), self.nbytes(key)) if qtype in QUANTISED else None

    def _bytes(self, key: str) -> torch.Tensor:
        t = self._tensors[self.stored[key]]
        qtype = T(t.tensor_type)
        if qtype not in BLOCK_DECODERS:
            raise CheckpointError(f"{self.path}: tensor {t.name} is stored as {qtype.name}, which this pack "
                                  f"cannot decode; supported: {', '.join(q.name for q in BLOCK_DECODERS)}. "
                                  f"Use a file quantised to one of those.")
        raw = np.asarray(t.data).reshape(-1).view(np.uint8)
        with warnings.catch_warnings():   # the map is read-only and nothing here writes to it
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(raw)

    def get_stored(self, key: str) -> torch.Tensor:
        """Packed bytes (1-D uint8, mmap-backed) for a quantised tensor, else the stored tensor."""
        if self.packed(key) is not None:
            return self._bytes(key)
        return self.get(key)

    def get(self, key: str) -> torch.Tensor:
        """The tensor: plain types as stored (mmap-backed), quantised ones decoded to float32."""
        qtype, shape, data = self.qtype(key), self.shape(key), self._bytes(key)
        if qtype in PLAIN_DTYPES:
            tensor = data.view(PLAIN_DTYPES[qtype]).reshape(shape)
        else:
            tensor = dequantize(qtype, data, shape)
        fix = self.adjust.get(key)
        return fix(tensor) if fix is not None else tensor

    def decode_into(self, key: str, out: torch.Tensor) -> None:
        """Fill CPU tensor ``out`` (the key's shape, any float dtype) with the decoded tensor, a
        chunk of whole rows at a time: the same bits as ``get(key).to(out.dtype)``, with at most
        :data:`DECODE_TRANSIENT_BYTES` beside ``out`` (the chunk's mapped pages are dropped
        after it)."""
        shape = self.shape(key)
        if tuple(out.shape) != shape:
            raise ValueError(f"{key}: decode_into needs a tensor of shape {list(shape)}, got {list(out.shape)}.")
        qtype = self.qtype(key)
        per, nbytes = block_geometry(qtype)
        row = int(np.prod(shape[1:])) if len(shape) > 1 else 0
        if qtype not in QUANTISED or key in self.adjust or not row or row % per:
            out.copy_(self.get(key))          # small, plain or fixed-up: decoded whole
            return
        data, flat = self._bytes(key), out.view(shape[0], row)
        step = max(1, DECODE_CHUNK_ELEMENTS // row)
        row_bytes = row // per * nbytes
        for start in range(0, shape[0], step):
            stop = min(shape[0], start + step)
            flat[start:stop].copy_(dequantize(qtype, data[start * row_bytes:stop * row_bytes], (stop - start, row)))
            self.close()

    def close(self) -> None:
        """Drop the mapped pages from this process's resident set (they stay in the page cache,
        and the map stays valid: the next read faults them back in)."""
        mm = getattr(self._reader.data, "_mmap", None)
        if mm is not None and hasattr(mmap, "MADV_DONTNEED"):
            try:
                mm.madvise(mmap.MADV_DONTNEED)
            except (OSError, ValueError) as e:   # not fatal: only the RSS figure stays high
                log.debug("madvise failed on %s: %s", self.path, e)


def summary(source: GGUFSource) -> str:
    counts = source.type_counts()
    return ", ".join(f"{n} {name}" for name, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def storage_name(source: GGUFSource, keys: Iterable[str]) -> str:
    """'gguf-q4_k' style name: the quantised type holding most of ``keys``' elements (a plain
    type when none is quantised)."""
    counts: dict[T, int] = {}
    for k in keys:
        n = 1
        for d in source.shape(k):
            n *= d
        counts[source.qtype(k)] = counts.get(source.qtype(k), 0) + n
    quantised = {q: n for q, n in counts.items() if q in QUANTISED}
    pool = quantised or counts
    top = max(pool, key=pool.get).name if pool else "F16"
    return "gguf-" + top.lower()
