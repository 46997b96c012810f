"""The public entry point: plan -> host store -> ``with stream_blocks(...)`` -> run the model.

Example (a model following the seam in ``newbie_core.models.blocks``)::

    layouts = model_layouts(model, Storage.FP8)
    plan = plan_stage("sample", block_sizes(model), budget, activation_bytes=est, chunk_candidates=c)
    store = HOST_CACHE.get(key, [l.storage for l in layouts], read_block, host_budget)
    with stream_blocks(model, plan, store, device) as session:
        for t in steps:
            v = model(x, t, cond)          # every block goes through session.runner
    log.info(session.bytes_h2d)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .copy_engine import CopyEngine, make_engine
from .fp8_cuda import FusedUpcast
from .graphs import BlockGraphs, CudaGraphBackend, GraphBackend
from .host_store import HostBlockStore
from .layout import (BlockLayout, PackedTensor, block_tensors, compute_layout, default_keep_high_precision,
                     fp8_layout, packed_layout)
from .patches import BlockPatches
from .plan import BlockSize, StagePlan, Storage
from .ring import SlotRing
from .runner import StreamingRunner

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BlockLayouts:
    compute: BlockLayout
    storage: BlockLayout


# Per block of block_sequence(): block-relative tensor name -> how its file holds it packed.
PackedSpec = Sequence[Mapping[str, PackedTensor]]


def block_layouts(block: nn.Module, storage: Storage | str, compute_dtype: torch.dtype = torch.bfloat16,
                  keep_high_precision: Callable[[str, tuple[int, ...]], bool] = default_keep_high_precision,
                  packed: Mapping[str, PackedTensor] | None = None) -> BlockLayouts:
    compute = compute_layout(block_tensors(block, compute_dtype))
    kind = Storage(storage)
    if kind is Storage.FP8:
        stored = fp8_layout(compute, keep_high_precision)
    elif kind is Storage.PACKED:
        if packed is None:
            raise ValueError("packed storage needs the packed tensors of each block (packed=...).")
        stored = packed_layout(compute, packed)
    else:
        stored = compute
    return BlockLayouts(compute, stored)


def model_layouts(model, plan_or_storage: StagePlan | Storage | str, compute_dtype: torch.dtype = torch.bfloat16,
                  keep_high_precision: Callable[[str, tuple[int, ...]], bool] = default_keep_high_precision,
                  packed: PackedSpec | None = None) -> list[BlockLayouts]:
    """Layouts for every block of ``model.block_sequence()``, per block storage from a plan."""
    blocks = model.block_sequence()
    if isinstance(plan_or_storage, StagePlan):
        kinds = plan_or_storage.storage
    else:
        kinds = [Storage(plan_or_storage)] * len(blocks)
    return [block_layouts(b, k, compute_dtype, keep_high_precision, packed[i] if packed is not None else None)
            for i, ((_, b), k) in enumerate(zip(blocks, kinds))]


def block_sizes(model, compute_dtype: torch.dtype = torch.bfloat16,
                keep_high_precision: Callable[[str, tuple[int, ...]], bool] = default_keep_high_precision,
                packed: PackedSpec | None = None) -> list[BlockSize]:
    """The planner's input: packed bytes per block at compute dtype, in fp8 storage, and (when
    the file holds the blocks packed) in the file's packed storage."""
    out = []
    for i, (name, block) in enumerate(model.block_sequence()):
        layouts = block_layouts(block, Storage.FP8, compute_dtype, keep_high_precision)
        packed_bytes = None
        if packed is not None:
            packed_bytes = packed_layout(layouts.compute, packed[i]).nbytes
        out.append(BlockSize(name, layouts.compute.nbytes, layouts.storage.nbytes, packed_bytes))
    return out


