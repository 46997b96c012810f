"""The resident DiT forward alone: ms, TFLOP/s, launches, and where the time goes.

Full-size random weights drawn on the GPU (seeded), the sampler's real input shapes, our forward
with the fused kernels eager and compiled, and optionally the same with CUDA graphs. Each variant
is timed as the median of ``--iters`` forwards after warm-up (the first call, which compiles, is
reported on its own), then profiled once: GEMM / attention / elementwise / copies / idle.

    python bench/forward_bench.py --out $OUT                       # 1024² CFG and 512² no CFG
    python bench/forward_bench.py --parts --out $OUT               # SDPA backends, fused variants
    python bench/forward_bench.py --smoke                          # tiny model on the CPU (CI)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from newbie_core.models.dit import DiTConfig, NextDiT, flops_per_forward  # noqa: E402
from newbie_core.models.dit.fused import kernels  # noqa: E402

CAPTION = 256                     # padded caption length of the benchmark prompt (Gemma tokens)
UNCOND = 24                       # the empty negative prompt with the system prefix


def random_dit(config: DiTConfig, device: str, dtype: torch.dtype, seed: int = 0) -> NextDiT:
    """Seeded random weights drawn on the device (norm weights near 1, matrices ~N(0, 0.02))."""
    model = NextDiT(config).to(device=device, dtype=dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, device=device)
            p.copy_(noise * 0.02 if p.ndim >= 2 else (noise * 0.01 if name.endswith("bias") else 1 + noise * 0.05))
    return model.eval()


def sampler_inputs(config: DiTConfig, size: int, cfg: bool, device: str, dtype: torch.dtype, seed: int = 1):
    """What the sampler passes: x (B,16,H/8,W/8), t, Gemma features padded to the longer caption,
    its right-padded mask, Jina pooled. With CFG the uncond caption is the short one."""
    gen = torch.Generator(device=device).manual_seed(seed)
    lens = (CAPTION, UNCOND) if cfg else (CAPTION,)
    b, length = len(lens), max(lens)
    x = torch.randn(b, 16, size // 8, size // 8, generator=gen, device=device, dtype=dtype)
    cap = torch.randn(b, length, config.cap_feat_dim, generator=gen, device=device, dtype=dtype)
    mask = torch.arange(length, device=device)[None] < torch.tensor(lens, device=device)[:, None]
    pooled = torch.randn(b, config.clip_text_dim, generator=gen, device=device, dtype=dtype)
    t = torch.full((b,), 0.4, device=device)
    return (x, t, cap, mask, pooled), lens


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def graphed(model: NextDiT, inputs):
    """The whole forward captured as one CUDA graph (after warm-ups): what launch overhead and
    the idle gaps between kernels cost, measured by taking them away. Same inputs every call."""
    with torch.inference_mode():
        for _ in range(2):
            model(*inputs)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = model(*inputs)

    def replay(*_):
        graph.replay()
        return out
    return replay


def time_forwards(model, inputs, iters: int, device: str) -> dict:
    """First call (compiles, warms cuBLAS/cuDNN), two warm-ups, then ``iters`` timed forwards."""
    with torch.inference_mode():
        sync(device)
        t0 = time.perf_counter()
        out = model(*inputs)
        sync(device)
        first = time.perf_counter() - t0
        for _ in range(2):
            model(*inputs)
        times = []
        for _ in range(iters):
            sync(device)
            t0 = time.perf_counter()
            model(*inputs)
            sync(device)
            times.append(time.perf_counter() - t0)
    return {"first_call_s": first, "ms": 1e3 * statistics.median(times), "ms_min": 1e3 * min(times),
            "ms_max": 1e3 * max(times), "n": iters, "_out": out}


# Kernel-name fragments per category (H200, torch 2.11: cuBLAS 'nvjet'/'sm90_xmma', cuDNN SDPA).
CATEGORIES = (("gemm", ("gemm", "nvjet", "xmma", "cutlass", "cublas", "Gemm")),
              ("attention", ("flash", "fmha", "sdpa", "attention", "cudnn")),
              ("copies", ("Memcpy", "Memset", "memcpy", "memset")))


def category(name: str) -> str:
    for cat, keys in CATEGORIES:
        if any(k in name for k in keys):
            return cat
    return "elementwise"


def device_kernels(prof) -> list[tuple[str, float]]:
    """(name, seconds) of every device-side event of a torch.profiler run."""
    return [(e.name, e.time_range.elapsed_us() / 1e6) for e in prof.events()
            if e.device_type == torch.autograd.DeviceType.CUDA]


def top_kernels(prof, n: int = 20, per: int = 1) -> list[list]:
    """The kernels that take the most device time: [ms per forward, launches per forward, name]."""
    total: dict[str, list] = {}
    for name, sec in device_kernels(prof):
        entry = total.setdefault(name, [0.0, 0])
        entry[0] += sec
        entry[1] += 1
    ranked = sorted(total.items(), key=lambda kv: -kv[1][0])[:n]
    return [[round(1e3 * t / per, 3), c // per, name[:110]] for name, (t, c) in ranked]


def breakdown(prof, wall_s: float) -> dict:
    """Device time per category from a torch.profiler run, and the idle rest of the wall time."""
    out = {"gemm": 0.0, "attention": 0.0, "elementwise": 0.0, "copies": 0.0}
    launches = 0
    for name, sec in device_kernels(prof):
        out[category(name)] += sec
        launches += category(name) != "copies"
    busy = out["gemm"] + out["attention"] + out["elementwise"]
    out["idle"] = max(0.0, wall_s - busy)
    out["wall"] = wall_s
    out["kernels"] = launches
    return {k: (round(v * 1e3, 2) if isinstance(v, float) else v) for k, v in out.items()}


def gaps(prof, top: int = 8) -> dict:
    """Where the GPU ran no kernel: the union of the kernels' intervals, the gaps between them
    summed by size class, and the largest gaps with the kernels on either side (launch overhead,
    host syncs and allocator calls show up here). The profiler slows the host down, so long gaps
    may be its own: set them beside ``--host``'s unprofiled issue time (on an H200 the host issued
    a 125 ms bf16 forward in 60 ms, while the fp8-compute forward was host-bound: 100 of 104 ms)."""
    spans = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA and category(e.name) != "copies")
    holes, end, prev = [], None, None
    for start, stop, name in spans:
        if end is not None and start > end:
            holes.append((start - end, prev, name))
        if end is None or stop > end:
            end, prev = stop, name
    classes = {"<5us": 0.0, "5-50us": 0.0, "50-500us": 0.0, ">500us": 0.0}
    for us, _, _ in holes:
        key = "<5us" if us < 5 else "5-50us" if us < 50 else "50-500us" if us < 500 else ">500us"
        classes[key] += us / 1e3
    biggest = sorted(holes, reverse=True)[:top]
    return {"gap_ms_by_size": {k: round(v, 2) for k, v in classes.items()}, "n_gaps": len(holes),
            "largest": [[round(us / 1e3, 3), a[:60], b[:60]] for us, a, b in biggest]}


def profile_forward(model: NextDiT, inputs, device: str, forwards: int = 3) -> dict:
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.inference_mode(), torch.profiler.profile(activities=acts) as prof:
        sync(device)
        t0 = time.perf_counter()
        for _ in range(forwards):
            model(*inputs)
        sync(device)
        wall = (time.perf_counter() - t0) / forwards
    per = breakdown(prof, wall * forwards)
    out = {k: (round(v / forwards, 2) if k != "kernels" else v // forwards) for k, v in per.items()}
    out["top"] = top_kernels(prof, per=forwards)
    out["gaps"] = gaps(prof)            # over all profiled forwards
    return out


def host_side(forward, inputs, device: str, forwards: int = 3, top: int = 25) -> dict:
    """How long the host takes to issue one forward (the call returns before the GPU finishes
    unless the launch queue is full) against its wall time, and the ops with the most host time:
    a forward whose host side is as long as its GPU side leaves the GPU waiting between kernels."""
    with torch.inference_mode():
        sync(device)
        t0 = time.perf_counter()
        forward(*inputs)
        issued = time.perf_counter() - t0
        sync(device)
        wall = time.perf_counter() - t0
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(forwards):
                forward(*inputs)
            sync(device)
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:top]
    return {"issue_ms": round(1e3 * issued, 2), "wall_ms": round(1e3 * wall, 2),
            "top_host_ops": [[round(e.self_cpu_time_total / 1e3 / forwards, 2), e.count // forwards, e.key[:80]]
                             for e in ops]}


def run(config: DiTConfig, size: int, cfg: bool, device: str, iters: int, variants: list[str],
        profile: bool, host: bool = False) -> list[dict]:
    """Each variant timed (and with ``profile`` profiled; with ``host`` its host side too)."""
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = random_dit(config, device, dtype)
    inputs, lens = sampler_inputs(config, size, cfg, device, dtype)
    flops = flops_per_forward(config, len(lens), max(lens), (size // 16) ** 2)
    rows, ref = [], None
    for variant in variants:
        model.set_kernels(kernels(variant != "eager" and device.startswith("cuda"), fp8_compute="fp8" in variant,
                                  hand="inductor" not in variant))
        forward = graphed(model, inputs) if variant.startswith("compiled-graph") else model
        row = {"row": f"ours-forward-{variant}", "forward_only": True, "size": f"{size}x{size}", "cfg": cfg,
               "dtype": str(dtype).removeprefix("torch."), **time_forwards(forward, inputs, iters, device)}
        out = row.pop("_out")
        ref = out if ref is None else ref
        row["rel_l2_vs_eager"] = float((out.float() - ref.float()).norm() / ref.float().norm())
        row["tflops"] = flops / (row["ms"] / 1e3) / 1e12
        if profile and device.startswith("cuda"):
            row["profile_ms"] = profile_forward(forward, inputs, device)
        if host and device.startswith("cuda"):
            row["host"] = host_side(forward, inputs, device)
            print("     host", row["host"], flush=True)
        prof = {k: v for k, v in row.get("profile_ms", {}).items() if k not in ("top", "gaps")}
        print(f"{row['row']:24s} {row['size']} cfg={cfg}: {row['ms']:.1f} ms [{row['ms_min']:.1f}-{row['ms_max']:.1f}, "
              f"n={iters}] {row['tflops']:.0f} TFLOP/s, first call {row['first_call_s']:.1f} s, "
              f"rel vs eager {row['rel_l2_vs_eager']:.1e} {prof}", flush=True)
        for entry in row.get("profile_ms", {}).get("top", [])[:12]:
            print("    ", entry, flush=True)
        if "gaps" in row.get("profile_ms", {}):
            print("     gaps", row["profile_ms"]["gaps"], flush=True)
        rows.append(row)
    return rows


def attention_variants(device: str, seq: int = 4352, heads: int = 24, kv_heads: int = 8, hd: int = 96) -> list[dict]:
    """One sample's joint attention at 1024² (the per-sample call of a padded CFG batch): GQA
    passed through (``enable_gqa``) or K/V repeated, under each SDPA backend."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from triton.testing import do_bench
    import torch.nn.functional as F
    gen = torch.Generator(device=device).manual_seed(0)
    qkv = torch.randn(1, seq, heads + 2 * kv_heads, hd, generator=gen, device=device, dtype=torch.bfloat16)
    q = qkv[:, :, :heads].contiguous().transpose(1, 2)
    k = qkv[:, :, heads:heads + kv_heads].contiguous().transpose(1, 2)
    v_view = qkv[:, :, heads + kv_heads:].transpose(1, 2)       # a strided view of the projection
    v_contig = v_view.transpose(1, 2).contiguous().transpose(1, 2)
    rep = heads // kv_heads
    flops = 4 * seq * seq * heads * hd
    rows = []
    for backend in (None, SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        for mode in ("gqa-vview", "gqa", "repeat"):
            def call():
                if mode == "gqa-vview":
                    return F.scaled_dot_product_attention(q, k, v_view, enable_gqa=True)
                if mode == "gqa":
                    return F.scaled_dot_product_attention(q, k, v_contig, enable_gqa=True)
                return F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v_contig.repeat_interleave(rep, 1))
            name = "default" if backend is None else backend.name
            try:
                if backend is None:
                    ms = do_bench(call, return_mode="median")
                else:
                    with sdpa_kernel([backend]):
                        ms = do_bench(call, return_mode="median")
                rows.append({"backend": name, "mode": mode, "ms": ms, "tflops": flops / ms / 1e9})
            except RuntimeError as e:
                rows.append({"backend": name, "mode": mode, "error": str(e).splitlines()[0][:120]})
            print("attention", rows[-1], flush=True)
    return rows


