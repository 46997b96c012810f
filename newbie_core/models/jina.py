"""Jina CLIP v2 pooled text embedding for the DiT's adaLN vector (spec §3.2).

The text tower is Jina's XLM-RoBERTa: post-LN blocks, rotary (rotate-half, base 20000) instead
of position embeddings, one token type, exact GELU. We run transformers' own
``JinaEmbeddingsV3Layer`` blocks in our loop so placement can stream them through
``block_runner``; embeddings, mask and rotary are made as ``JinaEmbeddingsV3Model.forward``
makes them, so the last hidden state is bitwise equal to it.

Pooling is jina-clip's ``mean_pooler``: the mean over tokens whose id is not ``<pad>`` (1),
``<s>`` and ``</s>`` included; no projection, no normalisation. The sum runs in fp32.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
import transformers

try:  # JinaEmbeddingsV3 landed in transformers 5.x; say so instead of a bare ImportError
    from transformers import JinaEmbeddingsV3Config
    from transformers.models.jina_embeddings_v3.modeling_jina_embeddings_v3 import (
        JinaEmbeddingsV3Layer,
        JinaEmbeddingsV3RotaryEmbedding,
    )
except ImportError as e:  # pragma: no cover - depends on the installed transformers
    raise ImportError(
        "The Jina CLIP v2 text encoder needs transformers with JinaEmbeddingsV3 (tested with 5.24); "
        f"found transformers {transformers.__version__}. Upgrade transformers.") from e

from .blocks import BlockRunner, run_block_directly
from .tokenizers import XLMR_PAD, JinaTokenizer

log = logging.getLogger(__name__)

JINA_POOLED_DIM = 1024
SUPPORTED_ATTENTION = ("sdpa", "eager")

# jina-clip-v2's text tower (jina-embeddings-v3 architecture); shapes can override these.
JINA_CLIP_V2_TEXT = dict(
    vocab_size=250_002, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
    intermediate_size=4096, type_vocab_size=1, layer_norm_eps=1e-5, rope_theta=20_000.0,
)


def make_jina_text_config(attn_implementation: str = "sdpa", **overrides) -> JinaEmbeddingsV3Config:
    """A local ``JinaEmbeddingsV3Config`` for the text tower (dropout off); nothing from a hub."""
    p = {**JINA_CLIP_V2_TEXT, **overrides}
    rope = {"rope_type": "default", "rope_theta": float(p.pop("rope_theta"))}
    config = JinaEmbeddingsV3Config(
        hidden_act="gelu", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, rope_parameters=rope,
        pad_token_id=XLMR_PAD, bos_token_id=0, eos_token_id=2, max_position_embeddings=8194, use_cache=False, **p)
    config._attn_implementation = attn_implementation
    return config


def jina_attention_mask(valid: torch.Tensor, attn_implementation: str, dtype: torch.dtype) -> torch.Tensor | None:
    """Key-padding mask as transformers builds it: None when nothing is padded, else (B, 1, L, L)."""
    if attn_implementation not in SUPPORTED_ATTENTION:
        raise ValueError(f"attn_implementation must be one of {SUPPORTED_ATTENTION}, got {attn_implementation!r}.")
    if bool(valid.all()):
        return None
    batch, length = valid.shape
    allowed = valid[:, None, None, :].expand(batch, 1, length, length)
    if attn_implementation == "eager":
        zero = torch.tensor(0.0, device=valid.device, dtype=dtype)
        return torch.where(allowed, zero, torch.finfo(dtype).min)
    return allowed


def mean_pool(hidden: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B, L, H) and (B, L) bool -> (B, H): fp32 mean over valid tokens, cast back."""
    weights = valid.to(device=hidden.device, dtype=torch.float32).unsqueeze(-1)  # (B, L, 1)
    total = (hidden.float() * weights).sum(dim=1)  # (B, H)
    return (total / weights.sum(dim=1)).to(hidden.dtype)


class JinaTextEncoder(nn.Module):
    """Jina CLIP v2 text tower; its 24 layers go through ``block_runner``.

    ``embeddings.word_embeddings`` may stay on the CPU; the looked-up rows move to
    ``compute_device`` before the token-type add and the embedding LayerNorm.
    """

    def __init__(self, config: JinaEmbeddingsV3Config, tokenizer: JinaTokenizer | None = None):
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        self.block_runner: BlockRunner = run_block_directly
        self.compute_device = torch.device("cpu")
        h = config.hidden_size
        with torch.device("meta"):
            self.embeddings = nn.Module()
            self.embeddings.word_embeddings = nn.Embedding(config.vocab_size, h)
            self.embeddings.token_type_embeddings = nn.Embedding(config.type_vocab_size, h)
            self.embeddings.LayerNorm = nn.LayerNorm(h, eps=config.layer_norm_eps)
            self.layers = nn.ModuleList(JinaEmbeddingsV3Layer(config) for _ in range(config.num_hidden_layers))
        self.rotary_emb = JinaEmbeddingsV3RotaryEmbedding(config)  # non-persistent buffers, built for real

    def block_sequence(self) -> list[tuple[str, nn.Module]]:
        return [(f"layers.{i}", layer) for i, layer in enumerate(self.layers)]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) ids -> (B, L, H) normed embeddings on ``compute_device``."""
        table = self.embeddings.word_embeddings.weight
        words = F.embedding(input_ids.to(table.device), table).to(self.compute_device)  # (B, L, H)
        types = torch.zeros(input_ids.shape, dtype=torch.long, device=self.compute_device)
        return self.embeddings.LayerNorm(words + self.embeddings.token_type_embeddings(types))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) ids and mask -> (B, L, H) last hidden state."""
        hidden = self.embed(input_ids)
        valid = attention_mask.to(device=hidden.device, dtype=torch.bool)
        mask = jina_attention_mask(valid, self.config._attn_implementation, hidden.dtype)
        position_ids = torch.arange(hidden.shape[1], device=hidden.device)[None, :]  # (1, L)
        rope = self.rotary_emb(hidden, position_ids)
        for index, layer in enumerate(self.layers):
            hidden = self.block_runner(index, layer, hidden, attention_mask=mask, position_embeddings=rope)
        return hidden

    def pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) -> (B, H) mean over non-pad tokens (``<s>``/``</s>`` included)."""
        hidden = self(input_ids, attention_mask)
        return mean_pool(hidden, input_ids.to(hidden.device) != XLMR_PAD)

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], max_length: int = 2048) -> torch.Tensor:
        """Raw prompts -> ``clip_text_pooled`` (B, H)."""
        if self.tokenizer is None:
            raise ValueError("This JinaTextEncoder has no tokenizer; call pooled() with ids instead.")
        batch = self.tokenizer(texts, max_length=max_length)
        return self.pooled(batch.input_ids, batch.attention_mask)
