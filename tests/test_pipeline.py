"""The staged pipeline on tiny checkpoints, on the CPU: end to end, caching, streaming, errors."""

from __future__ import annotations

import os

import pytest
import torch

from newbie_core.models.checkpoint import CheckpointError
from newbie_core.pipeline import (CONDITIONING_CACHE, ENCODER_CALLS, GenerationRequest, MemorySettings, Models,
                                  SamplingSettings, StorageDType, describe_plan, generate, load_dit_handle)
from newbie_core.pipeline.sample import run_sampling
from newbie_core.pipeline.encode import encode_texts
from newbie_core.placement import Report
from newbie_core.prompt import prepare_texts

CPU = torch.device("cpu")
XML = "<character_1>\n<n>miku</n>\n<gender>1girl</gender>\n</character_1>\n<general_tags>\n<count>1girl, solo</count>\n</general_tags>"


@pytest.fixture(scope="module")
def models(tiny_models) -> Models:
    return tiny_models


def _request(**kw) -> GenerationRequest:
    base = dict(prompt=XML, negative="", width=64, height=64, sampling=SamplingSettings(steps=3, seed=7))
    base.update(kw)
    return GenerationRequest(**base)


def test_generate_end_to_end_gives_an_image_of_the_requested_size(models):
    result = generate(models, _request(width=80, height=48), CPU)
    assert result.image.shape == (1, 48, 80, 3)
    assert result.latent.shape == (1, 16, 6, 10)
    assert torch.isfinite(result.image).all()
    assert 0.0 <= result.image.min() and result.image.max() <= 1.0
    assert result.image.std() > 1e-3          # not a constant image
    assert [r.name for r in result.report.records] in (["encode:gemma", "encode:jina", "sample", "decode"],
                                                         ["sample", "decode"])


def test_same_seed_same_latent_and_cache_skips_encoders(models):
    CONDITIONING_CACHE.clear()
    first = generate(models, _request(), CPU)
    calls = dict(ENCODER_CALLS)
    second = generate(models, _request(), CPU)
    assert ENCODER_CALLS == calls, "an unchanged prompt must not run the encoders again"
    assert torch.equal(first.latent, second.latent)
    assert [r.name for r in second.report.records] == ["sample", "decode"]
    generate(models, _request(prompt=XML + "\n<caption>new</caption>"), CPU)
    assert ENCODER_CALLS["gemma"] == calls["gemma"] + 1


def test_cache_key_follows_the_encoder_file_mtime(models, tiny_dir):
    CONDITIONING_CACHE.clear()
    texts = prepare_texts("a cat")
    encode_texts(models.encoders, texts, MemorySettings(), CPU, Report(), None)
    calls = ENCODER_CALLS["jina"]
    path = models.encoders.jina.source.files[0]
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    encode_texts(models.encoders, texts, MemorySettings(), CPU, Report(), None)
    assert ENCODER_CALLS["jina"] == calls + 1


def test_disk_conditioning_cache_survives_the_process_cache(models, tmp_path, caplog):
    CONDITIONING_CACHE.clear()
    memory = MemorySettings(conditioning_cache_dir=str(tmp_path))
    texts = prepare_texts("a dog on the beach", "lowres")
    first = encode_texts(models.encoders, texts, memory, CPU, Report(), None)
    assert len(list(tmp_path.glob("*.safetensors"))) == 2
    CONDITIONING_CACHE.clear()                      # a new process: only the disk copy is left
    calls = dict(ENCODER_CALLS)
    again = encode_texts(models.encoders, texts, memory, CPU, Report(), None)
    assert ENCODER_CALLS == calls
    assert all(torch.equal(a.cap_feats, b.cap_feats) and torch.equal(a.pooled, b.pooled) for a, b in zip(first, again))
    CONDITIONING_CACHE.clear()
    for path in tmp_path.glob("*.safetensors"):
        path.write_bytes(b"not a safetensors file")
    encode_texts(models.encoders, texts, memory, CPU, Report(), None)
    assert ENCODER_CALLS["gemma"] == calls["gemma"] + 1, "a damaged cache file is a miss"
    assert "ignoring unreadable conditioning cache file" in caplog.text


def test_streamed_sampling_is_bitwise_equal_to_resident(models):
    texts = prepare_texts(XML, "lowres")
    pos, neg = encode_texts(models.encoders, texts, MemorySettings(), CPU, Report(), None)
    start = torch.zeros(1, 16, 8, 8)
    sampling = SamplingSettings(steps=3, seed=3)
    resident = run_sampling(models.dit, pos, neg, start, sampling, MemorySettings(), CPU, Report(), None)
    # A budget that fits the small modules, activations and a two-slot ring but not all blocks.
    block = resident.plan.slot_bytes or 2 * 2**20
    tight = resident.plan.predicted_peak - 3 * block
    streamed = run_sampling(models.dit, pos, neg, start, sampling, MemorySettings(), CPU, Report(), tight)
    assert len(streamed.plan.resident) < streamed.plan.n_blocks, "the budget must force streaming"
    assert (streamed.plan.attn_chunk, streamed.plan.ffn_chunk) == (resident.plan.attn_chunk, resident.plan.ffn_chunk)
    assert torch.equal(streamed.latent, resident.latent)


