"""Parse and validate XML prompt text back into the schema (spec §6).

The README format has several top-level elements (``<character_1>``, ``<general_tags>``,
``<caption>``), which is not a well-formed XML document on its own, so the text is parsed inside
a synthetic root element; error positions are mapped back to the user's own line and column.
Parsing uses expat through the standard library: no DTDs, no external entities (a DOCTYPE inside
the synthetic root is a syntax error).

Tolerated variants (spec §8 item 12): ``<image>``/``<img>`` wrappers, ``<artist>`` for
``<artists>``, ``<n/>``. Unknown tags are logged and returned as warnings, never fatal.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from xml.parsers import expat

from .schema import (CHARACTER_FIELDS, GENERAL_FIELDS, Character, GeneralTags, Prompt,
                     normalize_value)

logger = logging.getLogger(__name__)

_ROOT = "newbie_prompt_root"
_OPEN, _CLOSE = f"<{_ROOT}>", f"</{_ROOT}>"
_CHARACTER_TAG = re.compile(r"^character_(\d+)$")
_WRAPPERS = frozenset({"image", "img"})
_GENERAL_ALIASES = {"artist": "artists"}
_XML_DECL = re.compile(r"^\s*<\?xml[^>]*\?>")


class PromptSyntaxError(ValueError):
    """Malformed XML. ``line``/``column`` are 1-based positions in the user's text."""

    def __init__(self, reason: str, line: int, column: int, excerpt: str) -> None:
        super().__init__(f"XML prompt, line {line}, column {column}: {reason}\n{excerpt}")
        self.reason, self.line, self.column, self.excerpt = reason, line, column, excerpt


@dataclass(frozen=True)
class ParseResult:
    prompt: Prompt
    warnings: tuple[str, ...] = ()


@dataclass
class _Node:
    tag: str
    line: int  # 1-based, in the user's text
    column: int
    parts: list["str | _Node"] = field(default_factory=list)  # text and children, in order
    has_attrs: bool = False

    @property
    def children(self) -> list["_Node"]:
        return [p for p in self.parts if isinstance(p, _Node)]

    def own_text(self) -> str:
        return "".join(p for p in self.parts if isinstance(p, str))

    def all_text(self) -> str:
        return "".join(p if isinstance(p, str) else p.all_text() for p in self.parts)


def _user_position(line: int, col0: int) -> tuple[int, int]:
    """expat (1-based line, 0-based column) in the wrapped text → 1-based user position."""
    if line == 1:
        col0 -= len(_OPEN)
    return line, max(col0, 0) + 1


def _excerpt(text: str, line: int, column: int) -> str:
    lines = text.split("\n")
    src = lines[min(line, len(lines)) - 1].replace("\t", " ")
    return f"  {src}\n  {' ' * (column - 1)}^"


class _TreeBuilder:
    """expat handlers that build _Node trees and keep the open-element stack for messages."""

    def __init__(self, parser: expat.XMLParserType) -> None:
        self.parser = parser
        self.holder = _Node("", 1, 1)  # receives the synthetic root as its only child
        self.stack = [self.holder]
        parser.StartElementHandler = self.start
        parser.EndElementHandler = self.end
        parser.CharacterDataHandler = self.data

    def start(self, tag: str, attrs: dict) -> None:
        line, col = _user_position(self.parser.CurrentLineNumber, self.parser.CurrentColumnNumber)
        node = _Node(tag, line, col, has_attrs=bool(attrs))
        self.stack[-1].parts.append(node)
        self.stack.append(node)

    def end(self, tag: str) -> None:
        self.stack.pop()

    def data(self, text: str) -> None:
        self.stack[-1].parts.append(text)


def _hint(text: str, builder: _TreeBuilder, line: int, column: int, code: int) -> str:
    """A sentence that tells the user what to change, for the common mistakes."""
    lines = text.split("\n")
    in_text = line <= len(lines) and column <= len(lines[line - 1])
    at_end = line == max((i for i, s in enumerate(lines, 1) if s.strip()), default=1) and \
        column == len(lines[line - 1]) + 1
    here = lines[line - 1][column - 1:] if line <= len(lines) else ""
    open_tags = builder.stack[2:]  # the user's open elements (below holder and root)
    if code == expat.errors.codes[expat.errors.XML_ERROR_UNDEFINED_ENTITY]:
        return "unknown entity; write a literal '&' as &amp;"
    if here.startswith("&"):
        return "a bare '&' must be written as &amp;"
    if in_text and column > 1 and lines[line - 1][column - 2] == "<":
        return "a literal '<' must be written as &lt;"
    if open_tags and at_end:
        n = open_tags[-1]
        return f"<{n.tag}> opened at line {n.line}, column {n.column} is never closed"
    if code == expat.errors.codes[expat.errors.XML_ERROR_TAG_MISMATCH]:
        if not open_tags:
            return "this closing tag has no matching opening tag"
        n = open_tags[-1]
        return f"closing tag does not match <{n.tag}> opened at line {n.line}, column {n.column}"
    return ""


_TAG_START = re.compile(r"</?[A-Za-z_][\w.:-]*\s*$")


def _unclosed_tag(text: str, line: int, column: int) -> tuple[str, int, int] | None:
    """A tag such as ``</gender`` that never got its '>': expat notices only at the next '<',
    often on the next line, so point just after the tag itself, where the '>' belongs."""
    lines = text.split("\n")
    offset = sum(len(s) + 1 for s in lines[:line - 1]) + column - 1
    prefix = text[:min(offset, len(text))]
    lt = prefix.rfind("<")
    if lt < 0 or ">" in prefix[lt:] or not _TAG_START.match(prefix[lt:]):
        return None
    tag = prefix[lt:].rstrip()
    end = lt + len(tag)
    at_line = text.count("\n", 0, end) + 1
    at_column = end - (text.rfind("\n", 0, end) + 1) + 1
    return f"the tag {tag!r} is missing its closing '>'", at_line, at_column


