"""Which CUDA allocator this process runs, and turning on expandable segments where we may.

A budget counts reserved bytes (budget.py), and how far reserved runs above the live bytes
depends on the allocator. Measured on an H200 at 1024² with CFG under a 2 GB budget (the fp8
and Q4_K rows, bench/activation_memory.py, 2026-12-03), the same run's peaks, live then reserved:

- torch's native caching allocator: 1.23 GiB live, 1.77 GiB reserved. Each large request
  splits a cached segment or takes a new one, and the FFN's 154 MiB tensors and the attention's
  smaller ones leave segments that fit neither;
- the same with ``expandable_segments``: 1.32 GiB reserved. Segments grow in place by mapping
  pages, so freed memory is reused whatever its size;
- ``cudaMallocAsync`` (CUDA's pool, which ComfyUI sets by default on CUDA builds of torch):
  1.59 GiB reserved.

Steps took the same time under all three. So the CLI and the benchmarks turn expandable
segments on (:func:`use_expandable_segments`) unless the user configured the allocator, and a
plan's activation estimate depends on :func:`active_allocator`. Inside ComfyUI the pack leaves
the process's allocator as ComfyUI set it and plans for that one.
"""

from __future__ import annotations

import logging
import os
from enum import Enum

import torch

log = logging.getLogger(__name__)

_ENV = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")


class Allocator(str, Enum):
    NATIVE = "native"                  # torch's caching allocator, one segment per large request
    EXPANDABLE = "expandable"          # the same with expandable_segments: segments grow in place
    ASYNC = "cudaMallocAsync"          # CUDA's stream-ordered pool


def allocator_settings() -> str:
    """The allocator settings this process runs with (the environment's, or set at run time)."""
    getter = getattr(torch._C, "_accelerator_getAllocatorSettings", None)
    if getter is not None:
        return getter()
    return ",".join(os.environ[k] for k in _ENV if os.environ.get(k))


def _expandable_requested(settings: str) -> bool:
    options = dict(part.split(":", 1) for part in settings.replace(" ", "").split(",") if ":" in part)
    return options.get("expandable_segments", "").lower() == "true"


def active_allocator(device: torch.device) -> Allocator:
    """The allocator behind ``device``'s allocations. Expandable segments are asked for in the
    settings but may be unsupported where the process runs (torch then warns and keeps plain
    segments), so a small probe allocation checks that its segment really is expandable."""
    if device.type != "cuda" or not torch.cuda.is_available():     # planning for a GPU from a CPU
        return Allocator.NATIVE
    if torch.cuda.memory.get_allocator_backend() == "cudaMallocAsync":
        return Allocator.ASYNC
    if not _expandable_requested(allocator_settings()):
        return Allocator.NATIVE
    probe = torch.empty(2**20 + 1, dtype=torch.uint8, device=device)   # a large-pool request
    at = probe.data_ptr()
    index = probe.device.index
    for segment in torch.cuda.memory._snapshot()["segments"]:
        if segment["device"] == index and segment["address"] <= at < segment["address"] + segment["total_size"]:
            return Allocator.EXPANDABLE if segment.get("is_expandable") else Allocator.NATIVE
    return Allocator.NATIVE


def use_expandable_segments() -> bool:
    """Turn expandable segments on for this process, unless its allocator was configured
    already (``PYTORCH_CUDA_ALLOC_CONF`` or at run time): the user's choice stands. Call it
    before the first CUDA allocation, so that every segment can grow. Returns whether they
    were asked for, by the user or here."""
    settings = allocator_settings()
    if settings:
        return _expandable_requested(settings)
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None)
    try:
        if setter is not None:
            setter("expandable_segments:True")
        else:
            torch.cuda.memory._set_allocator_settings("expandable_segments:True")
    except (RuntimeError, AttributeError) as e:
        log.debug("could not turn on expandable segments (%s)", e)
        return False
    return True
