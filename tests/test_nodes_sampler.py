"""CPU tier: the sampler node, and Cancel in the sampler and the encoder (see nodes_support for how
the pack is loaded)."""

from __future__ import annotations

import re

import pytest
import torch

from nodes_support import adapter, conds, models, nodes, pack  # noqa: F401  (fixtures)
from nodes_support import call, empty, mod, sample  # tests/ is on pytest's pythonpath (pyproject)


# ---------------------------------------------------------------------------------- sampler

def test_sampler_returns_raw_latent_report_progress_and_is_deterministic(nodes, models, conds, adapter):
    adapter.progress_bars.clear()
    start = empty(nodes, 48, 32, batch=2)
    latent, report = sample(nodes, models, conds, start)
    assert latent["samples"].shape == (2, 16, 4, 6) and latent["samples"].device.type == "cpu"
    assert torch.isfinite(latent["samples"]).all() and latent["samples"].std() > 1e-3
    assert [u[0] for u in adapter.progress_bars[-1].updates] == [1, 2]
    again, _ = sample(nodes, models, conds, start)
    assert torch.equal(latent["samples"], again["samples"])
    other, _ = sample(nodes, models, conds, start, seed=2)
    assert not torch.equal(latent["samples"], other["samples"])
    text = report.render()
    assert "sample" in text and "predicted peak" in text and "blocks resident / streamed" in text


def test_sampler_cancel_stops_within_one_step(nodes, models, conds, adapter):
    ad = mod("nodes.comfy_adapter")
    adapter.progress_bars.clear()
    original = ad.FallbackAdapter.progress_bar

    def bar_that_cancels(self, total, node_id=None):
        bar = original(self, total, node_id)
        update = bar.update_absolute

        def update_and_cancel(value, total=None, preview=None):
            update(value, total, preview)
            self.request_interrupt()        # the user presses Cancel during the first step
        bar.update_absolute = update_and_cancel
        return bar

    adapter.progress_bar = bar_that_cancels.__get__(adapter)
    try:
        with pytest.raises(ad.ProcessingInterrupted):
            sample(nodes, models, conds, empty(nodes), steps=5)
    finally:
        del adapter.progress_bar
    assert [u[0] for u in adapter.progress_bars[-1].updates] == [1]


def test_encode_cancel_stops_within_one_block(nodes, models, adapter, monkeypatch):
    """ComfyUI's Cancel is a flag: the encode node polls it before every encoder block."""
    ad = mod("nodes.comfy_adapter")
    pipeline = mod("newbie_core.pipeline")
    checks = []
    original = ad.FallbackAdapter.check_interrupted

    def cancel_during_the_first_block(self):
        checks.append(1)
        if len(checks) == 2:              # the user presses Cancel while block 0 runs
            self.request_interrupt()
        original(self)
    monkeypatch.setattr(ad.FallbackAdapter, "check_interrupted", cancel_during_the_first_block)
    counted = dict(pipeline.ENCODER_CALLS)
    args = dict(text_encoders=models[1], positive="a prompt cancelled mid-encode", negative="", compat=False)
    with pytest.raises(ad.ProcessingInterrupted):
        call(nodes["NewBieTextEncode"], **args)
    assert len(checks) == 2                                   # block 1 never started
    assert pipeline.ENCODER_CALLS == counted                  # neither encoder finished; Jina never started
    monkeypatch.undo()
    call(nodes["NewBieTextEncode"], **args)                   # the next run works
    assert pipeline.ENCODER_CALLS["gemma"] == counted["gemma"] + 1


def test_sampler_streams_under_a_small_budget_and_matches_resident(nodes, models, conds):
    start = empty(nodes)
    resident, rep = sample(nodes, models, conds, start, cfg=1.0)     # cfg 1: one forward per step
    plan_text = rep.plans[0][1]
    assert re.search(r"blocks resident / streamed\s+(\d+) / 0", plan_text)
    # The all-resident plan's peak minus three blocks: fits the ring, but not every block.
    plan = mod("newbie_core.pipeline.sample").plan_sampling(
        models[0], mod("newbie_core.pipeline").MemorySettings(), 1, conds[0][0][0].shape[1], 32, 32,
        torch.device("cpu"), None)[2]
    block = max(plan.slot_bytes, 2 * 2**20)
    tight_gb = (plan.predicted_peak - 3 * block) / 2**30
    streamed, rep2 = sample(nodes, models, conds, start, cfg=1.0, vram_budget_gb=tight_gb)
    assert re.search(r"blocks resident / streamed\s+\d+ / [1-9]", rep2.plans[0][1]), rep2.plans[0][1]
    assert torch.equal(resident["samples"], streamed["samples"])


def test_sampler_accepts_native_masked_conditioning_and_rejects_foreign(nodes, models, conds):
    enc = mod("nodes.encode_node")
    feats, extra = conds[0][0]
    padded = torch.cat([feats, torch.full((1, 3, feats.shape[2]), 99.0)], dim=1)      # (1, L+3, C)
    mask = torch.cat([extra["attention_mask"], torch.zeros(1, 3, dtype=torch.long)], dim=1)
    native = [[padded, {"pooled_output": extra["pooled_output"], "attention_mask": mask}]]
    back = enc.from_comfy_conditioning(native, "positive")
    assert torch.equal(back.cap_feats, feats[0].float()) and back.pooled.shape == (extra["pooled_output"].shape[1],)
    start = empty(nodes)
    a, _ = sample(nodes, models, conds, start, cfg=1.0)
    b, _ = sample(nodes, models, conds, start, cfg=1.0, positive=native)
    assert torch.equal(a["samples"], b["samples"])
    with pytest.raises(ValueError, match="pooled_output"):
        sample(nodes, models, conds, start, positive=[[feats, {}]])
    with pytest.raises(ValueError, match="expects"):
        sample(nodes, models, conds, start, negative=[[torch.zeros(1, 5, 2048), {"pooled_output": torch.zeros(1, 1280)}]])


def test_sampler_rejects_bad_inputs_clearly(nodes, models, conds):
    start = empty(nodes)
    with pytest.raises(ValueError, match="denoise"):
        sample(nodes, models, conds, start, denoise=0.0)
    with pytest.raises(ValueError, match="16 channels"):
        sample(nodes, models, conds, {"samples": torch.zeros(1, 4, 8, 8)})
    with pytest.raises(ValueError, match="multiple of 16"):
        sample(nodes, models, conds, {"samples": torch.zeros(1, 16, 9, 8)})
    with pytest.raises(ValueError, match="unknown sampler"):
        sample(nodes, models, conds, start, sampler="nope")
    with pytest.raises(ValueError, match="DiT Loader"):
        sample(nodes, models, conds, start, dit="not a handle")
