"""Hand-written Triton bodies for two of the block's functions (``fused.py``).

Measured on an H200 at 1024² CFG (``bench/forward_bench.py --parts``), inductor's kernels ran:
- the QK-norm + RoPE as two kernels that gather each pair's partner element: 82.9 us for 107 MB
  (1.3 TB/s). Here rows are (token, head) pairs, each program holds 32 of them in registers, loads
  them contiguously, swaps RoPE pairs in registers (a reshape and split, no gather) and writes q
  and k once: 40.7 us. The whole forward went from 123.3 to 118.2 ms in the same visit.
- the gated residual at 44.9 us against 43.1 here (one row per program, the gate's tanh taken
  once per sample beforehand, see ``fused.tanh_float``).
Hand versions of the other functions measured no faster (norm_scale 30.1 against 30.1 us; the
residual + norm pair 64.5 against inductor's 51.0), so they stay with inductor.

The maths is the reference bodies': float32 inside, one rounding to the output dtype. The sums
add in another order, so results may differ from inductor's in the last bit; ``fused.py`` checks
each kernel against the reference body once per process and uses inductor's kernel instead when
one is more than one unit in the last place away.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

try:
    import triton
    import triton.language as tl
except ImportError:      # CPU-only installs: fused.py uses its torch bodies
    triton = None

MAX_DIM = 16384                     # longest row held in registers
# function -> (rows per program, warps); the qkv kernel's rows are (token, head) pairs
LAUNCH: dict[str, tuple[int, int]] = {"gated_residual": (1, 8), "qkv_norm_rope": (32, 8)}

if triton is not None:
    _FP16_MAX = tl.constexpr(65504.0)

    @triton.jit
    def _finite(v):
        """inf -> +-65504, nan -> 0 (fused.finite_fp16) for fp16 outputs."""
        v = tl.where(v != v, 0.0, v)
        return tl.minimum(tl.maximum(v, -_FP16_MAX), _FP16_MAX)

    @triton.jit
    def _gated_residual_kernel(x_ptr, y_ptr, w_ptr, g_ptr, out_ptr, n_rows, n_cols, seq, g_stride, eps,
                               HAS_GATE: tl.constexpr, FINITE: tl.constexpr, ROWS: tl.constexpr,
                               BLOCK: tl.constexpr):
        """x + gate * rmsnorm(y) * w, the gate already through its tanh (fused.gated_residual)."""
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK)
        ok = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
        at = rows[:, None] * n_cols + cols[None, :]
        y = tl.load(y_ptr + at, mask=ok, other=0.0).to(tl.float32)
        if FINITE:
            y = _finite(y)
        w = tl.load(w_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
        branch = y * tl.rsqrt(tl.sum(y * y, axis=1) / n_cols + eps)[:, None] * w[None, :]
        if HAS_GATE:
            branch = tl.load(g_ptr + (rows // seq)[:, None] * g_stride + cols[None, :], mask=ok, other=0.0) * branch
        out = tl.load(x_ptr + at, mask=ok, other=0.0).to(tl.float32) + branch
        if FINITE:
            out = _finite(out)
        tl.store(out_ptr + at, out.to(out_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _qkv_norm_rope_kernel(qkv_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, n_pairs, seq, token_stride,
                              c_batch, c_seq, eps, N_HEADS: tl.constexpr, N_KV: tl.constexpr, HEADS: tl.constexpr,
                              D: tl.constexpr, DP: tl.constexpr, ROWS: tl.constexpr):
        """Rows are (token, head) pairs over the q and k heads (``HEADS`` = their count padded to a
        power of two); columns the head dim (``DP`` = ``D`` padded). Each row: RMSNorm with its
        head's weight, then pairs (2j, 2j+1) rotated by the token's cos/sin."""
        r = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        token, head = r // HEADS, r % HEADS
        half = tl.arange(0, DP // 2)
        cols = tl.arange(0, DP)
        row_ok = (token < n_pairs) & (head < N_HEADS + N_KV)
        ok = row_ok[:, None] & (cols < D)[None, :]
        t = tl.load(qkv_ptr + token[:, None] * token_stride + head[:, None] * D + cols[None, :], mask=ok, other=0.0)
        is_q = (head < N_HEADS)[:, None]
        w = tl.where(is_q, tl.load(qw_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)[None, :],
                     tl.load(kw_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)[None, :])
        t = t.to(tl.float32)
        inv = tl.rsqrt(tl.sum(t * t, axis=1) / D + eps)
        n = t * inv[:, None] * w
        even, odd = tl.split(tl.reshape(n, (ROWS, DP // 2, 2)))
        c_at = (token // seq)[:, None] * c_batch + (token % seq)[:, None] * c_seq + half[None, :]
        c_ok = row_ok[:, None] & (half < D // 2)[None, :]
        c = tl.load(cos_ptr + c_at, mask=c_ok, other=0.0)
        s = tl.load(sin_ptr + c_at, mask=c_ok, other=0.0)
        out = tl.reshape(tl.join(even * c + odd * -s, odd * c + even * s), (ROWS, DP))
        out = out.to(q_ptr.dtype.element_ty)
        q_at = token[:, None] * (N_HEADS * D) + head[:, None] * D + cols[None, :]
        k_at = token[:, None] * (N_KV * D) + (head[:, None] - N_HEADS) * D + cols[None, :]
        tl.store(q_ptr + q_at, out, mask=ok & is_q)
        tl.store(k_ptr + k_at, out, mask=ok & ~is_q)


def _rows_of(x: torch.Tensor) -> bool:
    """x (B, S, D) whose rows are contiguous one after another (what the kernels index)."""
    return x.is_contiguous() and x.ndim == 3


def _batch_vector(v: torch.Tensor | None, x: torch.Tensor) -> bool:
    """A float32 (B, 1, D) gate with contiguous features, or None."""
    return v is None or (v.ndim == 3 and v.shape[0] == x.shape[0] and v.shape[1] == 1 and v.shape[2] == x.shape[2]
                         and v.stride(2) == 1 and v.dtype == torch.float32)


def applies(name: str, *args) -> bool:
    """Whether the kernel ``name`` takes these arguments (else fused.py runs its other bodies)."""
    if triton is None or not args[0].is_cuda or args[0].dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return False
    x = args[0]
    if name == "qkv_norm_rope":
        qkv, qw, kw, cos, sin = args[:5]
        return (qkv.ndim == 4 and qkv.stride(3) == 1 and qkv.stride(2) == qkv.shape[3]
                and qkv.stride(0) == qkv.shape[1] * qkv.stride(1) and cos.dtype == torch.float32
                and cos.shape == sin.shape and cos.stride() == sin.stride() and cos.stride(-1) == 1
                and cos.shape[:2] == qkv.shape[:2] and 2 * cos.shape[-1] == qkv.shape[3] and qkv.shape[3] <= 256)
    if not (_rows_of(x) and 0 < x.shape[-1] <= MAX_DIM):
        return False
    if name == "gated_residual":
        return _rows_of(args[1]) and args[1].shape == x.shape and _batch_vector(args[3], x)
    return False


def gated_residual(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, gate: torch.Tensor | None, eps: float,
                   launch: tuple[int, int] | None = None) -> torch.Tensor:
    rows, warps = launch or LAUNCH["gated_residual"]
    n_rows, n_cols = x.shape[0] * x.shape[1], x.shape[2]
    out = torch.empty_like(x)
    _gated_residual_kernel[(triton.cdiv(n_rows, rows),)](x, y, weight, x if gate is None else gate, out, n_rows, n_cols, x.shape[1],
                                    0 if gate is None else gate.stride(0), eps, HAS_GATE=gate is not None,
                                    FINITE=x.dtype == torch.float16, ROWS=rows,
                                    BLOCK=triton.next_power_of_2(n_cols), num_warps=warps)
    return out


def qkv_norm_rope(qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, cos: torch.Tensor,
                  sin: torch.Tensor, eps: float, n_heads: int,
                  launch: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows, warps = launch or LAUNCH["qkv_norm_rope"]
    b, s, total, d = qkv.shape
    n_kv = (total - n_heads) // 2
    heads = triton.next_power_of_2(n_heads + n_kv)
    rows = max(rows, heads)                  # a program covers whole tokens
    q = qkv.new_empty(b, s, n_heads, d)
    k = qkv.new_empty(b, s, n_kv, d)
    n_tokens = b * s
    grid = triton.cdiv(n_tokens * heads, rows)
    _qkv_norm_rope_kernel[(grid,)](qkv, q_weight, k_weight, cos, sin, q, k, n_tokens, s, qkv.stride(1),
                                   cos.stride(0), cos.stride(1), eps, N_HEADS=n_heads, N_KV=n_kv, HEADS=heads, D=d,
                                   DP=triton.next_power_of_2(d), ROWS=rows, num_warps=warps)
    return q, k, qkv[:, :, n_heads + n_kv:]


BODIES: dict[str, Callable] = {"gated_residual": gated_residual, "qkv_norm_rope": qkv_norm_rope}
