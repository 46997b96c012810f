"""The GPU slot ring: a few block-sized buffers that streamed blocks take turns in.

All slots (and the fp8 staging buffer) are carved out of ONE allocation made up front, on the
main stream, before the stage allocates any activation. One allocation means one segment that
never fragments and is never split by activations; making it first means it sits at the bottom
of the stage's memory, so the predicted ring cost is exactly one rounded segment. Only the
main stream allocates it and only the main stream frees it (after :meth:`CopyEngine.drain`),
which is why no ``record_stream`` is needed for the side stream's writes into it.
"""

from __future__ import annotations

import torch


class SlotRing:
    """``slots`` compute-layout buffers, each with its own fp8 staging buffer when
    ``staging_bytes`` > 0 (the H2D copy lands there; the compute stream upcasts it into the slot)."""

    def __init__(self, slots: int, slot_bytes: int, staging_bytes: int, device: torch.device | str):
        if slots < 1 or slot_bytes <= 0:
            raise ValueError(f"a ring needs at least one slot of positive size, got {slots} x {slot_bytes} bytes.")
        self.n_slots = slots
        self.slot_bytes = slot_bytes
        self.buffer = torch.empty(slots * (slot_bytes + staging_bytes), dtype=torch.uint8, device=device)
        self.slots = [self.buffer[i * slot_bytes:(i + 1) * slot_bytes] for i in range(slots)]
        base = slots * slot_bytes
        self.staging = [self.buffer[base + i * staging_bytes:base + (i + 1) * staging_bytes]
                        for i in range(slots)] if staging_bytes else []
        self.copy_done: list[object] = [None] * slots      # side event: slot holds its next block
        self.compute_done: list[object] = [None] * slots   # main event: compute finished reading it

    @property
    def nbytes(self) -> int:
        return self.buffer.numel()

    def release(self) -> None:
        """Drop every reference (the caller drained the side stream first)."""
        self.slots, self.staging, self.buffer = [], [], None
        self.copy_done, self.compute_done = [], []
