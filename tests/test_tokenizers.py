"""Tokenizers: special ids, padding, truncation, and the same ids from every tokenizer source."""

from __future__ import annotations

import logging

import pytest
import torch

from newbie_core.models.tokenizers import (
    GemmaSpm,
    XlmrSpm,
    gemma_tokenizer_from_bytes,
    jina_tokenizer_from_bytes,
    tokenizer_from_folder,
)
from newbie_core.tiny.text_encoders import FIXTURES, xlmr_tokenizer_json

TEXTS = [
    "<character_1><n>witch</n><gender>1girl</gender><appearance>silver hair, red eyes</appearance></character_1>",
    "<general_tags><style>anime, masterpiece</style><background>night sky</background></general_tags>",
    "1girl, solo, kimono, cherry blossoms, 2025",
    "You are an assistant designed to generate high-quality anime images. <Prompt Start> a cat",
    "kasumi toshiro (series mikane), unknown_wordzzz, Ｆｕｌｌwidth ＡＢＣ café",
    "",
]


@pytest.fixture(scope="module")
def gemma_bytes() -> bytes:
    return (FIXTURES / "gemma_tiny.model").read_bytes()


def test_gemma_batch_has_bos_right_padding_and_multiple_of_8(gemma_bytes):
    tok = gemma_tokenizer_from_bytes(gemma_bytes)
    batch = tok(["1girl, solo", "a much longer prompt with many more words in it, masterpiece"])
    ids, mask = batch.input_ids, batch.attention_mask
    assert ids.shape[1] % 8 == 0 and mask.dtype == torch.bool
    assert (ids[:, 0] == 2).all()                       # BOS
    lengths = mask.sum(1)
    for row, n in enumerate(lengths.tolist()):
        assert mask[row, :n].all() and not mask[row, n:].any()   # right padding
        assert (ids[row, n:] == 0).all()                          # pad id 0
        assert 1 not in ids[row, :n].tolist()                     # no EOS
    spm = GemmaSpm(gemma_bytes)
    assert ids[0, 1:lengths[0]].tolist() == spm.encode("1girl, solo")


def test_gemma_empty_prompt_is_a_single_bos(gemma_bytes):
    batch = gemma_tokenizer_from_bytes(gemma_bytes)([""], pad_to_multiple_of=1)
    assert batch.input_ids.tolist() == [[2]] and batch.attention_mask.tolist() == [[True]]


def test_gemma_truncation_warns_with_the_dropped_count(gemma_bytes, caplog):
    tok = gemma_tokenizer_from_bytes(gemma_bytes)
    full = 1 + len(GemmaSpm(gemma_bytes).encode(TEXTS[0]))
    with caplog.at_level(logging.WARNING):
        batch = tok([TEXTS[0], "short"], max_length=10)
    assert batch.input_ids.shape[1] == 16 and int(batch.attention_mask[0].sum()) == 10
    assert batch.dropped == (full - 10, 0)
    assert f"{full - 10} token(s)" in caplog.text and "max_length=10" in caplog.text


def test_xlmr_ids_agree_across_fairseq_offset_aligned_spm_and_tokenizer_json(tmp_path):
    offset = XlmrSpm((FIXTURES / "xlmr_tiny.model").read_bytes())
    aligned = XlmrSpm((FIXTURES / "xlmr_tiny_aligned.model").read_bytes())
    assert offset.offset == 1 and aligned.offset == 0 and offset.vocab_size == aligned.vocab_size
    xlmr_tokenizer_json(FIXTURES / "xlmr_tiny.model", tmp_path / "tokenizer.json")
    from_json = tokenizer_from_folder(tmp_path, "jina")
    for text in TEXTS:
        ids = offset.encode(text)
        assert ids == aligned.encode(text) == from_json.pieces.encode(text), text
    assert 3 in offset.encode("ｚｚ☃")  # unknown maps to fairseq <unk> = 3, not spm's 0


def test_jina_batch_layout_and_truncation_keeps_eos(caplog):
    tok = jina_tokenizer_from_bytes((FIXTURES / "xlmr_tiny_aligned.model").read_bytes())
    batch = tok(["", TEXTS[0]])
    assert batch.input_ids[0, :3].tolist() == [0, 2, 1]          # <s> </s> <pad>
    n = int(batch.attention_mask[1].sum())
    assert batch.input_ids[1, 0] == 0 and batch.input_ids[1, n - 1] == 2
    with caplog.at_level(logging.WARNING):
        short = tok([TEXTS[0]], max_length=6)
    assert short.input_ids.shape == (1, 6) and short.input_ids[0, -1] == 2
    assert short.dropped == (n - 6,) and "Jina prompt 0" in caplog.text


def test_wrong_tokenizer_models_are_refused(gemma_bytes):
    with pytest.raises(ValueError, match="Not an XLM-RoBERTa tokenizer"):
        XlmrSpm(gemma_bytes)
    with pytest.raises(ValueError, match="Not a Gemma tokenizer"):
        GemmaSpm((FIXTURES / "xlmr_tiny.model").read_bytes())
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        GemmaSpm(b"definitely not a protobuf")
