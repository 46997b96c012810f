"""The knobs of one generation, as frozen dataclasses shared by the CLI and the nodes."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from enum import Enum

import torch

GIB = 1024**3


class StorageDType(str, Enum):
    """How block weights are stored (on the host and when resident); compute is bf16 or fp16."""
    BF16 = "bf16"
    FP16 = "fp16"
    FP8 = "fp8"


COMPUTE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class MemorySettings:
    """One VRAM policy for a whole graph (the Memory Settings node emits one of these).

    ``vram_budget_gb=None`` means auto: what the device has free, minus a margin.
    ``ram_budget_gb=None`` means auto too: available host RAM minus a margin (pipeline.host_ram).
    ``attention_chunk`` / ``ffn_chunk``: 0 lets the planner choose, -1 turns chunking off,
    a positive number forces that many query rows / tokens per chunk.
    ``cuda_graphs``: the sampler replays DiT blocks as CUDA graphs (same kernels and bits, one
    launch per block). None = auto: on where launches, not the GPU, bound a step (see
    ``sample.use_graphs``); False to debug or if a driver misbehaves.
    ``compile``: build the DiT blocks' fused norm/RoPE/gate/SwiGLU kernels with torch.compile
    (``models/dit/fused.py``). None = auto: on with a CUDA GPU and Triton. The first run pays
    the compilation (cached on disk for later runs); False runs the same math eagerly.
    ``fp8_compute``: the blocks' big matmuls on e4m3 operands with ``torch._scaled_mm``
    (``models/dit/fp8_matmul.py``): faster on Ada/Hopper, less precise; off by default.
    ``link_gbps``: the host -> GPU link (GB/s, 1e9 bytes) the sampling plan assumes. None = the
    link measured once on this machine and cached (``placement.bandwidth``); set it to plan for
    another machine's link, or where the probe misjudges a shared one.
    """
    vram_budget_gb: float | None = None
    ram_budget_gb: float | None = None
    attention_chunk: int = 0
    ffn_chunk: int = 0
    fp8_streaming: bool = False
    compute_dtype: str = "bf16"
    vae_tile_px: int = 0            # 0 = choose from the budget, -1 = never tile
    vae_overlap_px: int = 64
    conditioning_cache_dir: str | None = None
    cuda_graphs: bool | None = None
    compile: bool | None = None
    fp8_compute: bool = False
    link_gbps: float | None = None

    def __post_init__(self) -> None:
        if self.vram_budget_gb is not None and self.vram_budget_gb <= 0:
            raise ValueError(f"vram_budget_gb must be positive or None (auto), got {self.vram_budget_gb}.")
        if self.ram_budget_gb is not None and self.ram_budget_gb <= 0:
            raise ValueError(f"ram_budget_gb must be positive or None (auto), got {self.ram_budget_gb}.")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be one of {sorted(COMPUTE_DTYPES)}, got {self.compute_dtype!r}.")
        if self.link_gbps is not None and not (math.isfinite(self.link_gbps) and self.link_gbps > 0):
            raise ValueError(f"link_gbps must be a positive, finite number of GB/s (or None: measured), "
                             f"got {self.link_gbps}.")
        if self.vae_overlap_px < 0 or self.vae_overlap_px % 8:
            raise ValueError(f"vae_overlap_px must be a non-negative multiple of 8, got {self.vae_overlap_px}.")

    @property
    def vram_budget_bytes(self) -> int | None:
        return None if self.vram_budget_gb is None else int(self.vram_budget_gb * GIB)

    @property
    def ram_budget_bytes(self) -> int | None:
        return None if self.ram_budget_gb is None else int(self.ram_budget_gb * GIB)

    @property
    def link_bytes_per_s(self) -> float | None:
        return None if self.link_gbps is None else self.link_gbps * 1e9

    @property
    def torch_compute_dtype(self) -> torch.dtype:
        return COMPUTE_DTYPES[self.compute_dtype]

    def with_budget(self, gb: float | None) -> "MemorySettings":
        return replace(self, vram_budget_gb=gb)


@dataclass(frozen=True)
class SamplingSettings:
    """What the sampler needs beyond the model and the conditioning (spec §5)."""
    steps: int = 28
    cfg: float = 5.0
    shift: float = 6.0
    sampler: str = "euler"
    seed: int = 0
    denoise: float = 1.0
    cfg_renorm: float = 0.0         # official CFG renormalisation; 0 = off
    cfg_trunc: float = 1.0          # CFG only while t < cfg_trunc; 1.0 = always (off)

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}.")
        if not 0.0 < self.denoise <= 1.0:
            raise ValueError(f"denoise must be in (0, 1], got {self.denoise}.")
        if self.cfg < 0:
            raise ValueError(f"cfg must be >= 0, got {self.cfg}.")
        if self.shift <= 0:
            raise ValueError(f"shift must be positive, got {self.shift}.")
