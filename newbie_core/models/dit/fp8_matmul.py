"""Optional fp8 compute for the blocks' big matmuls: e4m3 operands, scaled, bf16 out (issue 10.3).

The GEMMs are about 70 ms of a 1024² CFG step on an H200 in bf16. Hopper and Ada tensor cores
run e4m3 at twice the bf16 rate, so ``torch._scaled_mm`` on e4m3 operands can take much of that
away, at a cost in precision (BENCHMARKS.md gives the latent drift). It is off by default
(``--fp8-compute``), as ComfyUI's ``--fast`` is.

Scaling, both operands quantised on the fly from the compute-dtype values the block already has:

- activations per row (token): ``s = amax(|x_row|) / 448``, ``q = e4m3(x / s)``;
- weights per output row: the same over each row of ``W``.

So an fp8 weight file and a bf16 one take the same path (the slot holds compute-dtype weights
either way), placement is untouched, and a streamed block computes on the same values as a
resident one: streamed stays bitwise equal to resident. Row-wise scales need sm_90 (Hopper);
on Ada (sm_89) one scale per tensor is used. The quantisers are plain functions: on CUDA the
row-wise one runs as a one-pass Triton kernel with the same bits (fp8_rows_cuda.py), and
``fused.Kernels`` compiles the per-tensor one like the other block functions.
"""

from __future__ import annotations

import torch

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
# A scale is amax times this reciprocal, not amax / 448: torch on CUDA turns a division by a Python
# scalar into that product anyway, so written so the CPU, CUDA and the Triton kernel
# (fp8_rows_cuda.py) all round the same product.
INV_E4M3_MAX = 1.0 / E4M3_MAX
_TINY = 1e-12        # an all-zero row gets scale 1e-12/448 instead of 0 (no division by zero)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) -> e4m3 (M, K) and its float32 scales (M, 1): one scale per row."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp(min=_TINY) * INV_E4M3_MAX
    # times the row's reciprocal, not divided by the scale: one IEEE division per row instead of
    # per element made the Triton kernel 2.2x faster (bench/fp8_quant_bench.py)
    return (xf * scale.reciprocal()).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


def quantize_tensor(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) -> e4m3 (M, K) and one float32 scale (0-dim) for the whole tensor."""
    xf = x.float()
    scale = xf.abs().amax().clamp(min=_TINY) * INV_E4M3_MAX
    return (xf / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


def rowwise_supported(device: torch.device) -> bool:
    """Row-wise scaled e4m3 matmuls: Hopper and newer on CUDA, and the CPU (torch's own kernel)."""
    if device.type != "cuda":
        return True
    return torch.cuda.get_device_capability(device) >= (9, 0)


def fp8_compute_problem(device: torch.device) -> str | None:
    """Why fp8 compute cannot run on ``device``, in words for the user, or None when it can."""
    if device.type != "cuda":
        return ("fp8 compute needs an NVIDIA GPU with fp8 tensor cores (Ada or Hopper); this run is on "
                f"{device.type}. Leave fp8 compute off.")
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        name = torch.cuda.get_device_name(device)
        return (f"fp8 compute needs fp8 tensor cores (Ada or Hopper, compute capability 8.9 or newer); "
                f"{name} is {major}.{minor}. Leave fp8 compute off (fp8 weight storage still works).")
    return None


def scaled_matmul(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                  out_dtype: torch.dtype) -> torch.Tensor:
    """(M, K) e4m3 times (N, K) e4m3 transposed -> (M, N) in ``out_dtype``, with the scales applied.

    Row-wise: x_scale (M, 1), w_scale (N, 1). Per tensor: both 0-dim.
    """
    if x_scale.ndim:
        w_scale = w_scale.view(1, -1)
    return torch._scaled_mm(xq, wq.t(), scale_a=x_scale, scale_b=w_scale, out_dtype=out_dtype)
