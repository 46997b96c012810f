"""Row-wise e4m3 quantisation for fp8 compute in one pass (Triton), bit-identical to the torch path.

fp8 compute quantises nine operands per block and step: five weights and four activations. In the
measured `--fp8-compute` rows (H200, 1024² CFG) that took 25.9 ms of a 121 ms step. One program
here holds whole rows in registers (up to 16384 elements): it reads each row once, takes the
amax, and writes the e4m3 values and the scale.

What made it slow was the division, not the passes: a first version of this kernel, dividing
every element by its row's scale, took 389 us per block, no better than the compiled torch body
(393 us); one reciprocal per row and a multiply take 176 us, 1.08x a plain copy of the same
bytes (bench/fp8_quant_bench.py, same H200). The arithmetic is the torch path's, in the same
order, with IEEE division (``div_rn``; plain ``/`` in Triton is approximate): scale =
max(amax, 1e-12) * fp32(1/448), q = e4m3(clamp(x * (1 / scale))).

The kernel is checked against the torch path once per process (checked_kernel.py); CPU tensors,
installs without Triton and longer rows use the torch path. A streamed block and a resident one
go through the same function, so fp8 compute stays bitwise equal across placement modes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ...checked_kernel import CheckedKernel
from .fp8_matmul import _TINY, E4M3, E4M3_MAX, INV_E4M3_MAX, quantize_rows

try:
    import triton
    import triton.language as tl
except ImportError:      # CPU-only installs: the torch path is used
    triton = None

MAX_ROW = 16384          # longest row held in registers; the blocks' rows are 2304 and 6144

if triton is not None:
    @triton.jit
    def _quantize_rows_kernel(x_ptr, q_ptr, scale_ptr, n_rows, n_cols, stride, tiny, inv_max, fp8_max,
                              ROWS: tl.constexpr, BLOCK: tl.constexpr):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK)
        row_ok = rows < n_rows
        keep = row_ok[:, None] & (cols[None, :] < n_cols)
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride + cols[None, :], mask=keep, other=0.0)
        x = x.to(tl.float32)
        scale = tl.maximum(tl.max(tl.abs(x), axis=1), tiny) * inv_max
        q = x * tl.math.div_rn(1.0, scale)[:, None]
        q = tl.minimum(tl.maximum(q, -fp8_max), fp8_max)
        tl.store(q_ptr + rows[:, None].to(tl.int64) * n_cols + cols[None, :], q.to(q_ptr.dtype.element_ty),
                 mask=keep)
        tl.store(scale_ptr + rows, scale, mask=row_ok)


def _launch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n_rows, n_cols = x.shape
    q = torch.empty((n_rows, n_cols), dtype=E4M3, device=x.device)
    scale = torch.empty((n_rows, 1), dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(n_cols)
    rows = max(1, 4096 // block)                 # about 4096 elements per program (measured best)
    _quantize_rows_kernel[(triton.cdiv(n_rows, rows),)](x, q, scale, n_rows, n_cols, x.stride(0), _TINY,
                                                        INV_E4M3_MAX, E4M3_MAX, ROWS=rows, BLOCK=block, num_warps=4)
    return q, scale


def _applies(x: torch.Tensor) -> bool:
    return (x.is_cuda and x.ndim == 2 and x.stride(-1) == 1 and 0 < x.shape[1] <= MAX_ROW
            and x.dtype in (torch.bfloat16, torch.float16, torch.float32))


def quantize_rows_fast(x: torch.Tensor, fallback: Callable = quantize_rows) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`fp8_matmul.quantize_rows` in one pass where the kernel applies, else ``fallback``
    (that function, or its compiled form)."""
    if _applies(x) and KERNEL.usable(x.device):
        return _launch(x)
    return fallback(x)


def _self_check(device: torch.device) -> None:
    """The kernel against the torch path on rows of the blocks' lengths, odd ones, an all-zero
    row and a strided view, for each input dtype."""
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for shape in ((37, 2304), (5, 6144), (3, 100), (1, 1)):
            x = (torch.randn(shape, generator=g) * 7).to(dtype).to(device)
            x[0] = 0
            for view in (x, torch.cat([x, x], dim=1)[:, : shape[1]]):
                q, scale = _launch(view)
                want_q, want_scale = quantize_rows(view)
                if not (torch.equal(q.view(torch.uint8), want_q.view(torch.uint8)) and torch.equal(scale, want_scale)):
                    raise RuntimeError(f"result differs from the torch quantiser ({dtype}, {tuple(shape)})")


KERNEL = CheckedKernel("fp8 Triton quantiser", triton is not None, _self_check, "the slower torch path")
