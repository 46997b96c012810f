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
import sys
from enum import Enum

import torch

log = logging.getLogger(__name__)

_ENV = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")
# Settings this module set at run time. A torch build may not report them back: on the H100 with
# torch 2.11 (2026-12-07) a process that turned expandable segments on here planned for the
# native allocator (fp8 under 2 GB kept 4 blocks resident where expandable segments allow 8).
_set_here: list[str] = []


class Allocator(str, Enum):
    NATIVE = "native"                  # torch's caching allocator, one segment per large request
    EXPANDABLE = "expandable"          # the same with expandable_segments: segments grow in place
    ASYNC = "cudaMallocAsync"          # CUDA's stream-ordered pool


def allocator_settings() -> str:
    """The allocator settings this process runs with (the environment's, or set at run time)."""
    getter = getattr(torch._C, "_accelerator_getAllocatorSettings", None)
    reported = getter() if getter is not None else ",".join(os.environ[k] for k in _ENV if os.environ.get(k))
    return ",".join(part for part in (reported, *(p for p in _set_here if p not in reported)) if part)


def _expandable_requested(settings: str) -> bool:
    options = dict(part.split(":", 1) for part in settings.replace(" ", "").split(",") if ":" in part)
    return options.get("expandable_segments", "").lower() == "true"


def active_allocator(device: torch.device) -> Allocator:
    """The allocator behind ``device``'s allocations, from the process's settings.

    Expandable segments count only where torch can map memory (its CUDA builds for Linux); a
    build without the driver API warns and keeps plain segments, so elsewhere a request for
    them is planned as the native allocator, the larger estimate. Not read back from the
    allocator itself: a snapshot of a process that turned them on at run time listed its
    segments as plain while its peaks were those of expandable ones (H200, torch 2.11: the
    GGUF rows reserved 1.28 GiB where the native allocator reserved 1.60 for the same plan)."""
    if device.type != "cuda" or not torch.cuda.is_available():     # planning for a GPU from a CPU
        return Allocator.NATIVE
    if torch.cuda.memory.get_allocator_backend() == "cudaMallocAsync":
        return Allocator.ASYNC
    supported = sys.platform.startswith("linux") and torch.version.cuda is not None
    return Allocator.EXPANDABLE if supported and _expandable_requested(allocator_settings()) else Allocator.NATIVE


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
    _set_here.append("expandable_segments:True")
    return True
