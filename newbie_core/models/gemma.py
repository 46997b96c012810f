"""Gemma 3 4B-it text features for the DiT: ``hidden_states[-2]`` without the final norm (spec §3.1).

The decoder layers are transformers' own ``Gemma3DecoderLayer``; the loop around them is ours so
that placement can stream them through ``block_runner`` (see ``blocks.py``). Only the first
``num_hidden_layers - 1`` layers exist in memory: ``hidden_states[-2]`` of the HF forward is the
residual stream after layer 32 of 34, so the last layer and the final norm are never built.

Masks and rotary embeddings are made exactly as transformers' ``Gemma3TextModel.forward`` makes
them for a right-padded batch without a cache, so the result is bitwise equal to
``Gemma3TextModel(...)(ids, mask, output_hidden_states=True).hidden_states[-2]``. For the
``sdpa`` attention that means: no mask tensor at all (SDPA's ``is_causal``) when nothing is padded
and the sequence is shorter than the sliding window, a boolean (B, 1, L, L) mask otherwise.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Gemma3TextConfig
from transformers.models.gemma3.modeling_gemma3 import Gemma3DecoderLayer, Gemma3RotaryEmbedding

from .blocks import BlockRunner, run_block_directly
from .tokenizers import GemmaTokenizer

log = logging.getLogger(__name__)

GEMMA_FEATURE_DIM = 2560
SUPPORTED_ATTENTION = ("sdpa", "eager")

# gemma-3-4b-it's text decoder (HF config.json "text_config"); shapes can override these.
GEMMA3_4B_TEXT = dict(
    vocab_size=262_208, hidden_size=2560, num_hidden_layers=34, num_attention_heads=8,
    num_key_value_heads=4, head_dim=256, intermediate_size=10_240, hidden_activation="gelu_pytorch_tanh",
    rms_norm_eps=1e-6, query_pre_attn_scalar=256, sliding_window=1024, sliding_window_pattern=6,
    rope_theta=1_000_000.0, rope_local_base_freq=10_000.0, rope_scaling_factor=8.0,
    max_position_embeddings=131_072, pad_token_id=0, eos_token_id=1, bos_token_id=2,
)


def make_gemma3_text_config(attn_implementation: str = "sdpa", **overrides) -> Gemma3TextConfig:
    """A local ``Gemma3TextConfig`` (4B text decoder unless overridden); nothing from a hub."""
    p = {**GEMMA3_4B_TEXT, **overrides}
    pattern = int(p.pop("sliding_window_pattern"))
    layer_types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                   for i in range(int(p["num_hidden_layers"]))]
    factor = float(p.pop("rope_scaling_factor"))
    global_rope = {"rope_type": "linear", "factor": factor, "rope_theta": float(p.pop("rope_theta"))}
    if factor == 1.0:
        global_rope = {"rope_type": "default", "rope_theta": global_rope["rope_theta"]}
    rope = {"full_attention": global_rope,
            "sliding_attention": {"rope_type": "default", "rope_theta": float(p.pop("rope_local_base_freq"))}}
    config = Gemma3TextConfig(layer_types=layer_types, rope_parameters=rope, use_cache=False,
                              attention_dropout=0.0, **p)
    config._attn_implementation = attn_implementation
    return config


def gemma_attention_mask(valid: torch.Tensor, attn_implementation: str, dtype: torch.dtype,
                         sliding_window: int | None) -> torch.Tensor | None:
    """The 4D mask transformers builds for a right-padded batch without cache.

    ``valid`` is (B, L) bool. Returns None where transformers lets SDPA use ``is_causal``.
    """
    if attn_implementation not in SUPPORTED_ATTENTION:
        raise ValueError(f"attn_implementation must be one of {SUPPORTED_ATTENTION}, got {attn_implementation!r}.")
    batch, length = valid.shape
    window_matters = sliding_window is not None and length >= sliding_window
    if attn_implementation == "sdpa" and not window_matters and bool(valid.all()):
        return None
    pos = torch.arange(length, device=valid.device)
    allowed = pos[None, :] <= pos[:, None]  # (L, L) causal: key index <= query index
    if sliding_window is not None:
        allowed = allowed & (pos[None, :] > pos[:, None] - sliding_window)
    allowed = allowed[None, None] & valid[:, None, None, :]  # (B, 1, L, L)
    if attn_implementation == "eager":
        zero = torch.tensor(0.0, device=valid.device, dtype=dtype)
        return torch.where(allowed, zero, torch.finfo(dtype).min)
    return allowed


class GemmaTextEncoder(nn.Module):
    """Gemma 3 text decoder, run up to ``hidden_states[-2]``; its layers go through ``block_runner``.

    ``model.embed_tokens`` may live on another device (the CPU) than the layers: the lookup runs
    where the table is, then the (B, L, H) result moves to ``compute_device``.
    """

    def __init__(self, config: Gemma3TextConfig, tokenizer: GemmaTokenizer | None = None):
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        self.n_run = config.num_hidden_layers - 1  # hidden_states[-2]: all but the last layer
        self.block_runner: BlockRunner = run_block_directly
        self.compute_device = torch.device("cpu")
        with torch.device("meta"):
            self.model = nn.Module()
            self.model.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
            self.model.layers = nn.ModuleList(Gemma3DecoderLayer(config, i) for i in range(self.n_run))
        self.rotary_emb = Gemma3RotaryEmbedding(config)  # non-persistent buffers, built for real

    def block_sequence(self) -> list[tuple[str, nn.Module]]:
        return [(f"model.layers.{i}", layer) for i, layer in enumerate(self.model.layers)]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Scaled token embeddings on ``compute_device``, as ``Gemma3TextScaledWordEmbedding``."""
        weight = self.model.embed_tokens.weight
        scale = torch.tensor(self.config.hidden_size**0.5).to(weight.dtype)  # rounded like HF
        hidden = F.embedding(input_ids.to(weight.device), weight) * scale  # (B, L, H)
        return hidden.to(self.compute_device)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) ids and mask -> (B, L, H) residual stream after layer ``n_run - 1``."""
        hidden = self.embed(input_ids)
        device, length = hidden.device, hidden.shape[1]
        valid = attention_mask.to(device=device, dtype=torch.bool)
        position_ids = torch.arange(length, device=device).unsqueeze(0)  # (1, L)
        impl = self.config._attn_implementation
        masks = {
            "full_attention": gemma_attention_mask(valid, impl, hidden.dtype, None),
            "sliding_attention": gemma_attention_mask(valid, impl, hidden.dtype, self.config.sliding_window),
        }
        kinds = self.config.layer_types[: self.n_run]
        rope = {kind: self.rotary_emb(hidden, position_ids, kind) for kind in set(kinds)}
        for index, layer in enumerate(self.model.layers):
            kind = kinds[index]
            hidden = self.block_runner(index, layer, hidden, attention_mask=masks[kind],
                                       position_embeddings=rope[kind], position_ids=position_ids)
        return hidden

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], max_length: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
        """Texts (already prefixed) -> ``cap_feats`` (B, L, H) and ``cap_mask`` (B, L) bool."""
        if self.tokenizer is None:
            raise ValueError("This GemmaTextEncoder has no tokenizer; call forward() with ids instead.")
        batch = self.tokenizer(texts, max_length=max_length)
        feats = self(batch.input_ids, batch.attention_mask)
        return feats, batch.attention_mask.to(feats.device)


def estimate_gemma_activation_bytes(config: Gemma3TextConfig, batch: int, seq_len: int,
                                    dtype: torch.dtype) -> int:
    """Peak activation bytes of one decoder layer, as an upper bound for planning.

    With B = batch, L = seq_len, H = hidden, M = mlp width, nq/nkv = query/kv heads, d = head_dim,
    s = bytes per element of ``dtype``:

    * residual stream in + out + one normed copy ............ 3·B·L·H·s
    * q, k, v projections and their normed/rotated copies ... 2·B·L·(nq + 2·nkv)·d·s
    * k, v repeated to nq heads (GQA with a mask) ........... 2·B·L·nq·d·s
    * attention scores, fp32, if SDPA falls back to math .... 4·B·nq·L²
    * MLP gate, up and their product ........................ 3·B·L·M·s
    * boolean masks (full + sliding) and o_proj input ....... 2·B·L² + B·L·nq·d·s
    """
    b, n, s = batch, seq_len, torch.finfo(dtype).bits // 8
    h, m = config.hidden_size, config.intermediate_size
    nq, nkv, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    per_token = 3 * h + 2 * (nq + 2 * nkv) * d + 2 * nq * d + 3 * m + nq * d
    return int(b * n * per_token * s + 4 * b * nq * n * n + 2 * b * n * n)
