"""The device-placement core: which block weights live where, and moving them in time.

It knows modules and bytes, not NewBie: a model plugs in through ``block_sequence()`` and a
``block_runner`` attribute (see ``newbie_core.models.blocks``), duck-typed here. Roles:

- planner (``plan_stage``): budget + block sizes + activation estimate -> ``StagePlan``; pure.
- mover (``host_store``, ``copy_engine``, ``ring``, ``fp8``): pinned host buffers and the
  host-RAM cache, the copy stream and its events, GPU ring slots, fp8 upcast into bf16 slots.
- runner (``runner``, ``session``): carries out a plan through the model's runner hook.
- accounting and guard: measured peaks beside predictions; clean failure and OOM retry.
- allocator: which CUDA allocator runs (its fragmentation shapes a plan's activation estimate).
"""

from .accounting import Report, StageRecord, measure_stage
from .allocator import Allocator, active_allocator, use_expandable_segments
from .budget import GiB, MiB, auto_budget, fmt_bytes, parse_bytes, resolve_budget
from .copy_engine import CudaCopyEngine, FakeCopyStream, ImmediateCopyEngine, StreamRaceError, make_engine
from .fp8 import dequantize, quantize
from .guard import PlacementOOMError, free_device_memory, run_with_oom_retry, stage_guard
from .host_store import HOST_CACHE, CacheKey, HostBlockStore, HostCache, HostMode, cache_key, host_ram_peak
from .layout import BlockLayout, default_keep_high_precision
from .plan import BlockSize, Plan, StagePlan, Storage, StorageChoice
from .planner import BudgetTooSmallError, plan_stage
from .session import (ResidentModules, StreamingSession, block_layouts, block_sizes, model_layouts,
                      stream_blocks)

__all__ = [
    "Allocator", "BlockLayout", "BlockSize", "BudgetTooSmallError", "CacheKey", "CudaCopyEngine", "FakeCopyStream",
    "GiB", "active_allocator", "use_expandable_segments",
    "HOST_CACHE", "HostBlockStore", "HostCache", "HostMode", "ImmediateCopyEngine", "MiB", "Plan",
    "PlacementOOMError", "Report", "ResidentModules", "StagePlan", "StageRecord", "Storage", "StorageChoice",
    "StreamRaceError", "StreamingSession", "auto_budget", "block_layouts", "block_sizes", "cache_key",
    "default_keep_high_precision", "dequantize", "fmt_bytes", "free_device_memory", "host_ram_peak",
    "make_engine", "measure_stage", "model_layouts", "parse_bytes", "plan_stage", "quantize",
    "resolve_budget", "run_with_oom_retry", "stage_guard", "stream_blocks",
]
