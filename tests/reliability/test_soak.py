"""Issue 11, item 5: consecutive generations do not grow host RAM; two pipelines do not mix.

CPU soak: tiny models, 16-48 px, 1-2 steps, changing prompts, sizes and budgets. Host RSS is
read from /proc after each run; after the first run (which fills the host caches) it may move
by at most SOAK_RSS_TOLERANCE. ``NEWBIE_SOAK_RUNS`` changes the count (default 30).
"""

from __future__ import annotations

import gc
import os

import pytest
import torch

from newbie_core.pipeline import (CONDITIONING_CACHE, GenerationRequest, MemorySettings, Models, SamplingSettings,
                                  generate, load_dit_handle, load_text_encoder_handle, load_vae_handle)

CPU = torch.device("cpu")
SOAK_RSS_TOLERANCE = 64 * 2**20


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc (Linux)")
def test_soak_host_rss_does_not_grow(tiny_models, record_property):
    runs = int(os.environ.get("NEWBIE_SOAK_RUNS", "30"))
    sizes = [(16, 16), (32, 16), (16, 48), (32, 32)]
    budgets = [None, 1.0, 0.1]
    rss = []
    for i in range(runs):
        w, h = sizes[i % len(sizes)]
        request = GenerationRequest(prompt=f"1girl, soak run {i % 7}", width=w, height=h,
                                    sampling=SamplingSettings(steps=1 + i % 2, seed=i, cfg=1.0 if i % 3 else 4.0),
                                    memory=MemorySettings(vram_budget_gb=budgets[i % len(budgets)]))
        result = generate(tiny_models, request, CPU)
        assert result.image.shape == (1, h, w, 3)
        del result
        gc.collect()
        rss.append(rss_bytes())
    growth = max(rss[1:]) - rss[1] if runs > 1 else 0
    record_property("soak_rss_mib", [round(r / 2**20, 1) for r in rss])
    print(f"soak: {runs} runs, RSS after run 1 {rss[0] / 2**20:.1f} MiB, after run 2 {rss[1] / 2**20:.1f} MiB, "
          f"max later {max(rss[1:]) / 2**20:.1f} MiB, last {rss[-1] / 2**20:.1f} MiB, growth {growth / 2**20:.1f} MiB")
    assert growth <= SOAK_RSS_TOLERANCE, [round(r / 2**20, 1) for r in rss]


def test_two_pipelines_in_one_process_keep_their_own_weights_and_conditioning(tiny_models, tmp_path):
    """A second checkpoint set (other seed: other weights) in the same process: each pipeline's
    results stay what they are alone, in any interleaving, through the shared host and
    conditioning caches."""
    from newbie_core.tiny import build_tiny_checkpoints
    other_paths = build_tiny_checkpoints(tmp_path / "other", seed=1)
    other = Models(load_dit_handle(other_paths.dit), load_text_encoder_handle(other_paths.gemma, other_paths.jina),
                   load_vae_handle(other_paths.vae))
    request = GenerationRequest(prompt="1girl, same prompt", width=16, height=16,
                                sampling=SamplingSettings(steps=1, seed=5))
    CONDITIONING_CACHE.clear()
    a1 = generate(tiny_models, request, CPU).latent
    b1 = generate(other, request, CPU).latent
    a2 = generate(tiny_models, request, CPU).latent
    b2 = generate(other, request, CPU).latent
    assert not torch.equal(a1, b1), "two different checkpoint sets gave the same latent"
    assert torch.equal(a1, a2) and torch.equal(b1, b2)
