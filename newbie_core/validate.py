"""Every user input checked up front, in the user's own units, before any weights are read.

One module for the CLI and the ComfyUI nodes: each check takes the name the user knows the
value by (``--size`` on the command line, ``width`` on a node) and raises :class:`InputError`
with one sentence that says what is wrong and what would be accepted. Nothing here imports
torch at module level, so ``--help`` and argument errors answer at once; only
:func:`check_device` imports it, because only torch knows whether CUDA is there.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

from .models.file_format import is_pickle_file, pickle_message
from .prompt import is_xml_prompt, parse_prompt
from .sampling.sizes import SIZE_MULTIPLE, round_up_size, validate_size


class InputError(ValueError):
    """A bad input, with a message for the user; ``field`` names the option or widget."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


# The official RoPE tables cover 512 patch rows and columns (spec §2.6: axes_lens [1024, 512,
# 512]); 512 patches of 16 px is the largest side whose positions the model has a meaning for.
MAX_SIDE_PX = 512 * SIZE_MULTIPLE
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
SAMPLER_CHOICES = ("euler", "heun", "midpoint", "dpmpp_2m", "res_multistep")   # == sampling.sampler_names()
MAX_STEPS = 1000
MAX_SEED = 2**64 - 1
# Longest text we still try as a file name: longer inline text is always text. Also avoids
# the OS's "File name too long" (255 bytes per component on most file systems).
_MAX_PATH_GUESS = 4096


