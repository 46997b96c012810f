"""A SentencePiece model rebuilt from a GGUF file's tokenizer metadata (llama.cpp's ``llama`` kind).

llama.cpp's converter stores the pieces, their scores and their types
(``tokenizer.ggml.tokens/scores/token_type``; the type numbers are SentencePiece's own) and the
special ids, but not the normaliser or trainer options. Gemma 3's are fixed and known: BPE with
byte fallback, identity normaliser, no dummy prefix, no whitespace folding. The model proto is
written here directly in protobuf's wire format (three nested messages, a dozen fields), so no
protobuf runtime is needed; sentencepiece then loads it like any ``tokenizer.model``.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

# sentencepiece_model.proto field numbers
_MODEL_PIECES, _MODEL_TRAINER, MODEL_NORMALIZER, MODEL_DENORMALIZER = 1, 2, 3, 5
_PIECE_TEXT, _PIECE_SCORE, _PIECE_TYPE = 1, 2, 3
_TRAINER_MODEL_TYPE, _TRAINER_VOCAB, _TRAINER_BYTE_FALLBACK = 3, 4, 35
_TRAINER_IDS = {"unk": 40, "bos": 41, "eos": 42, "pad": 43}
# sentencepiece finds its special ids by these piece strings (defaults <unk>, <s>, </s>, <pad>)
_TRAINER_PIECES = {"unk": 45, "bos": 46, "eos": 47, "pad": 48}
_NORM_NAME, _NORM_DUMMY_PREFIX, _NORM_REMOVE_SPACES = 1, 3, 4
BPE = 2
NORMAL = 1


def _varint(n: int) -> bytes:
    if n < 0:
        n += 1 << 64          # int32 fields are sign-extended to 64 bits on the wire
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _int(field: int, value: int) -> bytes:
    return _varint(field << 3) + _varint(value)


def length_delimited(field: int, value: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(value)) + value


def _float(field: int, value: float) -> bytes:
    return _varint(field << 3 | 5) + struct.pack("<f", value)


def build_spm_model(tokens: Sequence[str], scores: Sequence[float] | None, types: Sequence[int] | None,
                    ids: dict[str, int]) -> bytes:
    """Serialized ModelProto for a Gemma-style BPE vocabulary (see module docstring)."""
    out = bytearray()
    for i, token in enumerate(tokens):
        piece = length_delimited(_PIECE_TEXT, token.encode("utf-8"))
        piece += _float(_PIECE_SCORE, float(scores[i]) if scores is not None else 0.0)
        kind = int(types[i]) if types is not None else NORMAL
        if kind != NORMAL:
            piece += _int(_PIECE_TYPE, kind)
        out += length_delimited(_MODEL_PIECES, piece)
    trainer = _int(_TRAINER_MODEL_TYPE, BPE) + _int(_TRAINER_VOCAB, len(tokens)) + _int(_TRAINER_BYTE_FALLBACK, 1)
    for name, field in _TRAINER_IDS.items():
        if name in ids:
            trainer += _int(field, ids[name])
            trainer += length_delimited(_TRAINER_PIECES[name], tokens[ids[name]].encode("utf-8"))
    out += length_delimited(_MODEL_TRAINER, trainer)
    out += length_delimited(MODEL_NORMALIZER, gemma_normalizer())
    return bytes(out)


def gemma_normalizer() -> bytes:
    """Gemma 3's NormalizerSpec (module docstring), serialized: what a GGUF's metadata omits."""
    return length_delimited(_NORM_NAME, b"identity") + _int(_NORM_DUMMY_PREFIX, 0) + _int(_NORM_REMOVE_SPACES, 0)
