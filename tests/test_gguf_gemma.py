"""Gemma 3 from a llama.cpp GGUF: names and norms back to transformers', the tokenizer rebuilt from
the metadata gives the SentencePiece model's ids, and the encoder's output matches the bf16 file."""

from __future__ import annotations

import pytest
import sentencepiece
import torch
from gguf import GGMLQuantizationType as T

from newbie_core.models.checkpoint import CheckpointError
from newbie_core.models.gemma_loading import open_gemma
from newbie_core.tiny.gguf_files import write_gguf, write_tiny_gemma_gguf
from newbie_core.tiny.text_encoders import FIXTURES

from comfy_snapshot import COMFY_SNAPSHOT  # tests/ is on pytest's pythonpath (pyproject)

TEXTS = ["a girl with long silver hair, (masterpiece:1.2), 1girl solo",
         "  leading and  double  spaces\tand tabs\nnew line",
         "<start_of_turn>user\nhello<end_of_turn>\n<start_of_turn>model\n",
         "日本語のテキスト, émojis 🎨 and bytes \x7f ẞ", ""]


@pytest.fixture(scope="module")
def gguf_gemma(tmp_path_factory):
    return open_gemma(write_tiny_gemma_gguf(tmp_path_factory.mktemp("gg") / "gemma-3-tiny-Q8_0.gguf", T.Q8_0))


def test_tokenizer_from_gguf_metadata_gives_the_sentencepiece_ids(gguf_gemma):
    sp = sentencepiece.SentencePieceProcessor(model_file=str(FIXTURES / "gemma_tiny.model"))
    for text in TEXTS:
        assert gguf_gemma.tokenizer.pieces.encode(text) == list(sp.encode(text)), text
    batch = gguf_gemma.tokenizer(TEXTS[:2])
    assert batch.input_ids[0, 0].item() == 2          # <bos>


def test_names_shapes_and_norm_offset_map_back(gguf_gemma, tiny_models):
    ref = tiny_models.encoders.gemma
    assert gguf_gemma.config.num_hidden_layers == ref.config.num_hidden_layers
    assert gguf_gemma.config.sliding_window == ref.config.sliding_window
    assert gguf_gemma.source.shapes() == {k: v for k, v in ref.source.shapes().items()}
    norm = "model.layers.0.input_layernorm.weight"
    assert torch.allclose(gguf_gemma.source.get(norm), ref.source.get(norm).float(), atol=1e-2)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert gguf_gemma.source.qtype(q) is T.Q8_0
    assert (gguf_gemma.source.get(q) - ref.source.get(q).float()).abs().max() < 0.02 * ref.source.get(q).abs().max()
    assert gguf_gemma.is_packed


def test_other_architectures_are_refused(tmp_path):
    path = write_gguf(tmp_path / "llama.gguf", "llama", {"blk.0.attn_q.weight": torch.zeros(32, 32)},
                      {"blk.0.attn_q.weight": T.F16})
    with pytest.raises(CheckpointError, match="architecture 'llama'.*Gemma 3 4B"):
        open_gemma(path)


def test_encoder_features_from_gguf_match_the_bf16_file(gguf_gemma, tiny_models):
    from newbie_core.pipeline import MemorySettings
    from newbie_core.pipeline.encode import run_gemma
    from newbie_core.pipeline.handles import TextEncoderHandle
    from newbie_core.placement import Report
    handle = TextEncoderHandle(gguf_gemma, tiny_models.encoders.jina)
    cpu = torch.device("cpu")
    ours = run_gemma(handle, TEXTS[:1], MemorySettings(), cpu, Report(), None)[0]
    ref = run_gemma(tiny_models.encoders, TEXTS[:1], MemorySettings(), cpu, Report(), None)[0]
    assert ours.shape == ref.shape
    rel = (ours.float() - ref.float()).norm() / ref.float().norm()
    assert rel < 0.05, f"relative error {rel:.4f}"


@pytest.mark.parametrize("qtype", (T.Q8_0, T.Q4_K, T.Q6_K), ids=lambda t: t.name)
def test_a_large_host_tensor_decodes_in_chunks_to_the_same_bits(tmp_path, monkeypatch, qtype):
    """decode_into gives get(key).to(bf16) bit for bit while never decoding more than a chunk at
    once (the host-RAM plan counts only that chunk's transient beside the table)."""
    from newbie_core.models.gguf import GGUFSource, reader
    table = torch.randn(37, 512) * 0.05
    source = GGUFSource(write_gguf(tmp_path / "t.gguf", "gemma3", {"token_embd.weight": table},
                                   {"token_embd.weight": qtype}))
    want = source.get("token_embd.weight").to(torch.bfloat16)
    monkeypatch.setattr(reader, "DECODE_CHUNK_ELEMENTS", 5 * 512)
    calls = []
    real = reader.dequantize
    monkeypatch.setattr(reader, "dequantize", lambda q, data, shape: calls.append(shape) or real(q, data, shape))
    got = torch.empty(37, 512, dtype=torch.bfloat16)
    source.decode_into("token_embd.weight", got)
    assert torch.equal(got, want)
    assert calls == [(5, 512)] * 7 + [(2, 512)], "whole rows, one chunk at a time"
    with pytest.raises(ValueError, match=r"shape \[37, 512\]"):
        source.decode_into("token_embd.weight", torch.empty(512, 37))


