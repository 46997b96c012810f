"""Host RAM for one generation: the budget each stage's host copy is placed under, and the plan.

``MemorySettings.ram_budget_gb=None`` means auto: the RAM the OS says is available, plus what
this process already holds in host copies (they are reusable), minus a margin
(placement.host_budget). The plan lists, per model in stage order, the host mode the cache will
choose, its host and pinned bytes and the bytes it reads from disk per step.
"""

from __future__ import annotations

from ..placement import HOST_CACHE, StagePlan, block_sizes
from ..placement.host_budget import HostModel, HostPlan, auto_host_budget, auto_margin_text, plan_host
from .placed import PlacementInputs, packed_spec
from .settings import MemorySettings


def host_budget(memory: MemorySettings) -> int | None:
    """The user's RAM budget, or auto (see module docstring); None where the OS gives no figure."""
    if memory.ram_budget_bytes is not None:
        return memory.ram_budget_bytes
    return auto_host_budget(already_held=HOST_CACHE.used())


def budget_text(memory: MemorySettings) -> str:
    return "given" if memory.ram_budget_bytes is not None else auto_margin_text()


def host_model(name: str, model, inputs: PlacementInputs, plan: StagePlan, source=None,
               forwards_per_step: int = 1, extra_bytes: int = 0) -> HostModel:
    """What one planned stage asks of host RAM: its blocks in their storage layout, and the bytes
    of its streamed blocks copied per step (read from disk unless pinned)."""
    packed = packed_spec(model, source) if source is not None and plan.storage[0].value == "packed" else None
    sizes = block_sizes(model, inputs.compute_dtype, packed=packed)
    stored = [s.storage_bytes(k) for s, k in zip(sizes, plan.storage)]
    streamed = sum(stored[i] for i in plan.streamed) * forwards_per_step
    return HostModel(name, sum(stored), max(stored), streamed, extra_bytes)


def describe_host(models: list[HostModel], memory: MemorySettings) -> HostPlan:
    return plan_host(models, host_budget(memory), budget_text=budget_text(memory),
                     cached=[(f"cached {i}", b) for i, b in enumerate(s.host_bytes for s in HOST_CACHE._stores.values())])
