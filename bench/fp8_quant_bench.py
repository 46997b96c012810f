"""Why did the one-pass fp8 row quantiser run at a third of the bandwidth? (issue 10)

Times variants of the kernel on the nine operands a block quantises per step at 1024² CFG
(8704 tokens): an IEEE division per element (div) against one reciprocal per row then a
multiply (rcp), 4 vs 8 warps, elements per program; beside a plain copy of the same bytes (the
bandwidth ceiling) and the compiled torch body. Prints µs per call and GB/s (read + write), then
µs per block; bench/collect.py --fp8-quant reads that table.

    python bench/fp8_quant_bench.py             # CUDA + Triton
    python bench/fp8_quant_bench.py --smoke     # CPU: the torch path on small shapes (CI)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from newbie_core.models.dit.fp8_matmul import E4M3, E4M3_MAX, INV_E4M3_MAX, quantize_rows  # noqa: E402

TOKENS = 8704
SHAPES = {"x->qkv": (TOKENS, 2304), "attn->out": (TOKENS, 2304), "x->w1w3": (TOKENS, 2304),
          "swiglu->w2": (TOKENS, 6144), "W qkv": (3840, 2304), "W out": (2304, 2304), "W w1": (6144, 2304),
          "W w3": (6144, 2304), "W w2": (2304, 6144)}
VARIANTS = [(recip, warps, per) for recip in (False, True) for warps in (4, 8) for per in (4096, 8192)]


def triton_variants() -> dict:
    """name -> callable(x) for each kernel variant (needs Triton and CUDA)."""
    import triton
    import triton.language as tl

    @triton.jit
    def variant(x_ptr, q_ptr, scale_ptr, n_rows, n_cols, stride, tiny, inv_max, fp8_max,
                ROWS: tl.constexpr, BLOCK: tl.constexpr, RECIP: tl.constexpr):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK)
        row_ok = rows < n_rows
        keep = row_ok[:, None] & (cols[None, :] < n_cols)
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride + cols[None, :], mask=keep, other=0.0)
        x = x.to(tl.float32)
        scale = tl.maximum(tl.max(tl.abs(x), axis=1), tiny) * inv_max
        if RECIP:
            q = x * tl.math.div_rn(1.0, scale)[:, None]
        else:
            q = tl.math.div_rn(x, scale[:, None])
        q = tl.minimum(tl.maximum(q, -fp8_max), fp8_max)
        tl.store(q_ptr + rows[:, None].to(tl.int64) * n_cols + cols[None, :], q.to(q_ptr.dtype.element_ty),
                 mask=keep)
        tl.store(scale_ptr + rows, scale, mask=row_ok)

    def launcher(recip: bool, warps: int, per_program: int):
        def run(x: torch.Tensor):
            m, k = x.shape
            q = torch.empty((m, k), dtype=E4M3, device=x.device)
            s = torch.empty((m, 1), dtype=torch.float32, device=x.device)
            block = triton.next_power_of_2(k)
            rows = max(1, per_program // block)
            variant[(triton.cdiv(m, rows),)](x, q, s, m, k, x.stride(0), 1e-12, INV_E4M3_MAX, E4M3_MAX, ROWS=rows,
                                             BLOCK=block, RECIP=recip, num_warps=warps)
            return q, s
        return run

    return {f"{'rcp' if r else 'div'}/w{w}/{p}": launcher(r, w, p) for r, w, p in VARIANTS}


def median_ms(fn, repeats: int) -> float:
    """Median wall time of ``fn`` in ms; CUDA work is synchronised around each call."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, torch path, shapes / 64 (CI)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    device = "cpu" if args.smoke else "cuda"
    shapes = {k: (m // 64, n // 64) for k, (m, n) in SHAPES.items()} if args.smoke else SHAPES
    if args.smoke:
        timer, variants = (lambda fn: median_ms(fn, 5)), {"eager": quantize_rows}
    else:
        from triton.testing import do_bench
        timer = lambda fn: do_bench(fn, warmup=25, rep=100, return_mode="median")  # noqa: E731
        variants = {"compiled": torch.compile(quantize_rows, dynamic=False), **triton_variants()}
    print("operand".ljust(12), "copy", *variants)
    totals = [0.0] * (1 + len(variants))
    for name, shape in shapes.items():
        x = (torch.randn(shape, device=device) * 3).bfloat16()
        moved = x.numel() * 3                                    # bf16 read + e4m3 write
        src = torch.empty(x.numel() * 3 // 4, dtype=torch.bfloat16, device=device)   # the same bytes moved
        dst = torch.empty_like(src)
        want = quantize_rows(x)
        times = [timer(lambda: dst.copy_(src))]
        for label, fn in variants.items():
            q, scale = fn(x)
            if not (torch.equal(q.view(torch.uint8), want[0].view(torch.uint8)) and torch.equal(scale, want[1])):
                print(f"  {name}: {label} differs from the torch quantiser")
            times.append(timer(lambda: fn(x)))
        totals = [a + b for a, b in zip(totals, times)]
        print(name.ljust(12), " ".join(f"{t * 1e3:7.1f}us/{moved / t / 1e6:5.0f}GB/s" for t in times))
    print("per block".ljust(12), " ".join(f"{t * 1e3:7.1f}us" for t in totals))
    return 0


if __name__ == "__main__":
    sys.exit(main())
