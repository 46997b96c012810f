"""Schedule, guidance, noise and samplers against hand-computed values and exact flows."""

from __future__ import annotations

import pytest
import torch

from newbie_core.sampling import (SAMPLERS, GuidanceConfig, GuidedVelocity, cfg_velocity,
                                  denormalize_latent, flow_sigmas, initial_noise, noise_latent,
                                  normalize_latent, renorm_velocity, sample, shift_sigma)

# ---------------------------------------------------------------------------------- schedule


def test_shift_sigma_hand_values():
    assert shift_sigma(0.5, 6.0) == pytest.approx(3.0 / 3.5)  # 6·0.5/(1+5·0.5)
    assert shift_sigma(0.0, 6.0) == 0.0 and shift_sigma(1.0, 6.0) == 1.0
    assert shift_sigma(0.25, 1.0) == 0.25
    t = 0.3  # equivalent t-form: t' = t / (t + s(1 − t))
    assert 1 - shift_sigma(1 - t, 6.0) == pytest.approx(t / (t + 6 * (1 - t)))
    with pytest.raises(ValueError, match="shift"):
        shift_sigma(0.5, 0.0)


def test_flow_sigmas_four_steps_shift6():
    # σ_i = 6u/(1+5u), u = 1, .75, .5, .25, then 0
    expected = [1.0, 4.5 / 4.75, 3.0 / 3.5, 1.5 / 2.25, 0.0]
    s = flow_sigmas(4, 6.0)
    assert s.dtype == torch.float32 and s.shape == (5,)
    assert s.tolist() == pytest.approx(expected, abs=1e-7)
    assert s[0].item() == 1.0 and s[-1].item() == 0.0


def test_flow_sigmas_denoise_follows_comfyui_rule():
    # denoise 0.5, 4 steps: schedule for int(4/0.5) = 8 steps, keep the last 5 values
    full8 = [shift_sigma(1 - i / 8, 3.0) for i in range(8)] + [0.0]
    s = flow_sigmas(4, 3.0, denoise=0.5)
    assert s.tolist() == pytest.approx(full8[-5:], abs=1e-7)
    assert s[0].item() == pytest.approx(shift_sigma(0.5, 3.0))
    # int() truncation: 3 / 0.7 = 4.28 → 4 steps, keep the last 4 values
    full4 = [shift_sigma(1 - i / 4, 6.0) for i in range(4)] + [0.0]
    assert flow_sigmas(3, 6.0, denoise=0.7).tolist() == pytest.approx(full4[-4:], abs=1e-7)


@pytest.mark.parametrize("bad", [dict(steps=0), dict(steps=2.5), dict(steps=4, denoise=0.0),
                                 dict(steps=4, denoise=1.5)])
def test_flow_sigmas_rejects_bad_arguments(bad):
    with pytest.raises(ValueError):
        flow_sigmas(**bad)


# ---------------------------------------------------------------------------------- guidance


def test_cfg_velocity_formula():
    vc, vu = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    assert cfg_velocity(vc, vu, 3.0).tolist() == [4.0, -2.0]


def test_renorm_clamps_per_sample_and_never_scales_up():
    vc = torch.ones(2, 1, 2, 2)  # ‖v_c‖ = 2 per sample
    v = torch.stack([torch.full((1, 2, 2), 3.0), torch.full((1, 2, 2), 0.5)])  # norms 6 and 1
    out = renorm_velocity(v, vc, 1.0)
    norms = torch.linalg.vector_norm(out.flatten(1), dim=1)
    assert norms.tolist() == pytest.approx([2.0, 1.0])  # first clamped to r‖v_c‖, second kept
    assert torch.equal(out[1], v[1])
    assert torch.equal(renorm_velocity(v, vc, 0.0), v)  # off


class _RecordingModels:
    """Fake DiT halves whose velocity depends on the conditioning row and on t."""

    def __init__(self):
        self.pair_batches, self.single_batches, self.times = [], [], []

    def pair(self, x2, t2):
        self.pair_batches.append(x2.shape[0])
        self.times.append(t2.clone())
        b = x2.shape[0] // 2
        return torch.cat([x2[:b] * 0 + 2.0, x2[b:] * 0 + 1.0])  # cond → 2, uncond → 1

    def single(self, x, t):
        self.single_batches.append(x.shape[0])
        self.times.append(t.clone())
        return x * 0 + 2.0


