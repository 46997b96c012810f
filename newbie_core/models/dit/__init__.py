"""The NewBie Next-DiT: configuration, model, estimates and checkpoint loading (spec §2)."""

from .config import ActivationChunks, DiTConfig
from .estimate import AttentionKernel, estimate_activation_bytes, flops_per_forward
from .loading import DiTCheckpoint, build_dit, load_dit_weights, open_dit
from .model import NextDiT

__all__ = [
    "ActivationChunks", "AttentionKernel", "DiTCheckpoint", "DiTConfig", "NextDiT", "build_dit",
    "estimate_activation_bytes", "flops_per_forward", "load_dit_weights", "open_dit",
]