@pytest.mark.parametrize("cfg_trunc", [1.0, 0.1], ids=["cfg", "cfg-truncated"])
def test_the_caption_refiners_run_once_per_conditioning_not_per_step(models, monkeypatch, cfg_trunc):
    """The sampling plan streams the caption refiners once (plan.once): the sampler makes the
    refined caption once for the CFG pair, and once more for the positive alone when CFG is
    truncated, however many steps run."""
    from newbie_core.models.dit import NextDiT
    made = []
    original = NextDiT.refine_caption
    monkeypatch.setattr(NextDiT, "refine_caption",
                        lambda self, f, m: (made.append(f.shape[0]), original(self, f, m))[1])
    texts = prepare_texts(XML, "lowres")
    pos, neg = encode_texts(models.encoders, texts, MemorySettings(), CPU, Report(), None)
    sampling = SamplingSettings(steps=4, seed=3, cfg_trunc=cfg_trunc)
    result = run_sampling(models.dit, pos, neg, torch.zeros(1, 16, 8, 8), sampling, MemorySettings(), CPU, Report(),
                          None)
    assert made == ([2] if cfg_trunc == 1.0 else [2, 1])
    names = models.dit.ckpt.config.n_context_refiner
    assert [result.plan.block_names[i] for i in result.plan.once] == [f"context_refiner.{i}" for i in range(names)]


def test_fp8_storage_drifts_little_from_bf16(models, tiny_dir):
    texts = prepare_texts(XML)
    pos, neg = encode_texts(models.encoders, texts, MemorySettings(), CPU, Report(), None)
    start = torch.zeros(1, 16, 8, 8)
    sampling = SamplingSettings(steps=3, seed=1)
    bf16 = run_sampling(models.dit, pos, neg, start, sampling, MemorySettings(), CPU, Report(), None).latent
    fp8_handle = load_dit_handle(models.dit.ckpt.path, StorageDType.FP8)
    fp8 = run_sampling(fp8_handle, pos, neg, start, sampling, MemorySettings(), CPU, Report(), None).latent
    rel = (fp8 - bf16).norm() / bf16.norm()
    assert 0 < rel < 0.1


def test_img2img_keeps_the_start_at_low_denoise(models):
    image = torch.rand(1, 64, 64, 3)
    low = generate(models, _request(init_image=image, sampling=SamplingSettings(steps=4, denoise=0.2)), CPU)
    assert low.image.shape == image.shape
    with pytest.raises(ValueError, match="init image is 32x32"):
        generate(models, _request(init_image=torch.rand(1, 32, 32, 3)), CPU)


def test_plan_describes_every_stage_without_running(models):
    calls = dict(ENCODER_CALLS)
    text = describe_plan(models, _request(memory=MemorySettings(vram_budget_gb=4)), CPU)
    for stage in ("encode:gemma", "encode:jina", "sample", "decode"):
        assert stage in text
    assert ENCODER_CALLS == calls


def test_bad_inputs_give_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist.*Looked in"):
        load_dit_handle(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="multiple of 16"):
        _request(width=100)
    with pytest.raises(ValueError, match="denoise"):
        SamplingSettings(denoise=0.0)


def test_the_host_plan_counts_the_caption_refiners_once_not_per_step(models):
    """Bytes per step (the copy and disk rooflines of --plan) leave out the blocks that stream once."""
    from newbie_core.pipeline.host_ram import host_model
    from newbie_core.pipeline.sample import plan_sampling
    from newbie_core.placement import block_sizes
    _, _, full = plan_sampling(models.dit, MemorySettings(), 2, 16, 64, 64, CPU, None)
    model, inputs, plan = plan_sampling(models.dit, MemorySettings(), 2, 16, 64, 64, CPU,
                                        full.predicted_peak - 3 * (full.slot_bytes or 2 * 2**20))
    assert plan.once and set(plan.once) <= set(plan.streamed), "the tight budget streams the caption refiners"
    stored = [s.storage_bytes(k) for s, k in zip(block_sizes(model, inputs.compute_dtype), plan.storage)]
    per_step = host_model("sample", model, inputs, plan).streamed_bytes_per_step
    assert per_step == sum(stored[i] for i in plan.streamed_per_forward)
    assert per_step == sum(stored[i] for i in plan.streamed) - sum(stored[i] for i in plan.once)
