"""The elementwise parts of a Next-DiT block, each written once as a fusable function.

Between its GEMMs and attention a block does RMSNorms, adaLN scales, tanh gates, residual adds,
RoPE and the SwiGLU product. Written op by op that was ~90 launches per block, each a round trip
through memory, several in float32: measured on an H200 at 1024² with CFG, about 51 ms of a
203 ms step, against 91 ms for all the GEMMs and attention together (issue 10).

Each group below is a function of plain tensors with two bodies. The reference body is the maths
in float32 with one rounding to the compute dtype at the end (the official code rounds after every
norm; one rounding is closer to its float32 forward, BENCHMARKS.md has the drift), and
``torch.compile`` turns it into one Triton kernel. The eager body computes the same from torch's
own fused ops (``F.rms_norm``, ``addcmul``) for runs without torch.compile: the CPU, machines
without Triton, ``--compile off``. :class:`Kernels` hands the blocks one of the two sets. Weights
come in as arguments, so wherever placement put them (resident, a ring slot, an fp8 upcast) the
same kernel runs on the same values: a streamed run stays bitwise equal to a resident one with the
same setting. The blocks' big matmuls also go through :class:`Kernels`: the Linear modules
themselves by default, or fp8 compute (``fp8_matmul.py``, off by default), on the same terms.
"""

from __future__ import annotations

import functools
import logging
import os
import types
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ...checked_kernel import CheckedKernel
from . import fused_triton
from .fp8_matmul import quantize_rows, quantize_tensor, rowwise_supported, scaled_matmul
from .fp8_rows_cuda import quantize_rows_fast

log = logging.getLogger(__name__)

FP16_MAX = 65504.0


def finite_fp16(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Values bound for fp16 stay finite (inf -> +-65504, nan -> 0), as ComfyUI's lumina model
    keeps them; for any other ``dtype`` x passes through untouched."""
    if dtype == torch.float16:
        return torch.nan_to_num(x, nan=0.0, posinf=FP16_MAX, neginf=-FP16_MAX).clamp(-FP16_MAX, FP16_MAX)
    return x


def _rms(xf: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """float32 RMSNorm over the last axis, times the weight (official formula, spec §2.12)."""
    return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()


def _rope(tf: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (t[2j], t[2j+1]) of float32 (B, S, H, D) by cos/sin (B, S, D/2).

    Written as t * c + swap(t) * s over whole rows, not as a stack of two half-size results:
    compiled, that is one contiguous store per row instead of an interleaving one.
    """
    c = torch.stack((cos, cos), dim=-1).flatten(-2).unsqueeze(2)           # c_j at 2j and 2j+1
    s = torch.stack((-sin, sin), dim=-1).flatten(-2).unsqueeze(2)          # -s_j at 2j, s_j at 2j+1
    swapped = tf.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)               # t[2j+1] at 2j, t[2j] at 2j+1
    return tf * c + swapped * s


# -- the reference bodies: float32 inside, one rounding; what torch.compile fuses -------------

def norm_scale(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, eps: float) -> torch.Tensor:
    """rmsnorm(x) * weight * (1 + scale) in x's dtype. x (B, S, D), scale (B, 1, D) or None."""
    y = _rms(finite_fp16(x.float(), x.dtype), weight, eps)
    if scale is not None:
        y = y * (1 + scale.float())
    return finite_fp16(y, x.dtype).to(x.dtype)


def gated_residual(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, gate: torch.Tensor | None,
                   eps: float) -> torch.Tensor:
    """x + gate * rmsnorm(y) * weight in x's dtype (the sandwich norm's second half).

    x, y (B, S, D); gate (B, 1, D) float32, already through its tanh (:func:`tanh_float`: once
    per sample, not per token), or None for the unmodulated context refiner.
    """
    branch = _rms(finite_fp16(y.float(), y.dtype), weight, eps)
    if gate is not None:
        branch = gate * branch
    return finite_fp16(x.float() + branch, x.dtype).to(x.dtype)


def tanh_float(v: torch.Tensor) -> torch.Tensor:
    """tanh in float32: the adaLN gates, (B, 1, 4 * D), one small kernel per block."""
    return torch.tanh(v.float())


