"""The size upper bound: refuse a size the plan cannot place, naming the largest that fits.

Runs on the analytic plans only (headers and tokenizers, no weights). On a GPU the limit is the
stage budget: the planner raises :class:`BudgetTooSmallError` when even the smallest plan does
not fit. On the CPU nothing is budgeted, so the limit is the host RAM that is free now. The
sampling and the VAE-decode plans are both checked, since either can be the one that does not
fit; the search keeps the aspect ratio and shrinks both sides in steps of 16 px.
"""

from __future__ import annotations

import logging
import os

import torch

from ..placement import BudgetTooSmallError, fmt_bytes
from ..prompt import prepare_texts
from ..validate import InputError
from .encode import plan_gemma
from .sample import plan_sampling
from .vae_stage import plan_vae

log = logging.getLogger(__name__)


def host_available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), else free physical pages; None when unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _peak(models, memory, batch: int, cap_tokens: int, width: int, height: int, device: torch.device,
          budget: int | None, guided: bool) -> int | None:
    """The larger of the sampling and decode peaks, or None when the budget cannot place it."""
    try:
        _, _, plan = plan_sampling(models.dit, memory, batch * (2 if guided else 1), cap_tokens, width, height,
                                   device, budget)
        vae = plan_vae(models.vae, memory, batch, height // 8, width // 8, budget, device)
    except BudgetTooSmallError:
        return None
    return max(plan.predicted_peak, vae.predicted_peak)


def check_size_fits(models, request, device: torch.device, budget: int | None,
                    host_bytes: int | None = None, field: str = "--size") -> None:
    """Raise :class:`InputError` when ``request``'s size cannot be placed, with the largest size that can.

    ``host_bytes`` overrides the free host RAM (the CPU limit), for tests."""
    limit = None
    if budget is None:
        limit = host_bytes if host_bytes is not None else host_available_bytes()
        if limit is None:
            return
    texts = prepare_texts(request.prompt, request.negative, compat=request.compat)
    *_, gemma_tokens = plan_gemma(models.encoders, [texts.gemma_pos, texts.gemma_neg], request.memory, budget)
    cap = int(gemma_tokens.attention_mask.sum(1).max())
    guided = request.sampling.cfg != 1.0

    def fits(w: int, h: int) -> tuple[bool, int | None]:
        peak = _peak(models, request.memory, request.batch, cap, w, h, device, budget, guided)
        return peak is not None and (limit is None or peak <= limit), peak

    ok, peak = fits(request.width, request.height)
    if ok:
        return
    w, h = request.width, request.height
    lo, hi = 0.0, 1.0           # fits(scale lo) is true (or lo is 0), fits(hi) is false
    best = None
    for _ in range(12):
        mid = (lo + hi) / 2
        cand = (max(16, int(w * mid) // 16 * 16), max(16, int(h * mid) // 16 * 16))
        if fits(*cand)[0]:
            lo, best = mid, cand
        else:
            hi = mid
    where = (f"the free host RAM ({fmt_bytes(limit)})" if limit is not None
             else f"the VRAM budget of {fmt_bytes(budget)}")
    need = f" (it needs about {fmt_bytes(peak)})" if peak is not None else ""
    hint = (f"the largest size of this shape that fits is {best[0]}x{best[1]}" if best
            else "not even 16x16 fits; raise the budget or free memory")
    raise InputError(field, f"{request.width}x{request.height} does not fit {where}{need}; {hint}.")
