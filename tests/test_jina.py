"""Jina CLIP v2 pooled text: transformers parity, mean pooling, LoRA merge, both file layouts."""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import save_file
from transformers import JinaEmbeddingsV3Model

from newbie_core.models.checkpoint import CheckpointError
from newbie_core.models.jina import make_jina_text_config
from newbie_core.models.jina_loading import build_jina_encoder, open_jina
from newbie_core.tiny.text_encoders import JINA_TINY, tiny_jina_original_weights, write_tiny_gemma, write_tiny_jina

TEXTS = ["<character_1><n>witch</n><appearance>silver hair, red eyes</appearance></character_1>",
         "1girl, solo, kimono", ""]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_jina(tmp_path_factory.mktemp("jina"))


@pytest.fixture(scope="module")
def ckpt(tiny):
    return open_jina(tiny["jina_comfy"])


def test_config_facts():
    real = make_jina_text_config()
    dims = (real.vocab_size, real.hidden_size, real.num_hidden_layers, real.num_attention_heads)
    assert dims == (250_002, 1024, 24, 16)
    assert (real.intermediate_size, real.layer_norm_eps, real.hidden_act) == (4096, 1e-5, "gelu")
    assert real.rope_parameters["rope_theta"] == 20_000.0 and real.type_vocab_size == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_last_hidden_state_is_bitwise_equal_to_transformers(ckpt, dtype, tmp_path):
    ref = JinaEmbeddingsV3Model(ckpt.config, add_pooling_layer=False)
    ref.load_state_dict({k: ckpt.source.get(k).float() for k in ckpt.source.keys()})
    ref.save_pretrained(tmp_path / "ref")
    ref = JinaEmbeddingsV3Model.from_pretrained(tmp_path / "ref", dtype=dtype, add_pooling_layer=False).eval()
    enc = build_jina_encoder(ckpt, "cpu", dtype)
    calls = []
    enc.block_runner = lambda i, block, *a, **k: calls.append(i) or block(*a, **k)
    for texts in (TEXTS, TEXTS[:1]):  # padded batch, then an unpadded one (mask-free path)
        batch = enc.tokenizer(texts)
        with torch.inference_mode():
            ours = enc(batch.input_ids, batch.attention_mask)
            theirs = ref(input_ids=batch.input_ids, attention_mask=batch.attention_mask.long()).last_hidden_state
        assert torch.equal(ours, theirs)
    assert calls == [0, 1, 0, 1] and [n for n, _ in enc.block_sequence()] == ["layers.0", "layers.1"]


def test_pooling_is_the_mean_over_non_pad_tokens_including_s_and_eos(ckpt):
    enc = build_jina_encoder(ckpt, "cpu", torch.float32)
    batch = enc.tokenizer(TEXTS)
    with torch.inference_mode():
        hidden = enc(batch.input_ids, batch.attention_mask).double()
        pooled = enc.encode(TEXTS)
    assert pooled.shape == (3, JINA_TINY["hidden"]) and pooled.dtype == torch.float32
    for row in range(3):
        ids = batch.input_ids[row].tolist()
        keep = [j for j, t in enumerate(ids) if t != 1]
        assert ids[keep[0]] == 0 and ids[keep[-1]] == 2           # <s> and </s> are averaged too
        expected = sum(hidden[row, j] for j in keep) / len(keep)
        torch.testing.assert_close(pooled[row].double(), expected, rtol=1e-6, atol=1e-6)
    alone = enc.encode(TEXTS[1:2])
    torch.testing.assert_close(alone[0], pooled[1], rtol=1e-5, atol=1e-6)  # padding does not matter


