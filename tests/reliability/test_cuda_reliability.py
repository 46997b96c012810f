"""Issue 11, items 4-5 on the GPU (the lead runs these): faults and the soak leave allocated VRAM,
reserved VRAM, pinned host memory and host RSS back at their baselines.

Run: ``python -m pytest -q -m cuda tests/reliability/test_cuda_reliability.py -s``
(NEWBIE_SOAK_RUNS=30 by default).
"""

from __future__ import annotations

import gc
import os

import pytest
import torch

from newbie_core.pipeline import CONDITIONING_CACHE, GenerationRequest, MemorySettings, SamplingSettings, generate
from newbie_core.placement import HOST_CACHE
from newbie_core.placement.host_budget import pinned_bytes

pytestmark = pytest.mark.cuda
GPU = torch.device("cuda")
TOLERANCE = 8 * 2**20


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _torch_pinned() -> int:
    """Bytes in torch's pinned (caching host) allocator: the store's fallback when
    cudaHostRegister fails, and anything else that pins through torch."""
    stats = torch.cuda.host_memory_stats() if hasattr(torch.cuda, "host_memory_stats") else {}
    return int(stats.get("allocated_bytes.current", stats.get("allocated_bytes", {}).get("current", 0)) or 0)


def _snapshot() -> dict[str, int]:
    """``pinned`` is both kinds of page-locked memory: torch's allocator does not see the host
    store's cudaHostRegister'd buffers (pinned_bytes), which are the bulk of it."""
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return {"allocated": torch.cuda.memory_allocated(), "reserved": torch.cuda.memory_reserved(),
            "pinned": _torch_pinned() + pinned_bytes(), "torch_pinned": _torch_pinned(), "rss": _rss(),
            "host_stores": len(HOST_CACHE), "host_cache": HOST_CACHE.used()}


def _fmt(key: str, value: int) -> str:
    return f"{value}" if key == "host_stores" else f"{value / 2**20:.1f} MiB"


def _mib(snap: dict[str, int]) -> str:
    return ", ".join(f"{k} {_fmt(k, v)}" for k, v in snap.items())


def _request(**kw):
    base = dict(prompt="1girl, solo", width=64, height=64, sampling=SamplingSettings(steps=2, seed=1),
                memory=MemorySettings(vram_budget_gb=0.1))        # small budget (0.05 is below the tiny Gemma minimum)
    base.update(kw)
    return GenerationRequest(**base)


def _assert_back(before, after, what):
    """Every figure back at its baseline; both snapshots are printed (``-s``, or in the failure's
    captured stdout) so a GPU run says which one grew even when its output is cut."""
    print(f"{what}: before {_mib(before)}\n{what}: after  {_mib(after)}")
    grew = [k for k, slack in (("allocated", TOLERANCE), ("reserved", TOLERANCE), ("pinned", TOLERANCE),
                               ("rss", 64 * 2**20), ("host_stores", 0)) if after[k] > before[k] + slack]
    assert not grew, (f"{what}: {', '.join(grew)} above the baseline; "
                      + "; ".join(f"{k} {_fmt(k, before[k])} -> {_fmt(k, after[k])}" for k in grew))


@pytest.fixture()
def warm(tiny_models):
    CONDITIONING_CACHE.clear()
    generate(tiny_models, _request(), GPU)          # fills the host caches once
    return _snapshot()


@pytest.mark.parametrize("times", [1, 2])
def test_oom_in_sampling_returns_every_byte(tiny_models, warm, inject_oom, planned_budgets, times):
    """At 0.1 GB half the budget is below the tiny DiT's smallest CUDA sampling plan (the graph
    pool estimate), so the retry runs that smallest plan: all blocks streamed through the ring."""
    from newbie_core.pipeline import sample
    from newbie_core.placement import PlacementOOMError
    budgets = planned_budgets
    budgets.clear()                                   # only the plans of the run below
    inject_oom(sample, "_sample_loop", times)
    try:
        if times == 1:
            generate(tiny_models, _request(), GPU)
        else:
            with pytest.raises(PlacementOOMError):
                generate(tiny_models, _request(), GPU)
    finally:
        print(f"oom x{times}: sampling planned for budgets {budgets}")
    assert len(budgets) >= 2 and budgets[-1] < budgets[0]        # the retry really planned for less
    _assert_back(warm, _snapshot(), f"oom x{times}")


# At 0.1 GB the tiny DiT is all resident on CUDA; at 0.06 GB one block is (three ring slots, the
# rest streams). The encoders need about 75 MiB, so that run takes its conditioning from the
# cache the warm-up filled (same prompt) and never plans them.
@pytest.mark.parametrize("budget_gb", [0.1, 0.06], ids=["resident", "streamed"])
@pytest.mark.parametrize("step", [0, 1])
def test_exception_mid_streaming_returns_every_byte(tiny_models, warm, step, budget_gb):
    def boom(i, n, x, d):
        if i == step:
            raise RuntimeError("injected")
    request = _request(memory=MemorySettings(vram_budget_gb=budget_gb))
    with pytest.raises(RuntimeError):
        generate(tiny_models, request, GPU, callback=boom)
    _assert_back(warm, _snapshot(), f"exception at step {step}, {budget_gb} GB")
    plan = generate(tiny_models, request, GPU).sample_plan     # and the next run works
    assert (len(plan.resident) < len(plan.block_names)) == (budget_gb < 0.1), plan.render()


def test_interrupt_returns_every_byte(tiny_models, warm):
    def cancel(i, n, x, d):
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        generate(tiny_models, _request(), GPU, callback=cancel)
    _assert_back(warm, _snapshot(), "interrupt")


def test_cuda_soak(tiny_models, warm):
    runs = int(os.environ.get("NEWBIE_SOAK_RUNS", "30"))
    sizes, budgets = [(64, 64), (128, 64), (64, 128)], [0.1, 0.5, None]
    snaps = []
    for i in range(runs):
        w, h = sizes[i % 3]
        generate(tiny_models, _request(prompt=f"soak {i % 5}", width=w, height=h,
                                       memory=MemorySettings(vram_budget_gb=budgets[i % 3])), GPU)
        snaps.append(_snapshot())
    print("cuda soak:", [(s["allocated"] >> 20, s["reserved"] >> 20, s["pinned"] >> 20, s["rss"] >> 20)
                         for s in snaps[:: max(1, runs // 6)]])
    _assert_back(snaps[0], snaps[-1], "soak")
    HOST_CACHE.clear() if hasattr(HOST_CACHE, "clear") else None
