r"""Prompt weighting as the official NewBie text encode reads it: ``(x:1.2)``, ``(x)``, ``[x]``, ``{x}``.

Rules (lora-gguf-prompt §3.1, read from NewBieAI-Lab/ComfyUI-Newbie-Nodes; this is our own code):
* ``(x)`` multiplies the enclosing weight by 1.1 (nesting multiplies); ``(x:w)`` sets weight w,
  split at the last ``:``; a part after ``:`` that is not a number leaves the group a plain
  ``(x)`` with the colon kept in its text;
* ``[x]`` sets weight 0.9ⁿ and ``{x}`` sets 1.2ⁿ, where n counts directly nested brackets of the
  same kind (``[[x]]`` = 0.81); inside them, groups apply as usual;
* escapes: ``\(`` and ``\)`` become literal parentheses; ``\[ \] \{ \}`` are literal too and keep
  their backslash (as the official node passes them on);
* an opening bracket without its closing partner (or a stray closer) is literal text.
A prompt is weighted only when it contains one of ``()[]{}`` (escaped or not); otherwise it
passes through untouched. The plain text is the segments joined by one space, as the official
node joins them, so removing the syntax can leave double spaces.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

OPENERS = {"(": ")", "[": "]", "{": "}"}
BRACKET_FACTOR = {"[": 0.9, "{": 1.2}
PAREN_FACTOR = 1.1
ESCAPES = {"\\(": "(", "\\)": ")", "\\[": "\\[", "\\]": "\\]", "\\{": "\\{", "\\}": "\\}"}
MAX_DEPTH = 64


class WeightingMode(str, Enum):
    OFFICIAL = "official"      # the official node's default (its "compel" baseline)
    OFF = "off"                # text verbatim, as the pack did before


@dataclass(frozen=True)
class Segment:
    text: str
    weight: float


@dataclass(frozen=True)
class WeightedText:
    """The plain text an encoder reads, and the weight of each character span of it.

    ``joins`` are the spaces this module put between segments: they belong to no segment, so a
    token's weight (the character-overlap average, as the official node computes it from the
    tokenizer's offsets) does not count them; otherwise ``▁cat`` after a join would be diluted."""
    text: str
    spans: tuple[tuple[int, int, float], ...]      # (start, end, weight), weight != 1 only
    joins: tuple[int, ...] = ()

    @property
    def weighted(self) -> bool:
        return bool(self.spans)

    def shifted(self, offset: int) -> "WeightedText":
        """The same spans in a text that has ``offset`` characters in front (a system prefix)."""
        return WeightedText(self.text, tuple((a + offset, b + offset, w) for a, b, w in self.spans),
                            tuple(j + offset for j in self.joins if j + offset >= 0))

    def key(self) -> str:
        """For cache keys: the spans with rounded weights, and the joins they are averaged around."""
        spans = ";".join(f"{a}-{b}:{w:.6g}" for a, b, w in self.spans)
        return spans + ("|" + ",".join(map(str, self.joins)) if self.spans and self.joins else "")


def has_weighting_syntax(text: str) -> bool:
    return any(c in text for c in "()[]{}")


def _tokens(text: str) -> list[str]:
    """Characters, with each escape pair kept together as one literal item."""
    out, i = [], 0
    while i < len(text):
        pair = text[i:i + 2]
        if pair in ESCAPES:
            out.append(pair)
            i += 2
        else:
            out.append(text[i])
            i += 1
    return out


def _match(items: list[str], start: int) -> int | None:
    """Index of the closer matching the opener at ``start`` (same kind, nested), or None."""
    opener = items[start]
    closer, depth = OPENERS[opener], 0
    for i in range(start, len(items)):
        if items[i] == opener:
            depth += 1
        elif items[i] == closer:
            depth -= 1
            if depth == 0:
                return i
    return None


def _literal(items: list[str]) -> str:
    return "".join(ESCAPES.get(x, x) for x in items)


def _parse(items: list[str], weight: float, depth: int) -> list[Segment]:
    if depth > MAX_DEPTH:
        raise ValueError(f"prompt weighting nests deeper than {MAX_DEPTH} brackets")
    out: list[Segment] = []
    buf: list[str] = []
    i = 0

    def flush() -> None:
        if buf:
            out.append(Segment(_literal(buf), weight))
            buf.clear()

    while i < len(items):
        item = items[i]
        end = _match(items, i) if item in OPENERS else None
        if end is None:
            buf.append(item)
            i += 1
            continue
        flush()
        inner = items[i + 1:end]
        if item == "(":
            inner_weight = weight * PAREN_FACTOR
            colon = max((k for k, x in enumerate(inner) if x == ":"), default=-1)
            if colon > 0:
                try:
                    value = float("".join(inner[colon + 1:]))
                    if math.isfinite(value):
                        inner_weight, inner = value, inner[:colon]
                except ValueError:
                    pass
        else:
            n = 1
            while len(inner) >= 2 and inner[0] == item and _match(inner, 0) == len(inner) - 1:
                inner, n = inner[1:-1], n + 1
            inner_weight = round(BRACKET_FACTOR[item] ** n, 3)
        out += _parse(inner, inner_weight, depth + 1)
        i = end + 1
    flush()
    return out


def parse_weights(text: str) -> list[Segment]:
    """Segments of ``text`` with their weights (syntax removed, escapes resolved)."""
    return [s for s in _parse(_tokens(text), 1.0, 0) if s.text]


def weighted_text(text: str, mode: WeightingMode | str = WeightingMode.OFFICIAL) -> WeightedText:
    """The text to encode and its weighted spans; verbatim when off or without syntax."""
    if WeightingMode(mode) is WeightingMode.OFF or not has_weighting_syntax(text):
        return WeightedText(text, ())
    parts, spans, joins, pos = [], [], [], 0
    for seg in parse_weights(text):
        piece = seg.text
        if parts:
            joins.append(pos)
            pos += 1                                   # the joining space
        if seg.weight != 1.0 and piece.strip():
            spans.append((pos, pos + len(piece), seg.weight))
        parts.append(piece)
        pos += len(piece)
    return WeightedText(" ".join(parts), tuple(spans), tuple(joins))
