"""Optional fp8 compute (models/dit/fp8_matmul.py): the quantisers, the matmul, the switch.

The CPU runs torch's own scaled e4m3 matmul, so the whole path is exercised here; the CUDA tier
(test_cuda_pipeline.py) checks the same path under placement: streamed == resident.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from newbie_core.models.dit import DiTConfig, NextDiT
from newbie_core.models.dit.fp8_matmul import (E4M3, E4M3_MAX, fp8_compute_problem, quantize_rows,
                                               quantize_tensor, scaled_matmul)
from newbie_core.models.dit.fused import Kernels, kernels


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_row_quantiser_uses_the_full_e4m3_range_per_row():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 64, generator=g) * torch.tensor([1e-3, 1.0, 30.0, 1e3, 0.0])[:, None]
    q, s = quantize_rows(x)
    assert q.dtype == E4M3 and s.shape == (5, 1) and s.dtype == torch.float32
    assert torch.all(q[:4].float().abs().amax(-1) == E4M3_MAX)          # every non-zero row reaches 448
    assert torch.all(q[4].float() == 0) and torch.isfinite(s).all()      # a zero row stays zero, no 0/0
    back = q.float() * s
    for row in range(4):                                                  # e4m3: 3 mantissa bits
        assert _rel(back[row], x[row]) < 0.04


def test_tensor_quantiser_has_one_scale():
    x = torch.randn(8, 32) * 7
    q, s = quantize_tensor(x)
    assert s.ndim == 0 and float(q.float().abs().max()) == E4M3_MAX
    assert _rel(q.float() * s, x) < 0.04


@pytest.mark.parametrize("quantize", [quantize_rows, quantize_tensor])
def test_scaled_matmul_equals_the_dequantised_product(quantize):
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(24, 64, generator=g), torch.randn(48, 64, generator=g)
    (xq, xs), (wq, ws) = quantize(x), quantize(w)
    out = scaled_matmul(xq, xs, wq, ws, torch.float32)
    reference = (xq.float() * xs) @ (wq.float() * ws).t()
    assert out.shape == (24, 48) and _rel(out, reference) < 1e-5
    assert 1e-4 < _rel(out, x @ w.t()) < 0.06              # fp8 really ran: close, not equal


def test_without_fp8_the_linear_modules_themselves_run():
    """diffusers' and accelerate's offloading hook nn.Linear.forward: it must still be called."""
    lin, calls = nn.Linear(16, 8, bias=False), []
    lin.register_forward_pre_hook(lambda m, a: calls.append(m))
    x = torch.randn(3, 16)
    assert torch.equal(Kernels(compiled=False).linear(x, lin), lin(x)) and len(calls) == 2
    out = Kernels(compiled=False, fp8_compute=True).linear(x, lin)
    assert len(calls) == 2 and out.shape == (3, 8)


def test_fp8_compute_forward_is_close_to_bf16_and_not_equal():
    torch.manual_seed(0)
    model = NextDiT(DiTConfig.tiny()).to(torch.bfloat16)
    b, cfg = 2, model.config
    x = torch.randn(b, cfg.in_channels, 16, 16, dtype=torch.bfloat16)
    t = torch.tensor([0.3, 0.7])
    cap = torch.randn(b, 12, cfg.cap_feat_dim, dtype=torch.bfloat16)
    mask = torch.ones(b, 12, dtype=torch.bool)
    pooled = torch.randn(b, cfg.clip_text_dim, dtype=torch.bfloat16)
    with torch.no_grad():
        model.set_kernels(kernels(False))
        ref = model(x, t, cap, mask, pooled)
        model.set_kernels(kernels(False, fp8_compute=True))
        fp8 = model(x, t, cap, mask, pooled)
    assert torch.isfinite(fp8).all()
    assert 1e-4 < _rel(fp8, ref) < 0.1


def test_fp8_compute_is_refused_where_there_are_no_fp8_tensor_cores(monkeypatch):
    assert "Leave fp8 compute off" in fp8_compute_problem(torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 6))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA GeForce RTX 3060")
    msg = fp8_compute_problem(torch.device("cuda", 0))
    assert "RTX 3060 is 8.6" in msg and "compute capability 8.9" in msg
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (9, 0))
    assert fp8_compute_problem(torch.device("cuda", 0)) is None


def test_cli_refuses_fp8_compute_on_the_cpu_before_any_weights(tmp_path, monkeypatch, capsys):
    from newbie_core import cli
    from newbie_core.models import checkpoint

    def refuse(self, raw_key):
        raise AssertionError("weights were read before the inputs were checked")
    monkeypatch.setattr(checkpoint.TensorSource, "_get_raw", refuse)
    rc = cli.main(["generate", "--prompt", "a", "--out", str(tmp_path / "o.png"), "--device", "cpu",
                   "--fp8-compute"])
    err = capsys.readouterr().err
    assert rc == 2 and "--fp8-compute: fp8 compute needs an NVIDIA GPU with fp8 tensor cores" in err


def test_a_chunked_ffn_quantises_each_weight_once_per_call():
    """Token chunks share the quantised weights: 3 weight quantisations per FFN call, and two
    input quantisations per chunk (before w1|w3, before w2)."""
    from newbie_core.models.dit.blocks import FeedForward

    torch.manual_seed(0)
    ffn = FeedForward(32, 64)
    k = Kernels(compiled=False, fp8_compute=True)
    shapes: list[tuple[int, ...]] = []
    plain = k._fp8.rows
    k._fp8.rows = lambda t: (shapes.append(tuple(t.shape)), plain(t))[1]
    ffn.kernels = k
    x = torch.randn(2, 10, 32)
    whole = ffn(x)
    ffn.token_chunk = 6                                   # 20 tokens: chunks of 6, 6, 6, 2
    shapes.clear()
    chunked = ffn(x)
    weights = [s for s in shapes if s in ((64, 32), (32, 64))]
    assert len(weights) == 3 and len(shapes) - len(weights) == 2 * 4
    # Row-wise scales: chunking changes no operand; the CPU's scaled GEMM rounds its float32
    # epilogue differently for other row counts (seen: 9e-8 on values up to 0.45).
    assert torch.allclose(chunked, whole, rtol=1e-5, atol=1e-6)


def test_row_quantiser_falls_back_off_the_gpu():
    """CPU tensors (and rows longer than the kernel holds) take the fallback it is given."""
    from newbie_core.models.dit import fp8_rows_cuda

    calls = []
    x = torch.randn(4, 8)
    q, scale = fp8_rows_cuda.quantize_rows_fast(x, fallback=lambda t: (calls.append(t), quantize_rows(t))[1])
    want_q, want_scale = quantize_rows(x)
    assert calls and torch.equal(q.view(torch.uint8), want_q.view(torch.uint8)) and torch.equal(scale, want_scale)
    assert not fp8_rows_cuda._applies(torch.randn(2, fp8_rows_cuda.MAX_ROW + 1))


@pytest.mark.cuda
@pytest.mark.parametrize("shape", [(8704, 2304), (8704, 6144), (3840, 2304), (2304, 6144), (7, 33)])
def test_triton_row_quantiser_is_bitwise_the_torch_one(shape):
    """The one-pass kernel gives the torch path's bits, on the blocks' operand shapes, and is the
    path actually taken (its self-check passed)."""
    from newbie_core.models.dit import fp8_rows_cuda

    x = (torch.randn(shape, device="cuda") * 5).bfloat16()
    q, scale = fp8_rows_cuda.quantize_rows_fast(x, fallback=lambda t: pytest.fail("the kernel stood down"))
    want_q, want_scale = quantize_rows(x)
    assert fp8_rows_cuda.KERNEL.ok
    assert torch.equal(q.view(torch.uint8), want_q.view(torch.uint8)) and torch.equal(scale, want_scale)
