"""XML prompt builder, parser and validator."""

from __future__ import annotations

import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from newbie_core.prompt import (CHARACTER_FIELDS, GENERAL_FIELDS, Character, GeneralTags, Prompt,
                                PromptSyntaxError, PromptValueError, build_xml, normalize_value,
                                parse_prompt)

README_EXAMPLE = """<character_1>
<n>$character_1$</n>
<gender>1girl</gender>
<appearance>chibi, red_eyes, blue_hair</appearance>
<position>center_left</position>
</character_1>

<character_2>
<n>$character_2$</n>
<gender>1girl</gender>
<action>standing, waving</action>
</character_2>

<general_tags>
<count>2girls, multiple_girls</count>
<style>anime_style, digital_art</style>
<other>alternate_costume</other>
</general_tags>"""


def test_build_layout_matches_readme_format():
    p = Prompt(
        characters=(Character(n="hatsune_miku", gender="1girl", appearance="aqua_hair"),
                    Character(gender="1boy", position="left")),
        general_tags=GeneralTags(count="1girl, 1boy", quality="masterpiece"),
        caption="Two friends on a beach.")
    assert build_xml(p) == (
        "<character_1>\n  <n>hatsune_miku</n>\n  <gender>1girl</gender>\n"
        "  <appearance>aqua_hair</appearance>\n</character_1>\n\n"
        "<character_2>\n  <n></n>\n  <gender>1boy</gender>\n  <position>left</position>\n"
        "</character_2>\n\n"
        "<general_tags>\n  <count>1girl, 1boy</count>\n  <quality>masterpiece</quality>\n"
        "</general_tags>\n\n"
        "<caption>Two friends on a beach.</caption>")


def test_build_escapes_and_drops_empty_blocks():
    p = Prompt(characters=(Character(n="a&b", appearance="<x> & y > z"),))
    text = build_xml(p)
    assert "<n>a&amp;b</n>" in text and "<appearance>&lt;x&gt; &amp; y &gt; z</appearance>" in text
    assert "general_tags" not in text and "caption" not in text
    assert build_xml(Prompt()) == ""
    assert build_xml(Prompt(caption="  only a caption \n")) == "<caption>only a caption</caption>"


def test_field_order_follows_spec():
    full = Character(**{f: f.upper() for f in CHARACTER_FIELDS})
    text = build_xml(Prompt(characters=(full,)))
    positions = [text.index(f"<{f}>") for f in CHARACTER_FIELDS]
    assert positions == sorted(positions)
    tags = GeneralTags(**{f: f.upper() for f in GENERAL_FIELDS})
    text = build_xml(Prompt(general_tags=tags))
    positions = [text.index(f"<{f}>") for f in GENERAL_FIELDS]
    assert positions == sorted(positions)


def test_control_character_error_names_the_field():
    p = Prompt(characters=(Character(), Character(appearance="red\x07eyes")))
    with pytest.raises(PromptValueError, match=r"^character_2\.appearance: .*U\+0007") as err:
        build_xml(p)
    assert err.value.field == "character_2.appearance"
    with pytest.raises(PromptValueError, match=r"^general_tags\.quality:"):
        build_xml(Prompt(general_tags=GeneralTags(quality="\x00")))
    with pytest.raises(PromptValueError, match=r"^caption: expected text"):
        build_xml(Prompt(caption=3))


def test_parse_readme_example():
    result = parse_prompt(README_EXAMPLE)
    assert result.warnings == ()
    c1, c2 = result.prompt.characters
    assert c1.n == "$character_1$" and c1.appearance == "chibi, red_eyes, blue_hair"
    assert c1.position == "center_left" and c2.action == "standing, waving"
    assert result.prompt.general_tags.count == "2girls, multiple_girls"
    assert result.prompt.general_tags.other == "alternate_costume"


def test_parse_tolerates_wrappers_artist_alias_and_empty_n(caplog):
    text = ("<style>mika pikazo</style>\n<image>\n  <caption>miku in the sand</caption>\n"
            "  <character_1><n/><gender>1girl</gender><extra>x</extra></character_1>\n"
            "  <general_tags><artist>mika_pikazo</artist></general_tags>\n</image>")
    with caplog.at_level(logging.WARNING):
        result = parse_prompt(text)
    p = result.prompt
    assert p.characters == (Character(gender="1girl"),)
    assert p.general_tags.artists == "mika_pikazo" and p.caption == "miku in the sand"
    assert len(result.warnings) == 2
    assert result.warnings[0].startswith("style: unknown top-level tag <style>")
    assert result.warnings[1].startswith("character_1.extra: unknown tag <extra>")
    assert "line 4" in result.warnings[1]
    assert len(caplog.records) == 2  # each warning is also logged
    assert parse_prompt("<img><caption>x</caption></img>").prompt.caption == "x"


def test_parse_warns_on_numbering_duplicates_and_nesting():
    text = ("<character_2><n>a</n><n>b</n></character_2>\n"
            "<general_tags><count>1girl</count></general_tags>"
            "<general_tags><style><b>bold</b> style</style></general_tags>")
    result = parse_prompt(text)
    assert result.prompt.characters[0].n == "a, b"
    assert result.prompt.general_tags.style == "bold style"
    joined = "\n".join(result.warnings)
    assert "character_2.n: given twice" in joined
    assert "general_tags: a second block" in joined
    assert "general_tags.style: nested tags" in joined
    assert "characters: blocks are numbered [2]" in joined


