"""CPU tier: the prompt nodes and the text-encode node (see nodes_support for how the pack is loaded)."""

from __future__ import annotations

import pytest
import torch

from nodes_support import adapter, conds, models, nodes, pack  # noqa: F401  (fixtures)
from nodes_support import call, mod  # tests/ is on pytest's pythonpath (pyproject)


# ---------------------------------------------------------------------------------- prompt nodes

def test_chained_characters_and_builder_write_valid_xml(nodes):
    prompt = mod("newbie_core.prompt")
    first, = call(nodes["NewBieCharacter"], name="miku", gender="1girl", appearance="twintails", clothing="",
                  body_type="", expression="smile", action="", interaction="", position="left")
    both, = call(nodes["NewBieCharacter"], previous=first, name="rin", gender="1girl", appearance="short_hair",
                 clothing="", body_type="", expression="", action="waving", interaction="", position="right")
    assert [c.n for c in first] == ["miku"] and [c.n for c in both] == ["miku", "rin"]
    builder = nodes["NewBieXMLPromptBuilder"]
    widgets = {name: "" for name in builder.INPUT_TYPES()["required"]}
    widgets.update(count="2girls", quality="masterpiece", caption="Two idols on stage.")
    xml, = call(builder, characters=both, **widgets)
    assert xml.index("<character_1>") < xml.index("<character_2>") < xml.index("<general_tags>") < xml.index("<caption>")
    parsed = prompt.parse_prompt(xml).prompt
    assert [c.n for c in parsed.characters] == ["miku", "rin"] and parsed.characters[1].action == "waving"
    assert parsed.general_tags.count == "2girls" and parsed.caption == "Two idols on stage."
    # The builder's own character fields add one more character after the chain.
    widgets.update(character_name="len", character_gender="1boy")
    xml3, = call(builder, characters=both, **widgets)
    assert [c.n for c in prompt.parse_prompt(xml3).prompt.characters] == ["miku", "rin", "len"]


def test_builder_rejects_bad_values_naming_the_field(nodes):
    prompt = mod("newbie_core.prompt")
    first, = call(nodes["NewBieCharacter"], name="miku", gender="1girl", appearance="", clothing="", body_type="",
                  expression="", action="", interaction="", position="")
    second, = call(nodes["NewBieCharacter"], previous=first, name="rin", gender="1girl", appearance="bad\x01tag",
                   clothing="", body_type="", expression="", action="", interaction="", position="")
    builder = nodes["NewBieXMLPromptBuilder"]
    widgets = {name: "" for name in builder.INPUT_TYPES()["required"]}
    with pytest.raises(ValueError, match=r"character_2\.appearance") as err:
        call(builder, characters=second, **widgets)
    assert isinstance(err.value, prompt.PromptValueError) and err.value.field == "character_2.appearance"
    with pytest.raises(ValueError, match="empty"):
        call(builder, **widgets)


# ---------------------------------------------------------------------------------- encode

def test_encode_outputs_native_conditioning_layout(conds, models):
    dit = models[0]
    for cond in conds:
        assert isinstance(cond, list) and len(cond) == 1
        feats, extra = cond[0]
        assert feats.ndim == 3 and feats.shape[0] == 1 and feats.shape[2] == dit.ckpt.config.cap_feat_dim
        assert feats.device.type == "cpu" and torch.isfinite(feats).all()
        assert extra["attention_mask"].shape == (1, feats.shape[1]) and bool(extra["attention_mask"].all())
        assert extra["pooled_output"].shape == (1, dit.ckpt.config.clip_text_dim)
    assert not torch.equal(conds[0][0][0][0, :1], torch.zeros_like(conds[0][0][0][0, :1]))


def test_encode_skips_encoders_for_an_unchanged_prompt(nodes, models):
    pipeline = mod("newbie_core.pipeline")
    pipeline.CONDITIONING_CACHE.clear()
    args = dict(text_encoders=models[1], positive="a cat on a sofa", negative="", compat=False)
    first = call(nodes["NewBieTextEncode"], **args)
    counted = dict(pipeline.ENCODER_CALLS)
    second = call(nodes["NewBieTextEncode"], **args)                    # a new node instance, same prompt
    assert pipeline.ENCODER_CALLS == counted, "an unchanged prompt ran the encoders again"
    assert torch.equal(first[0][0][0], second[0][0][0]) and torch.equal(first[1][0][1]["pooled_output"],
                                                                        second[1][0][1]["pooled_output"])
    call(nodes["NewBieTextEncode"], **{**args, "compat": True})         # compat changes Jina's text: a miss
    assert pipeline.ENCODER_CALLS["jina"] == counted["jina"] + 1


def test_encode_reports_malformed_xml_with_line_and_column(nodes, models):
    pipeline = mod("newbie_core.pipeline")
    before = dict(pipeline.ENCODER_CALLS)
    with pytest.raises(ValueError, match=r"line 2, column \d+"):
        call(nodes["NewBieTextEncode"], text_encoders=models[1], positive="<character_1>\n<n>miku</gender>\n</character_1>",
             negative="", compat=False)
    assert pipeline.ENCODER_CALLS == before
