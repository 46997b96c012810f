"""Loader nodes: open checkpoints as handles. Only headers are read; nothing goes to a GPU.

Weights are read (once, into the host cache) by the stage that first needs them. ComfyUI caches
a loader's output while its inputs and IS_CHANGED value stay the same; IS_CHANGED is the file's
identity (path, size, mtime, inode, ctime: file_identity.py), so replacing a file reloads it, even
with its mtime kept, and nothing else does.
"""

from __future__ import annotations

from ..newbie_core.pipeline import (DiTHandle, TextEncoderHandle, VaeHandle, file_identity, load_dit_handle,
                                    load_text_encoder_handle, load_vae_handle)
from . import comfy_adapter as adapter
from .types import CATEGORY, NEWBIE_DIT, NEWBIE_TEXT_ENCODERS, NEWBIE_VAE


def file_fingerprint(folder: str, filename: str) -> str:
    """'path|size|mtime_ns' of a model file; a missing file gives a stable marker (the node's
    own run then raises the error that names the folder)."""
    try:
        path = adapter.full_path(folder, filename)
    except FileNotFoundError:
        return f"missing:{folder}/{filename}"
    return "|".join(map(str, file_identity(path)))


class _FileLoader:
    """Shared IS_CHANGED: the fingerprints of the files named by FILE_INPUTS (input, folder)."""
    FILE_INPUTS: tuple[tuple[str, str], ...] = ()
    CATEGORY = f"{CATEGORY}/loaders"

    @classmethod
    def IS_CHANGED(cls, **inputs) -> str:
        return ";".join(file_fingerprint(folder, str(inputs.get(name))) for name, folder in cls.FILE_INPUTS)


class NewBieDiTLoader(_FileLoader):
    TITLE = "NewBie DiT Loader"
    DESCRIPTION = ("Opens the NewBie Next-DiT checkpoint from models/diffusion_models. Reads only the header: "
                   "the sampler streams or places the weights within its VRAM budget.")
    FILE_INPUTS = (("dit_name", "diffusion_models"),)
    RETURN_TYPES = (NEWBIE_DIT,)
    RETURN_NAMES = ("dit",)
    OUTPUT_TOOLTIPS = ("The opened DiT, for NewBie Next-DiT Sampler.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "dit_name": (adapter.models_dir_list("diffusion_models"), {"tooltip":
                         "NewBie-Image-Exp0.1 DiT file in models/diffusion_models (official key names; bf16, fp16 "
                         "or fp8 files all work)."}),
            "storage": (["bf16", "fp16", "fp8"], {"default": "bf16", "tooltip":
                        "How the DiT's blocks are kept in RAM and on the GPU. fp8 halves memory and transfer "
                        "(upcast to bf16 before use); fp16 for GPUs without bf16."}),
        }}

    def load(self, dit_name: str, storage: str) -> tuple[DiTHandle]:
        return (load_dit_handle(adapter.full_path("diffusion_models", dit_name), storage),)


class NewBieTextEncoderLoader(_FileLoader):
    TITLE = "NewBie Text Encoder Loader (Gemma 3 + Jina)"
    DESCRIPTION = ("Opens the two NewBie text encoders from models/text_encoders: Gemma 3 4B (caption features) "
                   "and Jina CLIP v2 (pooled vector). Reads only the headers.")
    FILE_INPUTS = (("gemma_name", "text_encoders"), ("jina_name", "text_encoders"))
    RETURN_TYPES = (NEWBIE_TEXT_ENCODERS,)
    RETURN_NAMES = ("text_encoders",)
    OUTPUT_TOOLTIPS = ("Both encoders, for NewBie Text Encode then Unload.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        files = adapter.models_dir_list("text_encoders")
        return {"required": {
            "gemma_name": (files, {"tooltip": "Gemma 3 4B file (e.g. gemma_3_4b_it_bf16.safetensors) in "
                                              "models/text_encoders."}),
            "jina_name": (list(files), {"tooltip": "Jina CLIP v2 file (e.g. jina_clip_v2_bf16.safetensors) in "
                                                   "models/text_encoders. Always computed in bf16."}),
            "gemma_storage": (["bf16", "fp8"], {"default": "bf16", "tooltip":
                              "How Gemma's layers are kept: fp8 halves RAM and transfer (upcast before use). "
                              "fp16 is not offered: Gemma 3 overflows in fp16."}),
        }}

    def load(self, gemma_name: str, jina_name: str, gemma_storage: str) -> tuple[TextEncoderHandle]:
        gemma = adapter.full_path("text_encoders", gemma_name)
        jina = adapter.full_path("text_encoders", jina_name)
        return (load_text_encoder_handle(gemma, jina, gemma_storage),)


class NewBieVAELoader(_FileLoader):
    TITLE = "NewBie VAE Loader"
    DESCRIPTION = "Opens the FLUX VAE (ae.safetensors) from models/vae for the NewBie VAE decode/encode nodes."
    FILE_INPUTS = (("vae_name", "vae"),)
    RETURN_TYPES = (NEWBIE_VAE,)
    RETURN_NAMES = ("vae",)
    OUTPUT_TOOLTIPS = ("The opened VAE.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae_name": (adapter.models_dir_list("vae"), {"tooltip": "FLUX VAE file (ae.safetensors) in models/vae."}),
            "dtype": (["bf16", "fp32"], {"default": "bf16", "tooltip":
                      "VAE precision on the GPU (bf16 halves its activations; fp32 is the reference). "
                      "The CPU always uses fp32."}),
        }}

    def load(self, vae_name: str, dtype: str) -> tuple[VaeHandle]:
        return (load_vae_handle(adapter.full_path("vae", vae_name), dtype),)


class NewBieLoraLoader(_FileLoader):
    TITLE = "NewBie LoRA Loader"
    DESCRIPTION = ("Adds a LoRA (PEFT/official trainer, kohya, LyCORIS LoKr/LoHa) from models/loras to a NewBie DiT. "
                   "Chain several. The sampler applies it on the GPU as each block arrives, so streaming still works "
                   "and a new strength re-reads no model file.")
    FILE_INPUTS = (("lora_name", "loras"),)
    RETURN_TYPES = (NEWBIE_DIT,)
    RETURN_NAMES = ("dit",)
    OUTPUT_TOOLTIPS = ("The same DiT with this LoRA added, for the sampler or another LoRA loader.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "dit": (NEWBIE_DIT, {"tooltip": "From NewBie DiT Loader or another NewBie LoRA Loader."}),
            "lora_name": (adapter.models_dir_list("loras"), {"tooltip":
                          "A .safetensors LoRA for NewBie in models/loras. A PEFT LoRA reads its alpha from the "
                          "adapter_config.json beside it."}),
            "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.05, "tooltip":
                         "1.0 = the trained scale. The official NewBie nodes apply a PEFT LoRA at r/alpha times "
                         "that (2.0 here for the trainer's r 8, alpha 4); see the README."}),
        }}

    def load(self, dit: DiTHandle, lora_name: str, strength: float) -> tuple[DiTHandle]:
        return (dit.with_lora(adapter.full_path("loras", lora_name), strength),)