def test_empty_text_is_an_empty_prompt():
    assert parse_prompt("").prompt == Prompt()
    assert parse_prompt("  \n ").prompt == Prompt()


@pytest.mark.parametrize("text, line, column, words", [
    ("<character_1>\n  <n>black & white</n>\n</character_1>", 2, 12, "&amp;"),
    ("<character_1>\n  <n>x</gender>\n</character_1>", 2, 9, "does not match <n>"),
    ("<character_1>\n  <n>x</n>\n\n", 2, 11, "<character_1> opened at line 1, column 1 is never"),
    ("<caption>1 < 2</caption>", 1, 13, "&lt;"),
    ("<caption>x</caption>\n</general_tags>", 2, 3, "no matching opening tag"),
    ("<caption>caf\u00e9 &nbsp;</caption>", 1, 15, "entity"),
])
def test_syntax_errors_point_at_the_users_text(text, line, column, words):
    with pytest.raises(PromptSyntaxError) as err:
        parse_prompt(text)
    e = err.value
    assert isinstance(e, ValueError)
    assert (e.line, e.column) == (line, column), str(e)
    assert words in str(e)
    src_line, caret = e.excerpt.split("\n")
    assert src_line.strip() == text.split("\n")[line - 1].strip()
    assert caret.index("^") == 2 + column - 1


def test_xml_declaration_is_accepted_and_columns_kept():
    assert parse_prompt('<?xml version="1.0"?><caption>a</caption>').prompt.caption == "a"
    with pytest.raises(PromptSyntaxError) as err:
        parse_prompt('<?xml version="1.0"?><caption>a & b</caption>')
    assert err.value.column == 33  # the '&', counted in the original text
    assert err.value.excerpt.split("\n")[0].strip().startswith("<?xml")


# ------------------------------------------------------------------------- round trip property
# Values are normalised by one rule (schema.normalize_value): outer whitespace stripped, line
# breaks as "\n", inner text verbatim. The strategy generates arbitrary unicode that XML can
# carry (so no C0 controls other than \t \n \r, no surrogates, no U+FFFE/U+FFFF), including
# & < > and whitespace at the edges; the property is parse(build(p)) == normalised p.

_C0_BANNED = [c for c in map(chr, range(0x20)) if c not in "\t\n\r"]
_xml_chars = st.characters(blacklist_categories=("Cs",),
                           blacklist_characters=_C0_BANNED + ["\ufffe", "\uffff"])
_value = st.one_of(
    st.text(_xml_chars, max_size=20),
    st.sampled_from(["", " ", "a & b", "<n>", "]]>", "&amp;", " x\r\ny ", "\\(x\\)"]))
_character = st.builds(Character, **{f: _value for f in CHARACTER_FIELDS})
_general = st.builds(GeneralTags, **{f: _value for f in GENERAL_FIELDS})
_prompt = st.builds(Prompt, characters=st.lists(_character, max_size=3).map(tuple),
                    general_tags=_general, caption=_value)


@settings(max_examples=100, deadline=None)
@given(_prompt)
def test_build_parse_round_trip_is_lossless(prompt):
    expected = prompt.normalized()
    result = parse_prompt(build_xml(prompt))
    assert result.prompt == expected
    assert result.warnings == ()
    assert build_xml(result.prompt) == build_xml(prompt)  # stable under a second round


@given(_value)
def test_normalize_value_is_idempotent(value):
    once = normalize_value(value)
    assert normalize_value(once) == once and once == once.strip() and "\r" not in once


def test_official_builder_node_output_parses_with_warnings_only():
    # spec §6.4: NewBieTextToXMLPrompt output (style prefix line, <image> wrapper, caption first,
    # builder-only <body_type> inside general_tags)
    text = """<style>mika pikazo</style>

<image>
  <caption>miku sitting in the sand</caption>
  <character_1>
    <n>hatsune miku</n>
    <gender>1girl</gender>
    <expression>smile,</expression>
  </character_1>
  <general_tags>
    <count>1girl, solo</count>
    <body_type>wide hips</body_type>
    <artists>mika pikazo</artists>
    <quality>(((best_anatomy, masterpiece)))</quality>
  </general_tags>
</image>"""
    result = parse_prompt(text)
    p = result.prompt
    assert p.caption == "miku sitting in the sand"
    assert p.characters == (Character(n="hatsune miku", gender="1girl", expression="smile,"),)
    assert p.general_tags.quality == "(((best_anatomy, masterpiece)))"
    assert [w.split(":")[0] for w in result.warnings] == ["style", "general_tags.body_type"]


_xmlish = st.lists(st.sampled_from(list("<>/&;! \n\tab_1é") + [
    "<n>", "</n>", "<caption>", "</caption>", "&amp;", "<character_1>", "</character_1>"]),
    max_size=30).map("".join)


@settings(max_examples=150, deadline=None)
@given(_xmlish)
def test_parser_only_ever_raises_prompt_syntax_error_with_a_valid_position(text):
    try:
        parse_prompt(text)
    except PromptSyntaxError as err:
        lines = text.split("\n")
        assert 1 <= err.line <= len(lines)
        assert 1 <= err.column <= len(lines[err.line - 1]) + 1
        assert err.excerpt.count("^") == 1
