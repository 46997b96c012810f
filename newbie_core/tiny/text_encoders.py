"""Tiny Gemma 3 and Jina CLIP v2 text encoders in their real file layouts (random weights).

Layouts written under ``root``:

* ``text_encoders/gemma_3_4b_it_bf16.safetensors``: ComfyUI keys + ``spiece_model``;
* ``hf/gemma-3-4b-it/``: config.json, one shard with the ``language_model.model.`` prefix (plus
  two vision-tower keys that loaders must ignore), index json, tokenizer.model;
* ``text_encoders/jina_clip_v2_bf16.safetensors``: ComfyUI keys (LoRA merged) + ``spiece_model``;
* ``hf/jina-clip-v2/``: original jina-clip-v2 keys with ``parametrizations.weight.original`` and
  the ``retrieval.query`` LoRA, config.json and a tokenizer.json made offline from the spm model.

Tiny dims that shapes cannot reveal go into the safetensors ``__metadata__`` as
``newbie.gemma.*`` / ``newbie.jina.*`` JSON values.

The SentencePiece fixtures in ``fixtures/`` were trained once (sentencepiece 0.2.3) on ~1500
generated lines: anime tag lists, NewBie XML prompts (``<character_1>…``, ``<general_tags>``),
the Gemma system prefix with filler words, and random romanised names. They are committed
because SentencePiece training is not reproducible across versions. Settings:

* ``gemma_tiny.model``: bpe, vocab 1200, byte_fallback, no dummy prefix, identity normaliser,
  split_digits, pad 0 / eos 1 / bos 2 / unk 3 (Gemma's ids), user symbols <start_of_turn>,
  <end_of_turn>;
* ``xlmr_tiny.model``: unigram, vocab 1200, nmt_nfkc, unk 0 / <s> 1 / </s> 2 (like XLM-R's
  sentencepiece.bpe.model, so the fairseq offset applies);
* ``xlmr_tiny_aligned.model``: the same training with <s> 0 / <pad> 1 / </s> 2 / <unk> 3 and
  vocab 1201, which gives the same pieces at fairseq ids (the convention ComfyUI's raw-spm path
  needs); it goes into the ComfyUI Jina file.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

FIXTURES = Path(__file__).parent / "fixtures"

GEMMA_TINY = dict(hidden=64, layers=7, heads=2, kv_heads=1, head_dim=32, mlp=128, sliding_window=16)
JINA_TINY = dict(hidden=32, layers=2, heads=4, ffn=64, lora_rank=4)


def _normal(gen: torch.Generator, *shape: int, std: float = 0.02, mean: float = 0.0) -> torch.Tensor:
    return torch.randn(*shape, generator=gen) * std + mean


def _spm_tensor(name: str) -> torch.Tensor:
    return torch.frombuffer(bytearray((FIXTURES / name).read_bytes()), dtype=torch.uint8)


def _bf16(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.to(torch.bfloat16).contiguous() for k, v in tensors.items()}


# -- Gemma ------------------------------------------------------------------------------------
def tiny_gemma_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    """ComfyUI-named fp32 weights of the tiny Gemma (RMSNorm weights near 0, i.e. scale ~1)."""
    import sentencepiece
    vocab = sentencepiece.SentencePieceProcessor(model_file=str(FIXTURES / "gemma_tiny.model")).get_piece_size()
    g, d = torch.Generator().manual_seed(seed), GEMMA_TINY
    h, q, kv = d["hidden"], d["heads"] * d["head_dim"], d["kv_heads"] * d["head_dim"]
    out = {"model.embed_tokens.weight": _normal(g, vocab, h, std=0.5)}
    for i in range(d["layers"]):
        p = f"model.layers.{i}."
        out.update({
            p + "self_attn.q_proj.weight": _normal(g, q, h), p + "self_attn.k_proj.weight": _normal(g, kv, h),
            p + "self_attn.v_proj.weight": _normal(g, kv, h), p + "self_attn.o_proj.weight": _normal(g, h, q),
            p + "self_attn.q_norm.weight": _normal(g, d["head_dim"], std=0.1),
            p + "self_attn.k_norm.weight": _normal(g, d["head_dim"], std=0.1),
            p + "mlp.gate_proj.weight": _normal(g, d["mlp"], h), p + "mlp.up_proj.weight": _normal(g, d["mlp"], h),
            p + "mlp.down_proj.weight": _normal(g, h, d["mlp"]),
        })
        for norm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm"):
            out[p + norm + ".weight"] = _normal(g, h, std=0.1)
    out["model.norm.weight"] = _normal(g, h, std=0.1)
    return out


def _gemma_metadata() -> dict[str, str]:
    d = GEMMA_TINY
    return {"newbie.gemma.sliding_window": json.dumps(d["sliding_window"]),
            "newbie.gemma.query_pre_attn_scalar": json.dumps(d["head_dim"])}


def _gemma_hf_config(vocab: int) -> dict:
    d = GEMMA_TINY
    text = dict(model_type="gemma3_text", vocab_size=vocab, hidden_size=d["hidden"], num_hidden_layers=d["layers"],
                num_attention_heads=d["heads"], num_key_value_heads=d["kv_heads"], head_dim=d["head_dim"],
                intermediate_size=d["mlp"], sliding_window=d["sliding_window"], query_pre_attn_scalar=d["head_dim"],
                rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
                rope_scaling={"factor": 8.0, "rope_type": "linear"}, rms_norm_eps=1e-6)
    return {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3", "text_config": text,
            "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 8}}


def write_tiny_gemma(root: Path, seed: int = 0) -> dict[str, Path]:
    """Write the tiny Gemma as a ComfyUI file and as an HF folder; returns {variant: path}."""
    root = Path(root)
    weights = _bf16(tiny_gemma_weights(seed))
    comfy = root / "text_encoders" / "gemma_3_4b_it_bf16.safetensors"
    comfy.parent.mkdir(parents=True, exist_ok=True)
    save_file({**weights, "spiece_model": _spm_tensor("gemma_tiny.model")}, str(comfy), metadata=_gemma_metadata())

    folder = root / "hf" / "gemma-3-4b-it"
    folder.mkdir(parents=True, exist_ok=True)
    hf = {"language_model." + k: v for k, v in weights.items()}
    hf["vision_tower.vision_model.embeddings.patch_embedding.weight"] = torch.zeros(8, 3, 2, 2, dtype=torch.bfloat16)
    hf["multi_modal_projector.mm_input_projection_weight"] = torch.zeros(8, GEMMA_TINY["hidden"], dtype=torch.bfloat16)
    shard = "model-00001-of-00001.safetensors"
    save_file(hf, str(folder / shard), metadata={"format": "pt"})
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in hf.values())},
             "weight_map": {k: shard for k in sorted(hf)}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    vocab = weights["model.embed_tokens.weight"].shape[0]
    (folder / "config.json").write_text(json.dumps(_gemma_hf_config(vocab), indent=1))
    (folder / "tokenizer.model").write_bytes((FIXTURES / "gemma_tiny.model").read_bytes())
    return {"gemma_comfy": comfy, "gemma_hf": folder}


# -- Jina ---------------------------------------------------------------------------------------
def tiny_jina_original_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    """Weights in the original jina-clip-v2 text layout (relative to ``text_model.transformer.roberta.``),
    bf16-rounded values kept in fp32, LoRA included (one adapter, rank 4)."""
    import sentencepiece
    spm_size = sentencepiece.SentencePieceProcessor(model_file=str(FIXTURES / "xlmr_tiny.model")).get_piece_size()
    vocab = spm_size + 2  # fairseq: <s> <pad> </s> <unk> + pieces[3:] + <mask>
    g, d = torch.Generator().manual_seed(seed + 1), JINA_TINY
    h, f, r = d["hidden"], d["ffn"], d["lora_rank"]
    out: dict[str, torch.Tensor] = {}

    def lora_linear(name: str, fan_out: int, fan_in: int, bias: bool = True) -> None:
        out[name + ".parametrizations.weight.original"] = _normal(g, fan_out, fan_in)
        out[name + ".parametrizations.weight.0.lora_A"] = _normal(g, 1, r, fan_in, std=0.1)
        out[name + ".parametrizations.weight.0.lora_B"] = _normal(g, 1, fan_out, r, std=0.05)
        if bias:
            out[name + ".bias"] = _normal(g, fan_out)

    def lora_embedding(name: str, rows: int) -> None:
        out[name + ".parametrizations.weight.original"] = _normal(g, rows, h, std=0.5)
        out[name + ".parametrizations.weight.0.lora_A"] = _normal(g, 1, rows, r, std=0.1)
        out[name + ".parametrizations.weight.0.lora_B"] = _normal(g, 1, r, h, std=0.1)

    def layer_norm(name: str) -> None:
        out[name + ".weight"] = _normal(g, h, std=0.1, mean=1.0)
        out[name + ".bias"] = _normal(g, h)

    lora_embedding("embeddings.word_embeddings", vocab)
    lora_embedding("embeddings.token_type_embeddings", 1)
    layer_norm("emb_ln")
    for i in range(d["layers"]):
        p = f"encoder.layers.{i}."
        lora_linear(p + "mixer.Wqkv", 3 * h, h)
        lora_linear(p + "mixer.out_proj", h, h)
        layer_norm(p + "norm1")
        lora_linear(p + "mlp.fc1", f, h)
        lora_linear(p + "mlp.fc2", h, f)
        layer_norm(p + "norm2")
    return {k: v.to(torch.bfloat16).float() for k, v in out.items()}


def merge_jina_lora(original: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original layout -> ComfyUI layout (``model.`` prefix), adapter 0 merged with scale 1."""
    merged = {}
    for key, value in original.items():
        if ".lora_" in key:
            continue
        if key.endswith(".parametrizations.weight.original"):
            stem = key[: -len(".parametrizations.weight.original")]
            a = original[stem + ".parametrizations.weight.0.lora_A"][0]
            b = original[stem + ".parametrizations.weight.0.lora_B"][0]
            value = value + (a @ b if "embeddings" in stem else b @ a)
            key = stem + ".weight"
        merged["model." + key] = value
    return merged