def test_the_gguf_embedding_table_is_decoded_in_chunks_when_gemma_loads(tmp_path, monkeypatch, tiny_models):
    from newbie_core.models.gguf import reader
    from newbie_core.pipeline.host_ram import host_tensor_bytes
    path = write_tiny_gemma_gguf(tmp_path / "gemma-3-tiny-Q8_0.gguf", T.Q8_0)
    chunked = []
    real = reader.GGUFSource.decode_into
    monkeypatch.setattr(reader.GGUFSource, "decode_into", lambda self, key, out: chunked.append(key) or real(self, key, out))
    ckpt = open_gemma(path)
    from newbie_core.models.gemma import GemmaTextEncoder
    from newbie_core.pipeline.placed import materialize_non_blocks
    model = GemmaTextEncoder(ckpt.config, ckpt.tokenizer)       # on meta, as the stage builds it
    materialize_non_blocks(model, ckpt.source, torch.device("cpu"), torch.bfloat16, host_prefixes=("model.embed_tokens.",))
    assert ckpt.source.packed("model.embed_tokens.weight") is not None, "the tiny table is quantised"
    assert chunked == ["model.embed_tokens.weight"]
    table = model.get_parameter("model.embed_tokens.weight")
    assert table.dtype is torch.bfloat16
    assert torch.equal(table, ckpt.source.get("model.embed_tokens.weight").to(torch.bfloat16))
    extra = host_tensor_bytes(model, ckpt.source, torch.device("cuda"), torch.bfloat16, ("model.embed_tokens.",))
    assert extra == table.numel() * 2 + reader.DECODE_TRANSIENT_BYTES, "the table, plus one chunk's transient"


# A real 32 000-piece BPE SentencePiece vocabulary (EleutherAI's pile-T5, LLaMA's pieces) that
# ComfyUI ships; no Gemma vocabulary can be fetched here.
REAL_SPM = COMFY_SNAPSHOT / "comfy" / "text_encoders" / "t5_pile_tokenizer" / "tokenizer.model"
REAL_TEXTS = TEXTS + [
    "1girl, solo, long hair, looking at viewer, smile, blue eyes, (best quality:1.3), absurdres, highres",
    "<character_1><n>hatsune miku</n><gender>1girl</gender><appearance>twintails, aqua hair</appearance>"
    "</character_1>",
    "Ünïcödé ß ﬁ ligatures, zero-width\u200bjoiner, CJK 漢字かな한국어, Arabic العربية, 12345.678 and $€¥",
    "tabs\t\tand\r\nCRLF   runs of   spaces    ",
]


@pytest.mark.skipif(not REAL_SPM.exists(), reason="needs a ComfyUI snapshot (COMFYUI_PATH or out/comfyui)")
def test_a_real_32k_vocabulary_through_gguf_metadata_gives_the_sentencepiece_ids(tmp_path):
    from gguf import GGUFReader, GGUFWriter
    from newbie_core.models.gguf.gemma import tokenizer_model_bytes
    from newbie_core.models.gguf.reader import read_fields
    from newbie_core.tiny.gguf_files import add_spm_tokenizer, spm_vocabulary, with_gemma_normalizer
    # the reference: the same model with the normaliser the rebuild assumes (Gemma's), so the two
    # differ only where the rebuild could go wrong
    want = sentencepiece.SentencePieceProcessor(model_proto=with_gemma_normalizer(REAL_SPM))
    assert len(spm_vocabulary(REAL_SPM)[0]) == want.get_piece_size() == 32000
    path = tmp_path / "vocab.gguf"
    writer = GGUFWriter(str(path), "gemma3")
    add_spm_tokenizer(writer, REAL_SPM, {"unk": want.unk_id(), "bos": want.bos_id(), "eos": want.eos_id()})
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    got = sentencepiece.SentencePieceProcessor(model_proto=tokenizer_model_bytes(read_fields(GGUFReader(path)), path))
    long_text = " ".join(REAL_TEXTS) * 20
    for text in REAL_TEXTS + [long_text]:
        ids = want.encode(text)
        assert got.encode(text) == ids, text
        assert got.decode(ids) == want.decode(ids)
    assert len(want.encode(long_text)) > 2000
    assert any(want.id_to_piece(i).startswith("<0x") for i in want.encode(long_text)), "byte fallback ran"
