"""Tiled VAE decode and encode with blended overlaps, so big images fit small GPUs.

The image is cut into overlapping tiles on the latent grid, each tile runs through the VAE on
its own, and the overlaps are cross-faded with a ramp that falls to ~0 at a tile's inner edge
(where its zero padding makes it least right) and sums to 1 with its neighbour's. The result is
cropped exactly to the untiled size.

Tiled output is NOT identical to untiled output: the mid-block attention of the FLUX VAE sees the
whole latent at once, so a tile's attention sees only its own part. The blend removes the seams
(the local convolution edge effects); the global-attention difference stays and is small. A
tile at least as large as the image gives bitwise the untiled result.

diffusers' own ``enable_tiling()`` takes its tile size from ``sample_size`` (1024 px for FLUX), so
it never tiles a 1024x1024 image however little memory is left; here the tile comes from a memory
budget (see :mod:`.vae_memory`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from enum import Enum

import torch

from .vae import DOWNSCALE, FluxVAE

log = logging.getLogger(__name__)


class BlendMode(str, Enum):
    COSINE = "cosine"  # raised-cosine cross-fade: smooth in value and slope
    LINEAR = "linear"  # straight cross-fade
    NONE = "none"      # hard cut in the middle of each overlap (naive tiling; shows seams)


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Evenly spread tile starts covering [0, size) with tiles of `tile` cells, overlaps >= `overlap`."""
    if tile >= size:
        return [0]
    n = math.ceil((size - overlap) / (tile - overlap))
    return [round(k * (size - tile) / (n - 1)) for k in range(n)]


def _ramp_up(overlap: int, blend: BlendMode) -> torch.Tensor:
    """Weights rising across an overlap of `overlap` samples; ramp + flip(ramp) == 1.

    The first and last quarter of the overlap are 0 and 1: a tile's outermost samples, the ones
    its zero padding disturbs most, never contribute; the cross-fade uses the middle half.
    """
    margin = overlap // 4
    fade = overlap - 2 * margin
    pos = (torch.arange(fade, dtype=torch.float32) + 0.5) / fade  # (0, 1)
    if blend is BlendMode.COSINE:
        ramp = 0.5 - 0.5 * torch.cos(math.pi * pos)
    elif blend is BlendMode.LINEAR:
        ramp = pos
    else:
        ramp = (pos >= 0.5).float()
    return torch.cat([torch.zeros(margin), ramp, torch.ones(margin)])


def _axis_weights(starts: list[int], i: int, tile: int, scale: int, blend: BlendMode) -> torch.Tensor:
    """1-D blend weights, in output samples, for tile `i` of one axis."""
    w = torch.ones(tile * scale)
    if i > 0:
        overlap = (starts[i - 1] + tile - starts[i]) * scale  # shared with the previous tile
        if overlap > 0:
            w[:overlap] *= _ramp_up(overlap, blend)
    if i < len(starts) - 1:
        overlap = (starts[i] + tile - starts[i + 1]) * scale  # shared with the next tile
        if overlap > 0:
            w[-overlap:] *= _ramp_up(overlap, blend).flip(0)
    return w


def _check_tiles(tile: int, overlap: int, what: str) -> None:
    if tile < 1 or overlap < 0 or overlap >= tile:
        raise ValueError(f"{what}: need tile >= 1 and 0 <= overlap < tile, got tile={tile}, overlap={overlap}.")


