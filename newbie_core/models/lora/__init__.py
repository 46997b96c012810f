"""NewBie DiT LoRAs: read files (PEFT, kohya, LyCORIS LoKr/LoHa, diffusers names), map their keys
onto the official layers, and describe the changes as patches (applied by placement)."""

from .build import DitPatches, LoraPatch, LoraSpec, dit_lora_patches
from .files import READS as LORA_READS, LoraFile, clear_cache, read_lora
from .keymap import Target, describe_layout, lora_targets, qkv_rows, resolve

__all__ = ["DitPatches", "LORA_READS", "LoraFile", "LoraPatch", "LoraSpec", "Target", "clear_cache",
           "describe_layout", "dit_lora_patches", "lora_targets", "qkv_rows", "read_lora", "resolve"]
