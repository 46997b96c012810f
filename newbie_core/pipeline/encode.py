"""The text stage: Gemma 3 features and the Jina pooled vector, then both encoders leave the GPU.

Each encoder runs under its own placement plan, its decoder layers resident or streamed like
the DiT's blocks, and its embedding table stays in host RAM (rows are gathered on the CPU: a
few hundred rows instead of a 1.3 GB table on the GPU). Positive and negative prompts run as one
batch. Results go to the conditioning cache, so an unchanged prompt never runs the encoders.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch

from ..models.gemma import GemmaTextEncoder, estimate_gemma_activation_bytes
from ..models.jina import JinaTextEncoder
from ..models.tokenizers import piece_offsets
from ..placement import HOST_CACHE, Report, StorageChoice, measure_stage, run_with_oom_retry, stage_guard
from ..prompt import EncoderTexts, PromptWeights, WeightedText
from .conditioning import CONDITIONING_CACHE, Conditioning, ConditioningCache, conditioning_key
from .handles import TextEncoderHandle
from .host_ram import check_stage, host_model, host_tensor_bytes
from .placed import PlacementInputs, materialize_non_blocks, placed_blocks, plan_for
from .settings import MemorySettings, StorageDType

log = logging.getLogger(__name__)

GEMMA_MAX_TOKENS = 512
JINA_MAX_TOKENS = 2048
ENCODER_DTYPE = torch.bfloat16   # Gemma 3 overflows fp16; both encoders compute in bf16
# Beside the layers' activations a stage holds the embedded prompt, masks, rotary tables and
# the small non-block weights; measured at about 20 MiB on an H200 for Gemma 2x300 tokens.
ENCODER_FIXED_BYTES = 48 * 2**20

# Calls that really ran an encoder (tests and the ComfyUI tier check that cache hits skip them).
ENCODER_CALLS = {"gemma": 0, "jina": 0}
InterruptCheck = Callable[[], None]     # raises to cancel


def conditioning_keys(handle: TextEncoderHandle, texts: EncoderTexts,
                      weights: PromptWeights | None = None) -> list[str]:
    """Cache keys of the positive and negative conditioning: texts, weights, lengths, files."""
    pairs = [(texts.gemma_pos, texts.jina_pos), (texts.gemma_neg, texts.jina_neg)]
    tags = [w.key() for w in weights] if weights is not None else ["", ""]
    return [conditioning_key(g + (f"\x00weights:{tag}" if tag else ""), j, gemma_max=GEMMA_MAX_TOKENS,
                             jina_max=JINA_MAX_TOKENS, dtype=str(ENCODER_DTYPE), encoder_files=list(handle.files))
            for (g, j), tag in zip(pairs, tags)]


def encode_texts(handle: TextEncoderHandle, texts: EncoderTexts, memory: MemorySettings, device: torch.device,
                 report: Report, budget: int | None, cache: ConditioningCache = CONDITIONING_CACHE,
                 weights: PromptWeights | None = None,
                 interrupt_check: InterruptCheck | None = None) -> tuple[Conditioning, Conditioning]:
    """(positive, negative) conditioning, from the cache when every input is unchanged.
    ``weights`` (from ``prepare_weighted_texts``) are applied to the Gemma features.
    ``interrupt_check`` runs before every encoder block and raises to cancel (ComfyUI's Cancel
    is a flag that must be polled; a KeyboardInterrupt needs no check)."""
    pairs = [(texts.gemma_pos, texts.jina_pos), (texts.gemma_neg, texts.jina_neg)]
    keys = conditioning_keys(handle, texts, weights)
    folder = memory.conditioning_cache_dir
    found = [cache.get(k, folder) for k in keys]
    todo = [i for i, c in enumerate(found) if c is None]
    if todo:
        feats = run_gemma(handle, [pairs[i][0] for i in todo], memory, device, report, budget,
                          interrupt_check=interrupt_check)
        if weights is not None:
            feats = _weighted_features(handle, [pairs[i][0] for i in todo], [weights[i] for i in todo], feats,
                                       memory, device, report, budget, interrupt_check)
        pooled = run_jina(handle, [pairs[i][1] for i in todo], memory, device, report, budget,
                          interrupt_check=interrupt_check)
        for i, f, p in zip(todo, feats, pooled):
            found[i] = Conditioning(f, p)
            cache.put(keys[i], found[i], folder)
    else:
        log.info("conditioning cache hit: both encoders skipped")
    return found[0], found[1]


def token_weights(handle: TextEncoderHandle, text: str, spans: WeightedText, n_tokens: int) -> torch.Tensor:
    """(n_tokens,) weight per Gemma token (BOS first), as the official node aligns them: from the
    tokenizer's offset mapping, a token's weight is the average over the characters it covers
    (joining spaces not counted), so a token that straddles a span edge gets a blend. Encoders
    without offsets fall back to tokenising the text up to each span's edges."""
    pieces = handle.gemma.tokenizer.pieces
    offsets = piece_offsets(pieces, text)
    if offsets is None:
        log.debug("the Gemma tokenizer gives no offsets: weights by re-tokenising to span edges")
        out = torch.ones(n_tokens)
        for start, end, weight in spans.spans:
            first = 1 + len(pieces.encode(text[:start]))
            last = 1 + len(pieces.encode(text[:end]))
            out[first:min(last, n_tokens)] = weight
        return out
    weights = [1.0] + [_overlap_weight(a, b, spans) for a, b in offsets]
    weights += [1.0] * (n_tokens - len(weights))
    return torch.tensor(weights[:n_tokens], dtype=torch.float32)