def gemm_variants(device: str, tokens: int = 2 * 4352, dim: int = 2304, ffn: int = 9216) -> list[dict]:
    """The block's matmuls at 1024² CFG sizes: bf16 (what nn.Linear runs) against fp8 compute
    (row-wise quantisation of input and weight, then torch._scaled_mm), and the quantisers alone."""
    from triton.testing import do_bench
    from newbie_core.models.dit.fp8_matmul import quantize_rows, scaled_matmul
    gen = torch.Generator(device=device).manual_seed(0)
    quant = torch.compile(quantize_rows, fullgraph=True, dynamic=False)
    rows = []
    for name, (n, k) in {"qkv": (3840, dim), "out": (dim, dim), "w1/w3": (ffn, dim), "w1+w3 as one": (2 * ffn, dim),
                         "w2": (dim, ffn)}.items():
        x = torch.randn(tokens, k, generator=gen, device=device, dtype=torch.bfloat16)
        w = torch.randn(n, k, generator=gen, device=device, dtype=torch.bfloat16) * 0.02
        (xq, xs), (wq, ws) = quant(x), quant(w)
        flops = 2 * tokens * n * k
        cases = {"bf16": lambda: torch.nn.functional.linear(x, w),
                 "fp8-mm": lambda: scaled_matmul(xq, xs, wq, ws, torch.bfloat16),
                 "fp8-quant-x": lambda: quant(x), "fp8-quant-w": lambda: quant(w)}
        for label, fn in cases.items():
            ms = do_bench(fn, return_mode="median")
            rows.append({"gemm": name, "variant": label, "us": round(1e3 * ms, 1),
                         "tflops": round(flops / ms / 1e9) if "quant" not in label else None})
            print("gemm", rows[-1], flush=True)
    return rows


