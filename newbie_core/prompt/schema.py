"""The data model of NewBie's XML structured prompt (spec §6.2, §6.3).

Field order is the order the builder writes (README order, with the builder-only fields where
the official nodes put them). All values are plain text: comma-separated Danbooru-style tags or,
for the caption, a sentence.

Whitespace rule: a value's leading and trailing whitespace (``str.strip()``) carries no meaning
and is removed, and line breaks are normalised to ``\\n`` (XML parsers turn ``\\r\\n`` and ``\\r``
into ``\\n`` anyway). Inner whitespace is kept verbatim. :func:`normalize_value` is the rule; the
builder applies it on output and the parser on input, so build → parse is lossless on
normalised values.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields, replace

CHARACTER_FIELDS = ("n", "gender", "appearance", "clothing", "body_type", "expression",
                    "action", "interaction", "position")
GENERAL_FIELDS = ("count", "artists", "style", "background", "environment", "perspective",
                  "atmosphere", "lighting", "resolution", "quality", "objects", "other")
# Written even when empty, as the official builders do (a character always has a name slot
# and a gender).
ALWAYS_WRITTEN = frozenset({"n", "gender"})

# Characters XML 1.0 cannot carry at all (even escaped): C0 controls except tab/LF/CR,
# surrogates, U+FFFE and U+FFFF.
_XML_ILLEGAL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


class PromptValueError(ValueError):
    """A field value that cannot be written as XML. ``field`` is e.g. 'character_2.appearance'."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def normalize_value(value: str) -> str:
    """The whitespace rule of the module docstring."""
    return value.replace("\r\n", "\n").replace("\r", "\n").strip()


def check_value(field: str, value: object) -> str:
    """Return the normalised value, or raise PromptValueError naming ``field``."""
    if not isinstance(value, str):
        raise PromptValueError(field, f"expected text, got {type(value).__name__}")
    bad = _XML_ILLEGAL.search(value)
    if bad is not None:
        raise PromptValueError(
            field, f"contains the control character U+{ord(bad.group()):04X} at position "
                   f"{bad.start()}, which XML cannot carry; remove it")
    return normalize_value(value)


@dataclass(frozen=True)
class Character:
    """One ``<character_N>`` block."""

    n: str = ""
    gender: str = ""
    appearance: str = ""
    clothing: str = ""
    body_type: str = ""
    expression: str = ""
    action: str = ""
    interaction: str = ""
    position: str = ""


@dataclass(frozen=True)
class GeneralTags:
    """The ``<general_tags>`` block."""

    count: str = ""
    artists: str = ""
    style: str = ""
    background: str = ""
    environment: str = ""
    perspective: str = ""
    atmosphere: str = ""
    lighting: str = ""
    resolution: str = ""
    quality: str = ""
    objects: str = ""
    other: str = ""

    def is_empty(self) -> bool:
        return not any(getattr(self, f) for f in GENERAL_FIELDS)


@dataclass(frozen=True)
class Prompt:
    """A whole structured prompt: characters in order, general tags, natural-language caption."""

    characters: tuple[Character, ...] = ()
    general_tags: GeneralTags = GeneralTags()
    caption: str = ""

    def normalized(self) -> "Prompt":
        """A copy with every value checked and normalised (raises PromptValueError)."""
        chars = tuple(
            replace(c, **{f.name: check_value(f"character_{i}.{f.name}", getattr(c, f.name))
                          for f in fields(c)})
            for i, c in enumerate(self.characters, start=1))
        tags = replace(self.general_tags, **{
            f: check_value(f"general_tags.{f}", getattr(self.general_tags, f))
            for f in GENERAL_FIELDS})
        return Prompt(chars, tags, check_value("caption", self.caption))
