"""Clean failure: a stage that raises (or is interrupted) gives back what it allocated.

``stage_guard`` owns the stage's releasers (sessions, resident modules, any callback). On an
exception or KeyboardInterrupt it runs them, drops its references, collects garbage and empties
the CUDA cache, so ``memory_allocated`` is back at the baseline taken at entry; the exception
is then re-raised. ``run_with_oom_retry`` turns one CUDA out-of-memory into a retry at half the
budget and a second one into a :class:`PlacementOOMError` that says what to try.
"""

from __future__ import annotations

import gc
import logging
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import torch

from .budget import fmt_bytes
from .planner import BudgetTooSmallError

log = logging.getLogger(__name__)
T = TypeVar("T")


class PlacementOOMError(RuntimeError):
    """The stage ran out of GPU memory even at half its budget."""


class StageGuard:
    def __init__(self, name: str, device: torch.device):
        self.name, self.device = name, device
        self.baseline: int | None = None
        self._releasers: list[Callable[[], None]] = []
        self._held: list[object] = []

    def hold(self, obj: T) -> T:
        """Keep ``obj`` (a tensor, a session, ...) referenced only by the guard; dropped on failure.
        Objects with a ``close()`` are closed."""
        self._held.append(obj)
        if hasattr(obj, "close"):
            self._releasers.append(obj.close)
        return obj

    def on_release(self, fn: Callable[[], None]) -> None:
        self._releasers.append(fn)

    def release(self) -> None:
        for fn in reversed(self._releasers):
            try:
                fn()
            except Exception:   # noqa: BLE001 - freeing must go on; the original error is re-raised
                log.exception("stage %s: a releaser failed while cleaning up", self.name)
        self._releasers.clear()
        self._held.clear()
        free_device_memory(self.device)


def free_device_memory(device: torch.device | str) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


@contextmanager
def stage_guard(name: str, device: torch.device | str) -> Iterator[StageGuard]:
    guard = StageGuard(name, torch.device(device))
    if guard.device.type == "cuda":
        guard.baseline = torch.cuda.memory_allocated(guard.device)
    try:
        yield guard
    except BaseException as e:   # KeyboardInterrupt too: the VRAM must come back either way
        log.warning("stage %s failed (%s); releasing its memory", name, type(e).__name__)
        # The finished frames the exception passed through still hold the stage's activations
        # (and would until the caller drops the exception): clear their locals now.
        traceback.clear_frames(e.__traceback__)
        guard.release()
        if guard.baseline is not None:
            now = torch.cuda.memory_allocated(guard.device)
            if now > guard.baseline:
                log.warning("stage %s: %s still allocated above the baseline after cleanup (held outside "
                            "the stage)", name, fmt_bytes(now - guard.baseline))
        raise


def run_with_oom_retry(fn_for_budget: Callable[[int | None], T], budget: int | None, *, stage: str = "stage",
                       device: torch.device | str = "cuda",
                       predicted_peak: Callable[[int], int | None] | None = None,
                       advice: str | None = None) -> T:
    """Run ``fn_for_budget(budget)``; on CUDA OOM free, warn, retry once with ``budget // 2``.

    ``fn_for_budget`` must plan for the budget it is given (plan_stage inside), so the retry
    really uses less memory. When half the budget is below the stage's smallest plan (the
    planner's :class:`BudgetTooSmallError`, raised before anything is loaded), the retry uses
    that smallest plan instead, if it is below the budget that ran out; otherwise there is no
    smaller plan to try and the answer is a :class:`PlacementOOMError`. ``predicted_peak(budget)``
    only improves the error message; ``advice`` replaces its generic "Try: ..." part with the
    stage's own (the VAE has no fp8 streaming, but tiles). ``budget=None`` (nothing budgeted,
    e.g. the CPU) runs once: there is no budget to halve.
    """
    if budget is None:
        return fn_for_budget(None)
    try:
        return fn_for_budget(budget)
    except torch.cuda.OutOfMemoryError as first:
        # Leave the except block before retrying: the traceback's frames hold the failed
        # attempt's activations, and they are only dropped once it is gone.
        first_msg = str(first).splitlines()[0] if str(first) else "out of memory"
    free_device_memory(device)
    half = budget // 2
    log.warning("%s: CUDA out of memory with a budget of %s (%s); retrying once with %s",
                stage, fmt_bytes(budget), first_msg, fmt_bytes(half))
    retry, smallest = half, None
    while True:
        try:
            return fn_for_budget(retry)
        except BudgetTooSmallError as small:
            if retry == half and small.minimum is not None and small.minimum < budget:
                retry = smallest = small.minimum
                log.warning("%s: half the budget (%s) is below the smallest plan of this stage; retrying with "
                            "that plan (%s) instead", stage, fmt_bytes(half), fmt_bytes(retry))
                continue
            raise PlacementOOMError(
                f"{stage}: out of GPU memory with a VRAM budget of {fmt_bytes(budget)}, and this stage has no "
                f"smaller plan to retry with (its smallest needs "
                f"{fmt_bytes(small.minimum) if small.minimum is not None else 'more than half'}). "
                + (advice or _TRY)) from small
        except torch.cuda.OutOfMemoryError as second:
            free_device_memory(device)
            pred = predicted_peak(retry) if predicted_peak else None
            again = (f"again at half ({fmt_bytes(half)}" if smallest is None else
                     f"again with its smallest plan ({fmt_bytes(smallest)}, half would be below it")
            raise PlacementOOMError(
                f"{stage}: out of GPU memory with a VRAM budget of {fmt_bytes(budget)} and {again}"
                + (f", predicted peak {fmt_bytes(pred)}" if pred is not None else "") + "). " + (advice or _TRY)
            ) from second


_TRY = ("Something outside this stage probably holds VRAM (another program, other models). "
        "Try: a lower resolution, fp8 streaming, a smaller budget number, or closing other GPU programs.")
