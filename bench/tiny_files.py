"""Tiny random checkpoints in a fresh temporary folder: what every bench script's --smoke run
(CPU, CI) samples from, in the real key names and layouts."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from newbie_core.tiny import TinyPaths, build_tiny_checkpoints  # noqa: E402


def tiny_checkpoints(prefix: str) -> TinyPaths:
    """Every tiny layout under a new ``mkdtemp(prefix=prefix)`` folder (``.root``)."""
    return build_tiny_checkpoints(tempfile.mkdtemp(prefix=prefix))
