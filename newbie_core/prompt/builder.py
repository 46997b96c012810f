"""Prompt → XML text in the README layout (spec §6.3, §6.5 example B).

Layout: ``<character_1>`` … blocks first, then ``<general_tags>``, the caption last, one blank
line between blocks, two-space indent inside blocks. Empty fields are dropped except ``<n>`` and
``<gender>``; an empty ``<general_tags>`` block and an empty caption are dropped entirely.
``&``, ``<`` and ``>`` in values are escaped; everything else, including backslash-escaped
parentheses like ``rem_\\(re:zero\\)``, is written verbatim.
"""

from __future__ import annotations

from .schema import (ALWAYS_WRITTEN, CHARACTER_FIELDS, GENERAL_FIELDS, Character, GeneralTags,
                     Prompt)

INDENT = "  "


def escape_text(value: str) -> str:
    """Escape the three characters that would break element text."""
    return value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _element(tag: str, value: str, indent: str = "") -> str:
    return f"{indent}<{tag}>{escape_text(value)}</{tag}>"


def character_block(index: int, character: Character) -> str:
    """``<character_{index}>`` with its non-empty fields (n and gender always)."""
    tag = f"character_{index}"
    lines = [f"<{tag}>"]
    for name in CHARACTER_FIELDS:
        value = getattr(character, name)
        if value or name in ALWAYS_WRITTEN:
            lines.append(_element(name, value, INDENT))
    lines.append(f"</{tag}>")
    return "\n".join(lines)


def general_tags_block(tags: GeneralTags) -> str:
    """``<general_tags>`` with its non-empty fields; '' when all are empty."""
    if tags.is_empty():
        return ""
    body = [_element(name, getattr(tags, name), INDENT)
            for name in GENERAL_FIELDS if getattr(tags, name)]
    return "\n".join(["<general_tags>", *body, "</general_tags>"])


def build_xml(prompt: Prompt) -> str:
    """The XML text for ``prompt`` (values checked and normalised first).

    Raises PromptValueError naming the field when a value holds a character XML cannot carry.
    """
    p = prompt.normalized()
    blocks = [character_block(i, c) for i, c in enumerate(p.characters, start=1)]
    general = general_tags_block(p.general_tags)
    if general:
        blocks.append(general)
    if p.caption:
        blocks.append(_element("caption", p.caption))
    return "\n\n".join(blocks)
