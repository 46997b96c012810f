"""What the planner decides for one stage, as frozen data that renders itself as a table."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from .budget import fmt_bytes


# Budgets at or above this mean "no limit" (planning for the CPU, where nothing is budgeted).
UNBOUNDED = 1 << 59


class Storage(str, Enum):
    """How a block's weights are stored between uses. fp8 and packed (codec bytes, e.g. a
    quantised file's blocks) are turned into the compute dtype in a ring slot before each use."""
    BF16 = "bf16"
    FP8 = "fp8"
    PACKED = "packed"

    @property
    def upcast_per_use(self) -> bool:
        return self is not Storage.BF16


class StorageChoice(str, Enum):
    """What the caller allows: always bf16, always fp8, or ``auto``: fp8 only when the bf16 blocks
    cannot all stay resident with the largest chunks. ``packed`` is not a choice but a fact of
    the file (its blocks come packed, see codecs.py)."""
    BF16 = "bf16"
    FP8 = "fp8"
    AUTO = "auto"
    PACKED = "packed"


@dataclass(frozen=True)
class BlockSize:
    """One block's packed size (see layout.py) at compute dtype, in fp8 storage if allowed, and
    in packed storage when its file holds it packed."""
    name: str
    compute_bytes: int
    fp8_bytes: int | None = None
    packed_bytes: int | None = None

    def storage_bytes(self, storage: Storage) -> int:
        if storage is Storage.PACKED:
            if self.packed_bytes is None:
                raise ValueError(f"block {self.name} has no packed size; its file does not hold it packed.")
            return self.packed_bytes
        if storage is Storage.FP8:
            if self.fp8_bytes is None:
                raise ValueError(f"block {self.name} has no fp8 size; pass fp8_bytes or choose bf16 storage.")
            return self.fp8_bytes
        return self.compute_bytes