def test_guided_velocity_runs_one_batch_of_two():
    m = _RecordingModels()
    g = GuidedVelocity(m.pair, m.single, GuidanceConfig(scale=4.0))
    v = g(torch.zeros(3, 16, 4, 4), torch.tensor(0.75))
    assert m.pair_batches == [6] and m.single_batches == []
    assert torch.allclose(v, torch.full_like(v, 1 + 4 * (2 - 1)))
    assert m.times[0].shape == (6,) and m.times[0].dtype == torch.float32
    assert torch.allclose(m.times[0], torch.full((6,), 0.25))  # t = 1 − σ


def test_guided_velocity_skips_uncond_at_cfg_one():
    m = _RecordingModels()
    v = GuidedVelocity(m.pair, m.single, GuidanceConfig(scale=1.0))(torch.zeros(1, 2, 2, 2), 0.5)
    assert m.pair_batches == [] and m.single_batches == [1] and torch.all(v == 2.0)


def test_guided_velocity_truncation_switches_to_cond_only():
    m = _RecordingModels()
    g = GuidedVelocity(m.pair, m.single, GuidanceConfig(scale=5.0, trunc=0.25))
    x = torch.zeros(1, 2, 2, 2)
    g(x, 0.8)   # t = 0.2 < τ: guided
    g(x, 0.75)  # t = 0.25, not < τ: cond only
    g(x, 0.1)
    assert m.pair_batches == [2] and m.single_batches == [1, 1]
    assert (g.calls_pair, g.calls_single) == (1, 2)


def test_guidance_config_validation():
    with pytest.raises(ValueError, match="renorm"):
        GuidanceConfig(renorm=-1)
    with pytest.raises(ValueError, match="trunc"):
        GuidanceConfig(trunc=0.0)


# ---------------------------------------------------------------------------------- noise


