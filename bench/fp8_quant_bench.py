"""Why does the one-pass fp8 row quantiser run at a quarter of the bandwidth? (issue 10)

Times variants of the kernel on the nine operands a block quantises per step at 1024² CFG
(8704 tokens): IEEE division per element vs one reciprocal per row then a multiply, 4 vs 8
warps, elements per program; beside a plain bf16 copy of the same bytes (the bandwidth
ceiling) and the compiled torch body. Prints µs per call and GB/s (read + write).

    python bench/fp8_quant_bench.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from newbie_core.models.dit.fp8_matmul import quantize_rows  # noqa: E402

TOKENS = 8704
SHAPES = {"x->qkv": (TOKENS, 2304), "attn->out": (TOKENS, 2304), "x->w1w3": (TOKENS, 2304),
          "swiglu->w2": (TOKENS, 6144), "W qkv": (3840, 2304), "W out": (2304, 2304), "W w1": (6144, 2304),
          "W w3": (6144, 2304), "W w2": (2304, 6144)}


@triton.jit
def _variant(x_ptr, q_ptr, scale_ptr, n_rows, n_cols, stride, tiny, inv_max, fp8_max,
             ROWS: tl.constexpr, BLOCK: tl.constexpr, RECIP: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    row_ok = rows < n_rows
    keep = row_ok[:, None] & (cols[None, :] < n_cols)
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride + cols[None, :], mask=keep, other=0.0).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(x), axis=1), tiny) * inv_max
    if RECIP:
        q = x * tl.math.div_rn(1.0, scale)[:, None]
    else:
        q = tl.math.div_rn(x, scale[:, None])
    q = tl.minimum(tl.maximum(q, -fp8_max), fp8_max)
    tl.store(q_ptr + rows[:, None].to(tl.int64) * n_cols + cols[None, :], q.to(q_ptr.dtype.element_ty), mask=keep)
    tl.store(scale_ptr + rows, scale, mask=row_ok)


def run(x, recip, warps, per_program):
    m, k = x.shape
    q = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(k)
    rows = max(1, per_program // block)
    _variant[(triton.cdiv(m, rows),)](x, q, s, m, k, x.stride(0), 1e-12, 1.0 / 448, 448.0, ROWS=rows, BLOCK=block,
                                      RECIP=recip, num_warps=warps)
    return q, s


def main() -> None:
    torch.manual_seed(0)
    compiled = torch.compile(quantize_rows, dynamic=False)
    variants = [(r, w, p) for r in (False, True) for w in (4, 8) for p in (4096, 8192)]
    print("operand".ljust(12), "copy", "compiled", *[f"{'rcp' if r else 'div'}/w{w}/{p}" for r, w, p in variants])
    totals = [0.0] * (2 + len(variants))
    for name, shape in SHAPES.items():
        x = (torch.randn(shape, device="cuda") * 3).bfloat16()
        moved = x.numel() * 3                                    # bf16 read + e4m3 write
        dst = torch.empty(x.numel() * 3 // 4, dtype=torch.bfloat16, device="cuda")   # same bytes moved
        src = torch.empty_like(dst)
        times = [do_bench(lambda: dst.copy_(src), warmup=25, rep=100, return_mode="median"),
                 do_bench(lambda: compiled(x), warmup=25, rep=100, return_mode="median")]
        want = quantize_rows(x)
        for r, w, p in variants:
            got = run(x, r, w, p)
            same = torch.equal(got[0].view(torch.uint8), want[0].view(torch.uint8))
            times.append(do_bench(lambda: run(x, r, w, p), warmup=25, rep=100, return_mode="median"))
            if not same and not r:
                print(f"  {name}: div variant differs from torch")
        totals = [a + b for a, b in zip(totals, times)]
        print(name.ljust(12), " ".join(f"{t * 1e3:7.1f}us/{moved / t / 1e6:5.0f}GB/s" for t in times))
    print("per block".ljust(12), " ".join(f"{t * 1e3:7.1f}us" for t in totals))


if __name__ == "__main__":
    main()