def _jina_hf_config() -> dict:
    d = JINA_TINY
    kwargs = {"num_attention_heads": d["heads"], "lora_adaptations": ["retrieval.query"],
              "lora_rank": d["lora_rank"], "lora_alpha": d["lora_rank"], "use_flash_attn": False}
    return {"model_type": "jina_clip", "architectures": ["JinaCLIPModel"],
            "text_config": {"hf_model_name_or_path": "jinaai/jina-embeddings-v3", "pooler_type": "mean_pooler",
                            "proj_type": None, "embed_dim": d["hidden"], "default_lora_task": "retrieval.query",
                            "hf_model_config_kwargs": kwargs}}


def _proto_field(buf: bytes, wanted: int) -> bytes | None:
    """The first length-delimited field ``wanted`` of a protobuf message (no protobuf needed)."""
    pos = 0

    def varint() -> int:
        nonlocal pos
        shift = value = 0
        while True:
            byte = buf[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return value

    while pos < len(buf):
        tag = varint()
        field, wire = tag >> 3, tag & 7
        if wire == 0:
            varint()
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            n = varint()
            if field == wanted:
                return buf[pos:pos + n]
            pos += n
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
    return None


def xlmr_tokenizer_json(spm_path: Path, out_path: Path) -> None:
    """Build an XLM-R style tokenizer.json (Unigram over fairseq ids) from an spm model, offline."""
    import sentencepiece
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_path))
    vocab = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [(sp.id_to_piece(i), sp.get_score(i)) for i in range(3, sp.get_piece_size())]
    vocab.append(("<mask>", 0.0))
    tok = Tokenizer(models.Unigram(vocab, unk_id=3, byte_fallback=False))
    normalizer_spec = _proto_field(spm_path.read_bytes(), 3) or b""
    charsmap = _proto_field(normalizer_spec, 2)
    steps = [normalizers.Precompiled(charsmap)] if charsmap else []
    tok.normalizer = normalizers.Sequence(steps + [normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    tok.save(str(out_path))


def write_tiny_jina(root: Path, seed: int = 0) -> dict[str, Path]:
    """Write the tiny Jina text tower as a ComfyUI file and as an original HF folder."""
    root = Path(root)
    original = tiny_jina_original_weights(seed)
    comfy = root / "text_encoders" / "jina_clip_v2_bf16.safetensors"
    comfy.parent.mkdir(parents=True, exist_ok=True)
    merged = _bf16(merge_jina_lora(original))
    merged["spiece_model"] = _spm_tensor("xlmr_tiny_aligned.model")
    save_file(merged, str(comfy), metadata={"newbie.jina.num_attention_heads": json.dumps(JINA_TINY["heads"])})

    folder = root / "hf" / "jina-clip-v2"
    folder.mkdir(parents=True, exist_ok=True)
    hf = {"text_model.transformer.roberta." + k: v for k, v in _bf16(original).items()}
    hf["vision_model.patch_embed.proj.weight"] = torch.zeros(8, 3, 2, 2, dtype=torch.bfloat16)
    hf["logit_scale"] = torch.zeros((), dtype=torch.bfloat16)
    save_file(hf, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(_jina_hf_config(), indent=1))
    xlmr_tokenizer_json(FIXTURES / "xlmr_tiny.model", folder / "tokenizer.json")
    return {"jina_comfy": comfy, "jina_hf": folder}
