"""Put one model under a placement plan: the glue between a checkpoint, a model and placement.

Every stage (Gemma, Jina, the DiT) goes through :func:`placed_blocks`: the model is built on the
meta device, its small non-block modules are materialised where the caller says, and its blocks
are handed to placement, which keeps them resident or streams them from the host cache exactly
as the plan says. The block modules themselves stay on meta; their weights only ever exist in
placement's buffers. So there is one code path for every budget.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..models.checkpoint import TensorSource, assign_parameter
from .lora import patched_value
from ..models.gguf import BLOCK_DECODERS, codec_name
from ..models.gguf.dequant import decode_into
from ..models.gguf.triton_dequant import Piece, block_decoder
from ..placement.codecs import register_block_fuser, register_codec
from ..placement.layout import BlockLayout, PackedTensor
from ..placement.patches import BlockPatches, WeightPatch
from ..placement.plan import UNBOUNDED
from ..placement import (HOST_CACHE, BlockSize, StagePlan, StorageChoice, StreamingSession, block_sizes,
                         cache_key, model_layouts, plan_stage, stream_blocks)

log = logging.getLogger(__name__)

# Planning on the CPU: no budget applies, everything is resident.
UNLIMITED = UNBOUNDED

# GGUF blocks stay packed in placement's buffers; placement decodes them through these codecs,
# and whole blocks in one launch where the Triton block kernel applies.
for _qtype in BLOCK_DECODERS:
    register_codec(codec_name(_qtype), lambda src, out, q=_qtype: decode_into(q, src, out))
_QTYPE_OF_CODEC = {codec_name(q): q for q in BLOCK_DECODERS}


def gguf_block_fuser(storage: BlockLayout, compute: BlockLayout, device: torch.device):
    """Placement's layouts as the GGUF block kernel's pieces, or None where it does not apply."""
    dtypes = {c.dtype for c in compute.entries}
    if len(dtypes) != 1:
        return None
    pieces = []
    for s, c in zip(storage.entries, compute.entries):
        if s.codec is None:
            if s.dtype != c.dtype:
                return None
            qtype = None
        else:
            qtype = _QTYPE_OF_CODEC.get(s.codec)
            if qtype is None:
                return None
        pieces.append(Piece(qtype, s.offset, c.offset, c.nbytes // c.dtype.itemsize))
    return block_decoder(pieces, dtypes.pop(), device)


register_block_fuser(gguf_block_fuser)


def decodes_on_host(source, name: str, host_prefixes: Sequence[str]) -> bool:
    """Whether ``name`` is a quantised tensor that stays on the CPU, decoded in chunks straight
    into its tensor (GGUFSource.decode_into); host_ram.host_tensor_bytes counts it by this rule."""
    packed = getattr(source, "packed", None)
    return (name.startswith(tuple(host_prefixes)) and packed is not None and hasattr(source, "decode_into")
            and name in source and packed(name) is not None)


def block_keys(model, source: TensorSource) -> list[list[str]]:
    """For each block of ``model.block_sequence()``, the source keys that belong to it."""
    prefixes = [name + "." for name, _ in model.block_sequence()]
    keys: list[list[str]] = [[] for _ in prefixes]
    lookup = {p: i for i, p in enumerate(prefixes)}
    for key in source.keys():
        parts = key.split(".")
        for cut in range(1, len(parts)):
            i = lookup.get(".".join(parts[:cut]) + ".")
            if i is not None:
                keys[i].append(key)
                break
    return keys


class BlockReader:
    """``read_block(i)`` for placement's host store: block-relative name -> CPU tensor (lazy mmap).
    Sources that hold tensors packed (GGUF) give those as their packed bytes. ``drop_maps`` lets
    the store unmap the file between reads (host_store.py says why)."""

    def __init__(self, model, source: TensorSource):
        self.names = [name for name, _ in model.block_sequence()]
        self.keys = block_keys(model, source)
        self.source = source
        self._get = getattr(source, "get_stored", source.get)

    def __call__(self, index: int) -> dict[str, torch.Tensor]:
        cut = len(self.names[index]) + 1
        return {k[cut:]: self._get(k) for k in self.keys[index]}

    def drop_maps(self) -> None:
        self.source.close()


def block_reader(model, source: TensorSource) -> Callable[[int], dict[str, torch.Tensor]]:
    return BlockReader(model, source)


def packed_spec(model, source: TensorSource) -> list[dict[str, PackedTensor]] | None:
    """Per block, the tensors its source holds packed (GGUF quantised), or None for none at all."""
    packed = getattr(source, "packed", None)
    if packed is None:
        return None
    names = [name for name, _ in model.block_sequence()]
    spec = []
    for name, keys in zip(names, block_keys(model, source)):
        cut = len(name) + 1
        spec.append({k[cut:]: PackedTensor(*p) for k in keys if (p := packed(k)) is not None})
    return spec


def stored_block_bytes(model, plan: StagePlan, dtype: torch.dtype, source: TensorSource | None = None) -> list[int]:
    """Each block's bytes as ``plan`` stores them (compute dtype, fp8, or a packed ``source``'s
    own bytes): what its host copy holds and what one copy of it moves."""
    packed = packed_spec(model, source) if source is not None and plan.storage[0].value == "packed" else None
    sizes = block_sizes(model, dtype, packed=packed)
    return [s.storage_bytes(k) for s, k in zip(sizes, plan.storage)]


def non_block_parameters(model) -> list[tuple[str, nn.Parameter]]:
    """The parameters outside ``model.block_sequence()``: what stays resident beside the blocks."""
    block_prefixes = tuple(name + "." for name, _ in model.block_sequence())
    return [(name, p) for name, p in model.named_parameters() if not name.startswith(block_prefixes)]


def materialize_non_blocks(model: nn.Module, source: TensorSource, device: torch.device,
                           dtype: torch.dtype, host_prefixes: Sequence[str] = (),
                           optional: Callable[[str, tuple[int, ...]], torch.Tensor] | None = None,
                           patches: Mapping[str, Sequence[WeightPatch]] | None = None,
                           host_copies: dict[str, torch.Tensor] | None = None) -> int:
    """Load every parameter outside the block sequence, one tensor at a time (assign, no copy).

    Parameters under ``host_prefixes`` (e.g. a 1.3 GB embedding table) stay on the CPU, where
    their rows are gathered. ``patches`` (LoRA changes by parameter name) are added to the fresh
    copy, never to the file's tensor. ``host_copies`` keeps what was read from the file (as
    read), so the next call reads it from there instead. Returns the bytes placed on ``device``.
    """
    placed = 0
    for name, param in non_block_parameters(model):
        where = torch.device("cpu") if name.startswith(tuple(host_prefixes)) else device
        if host_copies is not None and name in host_copies:
            tensor = host_copies[name]
        elif host_copies is None and decodes_on_host(source, name, host_prefixes):
            # A quantised host tensor (a GGUF embedding table) is decoded a few rows at a time
            # straight into its compute-dtype tensor (GGUFSource.decode_into says why).
            tensor = torch.empty(tuple(param.shape), dtype=dtype)
            source.decode_into(name, tensor)
        elif name in source:
            tensor = source.get(name)
            if host_copies is not None:          # its own memory, not a view of a file map
                host_copies[name] = tensor = tensor.clone()
        elif optional is not None:
            tensor = optional(name, tuple(param.shape))
        else:
            raise KeyError(name)
        value = tensor.to(device=where, dtype=dtype if tensor.is_floating_point() else tensor.dtype)
        if patches:
            value = patched_value(name, value, patches)
        assign_parameter(model, name, value)
        if where == device:
            placed += value.numel() * value.element_size()
    return placed


@dataclass(frozen=True)
class PlacementInputs:
    """What a stage tells the planner about one model."""
    stage: str
    files: tuple[Path, ...]
    storage: StorageChoice
    compute_dtype: torch.dtype
    always_resident_bytes: int
    activation_bytes: Callable[[int | None, int | None], int]
    chunk_candidates: tuple[tuple[int | None, int | None], ...] = ((None, None),)
    # The candidates chunks may shrink to for residents when copies are slower than compute
    # (planner.py); None: all of them.
    transfer_chunks: tuple[tuple[int | None, int | None], ...] | None = None
    graphs: bool = False          # blocks replay as CUDA graphs (the estimate counts their pool)
    patches: BlockPatches | None = None   # LoRA changes to the blocks, added by placement
    # This machine's rates, for the planner's time prediction and its order of sacrifices
    # (plan_stage); None where unknown (the CPU), which plans as if copies were hidden.
    bandwidth: float | None = None        # host -> device bytes/s
    block_compute_s: float | None = None  # seconds of compute per block
    # Blocks that run once per stage, not per forward (the DiT's caption refiners, whose output
    # the sampler keeps: refined_caption.py); the planner streams them once.
    once: tuple[str, ...] = ()
    allocator: str | None = None          # the CUDA allocator activation_bytes was estimated for


def plan_for(model, inputs: PlacementInputs, budget: int | None, source: TensorSource | None = None) -> StagePlan:
    """Plan a stage; ``budget=None`` (CPU) keeps everything resident. A packed ``source`` (GGUF)
    sizes the blocks by their packed bytes."""
    packed = packed_spec(model, source) if source is not None and inputs.storage is StorageChoice.PACKED else None
    sizes: list[BlockSize] = block_sizes(model, inputs.compute_dtype, packed=packed)
    index = {size.name: i for i, size in enumerate(sizes)}
    return plan_stage(inputs.stage, sizes, UNLIMITED if budget is None else budget,
                      always_resident_bytes=inputs.always_resident_bytes,
                      activation_bytes=inputs.activation_bytes,
                      chunk_candidates=inputs.chunk_candidates, transfer_chunks=inputs.transfer_chunks,
                      storage=inputs.storage,
                      bandwidth=inputs.bandwidth, block_compute_s=inputs.block_compute_s,
                      activations_in_own_pool=inputs.graphs, once=[index[name] for name in inputs.once],
                      allocator=inputs.allocator)


@contextmanager
def placed_blocks(model, source: TensorSource, inputs: PlacementInputs, plan: StagePlan,
                  device: torch.device, host_budget: int | None) -> Iterator[StreamingSession]:
    """Run ``model``'s blocks as ``plan`` says, their host copies from the process-wide cache."""
    packed = packed_spec(model, source) if inputs.storage is StorageChoice.PACKED else None
    layouts = [l.storage for l in model_layouts(model, plan, inputs.compute_dtype, packed=packed)]
    key = cache_key(inputs.files, source.keys(), f"{plan.storage[0].value}/{inputs.compute_dtype}")
    store = HOST_CACHE.get(key, layouts, block_reader(model, source), host_budget)
    with stream_blocks(model, plan, store, device, compute_dtype=inputs.compute_dtype,
                       graphs=inputs.graphs, patches=inputs.patches, packed=packed) as session:
        yield session
