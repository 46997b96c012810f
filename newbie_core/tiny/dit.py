"""A tiny NewBie DiT in every real file layout, for CPU tests and the CLI's embedded default.

Config: ``DiTConfig.tiny()`` (dim 96, 3 heads / 1 KV head, head dim 32 with RoPE axes [8,12,12]
recorded in the safetensors metadata, 3 layers + 2 + 2 refiners, FFN 256, caption features 64 =
tiny Gemma hidden size, pooled 32 = tiny Jina hidden size). Weights are drawn like the official
init but without its zero inits (which would make every gate and the output zero): Linear
weights N(0, 0.02), biases N(0, 0.01), norm weights 1 + N(0, 0.05).

Files (relative to ``root``), name in the returned dict first:
  dit                 diffusion_models/NewBie-Image-Exp0.1-bf16.safetensors      official keys, bf16
  dit_fp16            diffusion_models/NewBie-Image-Exp0.1-fp16.safetensors      official keys, fp16
  dit_fp8_e4m3fn      diffusion_models/NewBie-Image-Exp0.1-fp8_e4m3fn.safetensors matrices fp8, rest bf16
  dit_hf_repo         hf/NewBie-image-Exp0.1                                     folder (transformer/ inside)
  dit_hf_transformer  hf/NewBie-image-Exp0.1/transformer                         its transformer folder
  dit_prefixed        dit_variants/newbie_prefixed.safetensors  keys under model.diffusion_model.
  dit_disty0          dit_variants/newbie_disty0_diffusers.safetensors  Disty0's diffusers key names
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..models.dit.config import DiTConfig
from ..models.dit.loading import AXES_METADATA_KEY, expected_shapes

CLASS_NAME = "NextDiT_3B_GQA_patch2_Adaln_Refiner_WHIT_CLIP"


def tiny_dit_state(config: DiTConfig | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """Official key -> float32 tensor, deterministic for a seed (CPU generator, sorted keys)."""
    config = config or DiTConfig.tiny()
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in sorted(expected_shapes(config).items()):
        noise = torch.randn(shape, generator=gen, dtype=torch.float32)
        if len(shape) == 2:
            state[key] = noise * 0.02
        elif key.endswith(".bias"):
            state[key] = noise * 0.01
        else:                                      # RMSNorm weights
            state[key] = 1.0 + noise * 0.05
    return state


def _to_disty0(key: str) -> str:
    """Official name -> diffusers-port name (spec §2.14); qkv is split by the caller."""
    top = [("cap_embedder.", "time_caption_embed.caption_embedder."),
           ("t_embedder.mlp.0.", "time_caption_embed.timestep_embedder.linear_1."),
           ("t_embedder.mlp.2.", "time_caption_embed.timestep_embedder.linear_2."),
           ("clip_text_pooled_proj.", "time_caption_embed.clip_text_pooled_proj."),
           ("time_text_embed.", "time_caption_embed.time_text_embed."),
           ("final_layer.adaLN_modulation.1.", "norm_out.linear_1."),
           ("final_layer.linear.", "norm_out.linear_2.")]
    for old, new in top:
        if key.startswith(old):
            return new + key[len(old):]
    m = re.match(r"^((?:layers|noise_refiner|context_refiner)\.\d+\.)(.+)$", key)
    if not m:
        return key
    prefix, rest = m.groups()
    norm1 = "norm1.weight" if prefix.startswith("context_refiner") else "norm1.norm.weight"
    rest = {"attention_norm1.weight": norm1, "attention_norm2.weight": "norm2.weight"}.get(rest, rest)
    for old, new in [("attention.out.", "attn.to_out.0."), ("attention.q_norm", "attn.norm_q"),
                     ("attention.k_norm", "attn.norm_k"), ("feed_forward.w1", "feed_forward.linear_1"),
                     ("feed_forward.w2", "feed_forward.linear_2"), ("feed_forward.w3", "feed_forward.linear_3"),
                     ("adaLN_modulation.1.", "norm1.linear.")]:
        rest = rest.replace(old, new)
    return prefix + rest


def disty0_state(state: dict[str, torch.Tensor], config: DiTConfig) -> dict[str, torch.Tensor]:
    out = {}
    q_rows, kv_rows = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
    for key, value in state.items():
        if key == "norm_final.weight":
            continue                                # the port drops the unused norm
        if key.endswith("attention.qkv.weight"):
            prefix = key[: -len("attention.qkv.weight")]
            q, k, v = value.split([q_rows, kv_rows, kv_rows], dim=0)
            out |= {prefix + "attn.to_q.weight": q, prefix + "attn.to_k.weight": k,
                    prefix + "attn.to_v.weight": v}
        else:
            out[_to_disty0(key)] = value
    return out


def _save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def write_tiny_dit(root: Path, seed: int = 0) -> dict[str, Path]:
    """Write every tiny DiT layout under ``root``; returns name -> path (see module docstring)."""
    root = Path(root)
    config = DiTConfig.tiny()
    state = tiny_dit_state(config, seed)
    meta = {AXES_METADATA_KEY: json.dumps(list(config.axes_dims))}
    bf16 = {k: v.to(torch.bfloat16) for k, v in state.items()}
    models = root / "diffusion_models"
    paths = {
        "dit": _save(bf16, models / "NewBie-Image-Exp0.1-bf16.safetensors", meta),
        "dit_fp16": _save({k: v.half() for k, v in state.items()},
                          models / "NewBie-Image-Exp0.1-fp16.safetensors", meta),
        "dit_fp8_e4m3fn": _save({k: v.to(torch.float8_e4m3fn) if v.ndim == 2 else v for k, v in bf16.items()},
                                models / "NewBie-Image-Exp0.1-fp8_e4m3fn.safetensors", meta),
        "dit_prefixed": _save({"model.diffusion_model." + k: v for k, v in bf16.items()},
                              root / "dit_variants" / "newbie_prefixed.safetensors", meta),
        "dit_disty0": _save(disty0_state(bf16, config),
                            root / "dit_variants" / "newbie_disty0_diffusers.safetensors", meta),
    }
    repo = root / "hf" / "NewBie-image-Exp0.1"
    _save(bf16, repo / "transformer" / "diffusion_pytorch_model.safetensors", meta)
    hf_config = {"_class_name": CLASS_NAME, "in_channels": config.in_channels,
                 "clip_text_dim": config.clip_text_dim, "clip_img_dim": config.clip_text_dim}
    (repo / "transformer" / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    paths["dit_hf_repo"] = repo
    paths["dit_hf_transformer"] = repo / "transformer"
    return paths