def _overlap_weight(start: int, end: int, spans: WeightedText) -> float:
    """Character-overlap average weight of text[start:end]; 1 where it covers no counted character."""
    joins = [j for j in spans.joins if start <= j < end]
    counted = end - start - len(joins)
    if counted <= 0:
        return 1.0
    total, weighted = 0.0, 0
    for a, b, w in spans.spans:
        n = max(0, min(b, end) - max(a, start))
        total += w * n
        weighted += n
    return (total + (counted - weighted)) / counted


# The official node's default ("compel") baseline: weights below 1 blend towards the features
# of a re-encode with those tokens hidden, weights above 1 push away from the BOS state.
LOW_WEIGHT_POWER = 0.7
HIGH_WEIGHT_POWER = 0.8


def apply_token_weights(feats: torch.Tensor, weights: torch.Tensor, hidden: torch.Tensor | None) -> torch.Tensor:
    """Weighted (L, H) features. ``hidden``: the features re-encoded with the 0 < w < 1 tokens
    masked (None when there are none). e0 = the BOS state (position 0, the same for any text)."""
    w = weights.to(feats.dtype)[:, None]                                          # (L, 1)
    e0 = feats[:1]
    if hidden is None:
        return torch.where(w > 1, (feats - e0) * w + e0, feats)
    low = (w > 0) & (w < 1)
    alpha = w.clamp_min(0) ** LOW_WEIGHT_POWER
    out = torch.where(low, feats * alpha + hidden * (1 - alpha), feats)
    out = torch.where(w <= 0, hidden, out)
    return torch.where(w > 1, (feats - e0) * w.clamp_min(1) ** HIGH_WEIGHT_POWER + e0, out)


def _weighted_features(handle: TextEncoderHandle, texts: list[str], spans: list[WeightedText],
                       feats: list[torch.Tensor], memory: MemorySettings, device: torch.device, report: Report,
                       budget: int | None, interrupt_check: InterruptCheck | None = None) -> list[torch.Tensor]:
    weights = [token_weights(handle, t, s, f.shape[0]) for t, s, f in zip(texts, spans, feats)]
    need = [i for i, w in enumerate(weights) if bool(((w > 0) & (w < 1)).any())]
    hidden: dict[int, torch.Tensor] = {}
    if need:
        masked = [torch.nonzero((weights[i] > 0) & (weights[i] < 1)).flatten().tolist() for i in need]
        for i, h in zip(need, run_gemma(handle, [texts[i] for i in need], memory, device, report, budget,
                                        masked=masked, interrupt_check=interrupt_check)):
            hidden[i] = h
    return [f if not s.weighted else apply_token_weights(f, w, hidden.get(i))
            for i, (f, w, s) in enumerate(zip(feats, weights, spans))]


def _storage(handle: TextEncoderHandle, memory: MemorySettings) -> StorageChoice:
    if handle.gemma.is_packed:     # GGUF: Gemma's blocks stay in the file's quantised form
        return StorageChoice.PACKED
    fp8 = memory.fp8_streaming or handle.gemma_storage is StorageDType.FP8
    return StorageChoice.FP8 if fp8 else StorageChoice.BF16


def plan_gemma(handle: TextEncoderHandle, texts: Sequence[str], memory: MemorySettings, budget: int | None):
    """Tokenize, build the meta encoder and plan it. Returns (encoder, inputs, plan, tokens)."""
    ckpt = handle.gemma
    tokens = ckpt.tokenizer(list(texts), max_length=GEMMA_MAX_TOKENS)
    batch, length = tokens.input_ids.shape
    encoder = GemmaTextEncoder(ckpt.config, ckpt.tokenizer)
    inputs = PlacementInputs(
        stage="encode:gemma", files=tuple(ckpt.source.files), storage=_storage(handle, memory),
        compute_dtype=ENCODER_DTYPE, always_resident_bytes=0,
        activation_bytes=lambda a, f: estimate_gemma_activation_bytes(ckpt.config, batch, length, ENCODER_DTYPE)
        + ENCODER_FIXED_BYTES)
    return encoder, inputs, plan_for(encoder, inputs, budget, ckpt.source), tokens


