"""XML prompt nodes: Character (chainable) and the XML Prompt Builder (spec §6).

Characters travel as an immutable tuple of ``prompt.Character``; each Character node appends one
to the chain it receives. The builder writes the README layout through ``prompt.build_xml``; a
value XML cannot carry raises ``PromptValueError`` naming the field (e.g. character_2.appearance).
"""

from __future__ import annotations

from ..newbie_core.prompt import Character, GeneralTags, Prompt, build_xml
from .types import CATEGORY, NEWBIE_CHARACTER

# widget name -> schema field (the schema's name field is "n", the XML tag)
CHARACTER_WIDGETS = {
    "name": ("n", "Character name tag, e.g. hatsune_miku (written as <n>)."),
    "gender": ("gender", "e.g. 1girl, 1boy."),
    "appearance": ("appearance", "Hair, eyes, body features: comma-separated tags."),
    "clothing": ("clothing", "Outfit tags."),
    "body_type": ("body_type", "Body type tags (optional)."),
    "expression": ("expression", "Facial expression tags, e.g. smile, open_mouth."),
    "action": ("action", "What the character does, e.g. waving, sitting."),
    "interaction": ("interaction", "Interaction with other characters (optional)."),
    "position": ("position", "Where the character is in the frame, e.g. left side."),
}
GENERAL_WIDGETS = {
    "count": "Subject count tags, e.g. 1girl, solo / 2girls.",
    "artists": "Artist tags.",
    "style": "Style tags, e.g. anime_style.",
    "background": "Background tags.",
    "environment": "Environment / setting tags.",
    "perspective": "Camera / framing tags, e.g. upper_body, from_side.",
    "atmosphere": "Mood tags.",
    "lighting": "Lighting tags.",
    "resolution": "Resolution tags, e.g. highres.",
    "quality": "Quality tags, e.g. masterpiece, best_quality.",
    "objects": "Object tags.",
    "other": "Anything else.",
}


def _text(tooltip: str, multiline: bool = False) -> tuple:
    return ("STRING", {"default": "", "multiline": multiline, "tooltip": tooltip})


def character_inputs() -> dict:
    return {name: _text(tip) for name, (_, tip) in CHARACTER_WIDGETS.items()}


def character_from_widgets(values: dict) -> Character:
    return Character(**{field: values.get(name, "") for name, (field, _) in CHARACTER_WIDGETS.items()})


def _chain(previous) -> tuple[Character, ...]:
    if previous is None:
        return ()
    if not isinstance(previous, tuple) or not all(isinstance(c, Character) for c in previous):
        raise ValueError("the characters input must come from a NewBie Character node.")
    return previous


class NewBieCharacter:
    TITLE = "NewBie Character"
    DESCRIPTION = ("One <character_N> block of NewBie's XML prompt. Chain several: each node appends its character "
                   "to the ones it receives, in order; feed the last into NewBie XML Prompt Builder.")
    CATEGORY = f"{CATEGORY}/prompt"
    RETURN_TYPES = (NEWBIE_CHARACTER,)
    RETURN_NAMES = ("characters",)
    OUTPUT_TOOLTIPS = ("The chain so far, this character last.",)
    FUNCTION = "add"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": character_inputs(),
                "optional": {"previous": (NEWBIE_CHARACTER, {"tooltip": "Characters from an earlier Character node; "
                                                                        "this one is appended after them."})}}

    def add(self, previous=None, **widgets) -> tuple[tuple[Character, ...]]:
        return (_chain(previous) + (character_from_widgets(widgets),),)


class NewBieXMLPromptBuilder:
    TITLE = "NewBie XML Prompt Builder"
    DESCRIPTION = ("Builds NewBie's structured XML prompt: chained characters (and optionally one more from this "
                   "node's character fields), general tags and a caption. Connect the text to NewBie Text Encode.")
    CATEGORY = f"{CATEGORY}/prompt"
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("xml",)
    OUTPUT_TOOLTIPS = ("The XML prompt text (the encoder adds the system prefix itself).",)
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        own = {f"character_{name}": (spec[0], {**spec[1], "tooltip": spec[1]["tooltip"] +
                                               " This node's own character: added after the chained ones when any "
                                               "of its fields is filled."})
               for name, spec in character_inputs().items()}
        required = {name: _text(tip) for name, tip in GENERAL_WIDGETS.items()}
        required["caption"] = _text("Natural-language description, written last as <caption>.", multiline=True)
        required.update(own)
        return {"required": required,
                "optional": {"characters": (NEWBIE_CHARACTER, {"tooltip": "Characters from NewBie Character nodes, "
                                                                          "written first as character_1, _2, ..."})}}

    def build(self, caption: str = "", characters=None, **widgets) -> tuple[str]:
        chars = _chain(characters)
        own = {name[len("character_"):]: value for name, value in widgets.items() if name.startswith("character_")}
        if any(str(v).strip() for v in own.values()):
            chars = chars + (character_from_widgets(own),)
        tags = GeneralTags(**{name: widgets.get(name, "") for name in GENERAL_WIDGETS})
        xml = build_xml(Prompt(chars, tags, caption))
        if not xml:
            raise ValueError("the XML prompt is empty: fill at least one character, general tag or the caption.")
        return (xml,)