def fused_variants(device: str, tokens: int = 2 * 4352, dim: int = 2304, ffn: int = 9216) -> list[dict]:
    """Each block function at 1024² CFG sizes: eager body, inductor's kernel (plain and with
    coordinate-descent tuning), and the hand-written Triton body (fused_triton.py) at several
    launch shapes (rows per program, warps); microseconds, the bandwidth its bytes imply, and how
    far each is from the reference body run op by op."""
    from triton.testing import do_bench
    from newbie_core.models.dit import fused, fused_triton
    gen = torch.Generator(device=device).manual_seed(0)
    def rnd(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.bfloat16)
    b = 2
    x, y = rnd(b, tokens // b, dim), rnd(b, tokens // b, dim)
    w = rnd(dim)
    mod = rnd(b, 4 * dim).unsqueeze(1)                 # strided (B, 1, dim) views, as the blocks take them
    scale, scale2, gate = *mod.chunk(4, dim=-1)[:2], fused.tanh_float(mod).chunk(4, dim=-1)[2]
    qkv, wq = rnd(b, tokens // b, 40, 96), rnd(96)
    angle = torch.rand(b, tokens // b, 48, generator=gen, device=device) * 6
    g1, g3 = rnd(tokens, ffn), rnd(tokens, ffn)
    e = 2
    rows_shapes = [(r, wp) for r in (1, 2, 4) for wp in (4, 8, 16)]
    qkv_shapes = [(r, wp) for r in (32, 64, 128) for wp in (2, 4, 8)]
    cases = {"norm_scale": ((x, w, scale, 1e-5), 2 * x.numel() * e, rows_shapes),
             "gated_residual": ((x, y, w, gate, 1e-5), 3 * x.numel() * e, rows_shapes),
             "residual_norm": ((x, y, w, gate, w, scale2, 1e-5), 4 * x.numel() * e, rows_shapes),
             "qkv_norm_rope": ((qkv, wq, wq, angle.cos(), angle.sin(), 1e-5, 24), 2 * qkv.numel() * 32 // 40 * e,
                               qkv_shapes),
             "swiglu": ((g1, g3), 3 * g1.numel() * e, [])}
    rows = []
    for name, (args, nbytes, shapes) in cases.items():
        ref, eager, _, _ = fused._FUNCTIONS[name]
        variants = {"eager": eager, "compiled": torch.compile(ref, fullgraph=True, dynamic=None),
                    "compiled-cdt": torch.compile(ref, fullgraph=True, dynamic=None,
                                                  options={"coordinate_descent_tuning": True})}
        if name in fused_triton.BODIES:
            body = fused_triton.BODIES[name]
            for r, wp in shapes:
                variants[f"hand/r{r}/w{wp}"] = lambda *a, body=body, r=r, wp=wp: body(*a, launch=(r, wp))
        # a function that writes over its first argument is compared on copies of the pristine
        # input (timing runs it over the same buffer again and again: the same work)
        pristine = args[0].clone() if name in fused.IN_PLACE else None
        def call(fn, pristine=pristine, args=args):
            return fn(*args) if pristine is None else fn(pristine.clone(), *args[1:])
        want = call(ref)               # the reference body run op by op: float32 inside, one rounding
        for label, fn in variants.items():
            try:
                got = call(fn)
                us = 1e3 * do_bench(lambda: fn(*args), return_mode="median")
                diff = [((a.float() - b.float()).abs().max().item(), (a != b).float().mean().item(), fused._ulps(a, b))
                        for a, b in zip(*(o if isinstance(o, tuple) else (o,) for o in (got, want)))]
                rows.append({"fn": name, "variant": label, "us": round(us, 1), "tb_s": round(nbytes / us / 1e6, 2),
                             "vs_ref_max_abs": max(d[0] for d in diff), "vs_ref_frac_diff": max(d[1] for d in diff),
                             "vs_ref_ulps": max(d[2] for d in diff)})
            except Exception as err:   # noqa: BLE001 - report and go on
                rows.append({"fn": name, "variant": label, "error": str(err).splitlines()[0][:120]})
            print("fused", rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path)
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU, 2 forwards")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--variants", default="eager,compiled",
                        help="comma list of eager, compiled, compiled-graph (whole forward as one CUDA graph), "
                             "compiled-fp8 (fp8 compute), compiled-graph-fp8")
    parser.add_argument("--sizes", default="1024,512", help="1024 (CFG) and/or 512 (no CFG)")
    parser.add_argument("--part-list", default="gemm,attention,fused", help="with --parts: which groups")
    parser.add_argument("--parts", action="store_true",
                        help="only the SDPA backends and the fused functions' variants (attention.json, fused.json)")
    parser.add_argument("--host", action="store_true", help="also the host side: issue time, ops by host time")
    args = parser.parse_args()
    if args.parts:
        benches = {"gemm": gemm_variants, "attention": attention_variants, "fused": fused_variants}
        parts = {name: benches[name]("cuda") for name in args.part_list.split(",")}
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "parts.json").write_text(json.dumps(parts, indent=1))
        return
    if args.smoke:
        run(DiTConfig.tiny(), 64, True, "cpu", 2, ["eager", "compiled-fp8"], False)
        return
    rows = []
    for size in map(int, args.sizes.split(",")):
        rows += run(DiTConfig.newbie_exp01(), size, size == 1024, "cuda", args.iters, args.variants.split(","),
                    not args.no_profile, args.host)
        torch.cuda.empty_cache()
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "forward.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
