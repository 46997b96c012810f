"""The fused block kernels (models/dit/fused.py): their math, one rounding, and the compile switch."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from newbie_core.models.dit import DiTConfig, NextDiT
from newbie_core.models.dit import fused
from newbie_core.models.dit.fused import (Kernels, gated_residual, gated_residual_eager, kernels, norm_scale,
                                          norm_scale_eager, qkv_norm_rope, qkv_norm_rope_eager, swiglu, swiglu_eager)

REFERENCE = (norm_scale, gated_residual, qkv_norm_rope, swiglu)
EAGER = (norm_scale_eager, gated_residual_eager, qkv_norm_rope_eager, swiglu_eager)
BODIES = pytest.mark.parametrize("bodies", [REFERENCE, EAGER], ids=["reference", "eager"])

EPS = 1e-5


def _rms64(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * w.double()


def _data(seed=0, b=2, s=7, d=64, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(b, s, d, generator=g) * 3).to(dtype)
    y = (torch.randn(b, s, d, generator=g) * 5).to(dtype)
    w = (1 + 0.2 * torch.randn(d, generator=g)).to(dtype)
    scale = (0.3 * torch.randn(b, 1, d, generator=g)).to(dtype)
    return x, y, w, scale


@BODIES
def test_norm_scale_and_gated_residual_are_the_sandwich_formulas(bodies):
    norm, residual, _, _ = bodies
    x, y, w, scale = _data()
    ref = _rms64(x, w) * (1 + scale.double())
    assert torch.allclose(norm(x, w, scale, EPS).double(), ref, atol=1e-5)
    assert torch.allclose(norm(x, w, None, EPS).double(), _rms64(x, w), atol=1e-5)
    gate = torch.tanh(scale.float())                         # the blocks pass their gates through tanh first
    ref = x.double() + gate.double() * _rms64(y, w)
    assert torch.allclose(residual(x, y, w, gate, EPS).double(), ref, atol=1e-5)
    assert torch.allclose(residual(x, y, w, None, EPS).double(), x.double() + _rms64(y, w), atol=1e-5)


@BODIES
def test_swiglu_and_qkv_norm_rope_formulas(bodies):
    _, _, qkv_rope, glu = bodies
    a, b, w, _ = _data(1, s=7, d=96)
    assert torch.allclose(glu(a, b).double(), F.silu(a.double()) * b.double(), atol=1e-5)
    qkv = a.view(2, 7, 6, 16)                             # 4 query heads, 1 key head, 1 value head
    angle = torch.rand(2, 7, 8) * 6
    q, k, v = qkv_rope(qkv, w[:16], w[16:32], angle.cos(), angle.sin(), EPS, 4)
    turn = torch.polar(torch.ones_like(angle.double()), angle.double())[:, :, None]     # (B, S, 1, D/2)
    for out, heads, weight in ((q, slice(0, 4), w[:16]), (k, slice(4, 5), w[16:32])):
        normed = _rms64(qkv[:, :, heads], weight).unflatten(-1, (8, 2)).contiguous()
        rot = torch.view_as_real(torch.view_as_complex(normed) * turn).flatten(-2)
        assert torch.allclose(out.double(), rot, atol=1e-5)
    assert q.is_contiguous() and k.is_contiguous() and torch.equal(v, qkv[:, :, 5:])


def test_one_rounding_is_closer_to_fp64_than_the_old_two():
    """bf16 results are rounded once, at the end; the old blocks rounded the norm, then the scale."""
    x, _, w, scale = _data(2, s=512, d=256, dtype=torch.bfloat16)
    ref = _rms64(x, w) * (1 + scale.double())
    xf = x.float()
    old = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)).to(x.dtype) * w * (1 + scale)
    err_new = (norm_scale(x, w, scale, EPS).double() - ref).norm()
    err_old = (old.double() - ref).norm()
    assert err_new < 0.8 * err_old


def test_fp16_outputs_stay_finite():
    x = torch.tensor([[[65000.0, 65000.0]]], dtype=torch.float16)
    y = torch.tensor([[[1.0, -1.0]]], dtype=torch.float16)
    w = torch.full((2,), 1000.0, dtype=torch.float16)
    out = gated_residual(x, y, w, None, EPS)              # 65000 + 1000 overflows fp16
    assert out.dtype == torch.float16 and torch.isfinite(out).all() and out.max() == 65504.0
    assert torch.isfinite(swiglu(torch.full((3,), 300.0, dtype=torch.float16),
                                 torch.full((3,), 300.0, dtype=torch.float16))).all()


def test_compile_request_without_a_gpu_falls_back_with_one_warning(caplog, monkeypatch):
    monkeypatch.setattr(fused, "compile_available", lambda: False)
    with caplog.at_level(logging.WARNING, logger=fused.__name__):
        k = Kernels(compiled=True)
    assert not k.compiled and k.norm_scale is norm_scale_eager
    assert "needs Triton" in caplog.text
    assert kernels(False) is fused.EAGER


def test_set_kernels_reaches_every_block_and_its_parts():
    model = NextDiT(DiTConfig.tiny())
    k = Kernels(compiled=False)
    model.set_kernels(k)
    assert model.kernels is k
    for _, block in model.block_sequence():
        assert block.kernels is k and block.attention.kernels is k and block.feed_forward.kernels is k


def test_persistent_inductor_cache_respects_the_users_choice(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    assert fused.use_persistent_cache() == tmp_path
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    path = fused.use_persistent_cache()
    assert "newbie_core" in str(path) and not str(path).startswith("/tmp/torchinductor")


@pytest.mark.cuda
def test_compiled_kernels_match_eager_on_cuda():
    if not fused.compile_available():
        pytest.skip("needs CUDA and Triton")
    k = Kernels(compiled=True, hand=False)                 # inductor's kernels; the hand ones have their own test
    x, y, w, scale = (t.cuda() for t in _data(3, s=300, d=256, dtype=torch.bfloat16))
    for n in (300, 77):                                     # two token counts: one dynamic kernel
        xs, ys = x[:, :n], y[:, :n]
        assert torch.allclose(k.norm_scale(xs, w, scale, EPS).float(), norm_scale(xs, w, scale, EPS).float(),
                              atol=2e-2, rtol=1e-2)
        gate = torch.tanh(scale.float())
        assert torch.allclose(k.gated_residual(xs, ys, w, gate, EPS).float(),
                              gated_residual(xs, ys, w, gate, EPS).float(), atol=5e-2, rtol=1e-2)
        a, b = xs.reshape(-1, 256), ys.reshape(-1, 256)
        assert torch.allclose(k.swiglu(a.clone(), b).float(), swiglu(a, b).float(), atol=2e-2, rtol=1e-2)
    assert all(getattr(k, name).compiled is not None for name in ("norm_scale", "gated_residual", "swiglu"))


def test_gates_pass_through_tanh_once_per_sample_in_float32():
    mod = torch.randn(2, 1, 8, dtype=torch.bfloat16)
    out = fused.tanh_float(mod)
    assert out.dtype == torch.float32 and torch.equal(out, torch.tanh(mod.float()))


@pytest.mark.cuda
def test_hand_kernels_pass_their_check_and_serve_the_compiled_blocks():
    if not fused.compile_available():
        pytest.skip("needs CUDA and Triton")
    assert fused.HAND_KERNELS.usable(torch.device("cuda"))
    k = Kernels(compiled=True)
    assert isinstance(k.qkv_norm_rope, fused._Hand) and isinstance(k.gated_residual, fused._Hand)
    assert not isinstance(Kernels(compiled=True, hand=False).qkv_norm_rope, fused._Hand)
    g = torch.Generator(device="cuda").manual_seed(0)
    qkv = torch.randn(2, 300, 40, 96, generator=g, device="cuda").bfloat16()
    w = 1 + 0.1 * torch.randn(96, generator=g, device="cuda").bfloat16()
    angle = torch.rand(2, 310, 48, generator=g, device="cuda")[:, :300] * 6      # strided, as the refiners slice
    args = (qkv, w, w, angle.cos(), angle.sin(), EPS, 24)
    for got, want in zip(k.qkv_norm_rope(*args), qkv_norm_rope(*args)):
        assert got.shape == want.shape and fused._ulps(got, want) <= 1
    x, y, w2, scale = (t.cuda() for t in _data(4, s=300, d=2304, dtype=torch.bfloat16))
    gate = torch.tanh(scale.float())
    assert fused._ulps(k.gated_residual(x, y, w2, gate, EPS), gated_residual(x, y, w2, gate, EPS)) <= 1


# -- one compiled copy per signature: dynamo's per-function variant limit ---------------------

def _variants_through(compiled: "fused._Compiled") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """norm_scale over 24 signatures (3 dtypes x 2 feature sizes x scale or none x batch 1 or 2),
    the way a long ComfyUI session meets them; (through the compiled copy, the reference body)."""
    out = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for d in (64, 96):
            for scaled in (False, True):
                for batch in (1, 2):
                    g = torch.Generator().manual_seed(d + batch)
                    x = torch.randn(batch, 7, d, generator=g).to(dtype)
                    w = torch.randn(d, generator=g).to(dtype)
                    s = torch.randn(batch, 1, d, generator=g).to(dtype) if scaled else None
                    out.append((compiled(x, w, s, 1e-6), norm_scale(x, w, s, 1e-6)))
    return out


def _dynamo_eager(fn):
    return torch.compile(fn, fullgraph=True, dynamic=None, backend="eager")


def test_every_dtype_and_feature_size_keeps_its_own_compiled_copy():
    """24 signatures stay compiled: each (dtype, feature size) has its own code object, so none
    reaches dynamo's limit of 8 variants, which a full-graph function answers with an error and
    _Compiled with eager bodies for good. Dynamo's eager backend stands in for inductor (CPU)."""
    torch._dynamo.reset()
    try:
        k = fused._Compiled("norm_scale", norm_scale, norm_scale_eager, (0, 1), {}, compile_fn=_dynamo_eager,
                            cuda_only=False)
        results = _variants_through(k)
        assert k.compiled is not None and len(k.compiled) == 6
        assert all(torch.equal(got, want) for got, want in results)
    finally:
        torch._dynamo.reset()