@dataclass(frozen=True)
class StagePlan:
    """Where every block of one stage lives, and the peak that should cost.

    ``resident`` blocks stay on the GPU for the whole stage; every other block is *streamed*
    through a ring of ``slots`` preallocated GPU buffers, ``prefetch_depth`` blocks ahead.
    fp8 blocks (streamed or resident) are upcast into a ring slot before each use, so they
    also use the ring, except the ``materialized`` ones: resident fp8-stored blocks that the
    budget lets stay at compute dtype, upcast once when placed (the same bits as every-use
    upcasts, none of their cost). ``breakdown`` lists what the predicted peak is made of.
    ``bandwidth`` (host -> device bytes/s) and ``block_compute_s`` are the rates the plan was
    made with, None where the caller had none; with both, ``predicted_step_s`` is known.
    ``once`` blocks run once per stage, before the forwards that repeat (the caller keeps their
    output, e.g. a DiT's caption refiners, which see the conditioning alone): they stream through
    the ring once, ahead of the cycle, and are resident only when every block is. ``allocator``
    names the CUDA allocator the activation estimate was made for (allocator.py), None where the
    caller gave none.
    """
    stage: str
    budget: int
    block_names: tuple[str, ...]
    resident: tuple[int, ...]
    storage: tuple[Storage, ...]
    slots: int
    prefetch_depth: int
    slot_bytes: int
    staging_bytes: int            # per slot: each slot has its own fp8 staging buffer
    attn_chunk: int | None
    ffn_chunk: int | None
    predicted_peak: int
    breakdown: tuple[tuple[str, int], ...]
    reason: str
    predicted_step_s: float | None = None
    materialized: tuple[int, ...] = ()
    bandwidth: float | None = None
    block_compute_s: float | None = None
    once: tuple[int, ...] = ()
    allocator: str | None = None

    @property
    def n_blocks(self) -> int:
        return len(self.block_names)

    @property
    def streamed(self) -> tuple[int, ...]:
        res = set(self.resident)
        return tuple(i for i in range(self.n_blocks) if i not in res)

    @property
    def ring_blocks(self) -> tuple[int, ...]:
        """Blocks that pass through a ring slot: streamed ones and fp8 resident ones (unless
        materialized), in order."""
        res, mat = set(self.resident), set(self.materialized)
        return tuple(i for i in range(self.n_blocks)
                     if i not in res or (self.storage[i].upcast_per_use and i not in mat))

    @property
    def prologue_blocks(self) -> tuple[int, ...]:
        """The ring blocks that run once, ahead of the cycle."""
        once = set(self.once)
        return tuple(i for i in self.ring_blocks if i in once)

    @property
    def cycle_blocks(self) -> tuple[int, ...]:
        """The ring blocks of every forward: the cycle that repeats."""
        once = set(self.once)
        return tuple(i for i in self.ring_blocks if i not in once)

    @property
    def streamed_per_forward(self) -> tuple[int, ...]:
        """The streamed blocks that every forward copies again (the ``once`` blocks copy once)."""
        once = set(self.once)
        return tuple(i for i in self.streamed if i not in once)

    def render(self) -> str:
        n_res, n = len(self.resident), self.n_blocks
        fp8 = sum(s is Storage.FP8 for s in self.storage)
        packed = sum(s is Storage.PACKED for s in self.storage)
        rows = [
            ("stage", self.stage),
            ("budget (peak reserved)", fmt_bytes(self.budget) if self.budget < UNBOUNDED else "none"),
            ("predicted peak", fmt_bytes(self.predicted_peak)),
            ("blocks resident / streamed", f"{n_res} / {n - n_res} of {n}"),
            ("resident range", _ranges(self.resident) or "none"),
            ("storage", f"{fp8} fp8, " + (f"{packed} packed, " if packed else "") + f"{n - fp8 - packed} bf16"
                        + (f"; {len(self.materialized)} {'packed' if packed else 'fp8'} kept at compute dtype (upcast once)"
                           if self.materialized else "")),
            ("ring", f"{self.slots} slot(s) x {fmt_bytes(self.slot_bytes)}, prefetch depth {self.prefetch_depth}"
                     + (f", staging {fmt_bytes(self.staging_bytes)} per slot" if self.staging_bytes else "")),
            ("chunks (attention / ffn)", f"{self.attn_chunk} / {self.ffn_chunk}"),
        ]
        if self.once:
            rows.append(("run once per stage", f"{_ranges(self.once)} (output kept for every forward; "
                                               + ("resident" if set(self.once) <= set(self.resident)
                                                  else "streamed once") + ")"))
        if self.allocator is not None:
            rows.append(("allocator planned for", self.allocator))
        if self.bandwidth is not None and self.block_compute_s is not None:
            rows.append(("rates planned with", f"link {self.bandwidth / 1e9:.1f} GB/s, compute "
                                               f"{self.block_compute_s * 1e3:.2f} ms per block"))
        if self.predicted_step_s is not None:
            rows.append(("predicted time per forward", f"{self.predicted_step_s * 1e3:.1f} ms"))
        rows += [(f"  peak: {label}", fmt_bytes(b)) for label, b in self.breakdown]
        rows.append(("reason", self.reason))
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def _ranges(indices: tuple[int, ...]) -> str:
    parts, start, prev = [], None, None
    for i in indices:
        if start is None:
            start = prev = i
        elif i == prev + 1:
            prev = i
        else:
            parts.append(f"{start}-{prev}" if prev != start else f"{start}")
            start = prev = i
    if start is not None:
        parts.append(f"{start}-{prev}" if prev != start else f"{start}")
    return ", ".join(parts)


@dataclass(frozen=True)
class Plan:
    """The plans of one generation's stages, in order (encode, sample, decode, ...)."""
    stages: tuple[StagePlan, ...] = field(default_factory=tuple)

    def __getitem__(self, stage: str) -> StagePlan:
        for s in self.stages:
            if s.stage == stage:
                return s
        raise KeyError(f"no plan for stage {stage!r}; planned: {[s.stage for s in self.stages]}")

    def render(self) -> str:
        return "\n\n".join(s.render() for s in self.stages)
