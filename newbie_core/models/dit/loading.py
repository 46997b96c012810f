"""Open, validate and load NewBie DiT checkpoints (spec §2.14); safetensors only.

Accepted layouts, all exposed under the official NextDiT key names:
* a single file (ComfyUI ``diffusion_models/NewBie-Image-Exp0.1-bf16.safetensors``), optionally
  with a ``model.diffusion_model.`` prefix;
* the HF repo folder or its ``transformer/`` folder (``diffusion_pytorch_model*.safetensors``);
* Disty0's diffusers port (``time_caption_embed.*``, split to_q/to_k/to_v), renamed on the fly;
* a GGUF file (``.gguf``, arch ``lumina2`` as ComfyUI-GGUF writes it; gguf_loading.py).
Stored dtypes bf16/fp16/fp32/fp8-e4m3fn, or GGML types in GGUF. Every dimension is inferred from
tensor shapes.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoint import SAFETENSORS_DTYPES, CheckpointError, TensorSource, check_keys, strip_prefix
from .config import DiTConfig
from .keymap import detect_foreign, diffusers_to_official
from .model import NextDiT

log = logging.getLogger(__name__)

PREFIXES = ("model.diffusion_model.",)
OPTIONAL_KEYS = ("norm_final.weight",)
ACCEPTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn)
AXES_METADATA_KEY = "newbie.axes_dims"
BLOCK_PREFIXES = ("context_refiner.", "noise_refiner.", "layers.")


@dataclass
class DiTCheckpoint:
    path: Path
    source: TensorSource          # official key names
    config: DiTConfig
    layout: str                   # "official", "official+prefix", "diffusers" or "gguf"
    stored_dtype: torch.dtype     # dtype of the block weights on disk (GGUF: the compute dtype)
    storage: str | None = None    # GGUF: the blocks' main type, e.g. "gguf-q4_k" (packed storage)
    # Host copies of the small tensors outside the blocks (embedders, final layer; ~25 MB for
    # NewBie), filled by the first sampling stage: later stages, a LoRA strength change among
    # them, read none of the file again. Dropped with the checkpoint (a replaced file is a new one).
    non_block_copies: dict[str, torch.Tensor] = field(default_factory=dict, repr=False, compare=False)

    @property
    def is_packed(self) -> bool:
        """Whether the blocks are held in the file's packed (quantised) form."""
        return self.layout == "gguf"


def _find_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such file or folder.")
    for folder in (path / "transformer", path):
        single = folder / "diffusion_pytorch_model.safetensors"
        if single.is_file():
            return [single]
        shards = sorted(folder.glob("diffusion_pytorch_model-*-of-*.safetensors"))
        if shards:
            return shards
    singles = sorted(path.glob("*.safetensors"))
    if len(singles) == 1:
        return singles
    raise CheckpointError(
        f"{path}: no DiT weights found: expected transformer/diffusion_pytorch_model.safetensors "
        f"(HF repo), diffusion_pytorch_model.safetensors (transformer folder) or a single "
        f".safetensors file; found {len(singles)} .safetensors file(s) here.")


def _count(keys: Iterable[str], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for k in keys if (m := pattern.match(k))}
    return max(found) + 1 if found else 0


def _axes_dims(head_dim: int, metadata: dict[str, str], path: Path) -> tuple[int, ...]:
    if head_dim == 96:
        return (32, 32, 32)
    raw = metadata.get(AXES_METADATA_KEY)
    if raw is None:
        raise CheckpointError(
            f"{path}: head dim {head_dim} is not NewBie's 96 and the file does not record its RoPE "
            f"split (safetensors metadata '{AXES_METADATA_KEY}'); cannot build the model.")
    return tuple(int(v) for v in json.loads(raw))


