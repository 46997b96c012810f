"""CPU tier: the official prompt-weighting syntax, the system-prompt option and their effect on the
Gemma features (newbie_core/prompt/weighting.py, pipeline/encode.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from newbie_core.pipeline import CONDITIONING_CACHE, MemorySettings
from newbie_core.models.tokenizers import GemmaSpm, piece_offsets, tokenizer_from_folder
from newbie_core.pipeline.encode import (ENCODER_CALLS, apply_token_weights, conditioning_keys, encode_texts, run_gemma,
                                         token_weights)
from newbie_core.placement import Report
from newbie_core.prompt import (TEXT_SYSTEM_PREFIX, WeightedText, parse_weights, prepare_texts,
                                prepare_weighted_texts, weighted_text)
from newbie_core.tiny.text_encoders import FIXTURES, xlmr_tokenizer_json

CPU = torch.device("cpu")


def pairs(text: str) -> list[tuple[str, float]]:
    return [(s.text, round(s.weight, 6)) for s in parse_weights(text)]


@pytest.mark.parametrize("text, expected", [
    ("a (cat:1.2) dog", [("a ", 1.0), ("cat", 1.2), (" dog", 1.0)]),
    ("(cat)", [("cat", 1.1)]),
    ("((cat))", [("cat", 1.21)]),
    ("(a (b) c:1.5)", [("a ", 1.5), ("b", 1.65), (" c", 1.5)]),      # nested (x) multiplies the group
    ("(a (b:0.5) c)", [("a ", 1.1), ("b", 0.5), (" c", 1.1)]),       # (x:w) is absolute
    ("[cat]", [("cat", 0.9)]),
    ("[[cat]]", [("cat", 0.81)]),
    ("{cat}", [("cat", 1.2)]),
    ("{{{cat}}}", [("cat", 1.728)]),
    ("[a {b} c]", [("a ", 0.9), ("b", 1.2), (" c", 0.9)]),
    ("(x:abc)", [("x:abc", 1.1)]),                                   # not a number: plain group
    ("(a:b:2)", [("a:b", 2.0)]),                                     # split at the last colon
    ("(unclosed", [("(unclosed", 1.0)]),
    ("x) y", [("x) y", 1.0)]),
    ("[half (open", [("[half (open", 1.0)]),
])
def test_weights_grammar(text, expected):
    assert pairs(text) == expected


def test_escapes_are_literal_and_square_and_curly_keep_their_backslash():
    assert pairs(r"\(smile\) (cat:1.3)") == [("(smile) ", 1.0), ("cat", 1.3)]
    assert pairs(r"\[x\] \{y\}") == [(r"\[x\] \{y\}", 1.0)]
    assert pairs(r"(a \) b:1.4)") == [("a ) b", 1.4)]                 # an escaped closer does not close


def test_plain_text_and_off_pass_verbatim():
    for text in ("1girl, smile", "a (cat:1.2)"):
        assert weighted_text(text, "off").text == text and not weighted_text(text, "off").weighted
    assert weighted_text("1girl, smile").text == "1girl, smile"
    assert weighted_text("a (cat:1.2) dog").text == "a  cat  dog"      # joined by one space, as the official node


def test_spans_point_at_the_weighted_words_behind_the_system_prefix():
    texts, weights = prepare_weighted_texts("a (cat:1.3) dog", "[ugly]")
    assert texts.gemma_pos == TEXT_SYSTEM_PREFIX + "a  cat  dog" and texts.jina_pos == "a  cat  dog"
    (a, b, w), = weights.positive.spans
    assert texts.gemma_pos[a:b] == "cat" and w == 1.3
    (a, b, w), = weights.negative.spans
    assert texts.gemma_neg[a:b] == "ugly" and w == 0.9


def test_system_prompt_auto_empty_and_custom():
    assert prepare_weighted_texts("a cat", weighting="off")[0] == prepare_texts("a cat")
    empty, w = prepare_weighted_texts("a (cat)", "bad", system_prompt="")
    assert (empty.gemma_pos, empty.gemma_neg) == ("a  cat", "bad")
    assert empty.gemma_pos[w.positive.spans[0][0]:w.positive.spans[0][1]] == "cat"
    custom, w = prepare_weighted_texts("a (cat)", system_prompt="Draw this:")
    assert custom.gemma_pos == "Draw this: a  cat" and custom.jina_pos == "a  cat"
    assert custom.gemma_pos[w.positive.spans[0][0]:w.positive.spans[0][1]] == "cat"


def test_apply_token_weights_follows_the_official_baseline():
    feats = torch.randn(5, 8)
    ones = torch.ones(5)
    assert torch.equal(apply_token_weights(feats, ones, None), feats)
    w = torch.tensor([1.0, 2.0, 1.0, 0.0, 1.0])
    out = apply_token_weights(feats, w, None)                          # no 0<w<1: linear push from BOS
    assert torch.allclose(out[1], (feats[1] - feats[0]) * 2 + feats[0]) and torch.equal(out[3], feats[3])
    hidden = torch.randn(5, 8)
    w = torch.tensor([1.0, 0.5, 1.5, 0.0, 1.0])
    out = apply_token_weights(feats, w, hidden)
    alpha = 0.5 ** 0.7
    assert torch.allclose(out[1], feats[1] * alpha + hidden[1] * (1 - alpha))
    assert torch.allclose(out[2], (feats[2] - feats[0]) * 1.5 ** 0.8 + feats[0])
    assert torch.equal(out[3], hidden[3]) and torch.equal(out[0], feats[0]) and torch.equal(out[4], feats[4])


def test_weights_change_only_the_weighted_tokens_and_the_cache_key(tiny_models):
    enc = tiny_models.encoders
    CONDITIONING_CACHE.clear()
    plain_texts, _ = prepare_weighted_texts("a cat dog", weighting="off", system_prompt="")
    texts, weights = prepare_weighted_texts("a (cat:1.5) dog", system_prompt="")
    assert texts.gemma_pos == "a  cat  dog"
    base, _ = encode_texts(enc, prepare_weighted_texts("a  cat  dog", weighting="off", system_prompt="")[0],
                           MemorySettings(), CPU, Report(), None)
    pos, _ = encode_texts(enc, texts, MemorySettings(), CPU, Report(), None, weights=weights)
    changed = (pos.cap_feats - base.cap_feats).abs().amax(dim=1) > 0
    assert changed.any() and not changed.all() and not changed[0], changed   # BOS and plain tokens untouched
    keys = conditioning_keys(enc, texts, weights)
    assert keys[0] != conditioning_keys(enc, texts, None)[0]
    assert keys[0] != conditioning_keys(enc, plain_texts, None)[0]
    assert conditioning_keys(enc, prepare_weighted_texts("a cat")[0])[0] != \
        conditioning_keys(enc, prepare_weighted_texts("a cat", system_prompt="")[0])[0]


def test_low_weights_re_encode_with_the_tokens_hidden(tiny_models):
    enc = tiny_models.encoders
    CONDITIONING_CACHE.clear()
    texts, weights = prepare_weighted_texts("a [cat] dog", "", system_prompt="")
    calls = ENCODER_CALLS["gemma"]
    pos, _ = encode_texts(enc, texts, MemorySettings(), CPU, Report(), None, weights=weights)
    assert ENCODER_CALLS["gemma"] == calls + 2                          # the prompts, then the masked re-encode
    plain = run_gemma(enc, [texts.gemma_pos], MemorySettings(), CPU, Report(), None)[0]
    assert pos.cap_feats.shape == plain.shape and not torch.equal(pos.cap_feats, plain)
    assert torch.equal(pos.cap_feats[0], plain[0])


# -- token weights from the tokenizer's offset mapping (what the official node does) ------------
def _gemma_handle(pieces):
    return SimpleNamespace(gemma=SimpleNamespace(tokenizer=SimpleNamespace(pieces=pieces)))


@pytest.fixture(scope="module")
def gemma_pieces():
    return GemmaSpm((FIXTURES / "gemma_tiny.model").read_bytes())


def test_gemma_offsets_spell_the_text_back_including_byte_fallback(gemma_pieces, tmp_path):
    for text in ("a  cat  dog", "héllo (wörld) 日本\n x", ""):
        offsets = piece_offsets(gemma_pieces, text)
        assert len(offsets) == len(gemma_pieces.encode(text))
        assert all(a <= b for a, b in offsets) and (not offsets or offsets[-1][1] == len(text))
    # 'é' is two byte pieces: both cover the one character.
    text = "héllo"
    assert [text[a:b] for a, b in piece_offsets(gemma_pieces, text)][:3] == ["h", "é", "é"]
    # tokenizer.json through the tokenizers library: its own (character) offsets.
    xlmr_tokenizer_json(FIXTURES / "xlmr_tiny.model", tmp_path / "tokenizer.json")
    tj = tokenizer_from_folder(tmp_path, "jina").pieces
    text = "wörld 日本 cat"
    spans = piece_offsets(tj, text)
    assert len(spans) == len(tj.encode(text)) and spans[-1][1] == len(text)


def test_a_token_straddling_a_span_edge_gets_the_character_average(gemma_pieces):
    text = "a  cat  dog"
    tokens = [text[a:b] for a, b in piece_offsets(gemma_pieces, text)]
    assert tokens == ["a", " ", " c", "at", " ", " do", "g"]           # what the cases below rely on
    # "ca" weighted 2.0: the token "at" covers 'a' (2.0) and 't' (1.0); the joins at 2 and 6 do not count.
    spans = WeightedText(text, ((3, 5, 2.0),), (2, 6))
    w = token_weights(_gemma_handle(gemma_pieces), text, spans, 8).tolist()
    assert w == [1.0, 1.0, 1.0, 2.0, 1.5, 1.0, 1.0, 1.0]               # BOS, a, ' ', ' c', at, ' ', ' do', g
    # Re-tokenising up to the edges (the fallback) cannot split "at": it gives it all or nothing.
    class NoOffsets:
        encode = gemma_pieces.encode
    fallback = token_weights(_gemma_handle(NoOffsets()), text, spans, 8).tolist()
    assert fallback[4] in (1.0, 2.0) and fallback != w


def test_official_joins_do_not_dilute_the_weighted_word(gemma_pieces):
    weighted = weighted_text("a (cat:1.2) dog")
    assert weighted.text == "a  cat  dog" and weighted.joins == (2, 6)
    w = token_weights(_gemma_handle(gemma_pieces), weighted.text, weighted, 8)
    # ' c' covers the join (not counted) and 'c': 1.2, not the 1.1 a counted space would give.
    assert torch.allclose(w, torch.tensor([1.0, 1.0, 1.0, 1.2, 1.2, 1.0, 1.0, 1.0]))
    texts, weights = prepare_weighted_texts("a (cat:1.2) dog", system_prompt=TEXT_SYSTEM_PREFIX)
    shifted = token_weights(_gemma_handle(gemma_pieces), texts.gemma_pos, weights.positive,
                            1 + len(gemma_pieces.encode(texts.gemma_pos)))
    assert sorted(set(shifted.tolist())) == pytest.approx([1.0, 1.2]) and (shifted > 1).sum() == 2
