"""GGML block decode on CUDA with Triton (placeholder until the kernels land: torch path)."""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType as T


def try_decode_into(qtype: T, src: torch.Tensor, out: torch.Tensor) -> bool:
    """Decode with a Triton kernel; False when there is none for ``qtype`` (use the torch path)."""
    return False