def run_tiled(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: int, overlap: int,
              in_per_cell: int, out_per_cell: int, blend: BlendMode = BlendMode.COSINE) -> torch.Tensor:
    """Apply a translation-equivariant-ish `fn` tile by tile over the cell grid of `x` and blend.

    `x` is (B, C, H, W) with H, W multiples of `in_per_cell`; `fn` maps a (B, C, h*in, w*in) tile
    to (B, C', h*out, w*out). Tiles are `tile` x `tile` cells (clipped to the grid). The blended
    result is accumulated in float32 on `x`'s device.
    """
    blend = BlendMode(blend)
    _check_tiles(tile, overlap, "tiling")
    b, _, height, width = x.shape
    gh, gw = height // in_per_cell, width // in_per_cell  # grid in cells
    th, tw = min(tile, gh), min(tile, gw)
    ys, xs = tile_starts(gh, th, overlap), tile_starts(gw, tw, overlap)
    out: torch.Tensor | None = None
    wsum = torch.zeros(1, 1, gh * out_per_cell, gw * out_per_cell, device=x.device)
    for i, y0 in enumerate(ys):
        wy = _axis_weights(ys, i, th, out_per_cell, blend).to(x.device)
        for j, x0 in enumerate(xs):
            wx = _axis_weights(xs, j, tw, out_per_cell, blend).to(x.device)
            piece = fn(x[..., y0 * in_per_cell:(y0 + th) * in_per_cell, x0 * in_per_cell:(x0 + tw) * in_per_cell])
            piece = piece.to(x.device, torch.float32)  # (B, C', th*out, tw*out)
            if out is None:
                out = torch.zeros(b, piece.shape[1], gh * out_per_cell, gw * out_per_cell, device=x.device)
            w = wy[:, None] * wx[None, :]  # (th*out, tw*out)
            oy, ox = y0 * out_per_cell, x0 * out_per_cell
            out[..., oy:oy + piece.shape[2], ox:ox + piece.shape[3]] += piece * w
            wsum[..., oy:oy + piece.shape[2], ox:ox + piece.shape[3]] += w
    log.debug("tiled run: %d x %d tiles of %d x %d cells, overlap %d, blend %s",
              len(ys), len(xs), th, tw, overlap, blend.value)
    return out / wsum


def decode_tiled(vae: FluxVAE, raw_latent: torch.Tensor, tile_latent: int, overlap_latent: int,
                 blend: BlendMode = BlendMode.COSINE) -> torch.Tensor:
    """(B, 16, h, w) raw latent -> (B, 3, 8h, 8w) float32 image, decoded in overlapping tiles.

    `tile_latent` and `overlap_latent` are in latent cells (x8 pixels). A tile >= the latent gives
    exactly ``vae.decode``. Overlaps of 8-16 latent cells hide the seams well.
    """
    _check_tiles(tile_latent, overlap_latent, "decode_tiled")
    if raw_latent.ndim != 4:
        raise ValueError(f"decode_tiled expects a (B, C, h, w) latent, got {tuple(raw_latent.shape)}.")
    return run_tiled(vae.decode, raw_latent.to(vae.device), tile_latent, overlap_latent, 1, DOWNSCALE, blend)


def encode_tiled(vae: FluxVAE, image: torch.Tensor, tile_px: int, overlap_px: int,
                 blend: BlendMode = BlendMode.COSINE) -> torch.Tensor:
    """(B, 3, H, W) image in [-1, 1] -> (B, 16, H/8, W/8) raw latent, encoded in overlapping tiles.

    `tile_px` and `overlap_px` must be multiples of 8 (tiles sit on the latent grid).
    """
    if tile_px % DOWNSCALE or overlap_px % DOWNSCALE:
        raise ValueError(f"encode_tiled: tile_px and overlap_px must be multiples of {DOWNSCALE}, "
                         f"got {tile_px} and {overlap_px}.")
    if image.ndim != 4 or image.shape[2] % DOWNSCALE or image.shape[3] % DOWNSCALE:
        raise ValueError(f"encode_tiled expects (B, 3, H, W) with H, W divisible by {DOWNSCALE}, "
                         f"got {tuple(image.shape)}.")
    _check_tiles(tile_px // DOWNSCALE, overlap_px // DOWNSCALE, "encode_tiled")
    return run_tiled(vae.encode, image.to(vae.device), tile_px // DOWNSCALE, overlap_px // DOWNSCALE,
                     DOWNSCALE, 1, blend)
