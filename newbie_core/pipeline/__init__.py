"""The staged pipeline: encode -> sample -> decode, each stage under a placement plan.

The CLI runs :func:`generate`; the ComfyUI nodes call the stage functions one node at a time.
"""

from ..file_identity import file_identity
from .conditioning import CONDITIONING_CACHE, Conditioning, ConditioningCache
from .encode import ENCODER_CALLS, encode_texts
from .generate import GenerationRequest, GenerationResult, Models, default_device, describe_plan, generate, stage_budget
from .handles import (DiTHandle, TextEncoderHandle, VaeHandle, load_dit_handle, load_text_encoder_handle,
                      load_vae_handle)
from .sample import SampleResult, run_sampling
from .settings import MemorySettings, SamplingSettings, StorageDType
from .vae_stage import decode_latent, encode_image

__all__ = [
    "CONDITIONING_CACHE", "Conditioning", "ConditioningCache", "DiTHandle", "ENCODER_CALLS", "GenerationRequest",
    "GenerationResult", "MemorySettings", "Models", "SampleResult", "SamplingSettings", "StorageDType",
    "TextEncoderHandle", "VaeHandle", "decode_latent", "default_device", "describe_plan", "encode_image",
    "encode_texts", "generate", "load_dit_handle", "load_text_encoder_handle", "load_vae_handle",
    "file_identity", "run_sampling", "stage_budget",
]