def _finite(value: float, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(field, f"must be a finite number, got {value!r}.")
    return float(value)


def _looks_like_path(text: str) -> bool:
    return 0 < len(text) <= _MAX_PATH_GUESS and "\n" not in text and "\0" not in text


def existing_file(text: str) -> Path | None:
    """The path ``text`` names when it is an existing file, else None (never raises)."""
    if not _looks_like_path(text):
        return None
    path = Path(text).expanduser()
    try:
        return path if path.is_file() else None
    except (OSError, ValueError):   # ENAMETOOLONG, EACCES, ...: not a file we can use, so text
        return None


def prompt_text(value: str, field: str = "--prompt", allow_file: bool = True) -> str:
    """The prompt: the file's text when ``value`` names an existing file, else ``value`` itself."""
    path = existing_file(value) if allow_file else None
    if path is None:
        return value
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(field, f"{path} is not UTF-8 text; save the prompt file as UTF-8.") from None
    except OSError as e:
        raise InputError(field, f"cannot read {path}: {e.strerror or e}.") from None


def check_prompt(text: str, field: str = "--prompt", allow_empty: bool = False) -> str:
    """Refuse an empty prompt (unless allowed: negatives may be empty); parse XML prompts now, so
    a syntax error is reported before the encoders load. Returns the text."""
    if not isinstance(text, str):
        raise InputError(field, f"must be text, got {type(text).__name__}.")
    if not text.strip():
        if allow_empty:
            return text
        raise InputError(field, "is empty: give the tags or sentence to draw (or an XML prompt), e.g. "
                                "'1girl, solo, smile'.")
    if is_xml_prompt(text):
        parse_prompt(text)     # PromptSyntaxError (a ValueError) names line and column
    return text


def check_size(width: int, height: int, *, round_up: bool = False,
               fields: tuple[str, str] = ("width", "height")) -> tuple[int, int]:
    """A size in px: positive, at most :data:`MAX_SIDE_PX` a side, a multiple of 16 (or rounded up)."""
    for field, v in zip(fields, (width, height)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise InputError(field, f"must be a whole number of pixels, got {v!r}.")
        if v <= 0:
            raise InputError(field, f"must be at least {SIZE_MULTIPLE} px, got {v}.")
        if v > MAX_SIDE_PX:
            raise InputError(field, f"{v} px is beyond the model's position range: the largest side is "
                                    f"{MAX_SIDE_PX} px (512 patches of 16 px).")
    if round_up:
        w, h = round_up_size(width, height)
        if max(w, h) > MAX_SIDE_PX:
            raise InputError(fields[0], f"rounded up, {w}x{h} exceeds the largest side of {MAX_SIDE_PX} px.")
        return w, h
    try:
        return validate_size(width, height)
    except ValueError as e:
        raise InputError(fields[0] if width % SIZE_MULTIPLE else fields[1], str(e)) from None


_SIZE_RE = re.compile(r"^\s*(\d+)\s*[x×X*]\s*(\d+)\s*(?:\(.*\))?\s*$")


def check_size_text(text: str, *, round_up: bool = False, field: str = "--size") -> tuple[int, int]:
    """'1024x1536' (width first) -> a checked (width, height)."""
    m = _SIZE_RE.match(text or "")
    if m is None:
        raise InputError(field, f"{text!r} is not WIDTHxHEIGHT; write it like 1024x1536 (width first).")
    return check_size(int(m.group(1)), int(m.group(2)), round_up=round_up, fields=(field, field))


def check_output_path(path: str, field: str = "--out") -> Path:
    """An image path we can write: a known image suffix, not a folder, its parent not a file."""
    out = Path(path).expanduser()
    if out.suffix.lower() not in IMAGE_SUFFIXES:
        raise InputError(field, f"{path!r} has no image extension; end it in one of {', '.join(IMAGE_SUFFIXES)} "
                                "(e.g. out.png).")
    if out.is_dir():
        raise InputError(field, f"{out} is a folder; give a file name such as {out / 'out.png'}.")
    _check_writable_folder(out.parents, field, f"so {out} cannot be created inside it")
    return out


def check_image_file(path: str, field: str = "--init-image") -> Path:
    """An image file PIL can read (it is decoded later, after the checks)."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path).expanduser()
    if not p.is_file():
        raise InputError(field, f"{p} does not exist." if not p.exists() else f"{p} is not a file.")
    try:
        with Image.open(p) as im:
            im.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise InputError(field, f"{p} is not an image this pack can read (PNG, JPEG, WebP, ...): {e}.") from None
    return p


def check_model_path(path: str, field: str) -> Path:
    """A model file or folder that exists and is not a pickle (headers are checked by the loader)."""
    p = Path(path).expanduser()
    if not p.exists():
        folder = p.parent if str(p.parent) else Path(".")
        raise InputError(field, f"{p} does not exist (looked in {folder.resolve()}).")
    if p.is_dir():
        pickles = [c.name for c in p.iterdir() if c.suffix.lower() in (".bin", ".pt", ".ckpt", ".pth")]
        if pickles and not any(c.suffix == ".safetensors" for c in p.iterdir()):
            raise InputError(field, pickle_message(p / pickles[0], "model folder"))
        return p
    if is_pickle_file(p):
        raise InputError(field, pickle_message(p, "model file"))
    return p


def check_lora(text: str, field: str = "--lora") -> Path:
    """``FILE[:STRENGTH]`` names an existing safetensors LoRA (the strength is parsed by the loader)."""
    for candidate in (text, text.rpartition(":")[0]):
        p = Path(candidate).expanduser() if candidate else None
        if p is not None and p.is_file():
            if is_pickle_file(p):
                raise InputError(field, pickle_message(p, "LoRA file"))
            if p.suffix.lower() != ".safetensors":
                raise InputError(field, f"{p} is not a .safetensors file; LoRAs are read from safetensors only.")
            return p
    raise InputError(field, f"{text!r}: no such LoRA file (give FILE or FILE:STRENGTH).")


def check_folder(path: str, field: str) -> Path:
    """A folder that exists or can be created: refuse a file in its place."""
    p = Path(path).expanduser()
    _check_writable_folder((p, *p.parents), field, "not a folder; give a folder path")
    return p


def _check_writable_folder(candidates, field: str, if_file: str) -> None:
    """The first of ``candidates`` (a path, then its parents) that exists must be a folder we can
    write into: everything below it can then be created."""
    for candidate in candidates:
        if candidate.exists():
            if not candidate.is_dir():
                raise InputError(field, f"{candidate} is a file, {if_file}.")
            if not os.access(candidate, os.W_OK):
                raise InputError(field, f"cannot write into {candidate} (permission denied).")
            return


def check_budget(gb: float | None, field: str, *, zero_is_auto: bool = False) -> float | None:
    """GiB: positive and finite, or None (auto). Nodes use 0 for auto."""
    if gb is None or (zero_is_auto and gb == 0):
        return None
    value = _finite(gb, field)
    if value <= 0:
        raise InputError(field, f"must be a positive number of GiB (or leave it out for auto), got {gb}.")
    if value > 65536:
        raise InputError(field, f"{gb} GiB is not a plausible budget; give GiB, e.g. 6 for 6 GiB.")
    return value


def check_link_gbps(gbps: float | None, field: str) -> float | None:
    """GB/s: positive and finite, or None (the link measured on this machine)."""
    if gbps is not None and not (math.isfinite(gbps) and gbps > 0):
        raise InputError(field, f"must be a positive number of GB/s (or leave it out to use the link "
                                f"measured on this machine), got {gbps}.")
    return gbps


MIN_VAE_TILE_PX = 128     # twice the 64 px overlap the tiles are blended over (MemorySettings.vae_overlap_px)


def check_vae_tile(px: int, field: str = "--vae-tile") -> int:
    """A VAE tile in pixels: 0 (auto), -1 (never tile), or a multiple of 8 of at least 128."""
    if isinstance(px, bool) or not isinstance(px, int):
        raise InputError(field, f"must be a whole number of pixels, got {px!r}.")
    if px in (0, -1):
        return px
    if px < MIN_VAE_TILE_PX or px % 8:
        near = max(MIN_VAE_TILE_PX, -(-px // 8) * 8)
        raise InputError(field, f"{px} px is not a usable tile: give a multiple of 8 px of at least "
                                f"{MIN_VAE_TILE_PX} (twice the 64 px blend overlap) "
                                f"(e.g. {near}), 0 for auto or -1 to never tile.")
    return px


def check_chunk(n: int, field: str) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < -1:
        raise InputError(field, f"must be 0 (auto), -1 (off) or a positive number, got {n!r}.")
    return n


def check_sampling(*, steps: int, cfg: float, shift: float, sampler: str, seed: int, denoise: float,
                   cfg_renorm: float = 0.0, cfg_trunc: float = 1.0, names: dict[str, str] | None = None) -> None:
    """The sampler's settings; ``names`` maps each setting to what the user calls it."""
    n = {k: (names or {}).get(k, k) for k in ("steps", "cfg", "shift", "sampler", "seed", "denoise",
                                                 "cfg_renorm", "cfg_trunc")}
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise InputError(n["steps"], f"must be a whole number from 1 to {MAX_STEPS}, got {steps!r}.")
    if not 0 <= _finite(cfg, n["cfg"]) <= 100:
        raise InputError(n["cfg"], f"must be from 0 to 100 (5 is the default; 1 turns guidance off), got {cfg}.")
    if not 0 < _finite(shift, n["shift"]) <= 100:
        raise InputError(n["shift"], f"must be above 0 and at most 100 (6 is the default), got {shift}.")
    if sampler not in SAMPLER_CHOICES:
        raise InputError(n["sampler"], f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLER_CHOICES)}.")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise InputError(n["seed"], f"must be a whole number from 0 to 2**64-1, got {seed!r}.")
    if not 0 < _finite(denoise, n["denoise"]) <= 1:
        raise InputError(n["denoise"], f"must be above 0 and at most 1 (1 = text-to-image), got {denoise}.")
    if _finite(cfg_renorm, n["cfg_renorm"]) < 0:
        raise InputError(n["cfg_renorm"], f"must be 0 (off) or positive, got {cfg_renorm}.")
    if not 0 < _finite(cfg_trunc, n["cfg_trunc"]) <= 1:
        raise InputError(n["cfg_trunc"], f"must be above 0 and at most 1 (1 = always guide), got {cfg_trunc}.")


def check_device(name: str | None, field: str = "--device"):
    """A torch device that exists here ('cpu', 'cuda', 'cuda:1'); None picks cuda when present."""
    import torch

    if name is None:
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    m = re.fullmatch(r"\s*(cpu|cuda)(?::(\d+))?\s*", name or "")
    if m is None:
        raise InputError(field, f"{name!r} is not a device; use cpu, cuda or cuda:N.")
    if m.group(1) == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise InputError(field, f"{name!r} asked for, but this PyTorch sees no CUDA GPU (build "
                                f"{torch.__version__}); use --device cpu or install a CUDA build of PyTorch.")
    index = int(m.group(2) or 0)
    count = torch.cuda.device_count()
    if index >= count:
        raise InputError(field, f"{name!r}: there {'is' if count == 1 else 'are'} only {count} CUDA "
                                f"device{'s' if count != 1 else ''} (cuda:0..cuda:{count - 1}).")
    return torch.device("cuda", index)


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_filename(name: str, default: str = "output", max_len: int = 120) -> str:
    """A file name (never a path) from free text: no separators, no leading dots, bounded length."""
    cleaned = _UNSAFE.sub("_", name).strip("._")[:max_len]
    return cleaned or default


def check_fp8_compute(device, field: str = "--fp8-compute") -> None:
    """fp8 compute needs fp8 tensor cores: refuse it, before any weights are read, elsewhere."""
    from .models.dit.fp8_matmul import fp8_compute_problem

    problem = fp8_compute_problem(device)
    if problem:
        raise InputError(field, problem)
