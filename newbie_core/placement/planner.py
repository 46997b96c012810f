"""The planner: budget + block sizes + activation estimate -> :class:`StagePlan`. Pure, no GPU.

Decisions, and why:

- **Which blocks stay resident: spread evenly over the sequence.** Every streamed block's copy
  then overlaps the compute of the resident blocks around it. A first version kept the last
  blocks resident as one run: while that tail computed, the ring could only prefetch
  ``prefetch_depth`` blocks, so the copies of the streamed head were exposed whenever a block
  copies slower than it computes (measured on an H200 at 512² without CFG, 4 GB budget:
  79 ms per step against a 66 ms copy roofline). The ring wraps around across sampling steps,
  so the next forward's first streamed blocks are prefetched during the previous one's end.
- **What shrinks first as the budget shrinks.** Candidate configurations form one chain, and
  the plan is the first one in the chain that fits. Along the chain every knob only moves one
  way (fewer resident blocks, fewer slots, smaller chunks), so a smaller budget never gives
  more resident blocks or larger chunks: plans are monotone in the budget. When streaming is
  hidden behind compute (the default, and the case measured for the DiT: ~3 ms copy vs ~3.5 ms
  compute per block) residents go first, then the third ring slot, then chunk sizes, since a
  hidden copy costs nothing and a smaller chunk costs every block. When the caller's
  bandwidth and compute figures say copies are *not* hidden, chunks shrink first (and streaming
  then runs on two slots). Measured on an H200 at 512² without CFG under 2 GB, against the
  residents-first order: bf16 8 resident blocks instead of 7, 102.1 ms per step instead of 104.3.
  Upcast-per-use storage (fp8, packed) streams on two slots whatever the link (see "Ring slots").
  How far chunks may shrink for residents is the caller's ``transfer_chunks``: the candidates
  cheap enough to trade for residency. Chunks cost launches, and in many pieces per sequence
  they cost more than the copies the residents save: measured on an H200 at 1024² with CFG (no
  CUDA graphs), through a copy engine throttled to 12 and 25 GB/s, fp8 under 4 GB and Q4_K
  under 2 GB planned 12-piece chunks (384 query rows, 768 FFN tokens) and ran 0.23-0.34 s per
  step, 1.4-2.2x the 0.12-0.18 s their copies and compute projected. Below those candidates
  chunks shrink only once nothing is left resident, to fit at all.
- **fp8 storage with room to spare.** fp8 is a storage format: a resident fp8 block is upcast
  into a ring slot before every use. When the budget allows, resident blocks are instead kept at
  compute dtype, upcast once when placed (*materialized*): same bits, no per-use upcast. The
  fp8 chain therefore starts with every block materialized and gives them up one by one before
  any block streams.
  Below that, blocks stay resident *in fp8* (upcast per use) rather than resident at compute
  dtype with more of the rest streaming: an upcast costs 0.08 ms per 87 M-parameter block (the
  fused kernel, bench/upcast_kernel.py), a streamed block 1.7 ms of copy at 55 GB/s. Measured
  on an H200 at 512² without CFG under 2 GB: 5 blocks at compute dtype + 35 streamed ran
  64.4 ms per step, against 9 resident fp8 + 31 streamed (see BENCHMARKS.md).
- **Blocks that run once per stage** (``once``: the caller keeps their output for every forward,
  as the sampler does with the DiT's caption refiners, which see the conditioning alone) never
  hold VRAM for the stage unless every block fits: they stream through the ring once, ahead of
  the cycle, and residency goes to the blocks every forward runs. They count once in the copy
  bytes, not per forward.
- **Packed storage** (a quantised file's blocks, codecs.py) plans like fp8: sized by the file's
  bytes, decoded into a slot per use, or once when the budget lets a block stay decoded.
- **Blocks stored in compute layout among packed ones** (a GGUF DiT keeps its refiners in F16:
  175 MB against 49 MB for a Q4_K layer) go resident first, and a resident one is kept as it is
  stored (no decode, no ring slot). Resident, any block saves per step the bytes it holds; these
  also size the staging buffers while any of them streams through the ring, so once every one
  that runs per forward is resident the staging shrinks to the quantised blocks' size (Q4_K
  under 2 GB: 120 MiB less per slot). Those that run once copy straight into their slot (runner.py),
  so they never size the staging.
- **Ring slots.** Three slots (prefetch depth 2) absorb jitter; two (depth 1) are the minimum
  for overlap. bf16 blocks copy straight into their slot, so they keep the third slot while
  residents go. fp8 and packed blocks, streamed or resident, are upcast into a slot before each
  use, on a stream of their own; streamed ones land first in the slot's own staging buffer, so
  the copy stream never waits for an upcast of another slot (one shared staging buffer serialised
  copy and upcast: measured at 512² under 2 GB, 61.5 ms per step against a 48.5 ms copy
  roofline), nor for compute: only the upcast into the slot waits for the slot to be free. With
  the staging buffers carrying the copies ahead, a third slot only holds bytes that could keep
  blocks resident, so this storage streams on two slots (``STAGED_SLOTS``). Measured on an H100
  at CFG under 2 GB (bench/ring_slots.py, 2026-12-07), three slots against two: at 1024², where
  copies hide, fp8 122.7 against 122.3 ms per step (1 resident block against 4), Q4_K 123.1
  against 122.4 (0 against 5), Q8_0 123.0 against 123.4 (0 against 2); at 512², where they do
  not, fp8 51.2 against 47.2 and Q8_0 50.9 against 46.8; through a copy engine throttled to
  12 GB/s at 1024², fp8 280.5 against 256.9. The two-slot plans copy 7-21% fewer bytes a step.
  Staging is sized by the largest streamed block's stored bytes, so a block stored at compute
  dtype among packed ones (a GGUF file's F16 refiners) goes through it too (runner.py, step 4).

The predicted peak is analytic (see budget.py for the allocator model), never a measurement.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Sequence

from .budget import activation_reserved, fmt_bytes, segment_bytes
from .plan import BlockSize, StagePlan, Storage, StorageChoice

ChunkPair = tuple[int | None, int | None]

# The ring slots of upcast-per-use storage (fp8, packed) while any block streams: its staging
# buffers carry the copies ahead, so two (module docstring, "Ring slots").
STAGED_SLOTS = 2


class BudgetTooSmallError(ValueError):
    """Even the smallest plan (2 ring slots, smallest chunks, nothing resident) does not fit.

    ``minimum`` is that smallest plan's predicted peak: the OOM retry falls back to it when half
    the budget is below it."""

    def __init__(self, message: str, minimum: int | None = None):
        super().__init__(message)
        self.minimum = minimum


def plan_stage(stage: str, blocks: Sequence[BlockSize], budget: int, *,
               always_resident_bytes: int = 0,
               activation_bytes: Callable[[int | None, int | None], int] | None = None,
               chunk_candidates: Sequence[ChunkPair] = ((None, None),),
               storage: StorageChoice | str = StorageChoice.BF16,
               bandwidth: float | None = None,
               block_compute_s: float | None = None,
               max_slots: int = 3,
               staged_slots: int = STAGED_SLOTS,
               activations_in_own_pool: bool = False,
               once: Collection[int] = (),
               transfer_chunks: Collection[ChunkPair] | None = None,
               allocator: str | None = None) -> StagePlan:
    """Plan one stage.

    ``always_resident_bytes`` is what the small modules take once placed
    (``ResidentModules.module_bytes``). ``activation_bytes(attn_chunk, ffn_chunk)`` is the caller's estimate of the live activation
    peak for those chunk sizes (``None`` = unchunked); ``chunk_candidates`` lists the pairs it
    may choose from. ``bandwidth`` (host->device bytes/s) and ``block_compute_s`` are optional
    measurements; with both, the plan predicts a time per forward and orders its sacrifices.
    ``activations_in_own_pool``: the blocks' activations come from a private pool (CUDA graphs),
    which cannot reuse the segment the one-time upcast of kept blocks staged through, so that
    segment counts on top (measured on an H200 at 512², fp8 resident with graphs: 55 MB above the
    bf16 row, 13 MB above a plan that left it out). ``once``: indices of blocks that run once per
    stage, not per forward (see module docstring). ``transfer_chunks``: the candidates chunks
    may shrink to for residents when copies are slower than compute (default: all of them).
    ``allocator``: the CUDA allocator ``activation_bytes`` was estimated for, shown in the plan.
    ``max_slots`` caps the ring; ``staged_slots`` is the ring of upcast-per-use storage while any
    block streams, whose copies land in per-slot staging buffers (module docstring).
    """
    if not blocks:
        raise ValueError(f"stage {stage!r}: no blocks to plan.")
    if not chunk_candidates:
        raise ValueError(f"stage {stage!r}: chunk_candidates is empty; pass at least ((None, None),).")
    if any(not 0 <= i < len(blocks) for i in once):
        raise ValueError(f"stage {stage!r}: once blocks {sorted(once)} are not all among its {len(blocks)} blocks.")
    act = activation_bytes or (lambda a, f: 0)
    chunks = sorted(chunk_candidates, key=lambda c: -act(*c))   # largest (fastest) first
    allowed = set(chunks if transfer_chunks is None else transfer_chunks) | {chunks[0]}
    # the last candidate, in that order, that a slow link may shrink chunks to for residents
    transfer_last = max(i for i, c in enumerate(chunks) if c in allowed)
    choice = StorageChoice(storage)
    ctx = _Ctx(stage, list(blocks), budget, always_resident_bytes, act, chunks, bandwidth,
               block_compute_s, max_slots, staged_slots, activations_in_own_pool, once, transfer_last)
    if choice is StorageChoice.AUTO:
        first = ctx.evaluate(Storage.BF16, len(blocks), ctx.slots_for(Storage.BF16, len(blocks)), 0, 0)
        kind = Storage.BF16 if first.predicted_peak <= budget else Storage.FP8
    else:
        kind = Storage(choice.value)
    for cfg in ctx.chain(kind):
        plan = ctx.evaluate(kind, *cfg)
        if plan.predicted_peak <= budget:
            return plan if allocator is None else dataclasses.replace(plan, allocator=allocator)
    raise BudgetTooSmallError(ctx.too_small_message(kind), minimum=ctx.smallest(kind).predicted_peak)


def resident_set(n: int, k: int) -> tuple[int, ...]:
    """``k`` of ``n`` block indices, spread evenly (the last block is always among them)."""
    return tuple(i for i in range(n) if (i + 1) * k // n > i * k // n)


class _Ctx:
    """The planner's inputs, and how one configuration turns into a StagePlan."""

    def __init__(self, stage, blocks, budget, fixed, act, chunks, bandwidth, compute_s, max_slots, staged_slots,
                 own_pool, once, transfer_last):
        self.stage, self.blocks, self.budget, self.fixed, self.own_pool = stage, blocks, budget, fixed, own_pool
        self.act, self.chunks, self.bandwidth, self.compute_s = act, chunks, bandwidth, compute_s
        self.max_slots = max(1, max_slots)
        self.staged_slots = max(1, min(max_slots, staged_slots))      # the cap holds for staged storage too
        self.n = len(blocks)
        self.transfer_last = transfer_last
        self.once = frozenset(once)
        self.steady = [i for i in range(self.n) if i not in self.once]     # run by every forward
        # Resident counts, most first: all blocks, then the steady blocks only (once blocks stream)
        self.counts = sorted({self.n, *range(len(self.steady) + 1)}, reverse=True)

    def plain(self, kind: Storage, i: int) -> bool:
        """Whether block ``i`` is stored in compute layout though the stage's storage is decoded
        per use (module docstring): its stored bytes are its compute bytes."""
        return kind.upcast_per_use and self.blocks[i].storage_bytes(kind) >= self.blocks[i].compute_bytes

    def resident(self, kind: Storage, n_resident: int) -> tuple[int, ...]:
        """The resident blocks of a configuration: all of them, or ``n_resident`` of the steady
        blocks: those stored in compute layout first, largest first, the rest spread evenly."""
        if n_resident >= self.n:
            return tuple(range(self.n))
        plain = sorted((i for i in self.steady if self.plain(kind, i)), key=lambda i: -self.blocks[i].compute_bytes)
        first = plain[:n_resident]
        rest = [i for i in self.steady if i not in set(first)]
        return tuple(sorted(first + [rest[j] for j in resident_set(len(rest), n_resident - len(first))]))

    def kept(self, kind: Storage, n_resident: int, n_materialized: int = 0) -> set[int]:
        """Resident blocks kept at compute dtype: ``n_materialized`` of them when all are resident,
        and always those stored in compute layout."""
        if not kind.upcast_per_use:
            return set()
        resident = self.resident(kind, n_resident)
        chosen = set(resident_set(self.n, n_materialized)) if n_resident == self.n else set()
        return chosen | {i for i in resident if self.plain(kind, i)}

    def ring_blocks(self, kind: Storage, n_resident: int, n_materialized: int = 0) -> list[int]:
        if kind.upcast_per_use:
            kept = self.kept(kind, n_resident, n_materialized)
            return [i for i in range(self.n) if i not in kept]
        resident = set(self.resident(kind, n_resident))
        return [i for i in range(self.n) if i not in resident]

    def staged(self, kind: Storage, streamed: Sequence[int]) -> list[int]:
        """The streamed blocks whose copies land in the ring's staging buffers: all of them with
        upcast-per-use storage, except the once blocks stored in compute layout (runner.py)."""
        if not kind.upcast_per_use:
            return []
        return [i for i in streamed if not (i in self.once and self.plain(kind, i))]

    def slots_for(self, kind: Storage, n_resident: int, n_materialized: int = 0) -> int:
        ring = len(self.ring_blocks(kind, n_resident, n_materialized))
        streamed = self.n - n_resident
        if ring == 0:
            return 0
        # Resident fp8 blocks only need an upcast (no H2D): two slots overlap it fully.
        depth = self.staged_slots if kind.upcast_per_use else self.max_slots
        return min(ring, depth if streamed else 2)

    def transfer_bound(self, kind: Storage) -> bool:
        """Whether copies outrun compute on average. The mean block, not the largest: the ring
        copies ahead, so a few larger blocks borrow their neighbours' slack (a GGUF file keeps its
        4 refiner blocks unquantised, 148-167 MiB against 88 MiB for a Q8_0 layer; judged by the
        largest, Q8_0 under 2 GB shrank every block's chunks to the smallest)."""
        if not (self.bandwidth and self.compute_s):
            return False
        steady = self.steady or range(self.n)
        mean = sum(self.blocks[i].storage_bytes(kind) for i in steady) / len(steady)
        return mean / self.bandwidth > self.compute_s

    def chain(self, kind: Storage) -> list[tuple[int, int, int, int]]:
        """Every configuration (n_resident, slots, chunk index, n_materialized), best first; see
        module docstring."""
        n, last, counts = self.n, len(self.chunks) - 1, self.counts
        low = lambda r: min(2, len(self.ring_blocks(kind, r)))   # noqa: E731
        materialized = []
        if kind.upcast_per_use:      # all resident, n..1 of them kept at compute dtype
            materialized = [(n, self.slots_for(kind, n, m), 0, m) for m in range(n, 0, -1)]
        if self.transfer_bound(kind):
            t = self.transfer_last      # chunks shrink this far for residents (plan_stage)
            cfgs = [(n, self.slots_for(kind, n), c, 0) for c in range(t + 1)]
            if kind.upcast_per_use:     # staged_slots: two unless a caller asks for a third
                cfgs += [(r, self.slots_for(kind, r), t, 0) for r in counts[1:]]
                cfgs.append((0, low(0), t, 0))
            else:
                cfgs += [(r, low(r), t, 0) for r in counts[1:]]
            cfgs += [(0, low(0), c, 0) for c in range(t + 1, last + 1)]     # then only to fit at all
            return materialized + cfgs
        cfgs = [(r, self.slots_for(kind, r), 0, 0) for r in counts]
        cfgs += [(0, low(0), c, 0) for c in range(last + 1)]
        return materialized + cfgs

    def evaluate(self, kind: Storage, n_resident: int, slots: int, chunk: int, n_materialized: int) -> StagePlan:
        resident = self.resident(kind, n_resident)
        streamed = [i for i in range(self.n) if i not in set(resident)]
        ring = self.ring_blocks(kind, n_resident, n_materialized)
        kept = tuple(i for i in resident if i not in set(ring)) if kind.upcast_per_use else ()
        slot_bytes = max((self.blocks[i].compute_bytes for i in ring), default=0) if slots else 0
        staging = max((self.blocks[i].storage_bytes(kind) for i in self.staged(kind, streamed)), default=0)
        attn, ffn = self.chunks[chunk]
        act_bytes = self.act(attn, ffn)
        breakdown = (
            ("always-resident modules", self.fixed),
            (f"{n_resident} resident block(s) ({kind.value}"
             + (f", {len(kept)} kept at compute dtype" if kept else "") + ")",
             sum(segment_bytes(self.blocks[i].compute_bytes if i in kept else self.blocks[i].storage_bytes(kind))
                 for i in resident)),
            (f"ring: {slots} slot(s)" + (f" with {kind.value} staging" if staging else ""),
             segment_bytes(slots * (slot_bytes + staging))),
            (f"activations {fmt_bytes(act_bytes)} + allocator overhead", activation_reserved(act_bytes)),
        )
        decoded = [i for i in kept if not self.plain(kind, i)]      # the plain ones copy straight in
        if decoded and self.own_pool:
            breakdown += (("one-time upcast staging (the graph pool cannot reuse it)",
                           segment_bytes(max(self.blocks[i].storage_bytes(kind) for i in decoded))),)
        peak = sum(b for _, b in breakdown)
        step = self.predict_time(kind, streamed)
        return StagePlan(
            stage=self.stage, budget=self.budget, block_names=tuple(b.name for b in self.blocks),
            resident=resident, storage=tuple(kind for _ in self.blocks), slots=slots,
            prefetch_depth=max(0, slots - 1), slot_bytes=slot_bytes, staging_bytes=staging,
            attn_chunk=attn, ffn_chunk=ffn, predicted_peak=peak, breakdown=breakdown,
            reason=self.reason(kind, n_resident, slots, chunk, len(decoded), len(kept) - len(decoded)),
            predicted_step_s=step, materialized=kept,
            bandwidth=self.bandwidth, block_compute_s=self.compute_s, once=tuple(sorted(self.once)))

    def predict_time(self, kind: Storage, streamed: Sequence[int]) -> float | None:
        if not (self.bandwidth and self.compute_s):
            return None
        exposed = sum(max(0.0, self.blocks[i].storage_bytes(kind) / self.bandwidth - self.compute_s)
                      for i in streamed if i not in self.once)
        return len(self.steady) * self.compute_s + exposed

    def reason(self, kind: Storage, n_resident: int, slots: int, chunk: int, n_materialized: int = 0,
               n_plain: int = 0) -> str:
        parts = []
        if n_resident == self.n:
            parts.append(f"all {self.n} blocks fit resident")
        elif n_resident:
            parts.append(f"{n_resident} blocks stay resident, spread evenly so that each of the other "
                         f"{self.n - n_resident} streams while resident blocks compute")
        else:
            parts.append(f"all {self.n} blocks stream")
        if self.once and n_resident < self.n:
            parts.append(f"{len(self.once)} block(s) run once per stage and stream once, ahead of the forwards")
        if kind is Storage.FP8 and n_materialized + n_plain == self.n:
            parts.append("fp8 storage, but every block fits at compute dtype: upcast once when placed")
        elif kind is Storage.FP8:
            parts.append("fp8 storage halves transfer and resident bytes; upcast into a bf16 slot per use"
                         + (f" ({n_materialized} resident blocks upcast once instead)" if n_materialized else ""))
        elif kind is Storage.PACKED and n_materialized + n_plain == self.n:
            parts.append("packed (quantised) storage, but every block fits at compute dtype: decoded once when placed")
        elif kind is Storage.PACKED:
            parts.append("packed (quantised) storage moves and keeps the file's bytes; decoded into a slot per use"
                         + (f" ({n_materialized} resident blocks decoded once instead)" if n_materialized else "")
                         + (f"; {n_plain} resident block(s) stored unquantised, kept as stored" if n_plain else ""))
        if self.transfer_bound(kind) and n_resident < self.n:
            parts.append("copies are slower than compute here, so chunks shrank before residents")
        if chunk:
            parts.append(f"chunks reduced to fit (candidate {chunk + 1} of {len(self.chunks)})")
        else:
            parts.append("largest chunks fit")
        return "; ".join(parts) + "."

    def smallest(self, kind: Storage) -> StagePlan:
        """The last configuration of the chain: nothing resident, two slots, smallest chunks."""
        return self.evaluate(kind, 0, min(2, len(self.ring_blocks(kind, 0))), len(self.chunks) - 1, 0)

    def too_small_message(self, kind: Storage) -> str:
        low = self.smallest(kind)
        largest = max(range(self.n), key=lambda i: self.blocks[i].compute_bytes)
        what = ", ".join(f"{label} {fmt_bytes(b)}" for label, b in low.breakdown)
        return (f"VRAM budget {fmt_bytes(self.budget)} is too small for stage {self.stage!r}: the minimum is "
                f"{fmt_bytes(low.predicted_peak)} ({low.predicted_peak:,} bytes) = {what}. The ring holds "
                f"{low.slots} copies of the largest block {self.blocks[largest].name!r} "
                f"({fmt_bytes(self.blocks[largest].compute_bytes)}). Raise the budget, lower the resolution "
                f"(smaller activations), or allow fp8 storage.")
