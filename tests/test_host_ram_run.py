"""The host-RAM budget end to end on the tiny models: refused before reading, and a run whose
host cache (its own byte accounting) never holds more than the plan said."""

from __future__ import annotations

import pytest
import torch

from newbie_core.pipeline import CONDITIONING_CACHE, GenerationRequest, MemorySettings, generate
from newbie_core.pipeline.generate import _stage_plans, host_plan
from newbie_core.placement import HOST_CACHE
from newbie_core.placement.budget import GiB
from newbie_core.placement.host_budget import PROCESS_BASELINE, HostBudgetTooSmallError
from newbie_core.pipeline import SamplingSettings

CPU = torch.device("cpu")
XML = "<character_1>\n<n>miku</n>\n</character_1>\n<general_tags>\n<count>1girl, solo</count>\n</general_tags>"


def _request(ram_bytes: int | None) -> GenerationRequest:
    memory = MemorySettings(ram_budget_gb=None if ram_bytes is None else ram_bytes / GiB)
    return GenerationRequest(prompt=XML, width=64, height=64, sampling=SamplingSettings(steps=2, seed=5),
                             memory=memory)


def _rows(plan):
    return {r.name: r for r in plan.rows}


def test_a_run_the_ram_budget_cannot_hold_is_refused_before_any_weight_is_read(tiny_models, monkeypatch):
    reads = []
    for src in (tiny_models.dit.ckpt.source, tiny_models.encoders.gemma.source):
        monkeypatch.setattr(src, "get", lambda *a, **k: reads.append(a) or pytest.fail("weights were read"))
    with pytest.raises(HostBudgetTooSmallError, match=r"GB.*--ram-budget.*ram_budget_gb.*GB or more"):
        generate(tiny_models, _request(PROCESS_BASELINE + 1024), CPU)
    assert reads == []


def test_the_dit_evicts_the_encoders_and_the_cache_stays_within_the_plan(tiny_models):
    HOST_CACHE.clear()
    roomy = _rows(host_plan(tiny_models, _request(None), CPU))
    gemma, jina = roomy["encode:gemma"], roomy["encode:jina"]
    # Room for the DiT's whole copy beside its own host tensors, but not for the encoders' too.
    models = {m.name: m for m in _stage_plans(tiny_models, _request(None), CPU, None)[2]}
    d = models["sample"]
    room = d.extra_bytes + d.total_bytes + min(gemma.host_bytes, jina.host_bytes) // 2
    budget = PROCESS_BASELINE + max(room, *(m.minimum_budget for m in models.values()))
    assert d.total_bytes + gemma.host_bytes + jina.host_bytes > budget - PROCESS_BASELINE - d.extra_bytes
    request = _request(budget)
    plan = host_plan(tiny_models, request, CPU)
    rows = _rows(plan)
    assert rows["sample"].evicted, plan.render()          # the plan releases encoder copies first
    assert plan.predicted_peak <= request.memory.ram_budget_bytes
    CONDITIONING_CACHE.clear()
    HOST_CACHE.reset_peak()
    generate(tiny_models, request, CPU)
    assert 0 < HOST_CACHE.peak <= plan.peak_cached
    assert HOST_CACHE.used() <= request.memory.ram_budget_bytes - PROCESS_BASELINE
    HOST_CACHE.clear()
