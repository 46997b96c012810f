"""Tokenizers for the two text encoders, built from bytes or local files only (spec §3.1, §3.2).

Gemma 3 uses its SentencePiece model as is: the spm ids are the model's ids (pad 0, eos 1, bos 2,
unk 3). Jina CLIP v2 uses XLM-RoBERTa's tokenizer, whose ids follow fairseq: ``<s>``=0,
``<pad>``=1, ``</s>``=2, ``<unk>``=3, then the SentencePiece pieces shifted by one. Two kinds of
SentencePiece model reach us for Jina:

* the original ``sentencepiece.bpe.model`` (unk 0, ``<s>`` 1, ``</s>`` 2): we apply the fairseq
  mapping ourselves;
* an "aligned" model whose own ids already are the fairseq ids (``<s>`` 0, ``<pad>`` 1,
  ``</s>`` 2, ``<unk>`` 3). ComfyUI feeds the raw spm ids of its ``spiece_model`` tensor straight
  into the embedding table, so a ComfyUI file that reproduces the official output must carry
  such a model; we recognise it by its special ids and use its ids unchanged.

An HF folder's ``tokenizer.json`` is read with the ``tokenizers`` library (offline). Padding,
truncation and the batch layout are ours, so every source gives the same tensors.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import sentencepiece
import torch

log = logging.getLogger(__name__)

# fairseq / XLM-R special ids (what the Jina embedding table is indexed by).
XLMR_BOS, XLMR_PAD, XLMR_EOS, XLMR_UNK = 0, 1, 2, 3
# Gemma special ids (identical in its spm model and in tokenizer.json).
GEMMA_PAD, GEMMA_EOS, GEMMA_BOS, GEMMA_UNK = 0, 1, 2, 3


class PieceEncoder(Protocol):
    """Turns one text into ids, without any special tokens. Encoders that can also give each
    id's character span of the text have ``offsets(text)`` (see :func:`piece_offsets`)."""

    def encode(self, text: str) -> list[int]: ...


Offsets = list[tuple[int, int]]


def piece_offsets(pieces: PieceEncoder, text: str) -> Offsets | None:
    """(start, end) character span of each id of ``pieces.encode(text)``, or None when the
    encoder cannot say (no ``offsets`` method, or its pieces do not spell the text back)."""
    offsets = getattr(pieces, "offsets", None)
    return offsets(text) if offsets is not None else None


def _byte_to_char_spans(text: str, byte_spans: list[tuple[int, int]]) -> Offsets:
    """Byte spans of ``text``'s UTF-8 encoding -> character spans (a byte inside a character
    counts as the whole character, as byte-fallback pieces of one character do)."""
    char_of_byte: list[int] = []
    for i, ch in enumerate(text):
        char_of_byte += [i] * len(ch.encode("utf-8"))
    char_of_byte.append(len(text))
    return [(char_of_byte[a], char_of_byte[b - 1] + 1 if b > a else char_of_byte[a]) for a, b in byte_spans]


@dataclass(frozen=True)
class TokenBatch:
    input_ids: torch.Tensor       # (B, L) int64, right padded
    attention_mask: torch.Tensor  # (B, L) bool, True on real tokens (specials included)
    dropped: tuple[int, ...]      # tokens cut by truncation, per text


def _sentencepiece_from_bytes(model_bytes: bytes, what: str) -> sentencepiece.SentencePieceProcessor:
    sp = sentencepiece.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(model_bytes)
    except (RuntimeError, OSError) as e:
        raise ValueError(f"The {what} tokenizer bytes are not a SentencePiece model ({e}).") from e
    return sp