def test_one_code_object_for_every_signature_falls_back_to_eager(monkeypatch):
    """The same calls on one shared code object hit the limit: the failure the copies prevent."""
    torch._dynamo.reset()
    monkeypatch.setattr(fused, "_fresh_code", lambda fn: fn)
    try:
        k = fused._Compiled("norm_scale", norm_scale, norm_scale_eager, (0, 1), {}, compile_fn=_dynamo_eager,
                            cuda_only=False)
        _variants_through(k)
        assert k.compiled is None
    finally:
        torch._dynamo.reset()


def _gate_up(dtype: torch.dtype, tokens: int = 37, hidden: int = 96, device: str = "cpu"):
    g = torch.Generator().manual_seed(1)
    gate, up = ((torch.randn(tokens, hidden, generator=g) * 4).to(dtype).to(device) for _ in range(2))
    if dtype == torch.float16:                # 300 * silu(300) overflows fp16: clamped to 65504
        gate[0, :2], up[0, :2] = 300.0, 300.0
    return gate, up


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_swiglu_written_over_its_gate_gives_the_bits_of_the_product_in_a_new_tensor(dtype):
    gate, up = _gate_up(dtype)
    for into, plain in ((fused.swiglu_into_eager, swiglu_eager), (fused.swiglu_into, swiglu)):
        buf = gate.clone()
        out = into(buf, up)
        assert out.data_ptr() == buf.data_ptr()
        assert torch.equal(out, plain(gate, up))
    assert Kernels(compiled=False).swiglu is fused.swiglu_into_eager and "swiglu" in fused.IN_PLACE


