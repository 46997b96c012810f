"""The DiT held under one placement plan across many forwards, for samplers the pack does not own.

The pack's own sampler plans, places and releases the DiT inside one call (``run_sampling``).
ComfyUI's samplers instead call a model once per step (or per cond/uncond chunk) and tell us only
when sampling starts and ends. :class:`PlacedDiT` bridges the two: the first forward plans for
the batch and caption length it sees and opens the same placement session ``run_sampling``
uses; later forwards reuse it; a forward that needs more (a larger batch, a longer caption,
another size) re-plans; :meth:`close` releases everything. Blocks run through the same runner as
in the pack's sampler, so a core sampler on this model computes what ours does.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import dataclass

import torch

from ..models.dit import ActivationChunks
from ..placement import Report, StagePlan, measure_stage, stage_guard
from .handles import DiTHandle
from .placed import placed_blocks
from .refined_caption import RefinedCaptions
from .sample import dit_store_budget, load_non_blocks, plan_sampling
from .settings import MemorySettings

log = logging.getLogger(__name__)

# budget_scope(ideal_peak, weight_bytes_for_budget) -> a context yielding the stage's VRAM
# budget (None = unbudgeted); the ComfyUI nodes pass `vram_for_stage`, which frees VRAM and
# registers the unloadable handle for as long as the session is open.
BudgetScope = Callable[[Callable[[], int], Callable[[int | None], int]], AbstractContextManager]


def _plain_budget(memory: MemorySettings, device: torch.device) -> BudgetScope:
    from .generate import stage_budget

    def scope(ideal_peak, weight_bytes):
        return nullcontext(stage_budget(memory, device))
    return scope


@dataclass(frozen=True)
class SessionShape:
    """What a plan was made for: forwards that fit inside it reuse the open session."""
    batch: int
    cap_tokens: int
    height: int          # latent rows (pixels / 8)
    width: int

    def covers(self, other: "SessionShape") -> bool:
        return (self.height, self.width) == (other.height, other.width) and \
            other.batch <= self.batch and other.cap_tokens <= self.cap_tokens


class PlacedDiT:
    """Callable DiT ``(x, t, cap_feats, cap_mask, pooled) -> velocity`` under placement.

    Arguments are the DiT's own (normalised latent, model time t = 1 - sigma, right-padded
    caption batch); the result is the raw velocity in ``x``'s dtype. ``min_batch`` lets the
    caller plan for the batch it will use at most (cond + uncond) on the first call already.
    """

    def __init__(self, handle: DiTHandle, memory: MemorySettings, device: torch.device,
                 report: Report | None = None, budget_scope: BudgetScope | None = None):
        self.handle, self.memory, self.device = handle, memory, torch.device(device)
        self.report = report if report is not None else Report()
        self.budget_scope = budget_scope or _plain_budget(memory, self.device)
        self.shape: SessionShape | None = None
        self.plan: StagePlan | None = None
        self.budget: int | None = None
        self.last_plan: StagePlan | None = None     # survive close(), for the node's report
        self.last_budget: int | None = None
        self.opened = 0                      # sessions opened (tests: one per sampling run)
        self.forwards = 0
        self._stacks: tuple[ExitStack, ExitStack] | None = None
        self._model = None
        self._session = None
        self._record = None
        self._captions: RefinedCaptions | None = None

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.memory.torch_compute_dtype

    @property
    def is_open(self) -> bool:
        return self._stacks is not None

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cap_feats: torch.Tensor, cap_mask: torch.Tensor,
                 pooled: torch.Tensor, min_batch: int = 0) -> torch.Tensor:
        b, _, h, w = x.shape
        need = SessionShape(max(b, min_batch), int(cap_feats.shape[1]), int(h), int(w))
        if self.shape is None or not self.shape.covers(need):
            if self.is_open:
                log.info("DiT session re-planned for %s (was planned for %s)", need, self.shape)
                self.close()
            self._open(need)
        dtype = self.compute_dtype
        try:
            with torch.inference_mode():
                feats, mask = cap_feats.to(device=self.device, dtype=dtype), cap_mask.to(self.device).bool()
                v = self._model(x.to(device=self.device, dtype=dtype), t.to(self.device, torch.float32), feats, mask,
                                pooled.to(device=self.device, dtype=dtype), caption=self._captions(feats, mask))
        except BaseException as e:
            self._fail(e)
            raise
        self.forwards += 1
        return v

    def _open(self, shape: SessionShape) -> None:
        handle, memory, device = self.handle, self.memory, self.device
        width, height = shape.width * 8, shape.height * 8

        def plan(budget: int | None) -> StagePlan:
            return plan_sampling(handle, memory, shape.batch, shape.cap_tokens, width, height, device, budget)[2]

        # Two stacks, as run_sampling nests them: the outer one (budget and handle, stage guard,
        # measurement) outlives the inner one (the placement session), whose byte counts are
        # final only once it is closed.
        outer, inner = ExitStack(), ExitStack()
        try:
            budget = outer.enter_context(self.budget_scope(lambda: plan(None).predicted_peak,
                                                           lambda b: _weight_bytes(plan(b))))
            model, inputs, stage_plan = plan_sampling(handle, memory, shape.batch, shape.cap_tokens, width, height,
                                                      device, budget)
            log.info("sampling plan (core sampler):\n%s", stage_plan.render())
            store_budget = dit_store_budget(handle, model, inputs, stage_plan, memory, device)
            guard = outer.enter_context(stage_guard("sample", device))
            record = outer.enter_context(measure_stage(self.report, "sample", device, stage_plan.predicted_peak))
            guard.on_release(lambda: model.to_empty(device="meta"))
            load_non_blocks(handle, model, device, inputs.compute_dtype)      # as run_sampling does
            model.set_chunking(ActivationChunks(stage_plan.attn_chunk, stage_plan.ffn_chunk))
            session = inner.enter_context(placed_blocks(model, handle.ckpt.source, inputs, stage_plan, device,
                                                        store_budget))
            guard.hold(session)
        except BaseException as e:
            _unwind(inner, outer, e)
            raise
        self._stacks = (inner, outer)
        self._model, self._session, self._record = model, session, record
        self._captions = RefinedCaptions(model)      # the session's weights made them
        self.shape, self.plan, self.budget = shape, stage_plan, budget
        self.last_plan, self.last_budget = stage_plan, budget
        self.opened += 1

    def close(self) -> None:
        """Release the weights and the handle; the next forward opens a new session."""
        stacks, self._stacks = self._stacks, None
        if stacks is None:
            return
        inner, outer = stacks
        session, record, model = self._session, self._record, self._model
        self._session = self._record = self._model = self._captions = None
        self.shape = None
        try:
            inner.close()
            record.bytes_h2d = session.bytes_h2d
            model.to_empty(device="meta")
        except BaseException as e:
            _unwind(ExitStack(), outer, e)
            raise
        outer.close()

    def _fail(self, error: BaseException) -> None:
        """A forward raised (Cancel, OOM): unwind the session as a failed stage."""
        stacks, self._stacks = self._stacks, None
        self._session = self._record = self._model = self._captions = None
        self.shape = None
        if stacks is not None:
            _unwind(*stacks, error)


def _unwind(inner: ExitStack, outer: ExitStack, error: BaseException) -> None:
    """Exit both stacks as if ``error`` passed through them (stage_guard then frees the VRAM).
    The caller re-raises ``error``; what the exits re-raise is that same error, so it is dropped."""
    for stack in (inner, outer):
        try:
            stack.__exit__(type(error), error, error.__traceback__)
        except BaseException as again:          # noqa: BLE001 - the original error is re-raised
            if again is not error:
                log.warning("while releasing the DiT session: %s", again)


def _weight_bytes(plan: StagePlan) -> int:
    """Bytes a plan keeps for weights: its peak breakdown minus the activations."""
    return sum(b for label, b in plan.breakdown if not label.startswith("activations"))
