"""Flow-matching sampling for NewBie: schedule with shift, CFG, samplers, noise, sizes.

Names resolve lazily (PEP 562): ``sizes`` needs no torch, so the CLI can parse and check sizes
before the heavy imports; everything else loads its module (and torch) on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "GuidanceConfig": "guidance", "GuidedVelocity": "guidance", "cfg_velocity": "guidance",
    "renorm_velocity": "guidance",
    "denormalize_latent": "noise", "initial_noise": "noise", "noise_latent": "noise", "normalize_latent": "noise",
    "SAMPLERS": "samplers", "SamplerInfo": "samplers", "SamplerName": "samplers", "sample": "samplers",
    "sampler_names": "samplers",
    "DEFAULT_SHIFT": "schedule", "flow_sigmas": "schedule", "shift_sigma": "schedule",
    "TRAINING_BUCKETS": "sizes", "image_tokens": "sizes", "latent_shape": "sizes", "parse_size": "sizes",
    "preset_names": "sizes", "round_up_size": "sizes", "size_name": "sizes", "validate_size": "sizes",
}

__all__ = list(_WHERE)


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