def qkv_norm_rope(qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, cos: torch.Tensor,
                  sin: torch.Tensor, eps: float, n_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fused projection (B, S, H + 2 Hkv, D) -> q (B, S, H, D) and k (B, S, Hkv, D), contiguous,
    after QK-norm then RoPE (spec §2.6-2.7), and v (B, S, Hkv, D) as a view of the projection.

    v stays a strided view: SDPA reads it in place, measured faster on an H200 than a
    contiguous copy (0.369 vs 0.393 ms for one 1024² sample's attention).
    """
    n_kv = (qkv.shape[2] - n_heads) // 2
    q, k, v = qkv.split([n_heads, n_kv, n_kv], dim=2)
    q = _rope(_rms(q.float(), q_weight, eps), cos, sin).to(qkv.dtype)
    k = _rope(_rms(k.float(), k_weight, eps), cos, sin).to(qkv.dtype)
    return q, k, v


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up in the inputs' dtype (the product between w1/w3 and w2)."""
    return finite_fp16(F.silu(gate.float()) * up.float(), gate.dtype).to(gate.dtype)


def swiglu_into(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """:func:`swiglu` written over ``gate`` (the FFN's own w1 output, read by nothing else), which
    it returns. The product then needs no buffer of its own: at 1024² with CFG that is one
    (tokens x ffn_dim) tensor, 154.5 MiB, off the FFN's peak, the block's largest. Compiled, the
    same pointwise kernel stores into ``gate`` instead of a new tensor: the same bits."""
    return gate.copy_(swiglu(gate, up))


def residual_norm(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, gate: torch.Tensor | None,
                  norm_weight: torch.Tensor, scale: torch.Tensor | None,
                  eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention's gated residual, then the FFN's input norm of its (rounded) result: both
    outputs, from one read of x when fused (each is the function above it, in that order)."""
    x = gated_residual(x, y, weight, gate, eps)
    return x, norm_scale(x, norm_weight, scale, eps)


# -- eager bodies: the same maths from torch's own fused ops, for runs without torch.compile ----
# (CPU, no Triton, --compile off). Run op by op, the reference bodies' float32 temporaries made
# the eager forward at 1024² CFG 230 ms on an H200; these bodies measured 155 ms there. They round
# after the norm, as the official code does.

def norm_scale_eager(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, eps: float) -> torch.Tensor:
    y = F.rms_norm(finite_fp16(x, x.dtype), (x.shape[-1],), weight, eps)
    return y if scale is None else finite_fp16(torch.addcmul(y, y, scale), x.dtype)


def gated_residual_eager(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, gate: torch.Tensor | None,
                         eps: float) -> torch.Tensor:
    branch = F.rms_norm(finite_fp16(y, y.dtype), (y.shape[-1],), weight, eps)
    out = x + branch if gate is None else torch.addcmul(x, gate.to(x.dtype), branch)
    return finite_fp16(out, x.dtype)


def qkv_norm_rope_eager(qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, cos: torch.Tensor,
                        sin: torch.Tensor, eps: float, n_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n_kv = (qkv.shape[2] - n_heads) // 2
    q, k, v = qkv.split([n_heads, n_kv, n_kv], dim=2)
    hd = qkv.shape[-1]
    q = _rope(F.rms_norm(q, (hd,), q_weight, eps).float(), cos, sin).to(qkv.dtype)
    k = _rope(F.rms_norm(k, (hd,), k_weight, eps).float(), cos, sin).to(qkv.dtype)
    return q, k, v


def swiglu_eager(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return finite_fp16(F.silu(gate) * up, gate.dtype)


def swiglu_into_eager(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """:func:`swiglu_eager` over ``gate``: torch's in-place silu and multiply give the same bits."""
    out = F.silu(gate, inplace=True).mul_(up)
    if gate.dtype == torch.float16:
        out.nan_to_num_(nan=0.0, posinf=FP16_MAX, neginf=-FP16_MAX).clamp_(-FP16_MAX, FP16_MAX)
    return out


def residual_norm_eager(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, gate: torch.Tensor | None,
                        norm_weight: torch.Tensor, scale: torch.Tensor | None,
                        eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    x = gated_residual_eager(x, y, weight, gate, eps)
    return x, norm_scale_eager(x, norm_weight, scale, eps)


# name -> (reference body, eager body, the dims of its tensor arguments that vary with the tokens,
# inductor options). Coordinate-descent tuning where it measured faster on an H200 at 1024² CFG:
# norm_scale 38.7 -> 26.9 us, qkv_norm_rope 137 -> 120 us; gated_residual was slower (57 -> 67).
_CDT = {"coordinate_descent_tuning": True}
_FUNCTIONS: dict[str, tuple[Callable, Callable, tuple[int, ...], dict]] = {
    "norm_scale": (norm_scale, norm_scale_eager, (0, 1), _CDT),
    "gated_residual": (gated_residual, gated_residual_eager, (0, 1), {}),
    "qkv_norm_rope": (qkv_norm_rope, qkv_norm_rope_eager, (0, 1), _CDT),
    "swiglu": (swiglu_into, swiglu_into_eager, (0,), {}),     # in place: see swiglu_into
    "residual_norm": (residual_norm, residual_norm_eager, (0, 1), {}),
    "tanh_float": (tanh_float, tanh_float, (0,), {}),
}
# The functions of _FUNCTIONS that write their result over their first argument.
IN_PLACE = frozenset({"swiglu"})


def compile_available() -> bool:
    """torch.compile can build GPU kernels here (Triton importable, a CUDA device present)."""
    try:
        from torch.utils._triton import has_triton
    except ImportError:
        return False
    return torch.cuda.is_available() and has_triton()


def use_persistent_cache() -> Path:
    """Point inductor's cache at the user cache dir unless the user chose one.

    Its default sits in /tmp, which many systems empty at boot: the compile cost would come back
    after every restart. Triton's own kernel cache already lives in the home directory.
    """
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        from platformdirs import user_cache_dir
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(user_cache_dir("newbie_core")) / "inductor")
    return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])


class _Compiled:
    """One function through torch.compile, with its token dims marked dynamic up front.

    Dynamic from the first call, so one kernel serves every caption length and image size: which
    kernel runs never depends on which sizes came before (a static first compile, then an
    automatic dynamic one, would give a 512² run after a 1024² run other kernels than a fresh one).

    One compiled copy per (dtype, feature size) of the first argument, each on its own code
    object: dynamo keeps at most ``recompile_limit`` (8) variants per code object, and a full-graph
    function past it raises. A long ComfyUI session that switches dtypes (bf16 / fp16 / fp32 ×
    modulated or not × batch 1 or more) reached it and ran eagerly from then on. Each copy
    compiles the graph the single function would for its signature, so the kernels are the same.
    A compile failure, or a CPU tensor, runs the eager body instead (a failure for good, with one
    warning).
    """

    def __init__(self, name: str, fn: Callable, eager: Callable, dynamic_dims: tuple[int, ...], options: dict,
                 compile_fn: Callable[[Callable], Callable] | None = None, cuda_only: bool = True):
        self.name, self.fn, self.eager, self.dims, self.cuda_only = name, fn, eager, dynamic_dims, cuda_only
        # dynamic=None: the dims marked below are symbolic from the first compile on; the rest
        # (feature sizes, head counts) stay static, so reductions are specialised to them.
        self._compile = compile_fn or (lambda f: torch.compile(f, fullgraph=True, dynamic=None,
                                                               options=options or None))
        self.compiled: dict[tuple, Callable[..., torch.Tensor]] | None = {}   # None: failed, eager for good

    def _for(self, x: torch.Tensor) -> Callable[..., torch.Tensor]:
        key = (x.dtype, x.shape[-1])
        compiled = self.compiled.get(key)
        if compiled is None:
            compiled = self.compiled[key] = self._compile(_fresh_code(self.fn))
        return compiled

    def __call__(self, *args):
        if self.compiled is None or (self.cuda_only and not args[0].is_cuda):
            return self.eager(*args)
        for t in args:
            if isinstance(t, torch.Tensor) and t.ndim > max(self.dims):
                for d in self.dims:
                    if t.shape[d] > 1:          # sizes 0 and 1 are always specialised
                        torch._dynamo.maybe_mark_dynamic(t, d)
        try:
            return self._for(args[0])(*args)
        except Exception as e:   # noqa: BLE001 - inductor/Triton failures of any kind: fall back
            if isinstance(e, torch.cuda.OutOfMemoryError):
                raise
            log.warning("torch.compile of %s failed (%s: %s); it runs eagerly from now on (same math, "
                        "more launches).", self.name, type(e).__name__, str(e).splitlines()[0][:200])
            self.compiled = None
            return self.eager(*args)


def _fresh_code(fn: Callable) -> Callable:
    """``fn`` on a copy of its code object: what dynamo keys its compiled variants by."""
    copy = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__, copy.__qualname__ = fn.__kwdefaults__, fn.__qualname__
    return copy


# The functions whose hand-written Triton body (fused_triton.py) replaces inductor's kernel where
# it applies; measured on an H200 at 1024² CFG (bench/forward_bench.py --parts), inductor against
# hand: qkv_norm_rope 82.9 -> 40.7 us, gated_residual 44.9 -> 43.1 us.
HAND_FUNCTIONS = frozenset(fused_triton.BODIES)


def _ulps(got: torch.Tensor, want: torch.Tensor) -> float:
    """The largest difference in units of ``want``'s last place: its dtype's epsilon times its
    magnitude, or its row's mean magnitude where that is larger (a value cancelled to near zero
    carries the rounding of the larger values it came from)."""
    w = want.float().abs()
    unit = torch.maximum(w, w.mean(-1, keepdim=True)).clamp_min(torch.finfo(torch.float32).tiny)
    return ((got.float() - want.float()).abs() / (unit * torch.finfo(want.dtype).eps)).max().item()


# How far a hand kernel may be from its reference body, in units of the last place: one for the
# 16-bit outputs (one rounding of nearly the same float32 value); float32 outputs carry the
# reordered sums and the hardware rsqrt themselves (the fp32 forward's 1e-5 parity has room).
HAND_ULPS = {torch.bfloat16: 1.0, torch.float16: 1.0, torch.float32: 16.0}


def _check_hand(device: torch.device,
                dtypes: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16, torch.float32)) -> None:
    """Each hand-written kernel against its reference body: odd row counts, a strided (B, 1, D)
    gate, no gate, fp16 inputs beyond its range, strided cos/sin. ``HAND_ULPS`` apart at most
    (the sums add in another order)."""
    g = torch.Generator().manual_seed(0)

    def rnd(*shape, dtype):
        return (torch.randn(*shape, generator=g) * 3).to(dtype).to(device)
    for dtype in dtypes:
        b, s, d, hd = 2, 37, 200, 32
        x, y, w, w2 = rnd(b, s, d, dtype=dtype), rnd(b, s, d, dtype=dtype), rnd(d, dtype=dtype), rnd(d, dtype=dtype)
        if dtype == torch.float16:
            y[0, 0, :3] = torch.tensor([float("inf"), -float("inf"), float("nan")])
        gates = tanh_float(rnd(b, 4 * d, dtype=dtype).unsqueeze(1)).chunk(4, dim=-1)   # strided views
        results = [(fused_triton.gated_residual(x, y, w, gate, 1e-5), gated_residual(x, y, w, gate, 1e-5))
                   for gate in (gates[1], None)]
        qkv = rnd(b, s, 5, hd, dtype=dtype)
        angle = rnd(b, s + 3, hd // 2, dtype=torch.float32)[:, :s]
        args = (qkv, w[:hd], w2[:hd], angle.cos(), angle.sin(), 1e-5, 3)
        results += list(zip(fused_triton.qkv_norm_rope(*args), qkv_norm_rope(*args)))
        for i, (got, want) in enumerate(results):
            if not got.isfinite().all() or _ulps(got, want) > HAND_ULPS[dtype]:
                raise RuntimeError(f"result {i} ({dtype}) is {_ulps(got, want):.1f} units in the last place "
                                   "from the reference body")


HAND_KERNELS = CheckedKernel("hand-written Triton block kernels", fused_triton.triton is not None, _check_hand,
                             "inductor's kernels")


class _Hand:
    """A function's hand-written body where it takes the arguments (CUDA, the layouts it indexes)
    and has passed its check on this process's GPU; otherwise ``fallback``, the compiled reference."""

    def __init__(self, name: str, fallback: Callable):
        self.name, self.fallback, self.body = name, fallback, fused_triton.BODIES[name]

    def __call__(self, *args):
        if fused_triton.applies(self.name, *args) and HAND_KERNELS.usable(args[0].device):
            return self.body(*args)
        return self.fallback(*args)


class _Fp8Linears:
    """The blocks' matmuls on e4m3 operands (fp8_matmul.py): each weight quantised once per
    :meth:`Kernels.weights` call, the input once per group of matmuls that share it (w1 and
    w3), then ``torch._scaled_mm``. Row-wise quantisation runs the one-pass Triton kernel
    (fp8_rows_cuda.py) wherever it applies, compiled or not, so ``--compile off`` changes no
    fp8 operand."""

    def __init__(self, compiled: bool):
        if compiled:
            rows = _Compiled("quantize_rows", quantize_rows, quantize_rows, (0,), {})
            self.tensor = _Compiled("quantize_tensor", quantize_tensor, quantize_tensor, (0,), {})
        else:
            rows, self.tensor = quantize_rows, quantize_tensor
        self.rows = functools.partial(quantize_rows_fast, fallback=rows)
        self._rowwise: dict[torch.device, bool] = {}

    def quantizer(self, device: torch.device) -> Callable:
        """Row-wise where the GPU supports it, one scale per tensor elsewhere (fp8_matmul.py)."""
        if device not in self._rowwise:
            self._rowwise[device] = rowwise_supported(device)
        return self.rows if self._rowwise[device] else self.tensor

    def weight(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.quantizer(w.device)(w)

    def __call__(self, x: torch.Tensor, weights: tuple[tuple[torch.Tensor, torch.Tensor], ...]) -> list[torch.Tensor]:
        xq, xs = self.quantizer(x.device)(x.reshape(-1, x.shape[-1]))
        return [scaled_matmul(xq, xs, wq, ws, x.dtype).view(*x.shape[:-1], wq.shape[0]) for wq, ws in weights]


class Kernels:
    """The four block functions: reference bodies through torch.compile, or the eager bodies;
    and how the blocks' big matmuls run: the modules themselves, or fp8 compute.

    ``compiled=None`` means auto: compiled where :func:`compile_available`. Blocks keep a
    reference, set by ``NextDiT.set_kernels``; graphs.module_structure ignores it (not a plain
    attribute), which is right: it does not change which weights a block reads.
    """

    def __init__(self, compiled: bool | None = None, fp8_compute: bool = False, hand: bool = True):
        want = compile_available() if compiled is None else compiled
        if want and not compile_available():
            log.warning("torch.compile was asked for but needs Triton and a CUDA GPU; running eagerly.")
            want = False
        self.compiled, self.fp8_compute, self.hand = want, fp8_compute, want and hand
        if want:
            log.debug("fused DiT kernels compile with inductor, cache %s", use_persistent_cache())
        for name, (fn, eager, dims, options) in _FUNCTIONS.items():
            body = _Compiled(name, fn, eager, dims, options) if want else eager
            setattr(self, name, _Hand(name, body) if self.hand and name in HAND_FUNCTIONS else body)
        self._fp8 = _Fp8Linears(want) if fp8_compute else None

    def weights(self, modules: tuple[nn.Linear, ...]) -> tuple:
        """What :meth:`linears` multiplies by: the bias-free Linear modules themselves, or with
        fp8 compute their quantised weights, made once here so the token chunks of one FFN call
        share them.

        Without fp8 compute the modules are called, so hooks on them (diffusers' and accelerate's
        offloading, which the peer benchmark runs on this model) still fire.
        """
        if self._fp8 is None:
            return tuple(modules)
        return tuple(self._fp8.weight(m.weight) for m in modules)

    def linears(self, x: torch.Tensor, weights: tuple) -> list[torch.Tensor]:
        """``x`` times each of ``weights`` (from :meth:`weights`)."""
        if self._fp8 is None:
            return [m(x) for m in weights]
        return self._fp8(x, weights)

    def linear(self, x: torch.Tensor, module: nn.Linear) -> torch.Tensor:
        return self.linears(x, self.weights((module,)))[0]

    def __repr__(self) -> str:
        return f"Kernels(compiled={self.compiled}, fp8_compute={self.fp8_compute}, hand={self.hand})"


EAGER = Kernels(compiled=False)
_SHARED: dict[tuple[bool, bool, bool], Kernels] = {(False, False, False): EAGER}


def kernels(compiled: bool | None = None, fp8_compute: bool = False, hand: bool = True) -> Kernels:
    """The process-wide Kernels for a setting (compiled code is cached per function anyway).
    ``hand=False`` keeps inductor's kernels everywhere (benchmarks compare the two)."""
    want = compile_available() if compiled is None else compiled
    key = (want, fp8_compute, want and hand)
    if key not in _SHARED:
        _SHARED[key] = Kernels(compiled=want, fp8_compute=fp8_compute, hand=hand)
    return _SHARED[key]