def run_gemma(handle: TextEncoderHandle, texts: Sequence[str], memory: MemorySettings, device: torch.device,
              report: Report, budget: int | None, masked: Sequence[Sequence[int]] | None = None,
              interrupt_check: InterruptCheck | None = None) -> list[torch.Tensor]:
    """Gemma ``hidden_states[-2]`` per text, trimmed to its valid tokens, on the CPU.
    ``masked``: per text, token positions hidden from attention (the weighting's re-encode)."""
    def features(encoder: GemmaTextEncoder, tokens) -> list[torch.Tensor]:
        mask = tokens.attention_mask
        if masked is not None:
            mask = mask.clone()
            for row, positions in enumerate(masked):
                mask[row, list(positions)] = False
        feats = encoder(tokens.input_ids, mask)                                    # (B, L, H)
        return [feats[i, : int(n)].float().cpu() for i, n in enumerate(tokens.attention_mask.sum(1))]

    return _run_encoder("gemma", lambda b: plan_gemma(handle, texts, memory, b), handle.gemma.source,
                        "model.embed_tokens.", features, memory, device, report, budget, interrupt_check)


def plan_jina(handle: TextEncoderHandle, texts: Sequence[str], memory: MemorySettings, budget: int | None):
    """Tokenize, build the meta encoder and plan it. Returns (encoder, inputs, plan, tokens)."""
    ckpt = handle.jina
    cfg = ckpt.config
    tokens = ckpt.tokenizer(list(texts), max_length=JINA_MAX_TOKENS)
    batch, length = tokens.input_ids.shape
    # Post-LN layer: residual, qkv, scores (fp32 if the math kernel is used), MLP hidden.
    act = batch * length * (6 * cfg.hidden_size + 2 * cfg.intermediate_size) * 2 \
        + 4 * batch * cfg.num_attention_heads * length * length
    encoder = JinaTextEncoder(cfg, ckpt.tokenizer)
    inputs = PlacementInputs(
        stage="encode:jina", files=tuple(ckpt.source.files), storage=StorageChoice.BF16,
        compute_dtype=ENCODER_DTYPE, always_resident_bytes=4 * cfg.hidden_size * 2,
        activation_bytes=lambda a, f: act + ENCODER_FIXED_BYTES)
    return encoder, inputs, plan_for(encoder, inputs, budget), tokens


def run_jina(handle: TextEncoderHandle, texts: Sequence[str], memory: MemorySettings, device: torch.device,
             report: Report, budget: int | None, interrupt_check: InterruptCheck | None = None) -> list[torch.Tensor]:
    """Jina CLIP v2 mean-pooled text embedding per text, on the CPU."""
    def pooled(encoder: JinaTextEncoder, tokens) -> list[torch.Tensor]:
        return [p.float().cpu() for p in encoder.pooled(tokens.input_ids, tokens.attention_mask)]   # (H,) each

    return _run_encoder("jina", lambda b: plan_jina(handle, texts, memory, b), handle.jina.source,
                        "embeddings.word_embeddings.", pooled, memory, device, report, budget, interrupt_check)


def _checked(runner, interrupt_check: InterruptCheck):
    """``runner`` with ``interrupt_check()`` before every block: a Cancel stops within one block."""
    def checked(index, *args, **kwargs):
        interrupt_check()
        return runner(index, *args, **kwargs)
    return checked


def _run_encoder(name: str, plan_encoder, source, table_prefix: str, run, memory: MemorySettings,
                 device: torch.device, report: Report, budget: int | None,
                 interrupt_check: InterruptCheck | None = None) -> list[torch.Tensor]:
    """One encoder stage: plan, place (embedding table in host RAM), run, release; OOM -> retry."""
    stage = f"encode:{name}"

    def attempt(budget_now: int | None) -> list[torch.Tensor]:
        encoder, inputs, plan, tokens = plan_encoder(budget_now)
        log.info("%s plan:\n%s", stage, plan.render())
        # Refuse before reading, and make room for the embedding table before it is loaded.
        table = host_tensor_bytes(encoder, source, device, ENCODER_DTYPE, (table_prefix,))
        store_budget = check_stage(host_model(stage, encoder, inputs, plan, source, extra_bytes=table), memory, device)
        HOST_CACHE.make_room(store_budget)
        with stage_guard(stage, device) as guard, measure_stage(report, stage, device, plan.predicted_peak) as rec:
            guard.on_release(lambda: encoder.to_empty(device="meta"))
            materialize_non_blocks(encoder, source, device, ENCODER_DTYPE, host_prefixes=(table_prefix,))
            encoder.rotary_emb.to(device)
            encoder.compute_device = device
            with placed_blocks(encoder, source, inputs, plan, device, store_budget) as session:
                guard.hold(session)
                if interrupt_check is not None:
                    encoder.block_runner = _checked(encoder.block_runner, interrupt_check)  # session restores it
                with torch.inference_mode():
                    out = run(encoder, tokens)
            rec.bytes_h2d = session.bytes_h2d
            ENCODER_CALLS[name] += 1
        return out

    return run_with_oom_retry(attempt, budget, stage=stage, device=device)
