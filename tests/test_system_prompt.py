"""The texts each encoder sees: system prefixes, XML detection, negatives, compat mode."""

from __future__ import annotations

import pytest

from newbie_core.prompt import (TEXT_SYSTEM_PREFIX, XML_SYSTEM_PREFIX, PromptSyntaxError,
                                prepare_texts)

XML = "<character_1>\n  <n>miku</n>\n  <gender>1girl</gender>\n</character_1>"


def test_prefixes_are_the_training_strings():
    assert XML_SYSTEM_PREFIX == ("You are an assistant designed to generate high-quality anime "
                                 "images based on xml format prompts. <Prompt Start> ")
    assert TEXT_SYSTEM_PREFIX == ("You are an assistant designed to generate high-quality anime "
                                  "images with the highest degree of image-text alignment based "
                                  "on textual prompts. <Prompt Start> ")


def test_xml_prompt_gets_xml_prefix_and_jina_gets_raw_prompt():
    texts = prepare_texts("\n  " + XML + "\n")
    assert texts.gemma_pos == XML_SYSTEM_PREFIX + XML
    assert texts.jina_pos == XML
    assert texts.gemma_neg == "" and texts.jina_neg == ""  # empty negative: BOS only
    gemma_pos, jina_pos, gemma_neg, jina_neg = texts  # plain 4-tuple too
    assert gemma_pos == texts.gemma_pos


def test_plain_text_gets_textual_prefix_without_validation():
    texts = prepare_texts("1girl, solo, black & white, a < b")
    assert texts.gemma_pos == TEXT_SYSTEM_PREFIX + "1girl, solo, black & white, a < b"
    assert texts.jina_pos == "1girl, solo, black & white, a < b"


def test_non_empty_negative_gets_textual_prefix_even_if_it_looks_like_xml():
    texts = prepare_texts(XML, "  blurry, <lowres  ")
    assert texts.gemma_neg == TEXT_SYSTEM_PREFIX + "blurry, <lowres"
    assert texts.jina_neg == "blurry, <lowres"
    assert prepare_texts(XML, "   \n").gemma_neg == ""


def test_malformed_xml_positive_raises_with_position():
    with pytest.raises(PromptSyntaxError) as err:
        prepare_texts("<character_1>\n  <n>a & b</n>\n</character_1>")
    assert (err.value.line, err.value.column) == (2, 8)  # at the bare '&'


def test_compat_sends_gemma_text_to_jina():
    texts = prepare_texts(XML, "bad hands", compat=True)
    assert texts.jina_pos == texts.gemma_pos == XML_SYSTEM_PREFIX + XML
    assert texts.jina_neg == texts.gemma_neg == TEXT_SYSTEM_PREFIX + "bad hands"
    assert prepare_texts(XML, "", compat=True).jina_neg == ""


def test_text_with_its_own_system_prompt_is_not_prefixed_twice():
    template_negative = ("You are an assistant designed to generate low-quality images based on "
                         "textual prompts. <Prompt Start>")
    texts = prepare_texts(XML, template_negative)
    assert texts.gemma_neg == template_negative
    assert texts.jina_neg == ""  # nothing after the marker: Jina sees what the official Jina sees
    own = "Custom system line. <Prompt Start> " + XML
    texts = prepare_texts(own)
    assert texts.gemma_pos == own and texts.jina_pos == XML
    with pytest.raises(PromptSyntaxError):
        prepare_texts("Custom. <Prompt Start> <character_1>")


def test_paren_escapes_kept_by_default_and_optionally_stripped():
    p = "rem_\\(re:zero\\), 1girl"
    assert prepare_texts(p).jina_pos == p
    assert prepare_texts(p, unescape_parens=True).jina_pos == "rem_(re:zero), 1girl"
