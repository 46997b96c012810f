"""NewBie's XML structured prompt: schema, builder, parser/validator and encoder texts."""

from .builder import build_xml, escape_text
from .parser import ParseResult, PromptSyntaxError, is_xml_prompt, parse_prompt
from .schema import (CHARACTER_FIELDS, GENERAL_FIELDS, Character, GeneralTags, Prompt,
                     PromptValueError, normalize_value)
from .system import (AUTO_SYSTEM_PROMPT, TEXT_SYSTEM_PREFIX, XML_SYSTEM_PREFIX, EncoderTexts, PromptWeights,
                     prepare_texts, prepare_weighted_texts, strip_paren_escapes)
from .weighting import Segment, WeightedText, WeightingMode, parse_weights, weighted_text

__all__ = [
    "build_xml", "escape_text",
    "ParseResult", "PromptSyntaxError", "is_xml_prompt", "parse_prompt",
    "CHARACTER_FIELDS", "GENERAL_FIELDS", "Character", "GeneralTags", "Prompt",
    "PromptValueError", "normalize_value",
    "TEXT_SYSTEM_PREFIX", "XML_SYSTEM_PREFIX", "EncoderTexts", "prepare_texts",
    "strip_paren_escapes", "AUTO_SYSTEM_PROMPT", "PromptWeights", "prepare_weighted_texts",
    "Segment", "WeightedText", "WeightingMode", "parse_weights", "weighted_text",
]
