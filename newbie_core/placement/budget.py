"""VRAM budgets and the caching allocator's rounding, in bytes.

A budget is the most memory torch may hold *reserved* (``torch.cuda.max_memory_reserved``)
during one stage, CUDA context excluded. Reserved, not allocated, because reserved is what
pushes other programs (and ComfyUI's own models) out of the card.

The allocator model follows PyTorch's CUDA caching allocator (c10/cuda/CUDACachingAllocator):
requests are rounded up to 512 B; requests of at most 1 MiB live in 2 MiB segments (the
small pool); larger requests below 10 MiB get 20 MiB segments; requests of 10 MiB or more get
a segment of their own, rounded up to 2 MiB. Buffers the placement core allocates itself
(one per resident block, one for the whole ring) are large, so each costs exactly
``segment_bytes(n)``. Activations are many short-lived tensors of mixed sizes; their
fragmentation is modelled as a fraction of the activation peak plus one large segment of
slack (``ACTIVATION_FRAGMENTATION``, ``ACTIVATION_SLACK``).
"""

from __future__ import annotations

import re

import torch

MiB = 2**20
GiB = 2**30

ALIGN = 256                      # tensor offsets inside packed buffers (cudaMalloc gives >= 256)
ROUND = 512                      # kMinBlockSize
SMALL_SIZE = 1 * MiB             # kSmallSize: at most this goes to the small pool
SMALL_SEGMENT = 2 * MiB          # kSmallBuffer
MIN_LARGE_ALLOC = 10 * MiB       # kMinLargeAlloc
LARGE_SEGMENT = 20 * MiB         # kLargeBuffer
LARGE_ROUND = 2 * MiB            # kRoundLarge

ACTIVATION_FRAGMENTATION = 0.10  # reserved/allocated excess seen for transformer activations
ACTIVATION_SLACK = LARGE_SEGMENT  # one partly used 20 MiB segment
DEFAULT_MARGIN = 512 * MiB       # "auto" leaves this much (or 5 % of the card, if larger) free


def align_up(n: int, a: int) -> int:
    return -(-n // a) * a


def segment_bytes(nbytes: int) -> int:
    """Reserved bytes one standalone allocation of ``nbytes`` costs in the caching allocator."""
    if nbytes <= 0:
        return 0
    size = align_up(nbytes, ROUND)
    if size <= SMALL_SIZE:
        return SMALL_SEGMENT
    if size < MIN_LARGE_ALLOC:
        return LARGE_SEGMENT
    return align_up(size, LARGE_ROUND)


def activation_reserved(activation_bytes: int) -> int:
    """Reserved bytes predicted for a stage whose live activations peak at ``activation_bytes``."""
    if activation_bytes <= 0:
        return 0
    return activation_bytes + int(ACTIVATION_FRAGMENTATION * activation_bytes) + ACTIVATION_SLACK


_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": MiB, "mb": 10**6,
          "mib": MiB, "g": GiB, "gb": 10**9, "gib": GiB}


def parse_bytes(text: str | int | float) -> int:
    """'6GiB', '6.5 GB', '800M', 123 -> bytes. GB means 10**9, GiB 2**30."""
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read {text!r} as a size: expected a number with an optional unit "
                         f"(B, KiB, MiB, GiB, KB, MB, GB), e.g. '6GiB' or '5.5GB'.")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def auto_budget(device: torch.device | str, margin: int | None = None) -> int:
    """Free VRAM for this stage: the driver's free memory, plus what torch holds reserved but
    unused (it is reusable), minus a margin for the other processes and cuBLAS workspaces."""
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"an 'auto' budget needs a CUDA device, got {device}; pass a number of bytes.")
    free, total = torch.cuda.mem_get_info(device)
    reusable = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if margin is None:
        margin = max(DEFAULT_MARGIN, int(0.05 * total))
    return max(0, free + reusable - margin)


def resolve_budget(budget: str | int | float, device: torch.device | str) -> int:
    """'auto' or a size (see :func:`parse_bytes`) -> bytes."""
    if isinstance(budget, str) and budget.strip().lower() == "auto":
        return auto_budget(device)
    value = parse_bytes(budget)
    if value <= 0:
        raise ValueError(f"a VRAM budget must be positive, got {budget!r}.")
    return value


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    if abs(n) >= GiB:
        return f"{n / GiB:.2f} GiB"
    if abs(n) >= MiB:
        return f"{n / MiB:.1f} MiB"
    return f"{n / 2**10:.1f} KiB"
