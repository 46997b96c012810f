"""StreamingRunner: carries out a StagePlan through the model's ``block_runner`` hook.

Every block, resident or streamed, runs with its parameters and buffers bound to views into one
packed buffer (layout.py): the runner points the block's parameter slots at the views, runs it,
and puts the original (e.g. meta) tensors back right after, even when the block raises. That is
what ``torch.func.functional_call`` does, without its per-call bookkeeping: measured on an H200
at 512² without CFG, the host work per block was the bound, not the GPU. The weights are never
moved or copied by this.

Ring schedule. The blocks that use the ring (streamed ones, and fp8 ones kept resident) form a
cycle that repeats every forward. Position ``p`` of that endless sequence is ring block
``p % R`` of forward ``p // R`` (counted from the cycle's origin, after any prologue: below) and
uses slot ``p % S``. Before computing position ``p`` the
runner makes sure positions up to ``p + depth`` were issued. Issuing position ``q``:

1. in a ring without staging buffers (every block at compute dtype), a block is copied straight
   into its slot once ``compute_done[q % S]`` (position ``q - S`` finished with the slot;
   ``depth <= S - 1`` guarantees that compute was already enqueued);
2. an fp8 or packed block is copied into the slot's staging buffer once position ``q - S``'s
   upcast has read it (``copy_done[q % S]``), which is before that position even computes;
   its upcast into the slot then waits for that copy and for ``compute_done[q % S]``. So the
   copy runs up to ``S`` blocks ahead of compute on ``S`` slots at no extra memory (measured on
   an H200 at 1024² CFG under 2 GB, two slots: fp8 121.5 -> 119.0 ms per step; a GGUF Q8_0
   file did not gain until its F16 refiners took this path too, step 4). A resident fp8
   block has nothing to copy: its upcast waits ``compute_done[q % S]`` alone;
3. the event of the last of those becomes ``copy_done[q % S]``;
4. in a ring that has staging buffers, a block stored in compute layout (a GGUF file's F16
   refiners among its quantised blocks) goes through staging too, and a plain device copy on the
   upcast stream moves it into the slot. Copied straight into its slot, its copy waited on the
   copy stream for the compute that last read the slot, and behind the two caption refiners,
   whose compute is tiny, compute then waited for each refiner's bytes (measured on an H200 at
   1024² CFG, Q8_0 under 2 GB: 5.15 ms a step of copy waits, 0.005 ms through staging). The
   planner sizes staging by the largest such block's stored bytes, so it holds them. A prologue
   block stored in compute layout (a GGUF file's F16 caption refiners) is copied straight into
   its slot: it runs once per conditioning, so its wait is paid once, and the staging buffers
   need not hold it.

Blocks that run once per stage (``plan.once``, e.g. a DiT's caption refiners, whose output the
sampler keeps for every step) form a *prologue* ahead of the cycle: positions ``0 .. O-1`` are
the prologue's blocks and the cycle starts at position ``O``, so they stream once and every
forward after them copies only its own blocks. When the caller runs them again (a new
conditioning), the runner starts a new prologue at the next position, as a resync.

Computing position ``p``: main stream waits ``copy_done[p % S]``, runs the block, records
``compute_done[p % S]``, then issues up to ``p + 1 + depth``. Because positions run on across
forwards, the last blocks of one forward prefetch the first blocks of the next. The hot path
never blocks the host: no ``.item()``, no synchronize, only events.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .copy_engine import CopyEngine
from .fp8_cuda import FusedUpcast
from .graphs import BlockGraphs, module_structure
from .host_store import HostBlockStore
from .layout import BlockLayout
from .patches import BlockPatches
from .plan import StagePlan
from .ring import SlotRing

log = logging.getLogger(__name__)


class StreamingRunner:
    """The ``block_runner`` installed by a StreamingSession (see module docstring)."""

    def __init__(self, plan: StagePlan, compute: Sequence[BlockLayout], storage: Sequence[BlockLayout],
                 store: HostBlockStore | None, engine: CopyEngine, ring: SlotRing | None,
                 resident: dict[int, torch.Tensor], upcast: FusedUpcast, graphs: BlockGraphs | None = None,
                 ready: dict[int, Any] | None = None, patches: BlockPatches | None = None):
        self.plan, self.compute, self.storage = plan, list(compute), list(storage)
        self.store, self.engine, self.ring, self.resident = store, engine, ring, resident
        self.order = plan.cycle_blocks              # the ring blocks of every forward
        self.prologue = plan.prologue_blocks        # ring blocks run once, ahead of the cycle
        self.ring_pos = {b: k for k, b in enumerate(self.order)}
        self.prologue_pos = {b: j for j, b in enumerate(self.prologue)}
        self._in_ring = frozenset(plan.ring_blocks)   # prologue and cycle
        self._prologue_at: int | None = 0 if self.prologue else None   # first position of the prologue
        self._origin = len(self.prologue)           # position of the cycle's block 0
        self.depth = plan.prefetch_depth
        self.bytes_h2d = 0
        self._next = 0          # next position to compute
        self._issued = -1       # highest position issued
        self._views: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        self._bindings: dict[tuple, list[tuple[dict, str, torch.Tensor, torch.Tensor]]] = {}
        self._resident_views = {i: compute[i].views(buf) for i, buf in resident.items() if i not in self._in_ring}
        self.upcast = upcast                     # owned (and released) by the session
        self._ready = dict(ready or {})          # resident block -> its copy event, until first use
        self._upcast = [layout.needs_upcast for layout in self.storage]
        # (4): in a ring with staging buffers every cycle block's copy lands there
        staging_bytes = ring.staging[0].numel() if ring is not None and ring.staging else 0
        self._through_staging = [up or (bool(staging_bytes) and i not in self.prologue_pos)
                                 for i, up in enumerate(self._upcast)]
        self.graphs = graphs
        if graphs is not None:
            graphs.new_forward()
        self._last_index = -1
        self._structure: dict[int, int] = {}     # block index -> id of its code structure
        self._structures: dict[object, int] = {}
        # Weight patches (patches.py) go onto a block's compute-layout views once they are there:
        # a resident block's once, at its first use; a ring block's at every use.
        self.patches = patches if patches else None
        self._unpatched = {i for i in self._resident_views if i in patches} if self.patches else set()
        if (self.order or self.prologue) and (ring is None or ring.n_slots < 1):
            raise ValueError("the plan streams blocks but no ring was given.")
        short = [i for i in (*self.prologue, *self.order) if i not in resident and self._through_staging[i]
                 and self.storage[i].nbytes > staging_bytes]
        if short:
            raise ValueError(f"plan {plan.stage!r}: the ring's staging buffers of {staging_bytes:,} bytes cannot "
                             f"hold streamed block {plan.block_names[short[0]]!r} ({self.storage[short[0]].nbytes:,} "
                             f"bytes stored); staging must fit the largest streamed block's stored bytes.")

    # -- hook -----------------------------------------------------------------------------
    def __call__(self, index: int, block: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if self.graphs is not None and index <= self._last_index:
            self.graphs.new_forward()
        self._last_index = index
        views = self._resident_views.get(index)
        if views is not None:
            if self._ready:                      # first use: the block's upload may still be in flight
                self.engine.main_wait(self._ready.pop(index, None))
            if index in self._unpatched:
                self.patches.apply(index, views)
                self._unpatched.discard(index)
            return self._call(index, block, ("resident", index), views, args, kwargs)
        if index not in self._in_ring:
            raise RuntimeError(f"block {index} is neither resident nor streamed in plan {self.plan.stage!r}; "
                               f"the model's block_sequence() changed after planning.")
        if self._block_at(self._next) != index:
            self._resync(index)
        p = self._next
        self.issue_upto(p + self.depth)
        s = p % self.ring.n_slots
        self.engine.main_wait(self.ring.copy_done[s])
        views = self._slot_views(s, index)
        if self.patches is not None and index in self.patches:
            self.patches.apply(index, views)
        out = self._call(index, block, (s, index), views, args, kwargs)
        self.ring.compute_done[s] = self.engine.main_record()
        self._next = p + 1
        self.issue_upto(self._next + self.depth)
        return out

    def start(self) -> None:
        """Issue the first prefetches at once, so they overlap whatever runs before block 0."""
        self.issue_upto(self.depth)

    # -- scheduling -----------------------------------------------------------------------
    def _block_at(self, p: int) -> int | None:
        """The block of position ``p``: the prologue's while it lasts, then the cycle's."""
        at = self._prologue_at
        if at is not None and at <= p < at + len(self.prologue):
            return self.prologue[p - at]
        if not self.order or p < self._origin:
            return None
        return self.order[(p - self._origin) % len(self.order)]

    def issue_upto(self, last: int) -> None:
        while self._issued < last:
            block = self._block_at(self._issued + 1)
            if block is None:           # a prologue with no cycle after it: nothing more to copy
                return
            self._issued += 1
            self._issue(self._issued, block)

    def _issue(self, q: int, block: int) -> None:
        s = q % self.ring.n_slots
        storage, compute, slot = self.storage[block], self.compute[block], self.ring.slots[s]
        if block in self.resident:              # resident fp8: upcast only, once the slot is free
            src = self.resident[block]
            self.ring.copy_done[s] = self.engine.upcast(
                lambda: self.upcast(storage, compute, src, slot), (self.ring.compute_done[s],), writes=[slot])
            return
        through_staging = self._through_staging[block]
        # (1) / (2): a copy into staging waits for the upcast that last read it, a copy straight
        # into the slot for the compute that last read the slot
        self.engine.side_wait(self.ring.copy_done[s] if through_staging else self.ring.compute_done[s])
        host = self.store.acquire(block, self.engine)
        if through_staging:                                       # (2) H2D into staging, upcast stream
            staging = self.ring.staging[s][: storage.nbytes]
            self.engine.copy(staging, host, side_only=True)
            self.store.release(block, copied := self.engine.side_record())
            if self._upcast[block]:
                fill = lambda: self.upcast(storage, compute, staging, slot)      # noqa: E731
            else:
                fill = lambda: slot[: storage.nbytes].copy_(staging)          # noqa: E731
            self.ring.copy_done[s] = self.engine.upcast(                                   # (3)
                fill, (copied, self.ring.compute_done[s]), writes=[slot], reads=[staging])
        else:
            self.engine.copy(slot[: storage.nbytes], host)
            self.store.release(block, self.engine.side_record())
            self.ring.copy_done[s] = self.engine.side_record()    # (3)
        self.bytes_h2d += storage.nbytes

    def _resync(self, block: int) -> None:
        """A forward was cut short (an exception) or started again, or the caller runs the
        prologue again: go on with ``block`` at the position after everything issued so far (a
        prologue block starts a new prologue there). Slot contents are simply re-issued."""
        log.debug("runner %s: resync at block %d (expected %s)", self.plan.stage, block, self._block_at(self._next))
        # Full barrier both ways: the main stream waits for every queued copy, and later copies
        # wait for everything the main stream did, including a failed block whose kernels read
        # a slot but never recorded its compute_done.
        self.engine.drain()
        self.engine.side_wait(self.engine.main_record())
        p = self._issued + 1
        if block in self.prologue_pos:
            self._prologue_at = p - self.prologue_pos[block]
            self._origin = self._prologue_at + len(self.prologue)
        else:
            self._prologue_at = None
            self._origin = p - self.ring_pos[block]
        self._next, self._issued = p, p - 1

    def _slot_views(self, s: int, block: int) -> dict[str, torch.Tensor]:
        key = (s, block)
        views = self._views.get(key)
        if views is None:
            # Made outside inference mode, like the resident views: a view made inside it lacks
            # the autograd dispatch keys, and torch.compile guards on those, so streamed blocks
            # would run other compiled kernels than resident ones (and round differently).
            with torch.inference_mode(False):
                views = self._views[key] = self.compute[block].views(self.ring.slots[s])
        return views

    def _call(self, index: int, block: nn.Module, key: tuple, views: dict[str, torch.Tensor],
              args: tuple, kwargs: dict) -> Any:
        """Run the block, as a graph replay when graphs are on (see graphs.py)."""
        if self.graphs is None or kwargs:
            return self._bound_call(block, key, views, args, kwargs)
        # A resident block's weights have their own addresses; a ring slot serves every block of
        # the same structure, so its graphs are keyed by slot and structure, not by block.
        graph_key = key if key[0] == "resident" else ("slot", key[0], self._structure_id(index, block))
        return self.graphs.run(graph_key, lambda *a: self._bound_call(block, key, views, a, {}), args)

    def _structure_id(self, index: int, block: nn.Module) -> int:
        sid = self._structure.get(index)
        if sid is None:
            struct = (module_structure(block), self.compute[index])
            sid = self._structure[index] = self._structures.setdefault(struct, len(self._structures))
        return sid

    def _bound_call(self, block: nn.Module, key: tuple, views: dict[str, torch.Tensor], args: tuple,
                    kwargs: dict) -> Any:
        """Run ``block`` with its parameter/buffer slots pointing at ``views`` (a few dict stores)."""
        binding = self._bindings.get(key)
        if binding is None:
            binding = self._bindings[key] = _binding(block, views)
        for table, leaf, tensor, _ in binding:
            table[leaf] = tensor
        try:
            return block(*args, **kwargs)
        finally:
            for table, leaf, _, original in binding:
                table[leaf] = original

    def release(self) -> None:
        if self.graphs is not None:
            self.graphs.release()
        self._bindings.clear()
        self._views.clear()
        self._resident_views.clear()


def _binding(block: nn.Module, views: dict[str, torch.Tensor]) -> list[tuple[dict, str, torch.Tensor, torch.Tensor]]:
    """(owning table, leaf name, view, original tensor) for every named parameter and buffer."""
    out = []
    for name, tensor in views.items():
        owner, _, leaf = name.rpartition(".")
        module = block.get_submodule(owner) if owner else block
        table = module._parameters if leaf in module._parameters else module._buffers
        if leaf not in table:
            raise KeyError(f"block has no parameter or buffer {name!r}")
        out.append((table, leaf, tensor, table[leaf]))
    return out