def infer_config(source: TensorSource, path: Path) -> DiTConfig:
    """Every DiTConfig field from the official-named shapes (RoPE split: see ``_axes_dims``)."""
    need = ("x_embedder.weight", "layers.0.attention.q_norm.weight", "layers.0.attention.qkv.weight",
            "layers.0.feed_forward.w1.weight", "cap_embedder.0.weight", "clip_text_pooled_proj.0.weight",
            "t_embedder.mlp.0.weight")
    missing = [k for k in need if k not in source]
    if missing:
        raise CheckpointError(f"{path}: not a complete NewBie DiT checkpoint: missing {', '.join(missing)}.")
    dim, patch_features = source.shape("x_embedder.weight")
    head_dim = source.shape("layers.0.attention.q_norm.weight")[0]
    n_heads = dim // head_dim
    qkv_rows = source.shape("layers.0.attention.qkv.weight")[0]
    keys = source.keys()
    try:
        return DiTConfig(
            dim=dim, n_layers=_count(keys, "layers."), n_noise_refiner=_count(keys, "noise_refiner."),
            n_context_refiner=_count(keys, "context_refiner."), n_heads=n_heads,
            n_kv_heads=(qkv_rows // head_dim - n_heads) // 2,
            ffn_dim=source.shape("layers.0.feed_forward.w1.weight")[0],
            cap_feat_dim=source.shape("cap_embedder.0.weight")[0],
            clip_text_dim=source.shape("clip_text_pooled_proj.0.weight")[0],
            adaln_dim=source.shape("t_embedder.mlp.0.weight")[0],
            in_channels=patch_features // 4, patch_size=2,
            axes_dims=_axes_dims(head_dim, source.metadata, path))
    except ValueError as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{path}: inconsistent NewBie DiT shapes: {e}") from e


def expected_shapes(config: DiTConfig) -> dict[str, tuple[int, ...]]:
    """Official key -> shape for a config (built on the meta device: no memory)."""
    return {k: tuple(v.shape) for k, v in build_dit(config, "meta").state_dict().items()}


def open_dit(path: str | Path) -> DiTCheckpoint:
    """Open a NewBie DiT checkpoint lazily, validate every key and shape, infer its config."""
    path = Path(path)
    if path.suffix.lower() == ".gguf":
        from .gguf_loading import open_dit_gguf
        return open_dit_gguf(path, PREFIXES, OPTIONAL_KEYS)
    files = _find_files(path)
    raw = TensorSource(files)
    mapping = strip_prefix(raw.raw_keys(), PREFIXES)
    layout = "official" if all(k == v for k, v in mapping.items()) else "official+prefix"
    shapes = {k: raw.raw_shape(v) for k, v in mapping.items()}
    if {"time_caption_embed.caption_embedder.1.weight",
            "time_caption_embed.clip_text_pooled_proj.0.weight"} <= mapping.keys():
        mapping, layout = diffusers_to_official(mapping, shapes, path), "diffusers"
    elif "cap_embedder.1.weight" not in mapping or "clip_text_pooled_proj.0.weight" not in mapping:
        raise CheckpointError(f"{path}: not a NewBie-image DiT checkpoint: {detect_foreign(list(mapping))}")
    source = raw.with_mapping(mapping)
    config = infer_config(source, path)
    check_keys(expected_shapes(config), source.shapes()).raise_if_bad(
        "NewBie DiT", path, allow_missing=OPTIONAL_KEYS)
    stored = _stored_dtype(raw, mapping, path)
    log.info("opened NewBie DiT %s (%s layout, %s, %d blocks)", path, layout, stored, config.n_blocks)
    return DiTCheckpoint(path=path, source=source, config=config, layout=layout, stored_dtype=stored)


def _stored_dtype(raw: TensorSource, mapping: dict, path: Path) -> torch.dtype:
    src = mapping["layers.0.feed_forward.w1.weight"]
    name = raw.raw_dtype(src)
    dtype = SAFETENSORS_DTYPES.get(name)
    if dtype not in ACCEPTED_DTYPES:
        raise CheckpointError(f"{path}: block weights are stored as {name}; expected BF16, F16, F32 "
                              f"or F8_E4M3 (fp8 e4m3fn). Quantised formats need their own loader.")
    return dtype


def build_dit(config: DiTConfig, device: str | torch.device = "meta",
              dtype: torch.dtype = torch.bfloat16) -> NextDiT:
    """An empty model: on "meta" nothing is allocated; elsewhere default-initialised weights."""
    with torch.device(device):
        model = NextDiT(config)
    return model.to(dtype).eval().requires_grad_(False)


def load_dit_weights(model: NextDiT, ckpt: DiTCheckpoint, device: str | torch.device,
                     dtype: torch.dtype = torch.bfloat16, include_blocks: bool = True) -> NextDiT:
    """Materialise the weights from ``ckpt.source`` on ``device`` in ``dtype`` (fp8 upcast).

    Tensors are assigned as the module's parameters (``assign=True``), so each is held once.
    With ``include_blocks=False`` the 40 blocks keep their current (e.g. meta) weights, for
    placement to stream them from ``ckpt.source`` itself.
    """
    state: dict[str, torch.Tensor] = {}
    for key, param in model.state_dict(keep_vars=True).items():
        if not include_blocks and key.startswith(BLOCK_PREFIXES):
            continue
        if key in ckpt.source:
            tensor = ckpt.source.get(key)
        elif key in OPTIONAL_KEYS:
            tensor = torch.ones(param.shape)
        else:
            raise CheckpointError(f"{ckpt.path}: tensor {key} is missing.")
        state[key] = tensor.to(device=device, dtype=dtype)
    model.load_state_dict(state, strict=include_blocks, assign=True)
    return model.requires_grad_(False).eval()
