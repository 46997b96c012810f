"""The host-RAM planner: modes from the budget, evictions in stage order, never above budget."""

from __future__ import annotations

import pytest
from hypothesis import assume, given, settings, strategies as st

from newbie_core.placement import HostCache, HostMode
from newbie_core.placement.host_store import CacheKey
from newbie_core.placement.budget import GiB, MiB
from newbie_core.placement.host_budget import (HostBudgetTooSmallError, HostModel, auto_host_budget, bytes_read,
                                               plan_host)

GEMMA = HostModel("gemma", int(6.4 * GiB), 190 * MiB, 0, extra_bytes=1300 * MiB)
JINA = HostModel("jina", int(1.1 * GiB), 50 * MiB)
DIT = HostModel("dit", int(6.9 * GiB), 175 * MiB, streamed_bytes_per_step=int(6.5 * GiB))


def test_sixteen_gigabytes_keep_everything_and_twelve_evict_gemma_before_the_dit():
    roomy = plan_host([GEMMA, JINA, DIT], 16 * GiB)
    assert all(r.mode is HostMode.PINNED and not r.evicted for r in roomy.rows)
    plan = plan_host([GEMMA, JINA, DIT], 12 * GiB)
    rows = {r.name: r for r in plan.rows}
    assert rows["gemma"].mode is HostMode.PINNED and rows["jina"].mode is HostMode.PINNED
    assert rows["dit"].mode is HostMode.PINNED and rows["dit"].evicted == ("gemma",)
    assert rows["dit"].disk_bytes_per_step == 0
    assert plan.predicted_peak <= 12 * GiB < roomy.predicted_peak


def test_eight_gigabytes_stream_the_dit_from_disk_through_a_pinned_ring():
    plan = plan_host([GEMMA, JINA, DIT], 8 * GiB)
    dit = plan.rows[-1]
    assert dit.mode is HostMode.STAGING and dit.host_bytes == 2 * DIT.largest_block == dit.pinned_bytes
    assert dit.disk_bytes_per_step == DIT.streamed_bytes_per_step
    assert plan.predicted_peak <= 8 * GiB
    assert "staging" in plan.render() and "8.00 GiB" in plan.render()


def test_a_budget_below_one_block_says_what_it_needs():
    with pytest.raises(HostBudgetTooSmallError, match="too small for dit.*one block buffer.*--ram-budget.*ram_budget_gb"):
        plan_host([DIT], 1 * GiB)


def test_auto_budget_is_available_ram_minus_a_margin():
    budget = auto_host_budget()
    if budget is None:
        pytest.skip("no /proc/meminfo here")
    assert 0 <= budget < auto_host_budget(already_held=GiB) or budget == 0
    assert bytes_read() is None or bytes_read() >= 0


sizes = st.integers(min_value=1 * MiB, max_value=20 * GiB)


@settings(max_examples=60, deadline=None)
@given(models=st.lists(st.tuples(sizes, st.integers(1, 64), st.integers(0, 2 * GiB)), min_size=1, max_size=5),
       budget=st.integers(min_value=1 * GiB, max_value=64 * GiB),
       cached=st.lists(st.integers(0, 8 * GiB), max_size=3))
def test_the_host_planner_never_plans_above_its_budget(models, budget, cached):
    assume(1536 * MiB + sum(cached) <= budget)          # what was cached before kept the budget too
    hm = [HostModel(f"m{i}", total, max(1, total // blocks), total, extra)
          for i, (total, blocks, extra) in enumerate(models)]
    try:
        plan = plan_host(hm, budget, cached=[(f"old{i}", b) for i, b in enumerate(cached)])
    except HostBudgetTooSmallError:
        assert any(budget - 1536 * MiB - m.extra_bytes < m.largest_block for m in hm)
        return
    assert plan.predicted_peak <= budget
    for row, m in zip(plan.rows, hm):
        assert row.host_bytes <= m.total_bytes or row.mode is not HostMode.PINNED


def test_plan_matches_what_the_host_cache_does():
    """The plan's modes are the modes the cache really picks under the same budget."""
    import torch
    from newbie_core.placement.layout import compute_layout
    cache = HostCache()
    layout = compute_layout([("w", (1024, 1024), torch.float32)])    # 4 MiB per block
    reader = lambda i: {"w": torch.zeros(1024, 1024)}               # noqa: E731
    models = [HostModel("a", 8 * layout.nbytes, layout.nbytes), HostModel("b", 8 * layout.nbytes, layout.nbytes)]
    budget = 11 * layout.nbytes
    plan = plan_host(models, budget + 0, baseline=0, pin=False)
    modes = []
    for m in models:
        store = cache.get(CacheKey(((m.name, 0, 0),), 1, "bf16"), [layout] * 8, reader, budget, pin=False)
        modes.append(store.mode)
    assert modes == [r.mode for r in plan.rows] == [HostMode.PINNED, HostMode.PINNED]
    assert [r.evicted for r in plan.rows] == [(), ("a",)]
    cache.clear()


def test_a_cuda_process_plans_with_its_measured_baseline():
    """The same models and budget predict more for a CUDA process (libraries, context, compiled
    kernels beside the host copies), and what the cache may hold shrinks by the same amount."""
    import torch

    from newbie_core.pipeline import MemorySettings
    from newbie_core.pipeline.host_ram import describe_host, stage_host_budget
    from newbie_core.placement.host_budget import CUDA_PROCESS_BASELINE, PROCESS_BASELINE

    memory = MemorySettings(ram_budget_gb=32)
    cpu, cuda = (describe_host([GEMMA, JINA, DIT], memory, torch.device(d)) for d in ("cpu", "cuda"))
    assert (cpu.baseline, cuda.baseline) == (PROCESS_BASELINE, CUDA_PROCESS_BASELINE)
    assert cuda.predicted_peak - cpu.predicted_peak == CUDA_PROCESS_BASELINE - PROCESS_BASELINE
    gap = stage_host_budget(memory, torch.device("cpu")) - stage_host_budget(memory, torch.device("cuda"))
    assert gap == CUDA_PROCESS_BASELINE - PROCESS_BASELINE
