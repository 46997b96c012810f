"""CPU tier: PlacedDiT, the DiT held under one placement plan across a core sampler's forwards."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch

from newbie_core.pipeline import MemorySettings, SamplingSettings, run_sampling
from newbie_core.pipeline.conditioning import Conditioning, batch_conditionings
from newbie_core.pipeline.dit_session import PlacedDiT
from newbie_core.placement import Report
from newbie_core.sampling import flow_sigmas, initial_noise
from newbie_core.tiny.lora import write_lora

CPU = torch.device("cpu")


def _conds(dit, lengths=(5, 3)):
    cfg = dit.ckpt.config
    gen = torch.Generator().manual_seed(0)
    return [Conditioning(torch.randn(n, cfg.cap_feat_dim, generator=gen), torch.randn(cfg.clip_text_dim, generator=gen))
            for n in lengths]


def _budget(value):
    return lambda ideal_peak, weight_bytes: nullcontext(value)


@pytest.mark.parametrize("with_lora", [False, True], ids=["plain", "lora"])
def test_core_style_euler_through_placed_dit_equals_run_sampling(tiny_models, tmp_path, with_lora):
    """An Euler loop written as ComfyUI runs it (denoised = x + sigma * v, cond and uncond in one
    call) over PlacedDiT gives run_sampling's latent; one session serves every step. With a LoRA
    on the trainer's targets, which include non-block modules (time_text_embed, the pooled
    projection), the MODEL path must patch those too."""
    dit = tiny_models.dit
    if with_lora:
        path = write_lora(tmp_path / "peft" / "adapter_model.safetensors", dit.ckpt.config, "peft", seed=3, std=0.1)
        dit = dit.with_lora(path, 1.0)
    pos, neg = _conds(dit)
    sampling = SamplingSettings(steps=3, cfg=4.0, seed=5)
    start = torch.zeros(1, 16, 8, 8)
    ours = run_sampling(dit, pos, neg, start, sampling, MemorySettings(), CPU, Report(), None).latent
    placed = PlacedDiT(dit, MemorySettings(), CPU, budget_scope=_budget(None))
    feats, mask, pooled = batch_conditionings([pos, neg], CPU, torch.float32)
    sigmas = flow_sigmas(3, 6.0)
    x = initial_noise(5, (1, 16, 8, 8))
    for i in range(3):
        s = float(sigmas[i])
        v = placed(torch.cat([x, x]), torch.full((2,), 1.0 - s), feats, mask, pooled).float()
        v = v[1:] + 4.0 * (v[:1] - v[1:])
        x = x + (s - float(sigmas[i + 1])) * v
    placed.close()
    latent = x / 0.3611 + 0.1159
    assert placed.opened == 1 and placed.forwards == 3 and not placed.is_open
    assert torch.allclose(latent, ours, atol=1e-4 * float(ours.abs().max())), float((latent - ours).abs().max())
    if with_lora:
        plain = run_sampling(tiny_models.dit, pos, neg, start, sampling, MemorySettings(), CPU, Report(), None).latent
        assert (ours - plain).abs().max() > 100 * 1e-4 * float(ours.abs().max()), "the LoRA must change the latent"


def test_streamed_session_is_bitwise_equal_to_resident_and_replans_for_more(tiny_models):
    dit = tiny_models.dit
    feats, mask, pooled = batch_conditionings(_conds(dit), CPU, torch.float32)
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.full((2,), 0.3)
    resident = PlacedDiT(dit, MemorySettings(), CPU, budget_scope=_budget(None))
    v_res = resident(x, t, feats, mask, pooled)
    plan = resident.plan
    tight = plan.predicted_peak - 3 * (plan.slot_bytes or 2 * 2**20)
    streamed = PlacedDiT(dit, MemorySettings(), CPU, budget_scope=_budget(tight))
    v_str = streamed(x, t, feats, mask, pooled)
    assert len(streamed.plan.resident) < streamed.plan.n_blocks, "the budget must force streaming"
    assert torch.equal(v_res, v_str)
    resident(x[:1], t[:1], feats[:1], mask[:1], pooled[:1])           # fits the open plan
    assert resident.opened == 1
    resident(torch.cat([x, x]), torch.cat([t, t]), torch.cat([feats, feats]), torch.cat([mask, mask]),
             torch.cat([pooled, pooled]))                            # a bigger batch re-plans
    assert resident.opened == 2 and resident.plan.n_blocks == plan.n_blocks
    for p in (resident, streamed):
        p.close()
        assert not p.is_open and p.last_plan is not None


def test_a_core_sampler_passing_new_but_equal_tensors_refines_the_caption_once(tiny_models, monkeypatch):
    """ComfyUI's samplers may build the caption batch anew at each step: equal values still hit
    the session's refined caption, a different conditioning makes its own, and a new session
    (other weights, e.g. another LoRA) starts empty."""
    from newbie_core.models.dit import NextDiT
    made = []
    original = NextDiT.refine_caption
    monkeypatch.setattr(NextDiT, "refine_caption", lambda self, f, m: (made.append(1), original(self, f, m))[1])
    dit = tiny_models.dit
    placed = PlacedDiT(dit, MemorySettings(), CPU, budget_scope=_budget(None))
    x, t = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(2)), torch.full((2,), 0.4)
    first = None
    for _ in range(3):
        feats, mask, pooled = batch_conditionings(_conds(dit), CPU, torch.float32)     # fresh tensors each call
        v = placed(x, t, feats, mask, pooled)
        first = v if first is None else first
        assert torch.equal(v, first)
    assert len(made) == 1
    placed(x, t, *batch_conditionings(_conds(dit, (4, 2)), CPU, torch.float32))
    assert len(made) == 2
    placed.close()
    placed(x, t, feats, mask, pooled)
    assert len(made) == 3 and placed.opened == 2
    placed.close()