@pytest.mark.cuda
def test_the_compiled_swiglu_over_its_gate_gives_the_compiled_products_bits():
    if not fused.compile_available():
        pytest.skip("needs CUDA and Triton")
    k = Kernels(compiled=True, hand=False)
    plain = torch.compile(swiglu, fullgraph=True, dynamic=None)
    for dtype in (torch.bfloat16, torch.float16):
        gate, up = _gate_up(dtype, tokens=300, hidden=1024, device="cuda")
        for n in (300, 77):
            buf = gate[:n].clone()
            assert torch.equal(k.swiglu(buf, up[:n]), plain(gate[:n], up[:n]))
            assert torch.equal(buf, plain(gate[:n], up[:n]))


@pytest.mark.cuda
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_the_ffn_holds_two_hidden_tensors_at_most(compiled):
    """w1's output takes the product and w3's goes before w2 runs: the FFN's peak is two
    (tokens x hidden) tensors and its (tokens x dim) result, not three hidden tensors."""
    if compiled and not fused.compile_available():
        pytest.skip("needs Triton")
    from newbie_core.models.dit.blocks import FeedForward
    tokens, dim, hidden = 4096, 256, 2048
    ff = FeedForward(dim, hidden).to("cuda", torch.bfloat16)
    ff.kernels = Kernels(compiled=compiled, hand=False)
    x = torch.randn(tokens, dim, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():                      # as the sampler runs: no tensors kept for backward
        ff(x)                                         # compile and warm cuBLAS outside the measurement
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = ff(x)
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    one_hidden = tokens * hidden * 2
    assert peak <= 2 * one_hidden + out.numel() * 2 + 2**20, f"{peak / one_hidden:.2f} hidden tensors live"
