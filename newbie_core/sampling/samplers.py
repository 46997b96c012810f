"""Deterministic ODE samplers for the flow-matching DiT (spec §2.11, §5.3).

Every sampler integrates dx/dσ = −v(x, σ) from sigmas[0] down to sigmas[-1] (normally 0), where
``velocity_fn(x, sigma)`` returns the (guided) velocity v̂ ≈ x_clean − noise and ``sigma`` is a
0-d float32 tensor. The denoised estimate is x̂0 = x + σ·v̂; an Euler step is
x_{σ'} = x + (σ − σ')·v̂. One "step" is one interval of ``sigmas``; second-order single-step
samplers call the model twice per step.

Coefficients are computed in Python float64 from the σ values; the state keeps the dtype of the
``x`` passed in (use float32).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Callable, Optional

import torch

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# callback(step_index, total_steps, x_at_step_start, denoised_estimate); exceptions propagate
# (the nodes raise from it to cancel a run).
StepCallback = Callable[[int, int, torch.Tensor, torch.Tensor], None]


def _velocity(fn: VelocityFn, x: torch.Tensor, sigma: float) -> torch.Tensor:
    return fn(x, torch.tensor(sigma, dtype=torch.float32))


def _sigma_list(sigmas: torch.Tensor) -> list[float]:
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(f"sigmas must be a 1-D tensor with at least 2 values, got shape "
                         f"{tuple(sigmas.shape)}")
    values = [float(s) for s in sigmas.detach().cpu().double()]
    decreasing = all(b < a for a, b in zip(values, values[1:]))
    if not decreasing or values[0] > 1.0 or values[-1] < 0.0:
        raise ValueError(f"sigmas must strictly decrease within [0, 1], "
                         f"got {values[:3]}...{values[-2:]}")
    return values


def _notify(callback: Optional[StepCallback], i: int, n: int, x: torch.Tensor,
            denoised: torch.Tensor) -> None:
    if callback is not None:
        callback(i, n, x, denoised)


def sample_euler(velocity_fn: VelocityFn, x: torch.Tensor, sigmas: torch.Tensor,
                 callback: Optional[StepCallback] = None) -> torch.Tensor:
    """First-order Euler: the FlowMatchEuler / ComfyUI ``euler`` update."""
    sig = _sigma_list(sigmas)
    n = len(sig) - 1
    for i in range(n):
        v = _velocity(velocity_fn, x, sig[i])
        _notify(callback, i, n, x, x + sig[i] * v)
        x = x + (sig[i] - sig[i + 1]) * v
    return x


def sample_heun(velocity_fn: VelocityFn, x: torch.Tensor, sigmas: torch.Tensor,
                callback: Optional[StepCallback] = None) -> torch.Tensor:
    """Heun (trapezoidal predictor-corrector), two model calls per step.

    As in k-diffusion/ComfyUI the step that lands on σ = 0 is a plain Euler step, so the model is
    never asked for the velocity at t = 1 exactly. That step's error is O(h²), which keeps the
    method second order overall.
    """
    sig = _sigma_list(sigmas)
    n = len(sig) - 1
    for i in range(n):
        dt = sig[i] - sig[i + 1]
        v1 = _velocity(velocity_fn, x, sig[i])
        _notify(callback, i, n, x, x + sig[i] * v1)
        x_pred = x + dt * v1
        if sig[i + 1] == 0.0:
            x = x_pred
            continue
        v2 = _velocity(velocity_fn, x_pred, sig[i + 1])
        x = x + dt * 0.5 * (v1 + v2)
    return x


def sample_midpoint(velocity_fn: VelocityFn, x: torch.Tensor, sigmas: torch.Tensor,
                    callback: Optional[StepCallback] = None) -> torch.Tensor:
    """Explicit midpoint (RK2), two model calls per step: the official demo's default solver.

    Same update as torchdiffeq's fixed-grid ``midpoint`` on the shifted time grid (t = 1 − σ is
    affine, so the midpoint in σ is the midpoint in t). Never evaluates at σ = 0.
    """
    sig = _sigma_list(sigmas)
    n = len(sig) - 1
    for i in range(n):
        dt = sig[i] - sig[i + 1]
        sig_mid = sig[i] - 0.5 * dt
        v1 = _velocity(velocity_fn, x, sig[i])
        _notify(callback, i, n, x, x + sig[i] * v1)
        v2 = _velocity(velocity_fn, x + 0.5 * dt * v1, sig_mid)
        x = x + dt * v2
    return x


def _log_snr(sigma: float) -> float:
    """λ = log((1 − σ)/σ) of the rectified-flow path (−inf at σ = 1, +inf at σ = 0)."""
    if sigma >= 1.0:
        return -math.inf
    if sigma <= 0.0:
        return math.inf
    return math.log1p(-sigma) - math.log(sigma)


def sample_dpmpp_2m(velocity_fn: VelocityFn, x: torch.Tensor, sigmas: torch.Tensor,
                    callback: Optional[StepCallback] = None) -> torch.Tensor:
    """DPM-Solver++(2M), data prediction, written for the flow path α = 1 − σ (flow form).

    x' = (σ'/σ)·x + α'·(1 − e^{−h})·D, h = λ' − λ, with D the denoised estimate, corrected to
    second order from the previous D when both steps have finite h. Steps that start at σ = 1 or
    land on σ = 0 (infinite h) are first order (DDIM). Note: ComfyUI's ``dpmpp_2m`` instead uses
    λ = −log σ on the same σ values, so its numbers differ slightly from these.
    """
    sig = _sigma_list(sigmas)
    n = len(sig) - 1
    d_old: Optional[torch.Tensor] = None
    h_old = math.inf
    for i in range(n):
        s, s_next = sig[i], sig[i + 1]
        v = _velocity(velocity_fn, x, s)
        denoised = x + s * v
        _notify(callback, i, n, x, denoised)
        if s_next == 0.0:
            x = denoised
            continue
        h = _log_snr(s_next) - _log_snr(s)
        decay = math.exp(-h) if math.isfinite(h) else 0.0  # e^{−h} = α σ' / (σ α')
        d = denoised
        if d_old is not None and math.isfinite(h_old) and math.isfinite(h):
            r = h_old / h
            d = (1.0 + 0.5 / r) * denoised - (0.5 / r) * d_old
        x = (s_next / s) * x + (1.0 - s_next) * (1.0 - decay) * d
        d_old, h_old = denoised, h
    return x


def sample_res_multistep(velocity_fn: VelocityFn, x: torch.Tensor, sigmas: torch.Tensor,
                         callback: Optional[StepCallback] = None) -> torch.Tensor:
    """Two-step exponential multistep (RES, arXiv 2308.02157), as ComfyUI's ``res_multistep``.

    In s = −log σ the ODE reads dx/ds = D(x, s) − x; integrating the linear part exactly and D as
    the line through the last two denoised estimates gives
    x' = e^{−h}x + h·[(φ1 + c·φ2)·D_i − c·φ2·D_{i−1}], with h = s' − s, c = h / h_prev,
    φ1 = (1 − e^{−h})/h, φ2 = (1 − φ1)/h. The first step and the step onto σ = 0 are Euler.
    Deterministic (eta = 0), matching the ComfyUI template's sampler on the same σ values.
    """
    sig = _sigma_list(sigmas)
    n = len(sig) - 1
    d_old: Optional[torch.Tensor] = None
    for i in range(n):
        s, s_next = sig[i], sig[i + 1]
        v = _velocity(velocity_fn, x, s)
        denoised = x + s * v
        _notify(callback, i, n, x, denoised)
        if d_old is None or s_next == 0.0:
            x = x + (s - s_next) * v
        else:
            h = math.log(s / s_next)
            c = h / math.log(sig[i - 1] / s)
            phi1 = -math.expm1(-h) / h
            phi2 = (1.0 - phi1) / h
            x = math.exp(-h) * x + h * ((phi1 + c * phi2) * denoised - c * phi2 * d_old)
        d_old = denoised
    return x


SamplerFn = Callable[[VelocityFn, torch.Tensor, torch.Tensor, Optional[StepCallback]],
                     torch.Tensor]


class SamplerName(str, Enum):
    EULER = "euler"
    HEUN = "heun"
    MIDPOINT = "midpoint"
    DPMPP_2M = "dpmpp_2m"
    RES_MULTISTEP = "res_multistep"


@dataclass(frozen=True)
class SamplerInfo:
    """A registered sampler: its function, order and model calls per step (for progress/ETA)."""

    fn: SamplerFn
    order: int
    calls_per_step: int
    description: str


SAMPLERS: dict[str, SamplerInfo] = {
    SamplerName.EULER.value: SamplerInfo(
        sample_euler, 1, 1, "Euler, 1 call/step (FlowMatchEuler, HF README default)"),
    SamplerName.HEUN.value: SamplerInfo(
        sample_heun, 2, 2, "Heun, 2 calls/step"),
    SamplerName.MIDPOINT.value: SamplerInfo(
        sample_midpoint, 2, 2, "midpoint RK2, 2 calls/step (official demo default)"),
    SamplerName.DPMPP_2M.value: SamplerInfo(
        sample_dpmpp_2m, 2, 1, "DPM-Solver++(2M) in flow form, 1 call/step"),
    SamplerName.RES_MULTISTEP.value: SamplerInfo(
        sample_res_multistep, 2, 1, "res_multistep, 1 call/step (ComfyUI template default)"),
}


def sampler_names() -> list[str]:
    return list(SAMPLERS)


def sample(name: str | SamplerName, velocity_fn: VelocityFn, x: torch.Tensor,
           sigmas: torch.Tensor, callback: Optional[StepCallback] = None) -> torch.Tensor:
    """Run sampler ``name`` over ``sigmas`` starting from ``x`` (already at level sigmas[0])."""
    key = name.value if isinstance(name, SamplerName) else str(name)
    info = SAMPLERS.get(key)
    if info is None:
        raise ValueError(f"unknown sampler {key!r}; choose one of {sampler_names()}")
    return info.fn(velocity_fn, x, sigmas, callback)
