"""Gemma 3 text features: the right layer, bitwise equal to transformers, both file layouts."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Gemma3TextConfig, Gemma3TextModel

from newbie_core.models.checkpoint import CheckpointError
from newbie_core.models.gemma import estimate_gemma_activation_bytes, make_gemma3_text_config
from newbie_core.models.gemma_loading import build_gemma_encoder, open_gemma
from newbie_core.tiny.text_encoders import write_tiny_gemma

# Long enough (> sliding window 16) that the sliding mask is materialised and matters.
TEXTS = ["<character_1><n>witch</n><appearance>silver hair, red eyes, long hair</appearance></character_1>"
         "<general_tags>night sky, masterpiece</general_tags>", "1girl, solo", ""]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_gemma(tmp_path_factory.mktemp("gemma"))


@pytest.fixture(scope="module")
def ckpt(tiny):
    return open_gemma(tiny["gemma_comfy"])


def _reference(ckpt, dtype, tmp_path) -> Gemma3TextModel:
    """transformers' own Gemma3TextModel on the same weights, loaded as from_pretrained does."""
    ref = Gemma3TextModel(ckpt.config)
    ref.load_state_dict({k[len("model."):]: ckpt.source.get(k).float() for k in ckpt.source.keys()})
    ref.save_pretrained(tmp_path / "ref")
    return Gemma3TextModel.from_pretrained(tmp_path / "ref", dtype=dtype, attn_implementation="sdpa").eval()


def test_config_facts_and_layer_choice(ckpt):
    real = make_gemma3_text_config()
    assert (real.vocab_size, real.hidden_size, real.num_hidden_layers, real.head_dim) == (262_208, 2560, 34, 256)
    assert (real.num_attention_heads, real.num_key_value_heads, real.intermediate_size) == (8, 4, 10_240)
    global_layers = [i for i, t in enumerate(real.layer_types) if t == "full_attention"]
    assert global_layers == [5, 11, 17, 23, 29]  # (i + 1) % 6 == 0, so layer 33 is a local one
    assert real.rope_parameters["full_attention"] == {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}
    assert real.rope_parameters["sliding_attention"]["rope_theta"] == 10_000.0
    assert (real.sliding_window, real.query_pre_attn_scalar, real.rms_norm_eps) == (1024, 256, 1e-6)
    enc = build_gemma_encoder(ckpt, "cpu", torch.float32)
    assert [n for n, _ in enc.block_sequence()] == [f"model.layers.{i}" for i in range(6)]
    assert ckpt.config.layer_types[5] == "full_attention"  # the tiny run includes a global layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bitwise_equal_to_transformers_hidden_states_minus_2(ckpt, dtype, tmp_path):
    enc = build_gemma_encoder(ckpt, "cpu", dtype)
    ref = _reference(ckpt, dtype, tmp_path)
    calls = []
    enc.block_runner = lambda i, block, *a, **k: calls.append(i) or block(*a, **k)
    for texts in (TEXTS, TEXTS[:1]):  # padded batch, then one unpadded prompt (mask-free SDPA path)
        batch = enc.tokenizer(texts, pad_to_multiple_of=8 if len(texts) > 1 else 1)
        with torch.inference_mode():
            ours = enc(batch.input_ids, batch.attention_mask)
            hs = ref(input_ids=batch.input_ids, attention_mask=batch.attention_mask.long(),
                     output_hidden_states=True).hidden_states
        assert len(hs) == 8 and torch.equal(ours, hs[-2])
        assert not torch.allclose(ours, hs[-3]) and not torch.allclose(ours.float(), hs[-1].float())
    assert calls == list(range(6)) * 2


def test_right_padding_does_not_change_valid_tokens(ckpt):
    enc = build_gemma_encoder(ckpt, "cpu", torch.float32)
    feats, mask = enc.encode(TEXTS)
    alone, alone_mask = enc.encode([TEXTS[1]])
    n = int(alone_mask.sum())
    assert feats.shape[1] > alone.shape[1] and int(mask[1].sum()) == n
    torch.testing.assert_close(feats[1, :n], alone[0, :n], rtol=1e-5, atol=1e-6)
    assert mask.dtype == torch.bool and feats.shape == (3, mask.shape[1], 64)


def test_encode_truncates_with_a_warning(ckpt, caplog):
    enc = build_gemma_encoder(ckpt, "cpu", torch.float32)
    with caplog.at_level(logging.WARNING):
        feats, mask = enc.encode(TEXTS, max_length=12)
    assert feats.shape[1] == 16 and int(mask.sum(1).max()) == 12
    assert "Gemma prompt 0 is too long" in caplog.text


