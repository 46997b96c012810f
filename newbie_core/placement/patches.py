"""Weight patches: additive changes (LoRA deltas, ...) applied to a block's compute-layout tensors.

Why here, and why this way. The host copy of a model stays exactly as read from the file; a patch
is small (low-rank factors) and lives beside it. After a block's weights land in compute layout
on the device (a copy into a resident buffer or a ring slot, or an fp8 upcast into one), the
runner adds the block's patches to those views, on the main stream, before the block runs. The
same torch ops run on the same bits for resident and streamed blocks, so a streamed run stays
bitwise equal to a resident one; changing a strength only changes a scale, never the host copy.

Placement knows tensors by name, nothing about what a patch means: a :class:`WeightPatch` names
its target tensor (relative to the block), optional row range, host factors and a ``delta``
function that turns the factors (on the device) into an fp32 matrix. All patches of one target
and row range are summed in fp32 and added with one rounding to the compute dtype.

A patch whose delta is a product of two factors (``low_rank``: a plain LoRA) goes in with one
GEMM instead: ``W.addmm_(left, right)`` accumulates in fp32 and rounds once, like the generic
path, but never writes an fp32 copy of the weight. Measured on an H200 with a rank-32 LoRA on
every linear of the full DiT, the generic path cost streamed 1024² steps 15-26 % (it runs for
every block that lands); several low-rank patches of one target are one GEMM over their
concatenated factors.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

DeltaFn = Callable[[Mapping[str, torch.Tensor]], torch.Tensor]


@dataclass(frozen=True)
class WeightPatch:
    """``scale * delta(factors)`` (fp32) added to rows ``rows`` (start, stop) of tensor ``target``."""
    target: str
    factors: Mapping[str, torch.Tensor]
    delta: DeltaFn
    scale: float
    shape: tuple[int, ...]                 # shape of the delta (the target, or its row range)
    rows: tuple[int, int] | None = None
    source: str = ""                       # for messages: which file and key it came from
    low_rank: Callable[[Mapping[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]] | None = None

    @property
    def factor_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.factors.values())

    @property
    def delta_numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


# Per-use temporaries of one application, in fp32 elements of the largest patched tensor: the
# target upcast, the summed delta, one delta being built, and the intermediates of a Hadamard
# (LoHa) delta. The planner counts this beside the factors.
SCRATCH_COPIES = 5


class BlockPatches:
    """The patches of one model: {block index: patches} plus the device copies of their factors."""

    def __init__(self, patches: Mapping[int, Sequence[WeightPatch]]):
        self.patches = {i: tuple(p for p in ps if p.scale != 0.0) for i, ps in patches.items()}
        self.patches = {i: ps for i, ps in self.patches.items() if ps}
        self._device: dict[int, list[tuple[WeightPatch, dict[str, torch.Tensor]]]] = {}

    def __bool__(self) -> bool:
        return bool(self.patches)

    def __contains__(self, index: int) -> bool:
        return index in self.patches

    @property
    def factor_bytes(self) -> int:
        """Bytes the factors take on the device (each file tensor counted once)."""
        seen: dict[int, int] = {}
        for ps in self.patches.values():
            for p in ps:
                for t in p.factors.values():
                    seen[id(t)] = t.numel() * t.element_size()
        return sum(seen.values())

    @property
    def scratch_bytes(self) -> int:
        """Peak temporaries of one application (see SCRATCH_COPIES)."""
        biggest = max((p.delta_numel for ps in self.patches.values() for p in ps), default=0)
        return SCRATCH_COPIES * 4 * biggest

    @property
    def device_bytes(self) -> int:
        return self.factor_bytes + self.scratch_bytes

    def to_device(self, device: torch.device | str) -> None:
        """Copy every factor to ``device`` once (a tensor shared by patches is copied once)."""
        moved: dict[int, torch.Tensor] = {}
        self._device = {}
        for i, ps in self.patches.items():
            self._device[i] = [(p, {k: moved.setdefault(id(t), t.to(device)) for k, t in p.factors.items()})
                               for p in ps]

    def release(self) -> None:
        self._device = {}

    def apply(self, index: int, views: Mapping[str, torch.Tensor]) -> None:
        """Add block ``index``'s patches to its compute-layout ``views`` in place (current stream)."""
        placed = self._device.get(index)
        if placed is None:
            if index in self.patches:
                raise RuntimeError("BlockPatches.apply before to_device(); the session moves the factors.")
            return
        apply_patches(views, placed)


def apply_patches(views: Mapping[str, torch.Tensor],
                  placed: Sequence[tuple[WeightPatch, Mapping[str, torch.Tensor]]]) -> None:
    """Sum the deltas per (target, rows) in fp32, in the order given, and add each sum once."""
    groups: dict[tuple[str, tuple[int, int] | None], list[tuple[WeightPatch, Mapping[str, torch.Tensor]]]] = {}
    for p, factors in placed:
        groups.setdefault((p.target, p.rows), []).append((p, factors))
    for (target, rows), members in groups.items():
        weight = views[target]
        part = weight if rows is None else weight[rows[0]:rows[1]]
        if all(p.low_rank is not None for p, _ in members):
            _add_low_rank(part, members, target)
            continue
        total = None
        for p, factors in members:
            d = p.delta(factors)
            if tuple(d.shape) != tuple(part.shape):
                raise ValueError(f"patch {p.source or target} gives a {list(d.shape)} delta for "
                                 f"{target} {list(part.shape)}.")
            d = d.float() * p.scale          # never in place: a delta may be a stored factor
            total = d if total is None else total.add_(d)
        part.copy_(part.float().add_(total))


def _add_low_rank(part: torch.Tensor, members: Sequence[tuple[WeightPatch, Mapping[str, torch.Tensor]]],
                  target: str) -> None:
    """part += sum(scale_i * left_i @ right_i) as one GEMM with fp32 accumulation, one rounding."""
    pairs = [(p, *p.low_rank(f)) for p, f in members]
    for p, left, right in pairs:
        if (left.shape[0], right.shape[-1]) != tuple(part.shape) or left.shape[1] != right.shape[0]:
            raise ValueError(f"patch {p.source or target} gives {list(left.shape)} x {list(right.shape)} factors "
                             f"for {target} {list(part.shape)}.")
    if len(pairs) == 1:
        p, left, right = pairs[0]
        part.addmm_(left.to(part.dtype), right.to(part.dtype), alpha=p.scale)
        return
    left = torch.cat([lf.float() * p.scale for p, lf, _ in pairs], dim=1).to(part.dtype)
    right = torch.cat([r.to(part.dtype) for _, _, r in pairs], dim=0)
    part.addmm_(left, right)
