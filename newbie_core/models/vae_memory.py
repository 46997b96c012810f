"""How much GPU memory a FLUX VAE decode or encode needs above its weights, and which tile fits.

An analytic model for the planner. It walks the AutoencoderKL in execution order and, for each
operation, counts the tensors alive at its worst moment, in "channel-pixels" (elements) at the
resolution the operation runs at; the peak is the largest of these, times bytes per element.
Counted per operation (``c_in -> c_out`` channels at ``N`` = batch x pixels):

* ResNet block: ``N * max(3 c_in, 2 c_in + c_out + ws (c_in + c_out), c_in + 3 c_out)``: the
  input held for the skip, the GroupNorm output and the SiLU output; then the conv with its input,
  output and cuDNN's layout/workspace copies (``ws``, see below); then the second half.
* Upsampler (nearest x2 then 3x3 conv), per OUTPUT pixel: ``c/4 + 2c + 2 ws c``.
* Downsampler (pad, stride-2 conv), per INPUT pixel: ``2c + c/4 + ws (c + c/4)``.
* Mid-block attention over ``T = h*w`` tokens of ``C`` channels (latent resolution):
  ``6 C T`` (skip, norm, q, k, v, out); plus, only when ``scores_materialized``, ``2 T^2``
  scores (scores + softmax) at 4 bytes, as the math SDPA backend (a fallback on some CPUs and
  non-CUDA backends) builds them. On CUDA the memory-efficient kernel serves head dim 512 in bf16
  and fp32, so nothing quadratic is built: measured on an H200, a 2048^2 bf16 decode peaks at
  10.2 GB where materialised scores alone would add 34 GB. Hence the default False.

In the FLUX decoder the peak is the last up-block at full resolution (its first ResNet takes 256
channels down to 128) or the upsampler feeding it. Tiling bounds every term by the tile size and
adds the float32 accumulators of the blended output (``(3 + 1) * 4`` bytes per output pixel).

Calibration: ``ws`` (cuDNN copies) and a global ``overhead`` (allocator rounding, GroupNorm
statistics, temporaries we do not model) are fitted to measurements. The overhead is derived
from one reference point, a FLUX-config AutoencoderKL decoding a 1024x1024 image's latent in bf16,
which peaks 2.55 GB above its weights; change :data:`CALIBRATION` to recalibrate. The encoder
gets a further :data:`ENCODE_FACTOR`.

Checked on an H200 (torch 2.11, diffusers 0.42.1, random FLUX-config weights, peak above weights
and inputs; measured / estimated GB):
  decode bf16 b1: 512^2 0.640/0.637, 1024^2 2.553/2.550, 1536^2 5.742/5.737, 2048^2 10.205/10.200
  decode bf16 tiled (tile, overlap 8; before TILE_MARGIN): 1024^2 t64 0.662/0.654, t32 0.179/0.176;
  2048^2 t64 0.712/0.705
  decode fp32 b1: 512^2 1.277/1.275, 1024^2 5.119/5.100
  decode bf16 b2 1024^2: 4.297/5.100 (batch is counted linearly: conservative; cuDNN's copies
  evidently do not double)
  encode bf16 b1 (with ENCODE_FACTOR): 1024^2 1.617/1.620, 2048^2 6.468/6.480
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from .vae import DOWNSCALE

log = logging.getLogger(__name__)

DEFAULT_OVERLAP_LATENT = 8   # latent cells (64 px) of overlap between tiles
MIN_TILE_LATENT = 16         # smaller tiles lose too much context to look right
CONV_WORKSPACE = 1.0         # `ws`: extra elements per conv as a fraction of (c_in + c_out)
ENCODE_FACTOR = 1.075        # encoder peaks measured 7.3% above its structural count (H200, bf16/fp32)
TILE_MARGIN = 1.03           # tiled decodes measured up to 1.6% above the model: keep it on the safe side


@dataclass(frozen=True)
class Calibration:
    """One measured decode: latent size, dtype and the peak bytes above the weights."""
    latent_h: int = 128
    latent_w: int = 128
    dtype: torch.dtype = torch.bfloat16
    peak_bytes: int = 2_550_000_000


CALIBRATION = Calibration()


def _bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _resnet(c_in: int, c_out: int) -> float:
    ws = CONV_WORKSPACE
    return max(3 * c_in, 2 * c_in + c_out + ws * (c_in + c_out), c_in + 3 * c_out)


def _attention(c: int, tokens: int, batch: int, elem: int, scores: bool) -> float:
    """Bytes of the mid-block attention at its peak."""
    total = 6 * c * tokens * batch * elem
    if scores:
        total += 2 * tokens * tokens * batch * 4
    return total


def _decoder_peak(config: dict[str, Any], batch: int, h: int, w: int, elem: int, scores: bool) -> float:
    """Structural peak bytes of one decoder pass over an (h, w) latent (no overhead factor)."""
    chans = list(reversed(config["block_out_channels"]))  # (512, 512, 256, 128) for FLUX
    layers = int(config["layers_per_block"]) + 1
    ws = CONV_WORKSPACE
    pixels = batch * h * w
    peaks = [pixels * (config["latent_channels"] + chans[0]) * (1 + ws) * elem,   # conv_in
             pixels * _resnet(chans[0], chans[0]) * elem,                           # mid resnets
             _attention(chans[0], h * w, batch, elem, scores)]
    c_in = chans[0]
    for k, c in enumerate(chans):
        for j in range(layers):
            peaks.append(pixels * _resnet(c_in if j == 0 else c, c) * elem)
        c_in = c
        if k < len(chans) - 1:
            pixels *= 4
            peaks.append(pixels * (c / 4 + 2 * c + 2 * ws * c) * elem)            # upsampler
    peaks.append(pixels * (3 * chans[-1] + 3 + ws * (chans[-1] + 3)) * elem)     # norm_out, conv_out
    return max(peaks)


def _encoder_peak(config: dict[str, Any], batch: int, h: int, w: int, elem: int, scores: bool) -> float:
    """Structural peak bytes of one encoder pass producing an (h, w) latent."""
    chans = list(config["block_out_channels"])  # (128, 256, 512, 512) for FLUX
    layers = int(config["layers_per_block"])
    ws = CONV_WORKSPACE
    pixels = batch * h * w * DOWNSCALE * DOWNSCALE
    image = pixels * 3 * elem  # the input stays alive throughout
    peaks = [pixels * (3 + chans[0]) * (1 + ws) * elem]                            # conv_in
    c_in = chans[0]
    for k, c in enumerate(chans):
        for j in range(layers):
            peaks.append(pixels * _resnet(c_in if j == 0 else c, c) * elem)
        c_in = c
        if k < len(chans) - 1:
            peaks.append(pixels * (2 * c + c / 4 + ws * (c + c / 4)) * elem)      # downsampler
            pixels //= 4
    peaks += [pixels * _resnet(c_in, c_in) * elem, _attention(c_in, h * w, batch, elem, scores),
              pixels * (3 * c_in + 2 * config["latent_channels"] * (1 + ws)) * elem]
    return (image + max(peaks)) * ENCODE_FACTOR


def _overhead() -> float:
    """Global factor that makes the model hit the calibration point exactly."""
    from .vae_loading import FLUX_VAE_CONFIG
    cal = CALIBRATION
    structural = _decoder_peak(FLUX_VAE_CONFIG, 1, cal.latent_h, cal.latent_w, _bytes(cal.dtype), False)
    return cal.peak_bytes / structural


def _accumulators(batch: int, h: int, w: int, out_channels: int, out_per_cell: int) -> int:
    """float32 blended output + weight sum of a tiled run, on the output grid."""
    pixels = h * w * out_per_cell * out_per_cell
    return (batch * out_channels + 1) * pixels * 4


def _estimate(peak_fn, config: dict[str, Any], batch: int, latent_h: int, latent_w: int, elem: int,
              tile_latent: int | None, scores: bool, *, margin: float, acc: int, fixed: int) -> int:
    """Untiled: one pass. Tiled: one tile's pass (times ``margin``) beside the blended output
    accumulators ``acc``, or the final division (2 * acc); ``fixed`` stays alive throughout."""
    if tile_latent is None or tile_latent >= max(latent_h, latent_w):
        return int(peak_fn(config, batch, latent_h, latent_w, elem, scores) * _overhead())
    th, tw = min(tile_latent, latent_h), min(tile_latent, latent_w)
    tile = peak_fn(config, batch, th, tw, elem, scores) * _overhead() * margin
    return int(max(tile + acc + fixed, 2 * acc + fixed))


def estimate_decode_bytes(config: dict[str, Any], batch: int, latent_h: int, latent_w: int,
                          dtype: torch.dtype, tile_latent: int | None = None, *,
                          scores_materialized: bool = False) -> int:
    """Peak activation bytes above the weights for decoding a (batch, 16, latent_h, latent_w) latent."""
    acc = _accumulators(batch, latent_h, latent_w, config["out_channels"], DOWNSCALE)
    return _estimate(_decoder_peak, config, batch, latent_h, latent_w, _bytes(dtype), tile_latent,
                     scores_materialized, margin=TILE_MARGIN, acc=acc, fixed=0)


def estimate_encode_bytes(config: dict[str, Any], batch: int, latent_h: int, latent_w: int,
                          dtype: torch.dtype, tile_latent: int | None = None, *,
                          scores_materialized: bool = False) -> int:
    """Peak activation bytes above the weights for encoding an image of 8*latent_h x 8*latent_w."""
    elem = _bytes(dtype)
    acc = _accumulators(batch, latent_h, latent_w, config["latent_channels"], 1)
    image = batch * 3 * latent_h * latent_w * DOWNSCALE * DOWNSCALE * elem  # the whole input stays
    return _estimate(_encoder_peak, config, batch, latent_h, latent_w, elem, tile_latent,
                     scores_materialized, margin=1.0, acc=acc, fixed=image)


def choose_tile(budget_bytes: int, latent_h: int, latent_w: int, dtype: torch.dtype,
                config: dict[str, Any], *, batch: int = 1, encode: bool = False,
                scores_materialized: bool = False) -> int | None:
    """The largest square tile (latent cells, a multiple of 8) whose run fits `budget_bytes`.

    None means the untiled run fits. When even the smallest tile does not fit, returns
    MIN_TILE_LATENT and logs a warning: the run may still succeed (the model is conservative).
    """
    estimate = estimate_encode_bytes if encode else estimate_decode_bytes
    kw = dict(scores_materialized=scores_materialized)
    if estimate(config, batch, latent_h, latent_w, dtype, None, **kw) <= budget_bytes:
        return None
    top = (max(latent_h, latent_w) - 1) // 8 * 8
    for tile in range(top, MIN_TILE_LATENT - 1, -8):
        if estimate(config, batch, latent_h, latent_w, dtype, tile, **kw) <= budget_bytes:
            log.info("VAE %s: tiles of %d latent cells fit %.2f GiB", "encode" if encode else "decode",
                     tile, budget_bytes / 2**30)
            return tile
    log.warning("VAE %s of %dx%d latent: even %d-cell tiles need more than the %.2f GiB budget; "
                "using them anyway.", "encode" if encode else "decode", latent_h, latent_w,
                MIN_TILE_LATENT, budget_bytes / 2**30)
    return MIN_TILE_LATENT