class StreamingSession:
    """Installs a StreamingRunner on ``model`` for one stage and takes everything back on exit."""

    def __init__(self, model, plan: StagePlan, store: HostBlockStore | None, device: torch.device | str,
                 engine: CopyEngine | None = None, compute_dtype: torch.dtype = torch.bfloat16,
                 keep_high_precision: Callable[[str, tuple[int, ...]], bool] = default_keep_high_precision,
                 graphs: GraphBackend | bool = False, patches: BlockPatches | None = None,
                 packed: PackedSpec | None = None):
        self.model, self.plan, self.store = model, plan, store
        self.patches = patches if patches else None
        self.graphs = graphs
        self.device = torch.device(device)
        self.engine = engine if engine is not None else make_engine(self.device)
        self.layouts = model_layouts(model, plan, compute_dtype, keep_high_precision, packed)
        self.runner: StreamingRunner | None = None
        self.upcast: FusedUpcast | None = None
        self.ring: SlotRing | None = None
        self.resident: dict[int, torch.Tensor] = {}
        self._prev = None
        self._had_own = False
        self.bytes_h2d = 0

    def __enter__(self) -> "StreamingSession":
        names = tuple(n for n, _ in self.model.block_sequence())
        if names != self.plan.block_names:
            raise ValueError(f"plan {self.plan.stage!r} was made for blocks {self.plan.block_names[:3]}... "
                             f"but the model has {names[:3]}...; plan again for this model.")
        if self.store is not None and [l.storage for l in self.layouts] != self.store.layouts:
            raise ValueError("the host store was built with other block layouts (storage dtype or compute dtype "
                             "differs from the plan); build the store from model_layouts(model, plan).")
        try:
            self._allocate()
        except BaseException:
            self._free()
            raise
        self._had_own = "block_runner" in vars(self.model)
        self._prev = getattr(self.model, "block_runner", None)
        self.model.block_runner = self.runner
        self.runner.start()
        return self

    def _allocate(self) -> None:
        plan = self.plan
        # The buffers below may reuse memory that main-stream work queued before this session still
        # touches: side-stream copies into them start only after that work.
        self.engine.side_wait(self.engine.main_record())
        self.upcast = FusedUpcast([(l.storage, l.compute) for l in self.layouts if l.storage.needs_upcast], self.device)
        if plan.slots:   # the ring first: one segment at the bottom, before any activation
            self.ring = SlotRing(plan.slots, plan.slot_bytes, plan.staging_bytes, self.device)
        if self.patches is not None:   # small factors, kept on the device for the stage
            self.patches.to_device(self.device)
        if plan.resident and self.store is None:
            raise ValueError("the plan keeps blocks resident but no host store was given to load them from.")
        materialized = set(plan.materialized)
        # Blocks resident at compute dtype are plain copies: compute waits for each one just before
        # its first use (the runner's ``ready`` events), so uploading the weights overlaps the first
        # forward. Blocks stored in fp8 or packed pass through upcasts on other streams: those stages wait
        # for every copy up front (drain below).
        lazy = not any(self.layouts[i].storage.needs_upcast for i in plan.resident)
        ready: dict[int, object] = {}
        staging = None
        # fp8 or packed bytes land here, then are upcast into the block's own buffer; a block
        # stored in compute layout is copied straight into it
        decoded = {i for i in materialized if self.layouts[i].storage.needs_upcast}
        if decoded:
            staging = torch.empty(max(self.layouts[i].storage.nbytes for i in decoded),
                                  dtype=torch.uint8, device=self.device)
        for i in plan.resident:
            layouts = self.layouts[i]
            size = layouts.compute.nbytes if i in materialized else layouts.storage.nbytes
            buf = torch.empty(size, dtype=torch.uint8, device=self.device)
            host = self.store.acquire(i, self.engine)
            if i in decoded:   # copy, then upcast on the main stream; the next copy waits for it
                src = staging[: layouts.storage.nbytes]
                self.engine.copy(src, host)
                self.engine.main_wait(self.engine.side_record())
                self.upcast(layouts.storage, layouts.compute, src, buf)
                self.engine.side_wait(self.engine.main_record())
            else:
                self.engine.copy(buf, host)
            copied = self.engine.side_record()
            self.store.release(i, copied)
            if lazy:
                ready[i] = copied
            self.bytes_h2d += layouts.storage.nbytes
            self.resident[i] = buf
        if not lazy:
            self.engine.drain()   # resident weights are in place before any compute reads them
        del staging               # freed on the main stream, after the upcasts that read it
        self.runner = StreamingRunner(plan, [l.compute for l in self.layouts], [l.storage for l in self.layouts],
                                      self.store, self.engine, self.ring, self.resident, self.upcast,
                                      self._block_graphs(), ready, self.patches)

    def _block_graphs(self) -> BlockGraphs | None:
        """``graphs=True`` means CUDA graphs on a CUDA device (off elsewhere); a backend is used as given."""
        if self.graphs is True:
            return BlockGraphs(CudaGraphBackend(self.device)) if self.device.type == "cuda" else None
        return BlockGraphs(self.graphs) if self.graphs else None

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.runner is not None:
            self.bytes_h2d += self.runner.bytes_h2d
            if self._had_own:
                self.model.block_runner = self._prev
            else:
                try:
                    del self.model.block_runner
                except AttributeError:
                    self.model.block_runner = self._prev
        self._free()

    def _free(self) -> None:
        # In-flight copies still write into the ring: the main stream waits for them before the
        # buffers go back to the allocator (which reuses memory in main-stream order).
        self.engine.drain()
        if self.runner is not None:
            self.runner.release()
        if self.ring is not None:
            self.ring.release()
        self.runner, self.ring, self.resident = None, None, {}
        if self.upcast is not None:
            self.upcast.release()
        if self.patches is not None:
            self.patches.release()


def stream_blocks(model, plan: StagePlan, store: HostBlockStore | None, device: torch.device | str,
                  engine: CopyEngine | None = None, **kwargs) -> StreamingSession:
    """Context manager running ``model``'s blocks as ``plan`` says (see module docstring)."""
    return StreamingSession(model, plan, store, device, engine, **kwargs)


class ResidentModules:
    """Small always-resident modules (embedders, final layer): placed whole, counted in bytes."""

    def __init__(self) -> None:
        self._placed: dict[int, tuple[nn.Module, torch.device]] = {}

    def place(self, module: nn.Module, device: torch.device | str, dtype: torch.dtype | None = None) -> nn.Module:
        home = next((t.device for t in module.parameters()), torch.device("cpu"))
        module.to(device=device, dtype=dtype) if dtype is not None else module.to(device=device)
        self._placed[id(module)] = (module, home)
        return module

    def release(self, module: nn.Module | None = None) -> None:
        """Move one module (or all) back to where it came from."""
        keys = [id(module)] if module is not None else list(self._placed)
        for key in keys:
            mod, home = self._placed.pop(key)
            mod.to(home if home.type != "meta" else "cpu")

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for mod, _ in self._placed.values()
                   for t in list(mod.parameters()) + list(mod.buffers()))

    @staticmethod
    def module_bytes(module: nn.Module, dtype: torch.dtype | None = None) -> int:
        """Bytes a module will take once placed (the planner's ``always_resident_bytes``)."""
        total = 0
        for t in list(module.parameters()) + list(module.buffers()):
            size = dtype.itemsize if (dtype is not None and t.is_floating_point()) else t.element_size()
            total += t.numel() * size
        return total