def _parse_tree(text: str, shown: str) -> _Node:
    """Parse ``text``; errors quote ``shown`` (the user's text, same line/column layout)."""
    parser = expat.ParserCreate()
    builder = _TreeBuilder(parser)
    try:
        parser.Parse(_OPEN + text + _CLOSE, True)
    except expat.ExpatError as err:
        line, column = _user_position(err.lineno, err.offset)
        lines = text.split("\n")
        reason = expat.errors.messages[err.code]
        if line <= len(lines):
            before = lines[line - 1][:column - 1]
            amp = before.rfind("&")
            if amp >= 0 and ";" not in before[amp:]:
                column = amp + 1  # point at the bare '&' itself, not where expat gave up
        unclosed = _unclosed_tag(text, line, column)
        if unclosed is not None:
            reason, line, column = unclosed
            raise PromptSyntaxError(reason, line, column, _excerpt(shown, line, column)) from None
        if line > len(lines) or (line == len(lines) and column > len(lines[-1])):
            # the error lies in the synthetic closing tag: the prompt ended too early
            reason = "unexpected end of the prompt"
            line = max((i for i, s in enumerate(lines, 1) if s.strip()), default=1)
            column = len(lines[line - 1]) + 1
        hint = _hint(text, builder, line, column, err.code)
        raise PromptSyntaxError(f"{reason}" + (f" ({hint})" if hint else ""), line, column,
                                _excerpt(shown, line, column)) from None
    return builder.holder.children[0]


class _Collector:
    """Maps the parsed tree onto the schema, collecting warnings."""

    def __init__(self) -> None:
        self.warnings: list[str] = []
        self.characters: list[tuple[int, Character]] = []
        self.general: dict[str, str] = {}
        self.caption: list[str] = []
        self.general_seen = 0

    def warn(self, where: str, node: _Node | None, message: str) -> None:
        pos = f" (line {node.line}, column {node.column})" if node is not None else ""
        msg = f"{where}: {message}{pos}"
        logger.warning("XML prompt: %s", msg)
        self.warnings.append(msg)

    def _value(self, where: str, node: _Node) -> str:
        if node.children:
            self.warn(where, node, "nested tags inside a field were flattened to their text")
        if node.has_attrs:
            self.warn(where, node, "attributes are ignored")
        return normalize_value(node.all_text())

    def _fields(self, where: str, node: _Node, known: tuple[str, ...],
                aliases: dict[str, str], out: dict[str, str]) -> None:
        for child in node.children:
            name = aliases.get(child.tag, child.tag)
            if name not in known:
                self.warn(f"{where}.{child.tag}", child,
                          f"unknown tag <{child.tag}> ignored (known: {', '.join(known)})")
                continue
            value = self._value(f"{where}.{name}", child)
            if name in out:
                self.warn(f"{where}.{name}", child, "given twice; values joined with ', '")
                value = ", ".join(v for v in (out[name], value) if v)
            out[name] = value
        self._stray_text(where, node)

    def _stray_text(self, where: str, node: _Node) -> None:
        stray = node.own_text().strip()
        if stray:
            self.warn(where, node, f"text outside any field ignored: {stray[:40]!r}")

    def top_level(self, node: _Node, where: str = "prompt") -> None:
        for child in node.children:
            m = _CHARACTER_TAG.match(child.tag)
            if m:
                values: dict[str, str] = {}
                self._fields(child.tag, child, CHARACTER_FIELDS, {}, values)
                self.characters.append((int(m.group(1)), Character(**values)))
            elif child.tag == "general_tags":
                if self.general_seen:
                    self.warn("general_tags", child, "a second block was merged into the first")
                self.general_seen += 1
                self._fields("general_tags", child, GENERAL_FIELDS, _GENERAL_ALIASES, self.general)
            elif child.tag == "caption":
                if self.caption:
                    self.warn("caption", child, "given twice; texts joined")
                self.caption.append(self._value("caption", child))
            elif child.tag in _WRAPPERS:
                self.top_level(child, child.tag)
            else:
                self.warn(child.tag, child, f"unknown top-level tag <{child.tag}> ignored")
        self._stray_text(where, node)

    def result(self) -> ParseResult:
        numbers = [n for n, _ in self.characters]
        if numbers != list(range(1, len(numbers) + 1)):
            self.warn("characters", None,
                      f"blocks are numbered {numbers}; expected character_1..character_"
                      f"{len(numbers)} in order (they are used in document order)")
        prompt = Prompt(tuple(c for _, c in self.characters), GeneralTags(**self.general),
                        " ".join(c for c in self.caption if c))
        return ParseResult(prompt, tuple(self.warnings))


def parse_prompt(text: str) -> ParseResult:
    """Parse XML prompt text into a :class:`Prompt` plus warnings.

    Raises PromptSyntaxError (a ValueError) with line, column and a caret excerpt for malformed
    XML. Empty or whitespace-only text gives an empty Prompt.
    """
    parsed = text
    decl = _XML_DECL.match(text)
    if decl:  # keep the user's columns: blank the declaration instead of cutting it
        parsed = re.sub(r"[^\n]", " ", decl.group()) + text[decl.end():]
    collector = _Collector()
    collector.top_level(_parse_tree(parsed, text))
    return collector.result()


def is_xml_prompt(text: str) -> bool:
    """True for text that is meant as XML: its first non-blank character is '<'."""
    return text.lstrip().startswith("<")