def test_embedding_device_is_separate_from_compute_device(ckpt):
    enc = build_gemma_encoder(ckpt, "cpu", torch.float32, embed_device="cpu")
    seen = []
    enc.block_runner = lambda i, block, h, **k: seen.append(h.device) or block(h, **k)
    ids = torch.tensor([[2, 10, 11]], dtype=torch.int32)  # any int dtype / device goes to the table
    out = enc(ids, torch.ones(1, 3, dtype=torch.bool))
    assert enc.compute_device == torch.device("cpu") and set(seen) == {enc.compute_device}
    assert out.device == enc.compute_device


@pytest.mark.cuda
def test_embedding_on_cpu_layers_on_gpu_is_bitwise_equal(ckpt):
    batch = ckpt.tokenizer(TEXTS)
    on_gpu = build_gemma_encoder(ckpt, "cuda", torch.bfloat16)
    split = build_gemma_encoder(ckpt, "cuda", torch.bfloat16, embed_device="cpu")
    assert split.model.embed_tokens.weight.device.type == "cpu"
    with torch.inference_mode():
        assert torch.equal(on_gpu(batch.input_ids, batch.attention_mask), split(batch.input_ids, batch.attention_mask))


def test_comfy_file_and_hf_folders_give_identical_features(tiny, ckpt, tmp_path):
    # a second HF folder using the newer transformers prefix "model.language_model."
    newer = tmp_path / "newer"
    newer.mkdir()
    for f in tiny["gemma_hf"].iterdir():
        (newer / f.name).write_bytes(f.read_bytes())
    shard = newer / "model-00001-of-00001.safetensors"
    tensors = {k.replace("language_model.model.", "model.language_model.", 1): v for k, v in load_file(shard).items()}
    save_file(tensors, str(shard))
    index = {"weight_map": {k: shard.name for k in tensors}}
    (newer / "model.safetensors.index.json").write_text(json.dumps(index))
    outs = []
    for path in (tiny["gemma_comfy"], tiny["gemma_hf"], newer):
        enc = build_gemma_encoder(open_gemma(path), "cpu", torch.bfloat16)
        outs.append(enc.encode(TEXTS))
    for feats, mask in outs[1:]:
        assert torch.equal(feats, outs[0][0]) and torch.equal(mask, outs[0][1])


def _fake_file(path, keys: dict[str, tuple[int, ...]]):
    save_file({k: torch.zeros(s) for k, s in keys.items()}, str(path))
    return path


def test_wrong_files_are_refused_with_what_they_look_like(tmp_path, tiny):
    from newbie_core.tiny.text_encoders import write_tiny_jina
    jina = write_tiny_jina(tmp_path)["jina_comfy"]
    with pytest.raises(CheckpointError, match="Jina CLIP v2"):
        open_gemma(jina)
    gemma2 = _fake_file(tmp_path / "g2.safetensors", {
        "model.embed_tokens.weight": (8, 4), "model.layers.0.self_attn.q_proj.weight": (4, 4),
        "model.layers.0.pre_feedforward_layernorm.weight": (4,)})
    with pytest.raises(CheckpointError, match="Gemma 2"):
        open_gemma(gemma2)
    dit = _fake_file(tmp_path / "dit.safetensors", {"model.diffusion_model.cap_embedder.1.weight": (4, 4)})
    with pytest.raises(CheckpointError, match="diffusion model"):
        open_gemma(dit)
    cfg = tmp_path / "g2folder"
    cfg.mkdir()
    (cfg / "config.json").write_text(json.dumps({"model_type": "gemma2"}))
    with pytest.raises(CheckpointError, match="model_type='gemma2'"):
        open_gemma(cfg)


def test_incomplete_file_is_refused(tiny, tmp_path):
    tensors = load_file(tiny["gemma_comfy"])
    del tensors["model.layers.3.mlp.up_proj.weight"]
    save_file(tensors, str(tmp_path / "cut.safetensors"))
    with pytest.raises(CheckpointError, match="missing tensor.*layers.3.mlp.up_proj"):
        open_gemma(tmp_path / "cut.safetensors")


def test_activation_estimate_scales_as_documented():
    cfg: Gemma3TextConfig = make_gemma3_text_config()
    one = estimate_gemma_activation_bytes(cfg, 1, 512, torch.bfloat16)
    assert estimate_gemma_activation_bytes(cfg, 2, 512, torch.bfloat16) == 2 * one
    # at least the MLP intermediates (gate, up, product) in bf16; at most 4x them plus fp32 scores
    mlp = 3 * 512 * cfg.intermediate_size * 2
    assert mlp < one < 4 * mlp + 4 * cfg.num_attention_heads * 512**2
    assert estimate_gemma_activation_bytes(cfg, 1, 512, torch.float32) > one
