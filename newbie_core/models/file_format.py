"""What kind of weights file a path is, from its first bytes, without torch and without unpickling.

The loaders accept safetensors (and GGUF where a GGUF loader exists). A PyTorch pickle
(``torch.save``'s zip archive, or a bare pickle stream) must be named as such, not reported as
a "truncated safetensors file": the user needs to fetch the safetensors release, not download
the same file again. Nothing here ever unpickles: loading a pickle can run arbitrary code.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

PICKLE_SUFFIXES = frozenset({".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle"})
_ZIP_MAGIC = b"PK\x03\x04"
_GGUF_MAGIC = b"GGUF"


def sniff_format(path: os.PathLike | str) -> str:
    """'safetensors', 'gguf', 'pickle' or 'unknown' for a file (reads at most 16 bytes)."""
    with Path(path).open("rb") as f:
        head = f.read(16)
    if head.startswith(_GGUF_MAGIC):
        return "gguf"
    if head.startswith(_ZIP_MAGIC) or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5):
        return "pickle"          # torch.save zip archive, or a raw pickle (protocol 2-5)
    if len(head) >= 9:
        (n,) = struct.unpack("<Q", head[:8])
        if 2 <= n < 100 * 2**20 and head[8:9] == b"{":
            return "safetensors"
    return "unknown"


def pickle_message(path: os.PathLike | str, what: str) -> str:
    """The refusal for a pickle in a model slot: what it is, why not, what to use instead."""
    return (f"{what}: {path} is a PyTorch pickle checkpoint ({Path(path).suffix or 'no suffix'}), not safetensors. "
            "This pack never unpickles files, because loading a pickle can run arbitrary code. "
            "Use the .safetensors release of this model (or convert the file on a machine you trust).")


def is_pickle_file(path: os.PathLike | str) -> bool:
    """True when the bytes say pickle, or a pickle suffix holds no safetensors/GGUF data."""
    kind = sniff_format(path)
    return kind == "pickle" or (kind == "unknown" and Path(path).suffix.lower() in PICKLE_SUFFIXES)