def test_initial_noise_is_placement_independent_and_seeded():
    a = initial_noise(42, (1, 16, 8, 8))
    b = initial_noise(42, (1, 16, 8, 8), dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(42)
    assert torch.equal(a, torch.randn((1, 16, 8, 8), generator=g))
    assert torch.equal(b, a.to(torch.bfloat16))  # drawn in fp32, then cast
    assert not torch.equal(a, initial_noise(43, (1, 16, 8, 8)))
    assert torch.equal(initial_noise(2**64 - 1, (4,)), initial_noise(2**64 - 1, (4,)))
    with pytest.raises(ValueError, match="seed"):
        initial_noise(2**64, (4,))


@pytest.mark.cuda
def test_initial_noise_same_on_gpu():
    cpu = initial_noise(7, (1, 16, 16, 16))
    gpu = initial_noise(7, (1, 16, 16, 16), device="cuda")
    assert torch.equal(gpu.cpu(), cpu)


def test_noise_latent_and_normalisation():
    x0, n = torch.full((1, 2, 2, 2), 2.0), torch.full((1, 2, 2, 2), -1.0)
    assert torch.allclose(noise_latent(x0, n, 0.25), torch.full_like(x0, 0.75 * 2 - 0.25))
    raw = torch.tensor([0.1159, 1.1159])
    assert torch.allclose(normalize_latent(raw), torch.tensor([0.0, 0.3611]))
    assert torch.allclose(denormalize_latent(normalize_latent(raw)), raw)


# ---------------------------------------------------------------------------------- samplers
# Gaussian data x0 ~ N(μ, s²) per element, x_σ = (1 − σ)x0 + σε. Exact velocity
# v = E[x0 − ε | x_σ]; the exact flow maps x(1) = z to x(σ) = (1 − σ)μ + √V(σ)·z, V = (1−σ)²s² + σ².

MU = torch.tensor([1.0, -0.5, 2.0, 0.25], dtype=torch.float64).view(1, 4, 1, 1)


def gaussian_velocity(std: float):
    def v(x, sigma):
        sig = float(sigma)
        var = (1 - sig) ** 2 * std**2 + sig**2
        resid = x - (1 - sig) * MU
        return MU + ((1 - sig) * std**2 - sig) / var * resid
    return v


def exact_endpoint(z, std):
    return MU + std * z


def _z():
    return initial_noise(0, (1, 4, 3, 3), dtype=torch.float64)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_fixed_data_reached_exactly(name):
    # std 0: every trajectory is a straight line to μ, which each sampler integrates exactly
    z = _z()
    out = sample(name, gaussian_velocity(0.0), z, flow_sigmas(5, 6.0).double())
    assert torch.allclose(out, MU.expand_as(out), atol=1e-10)


def _error(name, steps, std=2.0, shift=3.0):
    z = _z()
    out = sample(name, gaussian_velocity(std), z, flow_sigmas(steps, shift).double())
    return (out - exact_endpoint(z, std)).abs().max().item()


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_convergence_order(name):
    # Halving the step size divides the error by ~2 (first order) or by >= ~4 (second order;
    # midpoint even reaches ~8 on this linear field). The multistep methods take first-order
    # steps at both ends of the schedule, so their ratios approach 4 from below (3.4-3.7 here).
    e1, e2, e3 = _error(name, 64), _error(name, 128), _error(name, 256)
    ratios = (e1 / e2, e2 / e3)
    assert e3 < (0.05 if SAMPLERS[name].order == 1 else 2e-3), (name, e3)
    if SAMPLERS[name].order == 1:
        assert all(1.8 < r < 2.2 for r in ratios), (name, ratios)
    else:
        assert all(r > 3.2 for r in ratios), (name, ratios)


def test_second_order_beats_euler_at_equal_model_calls():
    assert _error("midpoint", 10) < _error("euler", 20)
    assert _error("res_multistep", 20) < _error("euler", 20)


def test_callback_once_per_step_with_denoised_and_exceptions_propagate():
    seen = []
    v = gaussian_velocity(0.0)
    z = _z()
    sample("heun", v, z, flow_sigmas(4), callback=lambda i, n, x, d: seen.append((i, n, d)))
    assert [(i, n) for i, n, _ in seen] == [(0, 4), (1, 4), (2, 4), (3, 4)]
    assert torch.allclose(seen[0][2], MU.expand_as(z))  # x + σ·v = μ for fixed data

    class Cancelled(Exception):
        pass

    def cancel(i, n, x, d):
        if i == 2:
            raise Cancelled

    with pytest.raises(Cancelled):
        sample("dpmpp_2m", v, z, flow_sigmas(6), callback=cancel)


def test_model_calls_per_step():
    calls = []

    def v(x, sigma):
        calls.append(float(sigma))
        return torch.zeros_like(x)

    x = torch.zeros(1, 1, 1, 1)
    sample("midpoint", v, x, flow_sigmas(3, 1.0))
    assert calls == pytest.approx([1.0, 5 / 6, 2 / 3, 0.5, 1 / 3, 1 / 6])
    calls.clear()
    sample("heun", v, x, flow_sigmas(3, 1.0))
    assert len(calls) == 5 and min(calls) > 0  # last step is Euler: never evaluates σ = 0
    calls.clear()
    sample("res_multistep", v, x, flow_sigmas(3, 1.0))
    assert len(calls) == 3


def test_guided_velocity_drives_a_sampler():
    # cond velocity → data μ, uncond → data 0: CFG scale w targets w·μ for straight-line data
    def pair(x2, t2):
        sig = 1 - t2[0].item()
        b = x2.shape[0] // 2
        return torch.cat([(MU.float() - x2[:b]) / sig, (0 - x2[b:]) / sig])

    g = GuidedVelocity(pair, lambda x, t: None, GuidanceConfig(scale=3.0))
    out = sample("euler", g, initial_noise(1, (1, 4, 2, 2)), flow_sigmas(8))
    assert torch.allclose(out, 3.0 * MU.float().expand_as(out), atol=1e-5)


def test_unknown_sampler_and_bad_sigmas():
    with pytest.raises(ValueError, match="unknown sampler 'ddim'.*euler"):
        sample("ddim", lambda x, s: x, torch.zeros(1), flow_sigmas(2))
    with pytest.raises(ValueError, match="decrease"):
        sample("euler", lambda x, s: x, torch.zeros(1), torch.tensor([0.5, 0.8, 0.0]))


@pytest.mark.parametrize("total", [8792, 4396, 1324, 33000, 300, 80])
def test_chunk_candidates_split_the_tokens_into_equal_parts(total):
    import math

    from newbie_core.pipeline.sample import CHUNK_ALIGN, even_chunks
    sizes = even_chunks(total, floor=1024)
    assert sizes == sorted(set(sizes), reverse=True) and all(s < total for s in sizes)
    for size in sizes:
        parts = math.ceil(total / size)
        tail = total - (parts - 1) * size
        assert size % CHUNK_ALIGN == 0 and tail > size - parts * CHUNK_ALIGN, "no small tail pass"
    if total > 2 * 1024:
        assert sizes[-1] <= 1024 < sizes[-2], "stops at the first size at or below the floor"
    assert even_chunks(8792, floor=1024)[0] == 4480


def test_chunk_settings_override_the_candidates():
    from newbie_core.pipeline import MemorySettings
    from newbie_core.pipeline.sample import chunk_candidates
    auto = chunk_candidates(MemorySettings(), batch=2, tokens=4396)
    assert (None, None) in auto and (2304, 4480) in auto and len(auto) > 10
    assert chunk_candidates(MemorySettings(attention_chunk=-1, ffn_chunk=3000), 2, 4396) == ((None, 3000),)