def _unmerged_reference(config) -> JinaEmbeddingsV3Model:
    """transformers' model on the original (un-merged) weights, with LoRA added by forward hooks."""
    w = tiny_jina_original_weights(0)
    h = config.hidden_size
    model = JinaEmbeddingsV3Model(config, add_pooling_layer=False).eval()
    orig = ".parametrizations.weight.original"
    sd = {"embeddings.word_embeddings.weight": w["embeddings.word_embeddings" + orig],
          "embeddings.token_type_embeddings.weight": w["embeddings.token_type_embeddings" + orig],
          "embeddings.LayerNorm.weight": w["emb_ln.weight"], "embeddings.LayerNorm.bias": w["emb_ln.bias"]}
    hooks = {"embeddings.word_embeddings": "embeddings.word_embeddings",
             "embeddings.token_type_embeddings": "embeddings.token_type_embeddings"}
    for i in range(config.num_hidden_layers):
        o, n = f"encoder.layers.{i}.", f"layers.{i}."
        qkv, bias = w[o + "mixer.Wqkv" + orig], w[o + "mixer.Wqkv.bias"]
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            rows = slice(j * h, (j + 1) * h)
            sd[n + f"self_attn.{name}.weight"], sd[n + f"self_attn.{name}.bias"] = qkv[rows], bias[rows]
            hooks[n + f"self_attn.{name}"] = (o + "mixer.Wqkv", rows)
        for old, new in (("mixer.out_proj", "self_attn.o_proj"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
            sd[n + new + ".weight"], sd[n + new + ".bias"] = w[o + old + orig], w[o + old + ".bias"]
            hooks[n + new] = (o + old, slice(None))
        for old, new in (("norm1", "post_attention_layernorm"), ("norm2", "post_mlp_layernorm")):
            sd[n + new + ".weight"], sd[n + new + ".bias"] = w[o + old + ".weight"], w[o + old + ".bias"]
    model.load_state_dict(sd)
    modules = dict(model.named_modules())
    for name, spec in hooks.items():
        if isinstance(spec, str):   # embedding: rows A0[ids] @ B0
            a, b = (w[spec + f".parametrizations.weight.0.lora_{x}"][0] for x in "AB")
            modules[name].register_forward_hook(lambda m, args, out, a=a, b=b: out + a[args[0]] @ b)
        else:                       # linear: x @ A0^T @ B0[rows]^T
            stem, rows = spec
            a, b = (w[stem + f".parametrizations.weight.0.lora_{x}"][0] for x in "AB")
            modules[name].register_forward_hook(lambda m, args, out, a=a, b=b[rows]: out + args[0] @ a.T @ b.T)
    return model


def test_lora_merge_matches_an_unmerged_forward(tiny):
    hf = open_jina(tiny["jina_hf"])
    enc = build_jina_encoder(hf, "cpu", torch.float32)
    batch = hf.tokenizer(TEXTS)
    ref = _unmerged_reference(hf.config)
    with torch.inference_mode():
        ours = enc.pooled(batch.input_ids, batch.attention_mask)
        hidden = ref(input_ids=batch.input_ids, attention_mask=batch.attention_mask.long()).last_hidden_state
        for handle_owner in ref.modules():
            handle_owner._forward_hooks.clear()
        base = ref(input_ids=batch.input_ids, attention_mask=batch.attention_mask.long()).last_hidden_state
    valid = (batch.input_ids != 1).unsqueeze(-1).float()
    unmerged = (hidden * valid).sum(1) / valid.sum(1)
    without_lora = (base * valid).sum(1) / valid.sum(1)
    torch.testing.assert_close(ours, unmerged, rtol=1e-4, atol=1e-5)
    assert (ours - without_lora).abs().max() > 100 * (ours - unmerged).abs().max()  # the LoRA mattered


def test_comfy_file_and_original_folder_give_identical_pooled(tiny, ckpt):
    hf = open_jina(tiny["jina_hf"])
    assert torch.equal(hf.tokenizer(TEXTS).input_ids, ckpt.tokenizer(TEXTS).input_ids)
    a = build_jina_encoder(ckpt, "cpu", torch.bfloat16).encode(TEXTS)
    b = build_jina_encoder(hf, "cpu", torch.bfloat16).encode(TEXTS)
    assert torch.equal(a, b)


def test_word_embeddings_can_stay_on_the_cpu(ckpt):
    enc = build_jina_encoder(ckpt, "cpu", torch.float32, embed_device="cpu")
    assert enc.embeddings.word_embeddings.weight.device.type == "cpu"
    assert enc.compute_device == torch.device("cpu") and enc.encode(TEXTS).device == enc.compute_device


def test_truncation_warns(ckpt, caplog):
    enc = build_jina_encoder(ckpt, "cpu", torch.float32)
    with caplog.at_level(logging.WARNING):
        pooled = enc.encode(TEXTS, max_length=8)
    assert pooled.shape == (3, JINA_TINY["hidden"]) and "Jina prompt 0 is too long" in caplog.text


def test_wrong_files_are_refused(tmp_path):
    gemma = write_tiny_gemma(tmp_path)["gemma_comfy"]
    with pytest.raises(CheckpointError, match="Gemma 3 text encoder"):
        open_jina(gemma)
    vae = tmp_path / "vae.safetensors"
    save_file({"decoder.conv_in.weight": torch.zeros(4, 4)}, str(vae))
    with pytest.raises(CheckpointError, match="a VAE"):
        open_jina(vae)


@pytest.mark.cuda
def test_cpu_word_embeddings_with_gpu_layers_is_bitwise_equal(ckpt):
    on_gpu = build_jina_encoder(ckpt, "cuda", torch.bfloat16)
    split = build_jina_encoder(ckpt, "cuda", torch.bfloat16, embed_device="cpu")
    assert torch.equal(on_gpu.encode(TEXTS), split.encode(TEXTS))