class GemmaSpm:
    """Gemma's SentencePiece model: spm ids are model ids."""

    def __init__(self, model_bytes: bytes):
        self.sp = _sentencepiece_from_bytes(model_bytes, "Gemma")
        got = (self.sp.pad_id(), self.sp.eos_id(), self.sp.bos_id())
        if got != (GEMMA_PAD, GEMMA_EOS, GEMMA_BOS):
            raise ValueError(f"Not a Gemma tokenizer: expected pad/eos/bos ids (0, 1, 2), found {got}.")
        self.vocab_size = self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return list(self.sp.encode(text))

    def offsets(self, text: str) -> Offsets | None:
        """Character span of each id. Gemma's model does not normalise (spaces become ``▁``,
        unknown characters fall back to bytes), so the pieces spell the text back byte for
        byte; if they do not (another model, an unknown piece), None."""
        spans, pos = [], 0
        for i in self.sp.encode(text):
            if self.sp.is_unknown(i):
                return None
            n = 1 if self.sp.is_byte(i) else len(self.sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
            spans.append((pos, pos + n))
            pos += n
        if pos != len(text.encode("utf-8")):
            return None
        return _byte_to_char_spans(text, spans)


class XlmrSpm:
    """XLM-R SentencePiece model, mapped onto fairseq ids whichever convention it uses."""

    def __init__(self, model_bytes: bytes):
        self.sp = _sentencepiece_from_bytes(model_bytes, "Jina (XLM-RoBERTa)")
        specials = (self.sp.unk_id(), self.sp.bos_id(), self.sp.eos_id())
        if specials == (0, 1, 2):
            self.offset = 1            # original sentencepiece.bpe.model: fairseq shifts by one
            self.vocab_size = self.sp.get_piece_size() + 2  # + <pad> and <mask>
        elif specials == (XLMR_UNK, XLMR_BOS, XLMR_EOS) and self.sp.pad_id() == XLMR_PAD:
            self.offset = 0            # already aligned with fairseq (ComfyUI's packaging)
            self.vocab_size = self.sp.get_piece_size() + 1  # + <mask>
        else:
            raise ValueError(
                "Not an XLM-RoBERTa tokenizer: expected unk/bos/eos ids (0, 1, 2) or (3, 0, 2), "
                f"found {specials}.")

    def encode(self, text: str) -> list[int]:
        ids = self.sp.encode(text)
        if self.offset == 0:
            return list(ids)
        unk = self.sp.unk_id()
        return [XLMR_UNK if i == unk else i + self.offset for i in ids]


class TokenizerJson:
    """An HF ``tokenizer.json`` read with the ``tokenizers`` library; specials are added by us."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer  # light import; kept local so spm-only users skip it
        self.tok = Tokenizer.from_file(str(path))
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def offsets(self, text: str) -> Offsets:
        """The library's own offset mapping (character spans of the original text)."""
        return [tuple(o) for o in self.tok.encode(text, add_special_tokens=False).offsets]


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int, multiple_of: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest sequence, rounded up to ``multiple_of``."""
    longest = max(len(s) for s in seqs)
    length = -(-longest // multiple_of) * multiple_of
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.bool)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq)] = torch.tensor(list(seq), dtype=torch.long)
        mask[row, : len(seq)] = True
    return ids, mask  # (B, L), (B, L)


def _warn_truncated(what: str, dropped: Sequence[int], max_length: int) -> None:
    for row, n in enumerate(dropped):
        if n:
            log.warning("%s prompt %d is too long: %d token(s) past max_length=%d were dropped.",
                        what, row, n, max_length)


class GemmaTokenizer:
    """BOS + text, no EOS, right padded with 0 to a multiple of 8, truncated at max_length (§3.1)."""

    def __init__(self, pieces: PieceEncoder, vocab_size: int):
        self.pieces = pieces
        self.vocab_size = vocab_size

    def __call__(self, texts: Sequence[str], max_length: int = 512, pad_to_multiple_of: int = 8) -> TokenBatch:
        if not texts:
            raise ValueError("Gemma tokenizer: expected at least one text, got an empty list.")
        seqs, dropped = [], []
        for text in texts:
            ids = [GEMMA_BOS] + self.pieces.encode(text)
            dropped.append(max(0, len(ids) - max_length))
            seqs.append(ids[:max_length])
        _warn_truncated("Gemma", dropped, max_length)
        ids, mask = pad_batch(seqs, GEMMA_PAD, pad_to_multiple_of)
        return TokenBatch(ids, mask, tuple(dropped))


class JinaTokenizer:
    """``<s>`` text ``</s>``, right padded with 1, truncated at max_length keeping ``</s>`` (§3.2)."""

    def __init__(self, pieces: PieceEncoder, vocab_size: int):
        self.pieces = pieces
        self.vocab_size = vocab_size

    def __call__(self, texts: Sequence[str], max_length: int = 2048) -> TokenBatch:
        if not texts:
            raise ValueError("Jina tokenizer: expected at least one text, got an empty list.")
        if max_length < 2:
            raise ValueError(f"Jina tokenizer: max_length must leave room for <s> and </s>, got {max_length}.")
        seqs, dropped = [], []
        for text in texts:
            body = self.pieces.encode(text)
            keep = max_length - 2
            dropped.append(max(0, len(body) - keep))
            seqs.append([XLMR_BOS] + body[:keep] + [XLMR_EOS])
        _warn_truncated("Jina", dropped, max_length)
        ids, mask = pad_batch(seqs, XLMR_PAD)
        return TokenBatch(ids, mask, tuple(dropped))


def gemma_tokenizer_from_bytes(model_bytes: bytes) -> GemmaTokenizer:
    spm = GemmaSpm(model_bytes)
    return GemmaTokenizer(spm, spm.vocab_size)


def jina_tokenizer_from_bytes(model_bytes: bytes) -> JinaTokenizer:
    spm = XlmrSpm(model_bytes)
    return JinaTokenizer(spm, spm.vocab_size)


def tokenizer_from_folder(folder: Path, kind: str) -> GemmaTokenizer | JinaTokenizer:
    """Prefer ``tokenizer.json`` (what the official code used), else a SentencePiece model file."""
    make = GemmaTokenizer if kind == "gemma" else JinaTokenizer
    if (folder / "tokenizer.json").is_file():
        tj = TokenizerJson(folder / "tokenizer.json")
        return make(tj, tj.vocab_size)
    for name in ("tokenizer.model", "sentencepiece.bpe.model", "spiece.model"):
        if (folder / name).is_file():
            data = (folder / name).read_bytes()
            return gemma_tokenizer_from_bytes(data) if kind == "gemma" else jina_tokenizer_from_bytes(data)
    raise ValueError(f"{folder}: no tokenizer found: expected tokenizer.json or tokenizer.model.")
