"""Finding, recognising and renaming FLUX VAE checkpoints (spec §4).

NewBie decodes with the FLUX.1 autoencoder. It ships in two layouts:

* **BFL / ComfyUI** ``ae.safetensors``: the original LDM names (``encoder.down.N.block.M``,
  ``encoder.mid.attn_1.q`` as 1x1 convs, ``decoder.up.N`` counted from the LOWEST resolution, so
  in the reverse order of diffusers' ``up_blocks``), optionally under ``first_stage_model.`` or
  ``vae.`` inside a bundled checkpoint.
* **diffusers**: a ``vae/`` folder (``config.json`` + ``diffusion_pytorch_model.safetensors``) or a
  single file with diffusers names.

:func:`open_vae` accepts either and returns a :class:`VaeCheckpoint` whose ``source`` always speaks
diffusers names, with the attention 1x1 convs reshaped to Linear weights lazily (``Derived``). The
architecture (channels, blocks) is read from tensor shapes, so the tiny test VAE loads through the
same path as the real one. Wrong files (an SD 4-channel VAE, a DiT, a text encoder) are refused
with a message the user can act on.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import torch

from .checkpoint import CheckpointError, Derived, TensorSource, check_keys

log = logging.getLogger(__name__)

# The FLUX.1 [dev] VAE config (diffusers names), built here so nothing ever reaches a hub.
FLUX_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 16,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "force_upcast": True,
    "mid_block_add_attention": True,
}

# Prefixes under which a VAE may sit inside a bundled checkpoint, most specific first.
_BUNDLE_PREFIXES = ("first_stage_model.", "vae.", "")


class VaeLayout(str, Enum):
    BFL = "bfl"              # ae.safetensors (BFL / ComfyUI / LDM names)
    DIFFUSERS = "diffusers"  # diffusers AutoencoderKL names


@dataclass(frozen=True)
class VaeCheckpoint:
    """An opened VAE checkpoint: diffusers-named lazy tensors plus the AutoencoderKL config."""
    source: TensorSource
    config: dict[str, Any]
    path: Path
    layout: VaeLayout


# -- BFL -> diffusers names -------------------------------------------------------------------
# Each rule: (pattern on the BFL key after the prefix, replacement builder). `n_up` is needed
# because BFL counts decoder up-blocks from the lowest resolution, diffusers from the highest.
_RESNET_PARTS = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
                 "nin_shortcut": "conv_shortcut"}
_ATTN_PARTS = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_TOP_PARTS = {"conv_in": "conv_in", "conv_out": "conv_out", "norm_out": "conv_norm_out"}

_RE_DOWN = re.compile(r"^encoder\.down\.(\d+)\.block\.(\d+)\.(\w+)\.(weight|bias)$")
_RE_DOWNSAMPLE = re.compile(r"^encoder\.down\.(\d+)\.downsample\.conv\.(weight|bias)$")
_RE_UP = re.compile(r"^decoder\.up\.(\d+)\.block\.(\d+)\.(\w+)\.(weight|bias)$")
_RE_UPSAMPLE = re.compile(r"^decoder\.up\.(\d+)\.upsample\.conv\.(weight|bias)$")
_RE_MID_BLOCK = re.compile(r"^(encoder|decoder)\.mid\.block_([12])\.(\w+)\.(weight|bias)$")
_RE_MID_ATTN = re.compile(r"^(encoder|decoder)\.mid\.attn_1\.(\w+)\.(weight|bias)$")
_RE_TOP = re.compile(r"^(encoder|decoder)\.(conv_in|conv_out|norm_out)\.(weight|bias)$")


def bfl_to_diffusers_key(key: str, n_up: int) -> str | None:
    """The diffusers name of one BFL VAE key, or None when the key is not a BFL VAE key."""
    if m := _RE_DOWN.match(key):
        i, j, part, wb = m.groups()
        return f"encoder.down_blocks.{i}.resnets.{j}.{_RESNET_PARTS[part]}.{wb}" if part in _RESNET_PARTS else None
    if m := _RE_DOWNSAMPLE.match(key):
        return f"encoder.down_blocks.{m[1]}.downsamplers.0.conv.{m[2]}"
    if m := _RE_UP.match(key):
        i, j, part, wb = m.groups()
        if part not in _RESNET_PARTS:
            return None
        return f"decoder.up_blocks.{n_up - 1 - int(i)}.resnets.{j}.{_RESNET_PARTS[part]}.{wb}"
    if m := _RE_UPSAMPLE.match(key):
        return f"decoder.up_blocks.{n_up - 1 - int(m[1])}.upsamplers.0.conv.{m[2]}"
    if m := _RE_MID_BLOCK.match(key):
        side, n, part, wb = m.groups()
        return f"{side}.mid_block.resnets.{int(n) - 1}.{_RESNET_PARTS[part]}.{wb}" if part in _RESNET_PARTS else None
    if m := _RE_MID_ATTN.match(key):
        side, part, wb = m.groups()
        return f"{side}.mid_block.attentions.0.{_ATTN_PARTS[part]}.{wb}" if part in _ATTN_PARTS else None
    if m := _RE_TOP.match(key):
        return f"{m[1]}.{_TOP_PARTS[m[2]]}.{m[3]}"
    if key.split(".")[0] in ("quant_conv", "post_quant_conv"):
        return key  # same name in both layouts (SD VAEs have them; FLUX does not)
    return None


def _squeeze_conv1x1(tensors: list[torch.Tensor]) -> torch.Tensor:
    # (C_out, C_in, 1, 1) conv weight -> (C_out, C_in) Linear weight; a view, no copy.
    return tensors[0].reshape(tensors[0].shape[0], tensors[0].shape[1])


def bfl_mapping(source: TensorSource, prefix: str) -> dict[str, str | Derived]:
    """diffusers name -> stored key (or a reshape recipe) for a BFL-layout VAE under `prefix`."""
    keys = [k for k in source.raw_keys() if k.startswith(prefix)]
    ups = {int(m[1]) for k in keys if (m := re.match(r"decoder\.up\.(\d+)\.", k[len(prefix):]))}
    n_up = max(ups) + 1 if ups else 0
    mapping: dict[str, str | Derived] = {}
    for raw in keys:
        name = bfl_to_diffusers_key(raw[len(prefix):], n_up)
        if name is None:
            mapping[raw[len(prefix):]] = raw  # kept under its own name: check_keys reports it
            continue
        shape = source.raw_shape(raw)
        if ".attentions.0.to_" in name and name.endswith("weight") and len(shape) == 4:
            mapping[name] = Derived((raw,), _squeeze_conv1x1, tuple(shape[:2]))
        else:
            mapping[name] = raw
    return mapping


# Attention names of diffusers files saved before diffusers 0.15 (Linear weights already).
_LEGACY_ATTN = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}


def diffusers_mapping(source: TensorSource, prefix: str) -> dict[str, str | Derived]:
    """diffusers name -> stored key for a diffusers-layout VAE under `prefix` (legacy names renamed)."""
    mapping: dict[str, str | Derived] = {}
    for raw in source.raw_keys():
        if not raw.startswith(prefix):
            continue
        name = raw[len(prefix):]
        if ".attentions.0." in name:
            for old, new in _LEGACY_ATTN.items():
                name = name.replace(old, new)
        mapping[name] = raw
    return mapping


# -- recognising what a file is -----------------------------------------------------------------
def _looks_like(keys: list[str]) -> str:
    """A short guess at what a non-VAE file holds, for the error message."""
    joined = " ".join(keys[:2000])
    if any(s in joined for s in ("x_embedder", "cap_embedder", "noise_refiner", "double_blocks",
                                 "diffusion_model.", "transformer_blocks", "adaLN")):
        return "a diffusion model (DiT/UNet) checkpoint"
    if any(s in joined for s in ("embed_tokens", "text_model", "encoder.layer.", "self_attn",
                                 "token_embedding", "shared.weight", "roberta")):
        return "a text encoder checkpoint"
    return "not a VAE checkpoint"


def _find_vae(source: TensorSource, path: Path) -> tuple[str, VaeLayout]:
    """The bundle prefix and layout of the VAE inside `source`, or a CheckpointError."""
    raw = source.raw_keys()
    for prefix in _BUNDLE_PREFIXES:
        if f"{prefix}decoder.conv_in.weight" not in raw:
            continue
        if f"{prefix}decoder.up.0.block.0.conv1.weight" in raw or f"{prefix}decoder.mid.block_1.conv1.weight" in raw:
            return prefix, VaeLayout.BFL
        if f"{prefix}decoder.mid_block.resnets.0.conv1.weight" in raw:
            return prefix, VaeLayout.DIFFUSERS
    raise CheckpointError(
        f"{path}: this is {_looks_like(raw)}, not a VAE (no 'decoder.conv_in.weight' among its "
        f"{len(raw)} tensors, e.g. {', '.join(raw[:3])}). NewBie needs the 16-channel FLUX VAE: "
        f"ComfyUI's 'vae/ae.safetensors' or the 'vae/' folder of the NewBie repository.")


def _infer_config(shapes: dict[str, tuple[int, ...]], path: Path, groups: int) -> dict[str, Any]:
    """The AutoencoderKL config implied by the tensor shapes (diffusers names)."""
    latent = shapes["decoder.conv_in.weight"][1]
    if latent == 4:
        raise CheckpointError(
            f"{path}: this is a 4-channel SD VAE, NewBie needs the 16-channel FLUX VAE (this file looks "
            f"like an SD1.x/SDXL VAE; use ComfyUI's 'ae.safetensors' or the NewBie repository's 'vae/' folder).")
    if latent != 16:
        raise CheckpointError(
            f"{path}: this VAE has {latent} latent channels, NewBie needs the 16-channel FLUX.1 VAE "
            f"(FLUX.2's VAE has 32; it does not fit).")
    blocks = []
    while f"encoder.down_blocks.{len(blocks)}.resnets.0.conv1.weight" in shapes:
        blocks.append(shapes[f"encoder.down_blocks.{len(blocks)}.resnets.0.conv1.weight"][0])
    layers = 0
    while f"encoder.down_blocks.0.resnets.{layers}.conv1.weight" in shapes:
        layers += 1
    if not blocks or any(c % groups for c in blocks):
        raise CheckpointError(f"{path}: cannot read the VAE's block channels ({blocks}) as multiples "
                              f"of {groups} GroupNorm groups; the file is not a FLUX VAE.")
    config = dict(FLUX_VAE_CONFIG)
    config.update(
        in_channels=shapes["encoder.conv_in.weight"][1],
        out_channels=shapes["decoder.conv_out.weight"][0],
        block_out_channels=blocks, layers_per_block=layers, norm_num_groups=groups,
        down_block_types=["DownEncoderBlock2D"] * len(blocks),
        up_block_types=["UpDecoderBlock2D"] * len(blocks),
        mid_block_add_attention="decoder.mid_block.attentions.0.to_q.weight" in shapes,
    )
    return config


def expected_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every parameter name and shape of an AutoencoderKL with `config` (built on meta, free)."""
    from diffusers import AutoencoderKL  # deferred: diffusers import is slow
    with torch.device("meta"):
        model = AutoencoderKL(**config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _resolve_files(path: Path) -> tuple[list[Path], dict[str, Any]]:
    """The safetensors file(s) of a VAE at `path`, plus a diffusers config.json when there is one."""
    if path.is_dir():
        for folder in (path, path / "vae"):
            files = sorted(folder.glob("diffusion_pytorch_model*.safetensors"))
            if files:
                cfg_path = folder / "config.json"
                config = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
                return files, config
            if (folder / "ae.safetensors").is_file():
                return [folder / "ae.safetensors"], {}
        raise CheckpointError(
            f"{path}: no VAE found in this folder: expected 'diffusion_pytorch_model.safetensors' "
            f"(with config.json), 'ae.safetensors', or a 'vae/' subfolder holding one of them.")
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder.")
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: only .safetensors VAE files are loaded (pickled .bin/.ckpt/.pt "
                              f"files can run code and are refused). Use ae.safetensors.")
    return [path], {}


def _as_list(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _check_config_json(declared: dict[str, Any], inferred: dict[str, Any], path: Path) -> None:
    """A diffusers config.json must agree with the tensors it ships with."""
    if declared.get("latent_channels", 16) == 4:
        raise CheckpointError(f"{path}: config.json declares a 4-channel SD VAE, NewBie needs the "
                              f"16-channel FLUX VAE.")
    for name in ("latent_channels", "block_out_channels", "layers_per_block", "in_channels", "out_channels"):
        if name in declared and _as_list(declared[name]) != _as_list(inferred[name]):
            raise CheckpointError(f"{path}: config.json says {name}={declared[name]} but the weights imply "
                                  f"{inferred[name]}; the folder is inconsistent, download it again.")
    if declared.get("use_quant_conv") or declared.get("use_post_quant_conv"):
        raise CheckpointError(f"{path}: config.json enables quant convs; the FLUX VAE has none. "
                              f"This is not the FLUX VAE.")


def open_vae(path: str | Path) -> VaeCheckpoint:
    """Open a FLUX VAE in either layout and check every tensor's name and shape; read no weights."""
    path = Path(path)
    files, declared = _resolve_files(path)
    raw = TensorSource(files)
    prefix, layout = _find_vae(raw, path)
    if layout is VaeLayout.BFL:
        source = raw.with_mapping(bfl_mapping(raw, prefix))
    else:
        source = raw.with_mapping(diffusers_mapping(raw, prefix))
    shapes = source.shapes()
    groups = int(declared.get("norm_num_groups", raw.metadata.get("norm_num_groups", 32)))
    config = _infer_config(shapes, path, groups)
    if declared:
        _check_config_json(declared, config, path)
    check_keys(expected_shapes(config), shapes).raise_if_bad("FLUX VAE", path)
    log.info("VAE %s: %s layout, block channels %s, %d tensors", path, layout.value,
             config["block_out_channels"], len(shapes))
    return VaeCheckpoint(source=source, config=config, path=path, layout=layout)
