"""System prefixes and the exact texts each text encoder sees (spec §3.1, §3.2, §3.4, §8).

Official recipe (training ``finetune.py`` and the demo): Gemma reads a system prefix followed
directly by the prompt; the prefix depends on whether the caption is XML. Jina CLIP reads the
raw prompt without any prefix. An empty negative prompt stays empty for both (Gemma then sees
only its BOS token). ComfyUI's native support instead sends Gemma's full text to Jina too;
``compat=True`` reproduces that.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

from .parser import is_xml_prompt, parse_prompt
from .weighting import WeightedText, WeightingMode, weighted_text

logger = logging.getLogger(__name__)

PROMPT_START = "<Prompt Start>"
# Both end with one space, exactly as in training.
XML_SYSTEM_PREFIX = ("You are an assistant designed to generate high-quality anime images based "
                     "on xml format prompts. <Prompt Start> ")
TEXT_SYSTEM_PREFIX = ("You are an assistant designed to generate high-quality anime images with "
                      "the highest degree of image-text alignment based on textual prompts. "
                      "<Prompt Start> ")


class EncoderTexts(NamedTuple):
    """The four strings to encode; a plain 4-tuple for callers that unpack it."""

    gemma_pos: str
    jina_pos: str
    gemma_neg: str
    jina_neg: str


def strip_paren_escapes(text: str) -> str:
    r"""``\(`` → ``(`` and ``\)`` → ``)``, as ComfyUI-style weight parsers leave the text."""
    return text.replace("\\(", "(").replace("\\)", ")")


def _split_own_prefix(text: str) -> tuple[str, str] | None:
    """Text that already carries a system prompt (contains <Prompt Start>): (prefix, body)."""
    cut = text.find(PROMPT_START)
    if cut < 0:
        return None
    end = cut + len(PROMPT_START)
    return text[:end], text[end:].strip()


def _prepare_one(text: str, compat: bool, negative: bool) -> tuple[str, str]:
    """(gemma_text, jina_text) for one prompt."""
    text = text.strip()
    if not text:
        return "", ""
    own = _split_own_prefix(text)
    if own is not None:
        # e.g. the Comfy-Org template's negative "...low-quality images... <Prompt Start>":
        # keep the user's system prompt rather than stacking ours in front of it.
        body = own[1]
        if not negative and is_xml_prompt(body):
            parse_prompt(body)
        return text, (text if compat else body)
    if not negative and is_xml_prompt(text):
        parse_prompt(text)  # raises PromptSyntaxError for malformed XML; warnings are logged
        gemma = XML_SYSTEM_PREFIX + text
    else:
        gemma = TEXT_SYSTEM_PREFIX + text
    return gemma, (gemma if compat else text)


def prepare_texts(prompt: str, negative: str = "", compat: bool = False,
                  unescape_parens: bool = False) -> EncoderTexts:
    """The Gemma and Jina input texts for a positive/negative pair.

    * positive XML (first non-blank char '<'): validated, Gemma gets XML_SYSTEM_PREFIX + text;
    * positive anything else: Gemma gets TEXT_SYSTEM_PREFIX + text, no validation;
    * negative: empty stays "" for both; non-empty gets TEXT_SYSTEM_PREFIX, no validation;
    * text already containing "<Prompt Start>" keeps its own system prompt (no second prefix),
      and Jina gets only the part after the marker;
    * Jina gets the prompt without prefix, unless ``compat`` (ComfyUI: Jina = Gemma's text).
    Leading/trailing whitespace of each prompt is removed first. ``unescape_parens`` strips the
    backslash in ``\\(``/``\\)`` (off by default: text goes to the encoders as written).
    Raises PromptSyntaxError (a ValueError with line/column) for a malformed XML positive.
    """
    if unescape_parens:
        prompt, negative = strip_paren_escapes(prompt), strip_paren_escapes(negative)
    gemma_pos, jina_pos = _prepare_one(prompt, compat, negative=False)
    gemma_neg, jina_neg = _prepare_one(negative, compat, negative=True)
    return EncoderTexts(gemma_pos, jina_pos, gemma_neg, jina_neg)


# "auto": the training prefixes above (XML or text, by the prompt); "" = no system prompt, as
# the official ComfyUI node's default; any other text is put in front of both prompts.
AUTO_SYSTEM_PROMPT = "auto"


class PromptWeights(NamedTuple):
    """Weighted character spans of the positive and negative Gemma texts (empty = unweighted)."""
    positive: WeightedText
    negative: WeightedText

    def key(self, mode: str) -> tuple[str, str]:
        return (f"{mode}|{self.positive.key()}", f"{mode}|{self.negative.key()}")


def _with_system(text: str, system_prompt: str, compat: bool, negative: bool) -> tuple[str, str]:
    if system_prompt == AUTO_SYSTEM_PROMPT:
        return _prepare_one(text, compat, negative)
    text = text.strip()
    if not text:
        return "", ""
    if not negative and is_xml_prompt(text):
        parse_prompt(text)
    system = system_prompt.strip()
    gemma = f"{system} {text}" if system else text
    return gemma, (gemma if compat else text)


def prepare_weighted_texts(prompt: str, negative: str = "", compat: bool = False,
                           weighting: WeightingMode | str = WeightingMode.OFFICIAL,
                           system_prompt: str = AUTO_SYSTEM_PROMPT) -> tuple[EncoderTexts, PromptWeights]:
    """:func:`prepare_texts` with the official weighting syntax and a chosen system prompt.

    The syntax is removed from what both encoders read; the weights are returned as spans of
    the Gemma texts (the system prefix is never weighted). With ``weighting="off"`` and the
    "auto" system prompt this is exactly :func:`prepare_texts`.
    """
    texts, spans = [], []
    for text, neg in ((prompt, False), (negative, True)):
        weighted = weighted_text(text.strip(), weighting)
        gemma, jina = _with_system(weighted.text, system_prompt, compat, neg)
        offset = len(gemma) - len(weighted.text.strip())
        ok = weighted.weighted and gemma.endswith(weighted.text.strip())
        lead = len(weighted.text) - len(weighted.text.lstrip())
        texts += [gemma, jina]
        spans.append(weighted.shifted(offset - lead) if ok else WeightedText(gemma, ()))
    return EncoderTexts(*texts), PromptWeights(*spans)
