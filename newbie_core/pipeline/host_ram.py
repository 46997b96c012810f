"""Host RAM for one generation: the budget each stage's host copy is placed under, and the plan.

``MemorySettings.ram_budget_gb=None`` means auto: the RAM the OS says is available, plus what
this process already holds in host copies (they are reusable), minus a margin
(placement.host_budget). The plan lists, per model in stage order, the host mode the cache will
choose, its host and pinned bytes and the bytes it reads from disk per step.

The plan and the run share one rule: while a stage runs, the host cache may hold the budget less
the process baseline and that stage's other host tensors (:func:`stage_host_budget`), and the
oldest copies are evicted first. So the encoders' copies go before the DiT's is built whenever
the budget needs it, and a plan within its budget is a run within its budget.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..placement import HOST_CACHE, StagePlan
from ..placement.host_budget import (HostModel, HostPlan, auto_host_budget, auto_margin_text, plan_host,
                                     process_baseline)
from ..models.gguf.reader import DECODE_TRANSIENT_BYTES
from .placed import PlacementInputs, decodes_on_host, non_block_parameters, stored_block_bytes
from .settings import MemorySettings


def host_budget(memory: MemorySettings) -> int | None:
    """The user's RAM budget, or auto (see module docstring); None where the OS gives no figure."""
    if memory.ram_budget_bytes is not None:
        return memory.ram_budget_bytes
    return auto_host_budget(already_held=HOST_CACHE.used())


def budget_text(memory: MemorySettings) -> str:
    return "given" if memory.ram_budget_bytes is not None else auto_margin_text()


def stage_host_budget(memory: MemorySettings, device: torch.device, extra_bytes: int = 0) -> int | None:
    """What the host cache may hold while a stage on ``device`` runs (the plan's rule, module docstring)."""
    budget = host_budget(memory)
    return None if budget is None else max(0, budget - process_baseline(device.type) - extra_bytes)


def copy_key(files) -> str:
    """The id of a model's host copy, as the host cache names it (its first file's path)."""
    return str(Path(next(iter(files))).resolve()) if files else ""


def host_tensor_bytes(model, source, device: torch.device, dtype: torch.dtype,
                      host_prefixes: tuple[str, ...] = ()) -> int:
    """Host bytes beside a stage's blocks while it runs: the non-block parameters that stay on the
    CPU (those under ``host_prefixes``, e.g. Gemma's 1.3 GB embedding table; all of them when the
    stage computes on the CPU) at the dtype they are loaded in. A quantised (GGUF) host tensor is
    decoded in chunks straight into its tensor, with at most ``DECODE_TRANSIENT_BYTES`` beside it
    (GGUFSource.decode_into); one at a time, so that is counted once. Other quantised tensors that
    land on the CPU are decoded whole, through a float32 copy."""
    packed = getattr(source, "packed", None)
    total, chunked = 0, False
    for name, p in non_block_parameters(model):
        if device.type != "cpu" and not name.startswith(host_prefixes):
            continue
        size = dtype.itemsize if p.is_floating_point() else p.element_size()
        total += p.numel() * size
        if decodes_on_host(source, name, host_prefixes):
            chunked = True
        elif packed is not None and name in source and packed(name) is not None:
            total += p.numel() * 4
    return total + (DECODE_TRANSIENT_BYTES if chunked else 0)


def host_model(name: str, model, inputs: PlacementInputs, plan: StagePlan, source=None,
               forwards_per_step: int = 1, extra_bytes: int = 0) -> HostModel:
    """What one planned stage asks of host RAM: its blocks in their storage layout, and the bytes
    of its streamed blocks copied per step (read from disk unless pinned)."""
    stored = stored_block_bytes(model, plan, inputs.compute_dtype, source)
    streamed = sum(stored[i] for i in plan.streamed_per_forward) * forwards_per_step
    return HostModel(name, sum(stored), max(stored), streamed, extra_bytes, key=copy_key(inputs.files))


def describe_host(models: list[HostModel], memory: MemorySettings, device: torch.device) -> HostPlan:
    """The host plan from the cache's current contents; raises HostBudgetTooSmallError (before
    anything is read) when some model cannot fit the budget at all."""
    return plan_host(models, host_budget(memory), baseline=process_baseline(device.type),
                     budget_text=budget_text(memory), cached=HOST_CACHE.entries())


def check_stage(model: HostModel, memory: MemorySettings, device: torch.device) -> int | None:
    """Refuse one stage (the nodes run stages one by one) that cannot fit the RAM budget, before
    its weights are read; returns the host cache's budget for it."""
    plan_host([model], host_budget(memory), baseline=process_baseline(device.type), cached=HOST_CACHE.entries())
    return stage_host_budget(memory, device, model.extra_bytes)
