"""Image sizes: parsing, validation and the training resolution buckets (spec §4, §5.4).

The DiT patchifies the ×8 VAE latent in 2×2 patches, so both image sides must be multiples of
16 px. The training buckets are the sizes the model saw; other multiples of 16 work, but far
from the buckets (or far above ≈1 MP) quality drops.
"""

from __future__ import annotations

import math
import re

SIZE_MULTIPLE = 16
LATENT_CHANNELS = 16
VAE_FACTOR = 8


def _crop_size_staircase(num_patches: int, patch_size: int,
                         max_ratio: float) -> list[tuple[int, int]]:
    """All (w, h) the official bucket generator accepts, in its order (W descending).

    The official routine walks a staircase in patch units: for each width wp (from num_patches
    down to 1) it visits every height from ⌊num/(wp+1)⌋ (where the previous column stopped) up to
    ⌊num/wp⌋. A size is kept when its aspect ratio is ≤ max_ratio and ⌊side/32⌋ is even for both
    sides (spec §5.4).
    """
    sizes: list[tuple[int, int]] = []
    for wp in range(num_patches, 0, -1):
        for hp in range(max(1, num_patches // (wp + 1)), num_patches // wp + 1):
            if max(wp, hp) / min(wp, hp) > max_ratio:
                continue
            w, h = wp * patch_size, hp * patch_size
            if (w // 32) % 2 == 0 and (h // 32) % 2 == 0:
                sizes.append((w, h))
    return sizes


# (width, height): the 51 buckets of training (≤ 4096 image tokens, aspect ratio ≤ 4).
TRAINING_BUCKETS: tuple[tuple[int, int], ...] = tuple(_crop_size_staircase(4096, 16, 4.0))


def _ratio_label(w: int, h: int) -> str:
    g = math.gcd(w, h)
    a, b = w // g, h // g
    if max(a, b) <= 32:
        return f"{a}:{b}"
    return f"{w / h:.2f}:1" if w >= h else f"1:{h / w:.2f}"


def size_name(w: int, h: int) -> str:
    """'1024x1536 (2:3)': the label used in preset menus; :func:`parse_size` reads it back."""
    return f"{w}x{h} ({_ratio_label(w, h)})"


def preset_names() -> list[str]:
    """Menu labels for the training buckets, 1024x1024 first, then landscape to portrait."""
    ordered = sorted(TRAINING_BUCKETS, key=lambda wh: (wh != (1024, 1024), -wh[0] / wh[1]))
    return [size_name(w, h) for w, h in ordered]


_SIZE_RE = re.compile(r"^\s*(\d+)\s*[x×X*]\s*(\d+)\s*(?:\(.*\))?\s*$")


def parse_size(text: str) -> tuple[int, int]:
    """'1024x1536' or a preset label '1024x1536 (2:3)' → (width, height). Not validated."""
    m = _SIZE_RE.match(text)
    if m is None:
        raise ValueError(
            f"size {text!r} is not WIDTHxHEIGHT: write it like '1024x1536' (width first)")
    return int(m.group(1)), int(m.group(2))


def _round(v: int, up: bool) -> int:
    q = v // SIZE_MULTIPLE + (1 if up and v % SIZE_MULTIPLE else 0)
    return max(SIZE_MULTIPLE, q * SIZE_MULTIPLE)


def round_up_size(w: int, h: int) -> tuple[int, int]:
    """Round each side up to the next multiple of 16 px."""
    return _round(w, True), _round(h, True)


def validate_size(w: int, h: int, round_up: bool = False) -> tuple[int, int]:
    """Check an image size; return it (or its rounded-up version when ``round_up``).

    Raises ValueError naming the nearest valid sizes when a side is not a multiple of 16.
    """
    for name, v in (("width", w), ("height", h)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"image {name} must be a positive integer (pixels), got {v!r}")
    if w % SIZE_MULTIPLE == 0 and h % SIZE_MULTIPLE == 0:
        return w, h
    if round_up:
        return round_up_size(w, h)
    down = (_round(w, False), _round(h, False))
    up = round_up_size(w, h)
    raise ValueError(
        f"image size {w}x{h} is not a multiple of {SIZE_MULTIPLE} px on both sides (the DiT "
        f"works on 2x2 patches of the x8 VAE latent). Nearest valid sizes: "
        f"{down[0]}x{down[1]} (rounded down) or {up[0]}x{up[1]} (rounded up). Set one of them as the "
        f"width/height of the latent node (or the --size of the CLI, whose --round-up picks "
        f"{up[0]}x{up[1]} automatically).")


def latent_shape(w: int, h: int) -> tuple[int, int, int]:
    """(16, h/8, w/8): the latent of one image, for a validated size."""
    w, h = validate_size(w, h)
    return LATENT_CHANNELS, h // VAE_FACTOR, w // VAE_FACTOR


def image_tokens(w: int, h: int) -> int:
    """DiT image tokens for a size: (h/16)·(w/16); 4096 at 1024x1024."""
    w, h = validate_size(w, h)
    return (h // SIZE_MULTIPLE) * (w // SIZE_MULTIPLE)
