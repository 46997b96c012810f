"""Random LoRA files for a NewBie DiT config, in the real key layouts (tests and the benchmark).

Layouts (``fmt``):
  peft       ``base_model.model.<module>.lora_A/B.weight`` + adapter_config.json beside it
             (the official trainer's LoRA output; r and alpha only in the json)
  kohya      ``lora_unet_<module with _>.lora_down/up.weight`` + ``.alpha``
  lokr       ``lycoris_<module with _>.lokr_w1`` + ``lokr_w2_a/_b`` (factorised) + ``.alpha``, and
             metadata ``lora_rank``/``lora_alpha`` as the official trainer writes them
  lokr_full  the same with a full ``lokr_w2`` (LyCORIS then fixes the scale at 1)
  loha       ``lycoris_<module>.hada_w1_a/b``, ``hada_w2_a/b`` + ``.alpha``
  diffusers  ``transformer.<block>.attn.to_q/to_k/to_v/to_out.0``, ``feed_forward.linear_2``
             PEFT keys, no alpha anywhere
Targets: the official trainer's (``TRAINER_TARGETS``) in every block, or every linear layer.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..models.dit.config import DiTConfig
from ..models.dit.loading import build_dit

TRAINER_TARGETS = ("attention.qkv", "attention.out", "feed_forward.w2", "time_text_embed.1",
                   "clip_text_pooled_proj.1")
FORMATS = ("peft", "kohya", "lokr", "lokr_full", "loha", "diffusers")


def linear_modules(config: DiTConfig, targets: tuple[str, ...] | str = TRAINER_TARGETS) -> dict[str, tuple[int, int]]:
    """Official module name -> (out, in) of the targeted linear layers (``"all"``: every one)."""
    model = build_dit(config, "meta")
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and (targets == "all" or any(name == t or name.endswith("." + t)
                                                                      for t in targets)):
            out[name] = (module.out_features, module.in_features)
    return out


def _factor(n: int, f: int = 8) -> tuple[int, int]:
    return (f, n // f) if n % f == 0 else (1, n)


def lora_tensors(config: DiTConfig, fmt: str, rank: int = 4, alpha: float = 2.0, seed: int = 0,
                 std: float = 0.05, targets: tuple[str, ...] | str = TRAINER_TARGETS,
                 dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The tensors of a random LoRA in layout ``fmt`` (see module docstring)."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(shape, generator=gen) * std).to(dtype)

    q = config.n_heads * config.head_dim
    kv = config.n_kv_heads * config.head_dim
    out: dict[str, torch.Tensor] = {}
    for name, (rows, cols) in linear_modules(config, targets).items():
        flat = name.replace(".", "_")
        if fmt == "peft":
            out[f"base_model.model.{name}.lora_A.weight"] = rand(rank, cols)
            out[f"base_model.model.{name}.lora_B.weight"] = rand(rows, rank)
        elif fmt == "kohya":
            out[f"lora_unet_{flat}.lora_down.weight"] = rand(rank, cols)
            out[f"lora_unet_{flat}.lora_up.weight"] = rand(rows, rank)
            out[f"lora_unet_{flat}.alpha"] = torch.tensor(float(alpha))
        elif fmt in ("lokr", "lokr_full"):
            (l, k), (m, n) = _factor(rows), _factor(cols)
            out[f"lycoris_{flat}.lokr_w1"] = rand(l, m)
            if fmt == "lokr":
                out[f"lycoris_{flat}.lokr_w2_a"] = rand(k, rank)
                out[f"lycoris_{flat}.lokr_w2_b"] = rand(rank, n)
            else:
                out[f"lycoris_{flat}.lokr_w2"] = rand(k, n)
            out[f"lycoris_{flat}.alpha"] = torch.tensor(float(alpha))
        elif fmt == "loha":
            for w in ("w1", "w2"):
                out[f"lycoris_{flat}.hada_{w}_a"] = rand(rows, rank)
                out[f"lycoris_{flat}.hada_{w}_b"] = rand(rank, cols)
            out[f"lycoris_{flat}.alpha"] = torch.tensor(float(alpha))
        elif fmt == "diffusers":
            block, _, rest = name.rpartition(".attention.")
            if rest == "qkv":
                for part, n_rows in (("to_q", q), ("to_k", kv), ("to_v", kv)):
                    out[f"transformer.{block}.attn.{part}.lora_A.weight"] = rand(rank, cols)
                    out[f"transformer.{block}.attn.{part}.lora_B.weight"] = rand(n_rows, rank)
            elif rest == "out":
                out[f"transformer.{block}.attn.to_out.0.lora_A.weight"] = rand(rank, cols)
                out[f"transformer.{block}.attn.to_out.0.lora_B.weight"] = rand(rows, rank)
            elif name.endswith("feed_forward.w2"):
                base = name[: -len("w2")] + "linear_2"
                out[f"transformer.{base}.lora_A.weight"] = rand(rank, cols)
                out[f"transformer.{base}.lora_B.weight"] = rand(rows, rank)
        else:
            raise ValueError(f"unknown LoRA layout {fmt!r}; one of {FORMATS}")
    return out


def write_lora(path: Path, config: DiTConfig, fmt: str, rank: int = 4, alpha: float = 2.0, seed: int = 0,
               **kw) -> Path:
    """Write a random LoRA (and, for ``peft``, its adapter_config.json beside it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = lora_tensors(config, fmt, rank, alpha, seed, **kw)
    metadata = {"format": "pt"}
    if fmt in ("lokr", "lokr_full"):
        metadata |= {"adapter_type": "lyco_lokr", "lora_rank": str(rank), "lora_alpha": str(alpha)}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    if fmt == "peft":
        targets = sorted({k.split(".lora_")[0].rsplit(".", 2)[-2] + "." + k.split(".lora_")[0].rsplit(".", 1)[-1]
                          for k in tensors})
        (path.parent / "adapter_config.json").write_text(json.dumps(
            {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": targets, "bias": "none"},
            indent=2) + "\n")
    return path


def write_tiny_loras(root: Path, seed: int = 0) -> dict[str, Path]:
    """The official trainer's two outputs for the tiny DiT, under ``root/loras`` (ComfyUI's folder)."""
    config = DiTConfig.tiny()
    loras = Path(root) / "loras"
    return {
        "lora_peft": write_lora(loras / "newbie_tiny_peft" / "adapter_model.safetensors", config, "peft",
                                rank=4, alpha=2.0, seed=seed + 11, std=0.1),
        "lora_lokr": write_lora(loras / "newbie_tiny_lokr.safetensors", config, "lokr", rank=4, alpha=4.0,
                                seed=seed + 12),
    }
