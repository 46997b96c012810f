"""Flow-matching sampling for NewBie: schedule with shift, CFG, samplers, noise, sizes."""

from .guidance import GuidanceConfig, GuidedVelocity, cfg_velocity, renorm_velocity
from .noise import denormalize_latent, initial_noise, noise_latent, normalize_latent
from .samplers import SAMPLERS, SamplerInfo, SamplerName, sample, sampler_names
from .schedule import DEFAULT_SHIFT, flow_sigmas, shift_sigma
from .sizes import (TRAINING_BUCKETS, image_tokens, latent_shape, parse_size, preset_names,
                    round_up_size, size_name, validate_size)

__all__ = [
    "GuidanceConfig", "GuidedVelocity", "cfg_velocity", "renorm_velocity",
    "denormalize_latent", "initial_noise", "noise_latent", "normalize_latent",
    "SAMPLERS", "SamplerInfo", "SamplerName", "sample", "sampler_names",
    "DEFAULT_SHIFT", "flow_sigmas", "shift_sigma",
    "TRAINING_BUCKETS", "image_tokens", "latent_shape", "parse_size", "preset_names",
    "round_up_size", "size_name", "validate_size",
]
