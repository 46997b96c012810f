"""NewBie module names as LoRA files write them -> the DiT's official linear layers.

Every name a NewBie LoRA may use is listed from the model itself (its ``nn.Linear`` modules on
the meta device), so the table follows the config: the official names (``layers.0.attention.qkv``),
the diffusers port's (``layers.0.attn.to_q`` -> rows of the fused qkv, ``attn.to_out.0``,
``feed_forward.linear_1``, ``norm1.linear``, ``time_caption_embed.*``), each also
underscore-joined as kohya and LyCORIS write them (``lora_unet_layers_0_attention_qkv``,
``lycoris_layers_0_attention_qkv``). File prefixes such as ``base_model.model.`` (PEFT),
``transformer.``, ``diffusion_model.`` are stripped first.

GQA: to_q/to_k/to_v are rows [0, q) / [q, q + kv) / [q + kv, q + 2 kv) of qkv with
q = n_heads x head_dim and kv = n_kv_heads x head_dim (2304 and 768 for NewBie). ComfyUI's
Lumina-2 map assumes kv = dim; that is wrong here and is never used.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from ..dit.config import DiTConfig
from ..dit.keymap import DIFFUSERS_TOP_LEVEL

DOTTED_PREFIXES = ("base_model.model.", "unet.base_model.model.", "model.diffusion_model.", "diffusion_model.",
                   "transformer.", "unet.", "model.")
UNDERSCORE_PREFIXES = ("lora_unet_", "lora_transformer_", "lycoris_", "lora_")
UNDERSCORE_INNER = ("diffusion_model_", "transformer_")
_BLOCK = re.compile(r"^((?:layers|noise_refiner|context_refiner)\.\d+\.)(.+)$")


@dataclass(frozen=True)
class Target:
    module: str                          # official module name, e.g. "layers.0.attention.qkv"
    rows: tuple[int, int] | None = None  # output rows of that module's weight, None = all


def qkv_rows(config: DiTConfig) -> dict[str, tuple[int, int]]:
    """Row ranges of q, k and v inside the fused qkv weight, from the config (GQA-aware)."""
    q = config.n_heads * config.head_dim
    kv = config.n_kv_heads * config.head_dim
    return {"q": (0, q), "k": (q, q + kv), "v": (q + kv, q + 2 * kv)}


def _block_aliases(rest: str, rows: dict[str, tuple[int, int]]) -> list[tuple[str, tuple[int, int] | None]]:
    """Diffusers-style names of one in-block linear (``rest`` relative to the block)."""
    out: list[tuple[str, tuple[int, int] | None]] = []
    if rest == "attention.qkv":
        for part in "qkv":
            out += [(f"attn.to_{part}", rows[part]), (f"attention.to_{part}", rows[part])]
    renames = {"attention.out": ("attn.to_out.0", "attention.to_out.0"),
               "feed_forward.w1": ("feed_forward.linear_1",), "feed_forward.w2": ("feed_forward.linear_2",),
               "feed_forward.w3": ("feed_forward.linear_3",), "adaLN_modulation.1": ("norm1.linear",)}
    out += [(alias, None) for alias in renames.get(rest, ())]
    return out


def lora_targets(model: nn.Module, config: DiTConfig) -> dict[str, Target]:
    """Every accepted name (dotted and underscore-joined) -> its target linear layer."""
    rows = qkv_rows(config)
    table: dict[str, Target] = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        table[name] = Target(name)
        block = _BLOCK.match(name + ".")
        if block:
            prefix, rest = block.groups()
            for alias, part in _block_aliases(rest.rstrip("."), rows):
                table[prefix + alias] = Target(name, part)
        for diffusers, official in DIFFUSERS_TOP_LEVEL.items():
            if (name + ".").startswith(official) and diffusers != official:
                table[(diffusers + (name + ".")[len(official):]).rstrip(".")] = Target(name)
    table.update({alias.replace(".", "_"): t for alias, t in list(table.items())})
    return table


def resolve(module: str, table: dict[str, Target]) -> Target | None:
    """The target of a module name as a LoRA file writes it, or None."""
    name = module
    for _ in range(4):                       # e.g. base_model.model.transformer.layers.0...
        if name in table:
            return table[name]
        prefix = next((p for p in DOTTED_PREFIXES if name.startswith(p)), None)
        if prefix is None:
            break
        name = name[len(prefix):]
    for prefix in UNDERSCORE_PREFIXES:
        if module.startswith(prefix):
            name = module[len(prefix):]
            for inner in UNDERSCORE_INNER:
                if name.startswith(inner) and name not in table:
                    name = name[len(inner):]
            return table.get(name)
    return None


_FOREIGN = (   # (pattern on module names, what the file looks like); first match wins
    (r"double_blocks|single_blocks|single_transformer_blocks", "a FLUX LoRA (double/single blocks)"),
    (r"joint_blocks", "an SD3 LoRA (joint_blocks)"),
    (r"lora_te2_|text_encoder_2", "an SDXL LoRA (two text encoders, UNet blocks)"),
    (r"input_blocks|output_blocks|down_blocks|up_blocks|mid_block", "an SD 1.x/2.x or SDXL UNet LoRA"),
    (r"(^|[._])blocks[._]\d+[._](self_attn|cross_attn)", "a Wan video-model LoRA"),
    (r"^lora_te|text_model|self_attn[._](q|k|v)_proj|mlp[._](gate|up|down)_proj",
     "a text-encoder LoRA (the pack applies LoRAs to the DiT only)"),
    (r"attention[._](to_q|qkv|out)|feed_forward", "a Lumina-style LoRA whose module names or block "
     "count do not match this NewBie DiT"),
)


def describe_layout(modules: list[str]) -> str:
    """One phrase saying what a LoRA that matches nothing looks like."""
    for pattern, description in _FOREIGN:
        if any(re.search(pattern, m) for m in modules):
            return description
    sample = ", ".join(sorted(modules)[:3])
    return f"an unknown layout ({len(modules)} modules, e.g. {sample})"
