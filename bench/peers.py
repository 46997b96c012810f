"""Forward-only peer rows (issue 10, items 4-5): other projects' ways of running the SAME Next-DiT
weights, timed in the same GPU visit as our rows.

Every peer is built from one set of seeded random bf16 weights in the official key names
(generated on the GPU with a seeded generator, so every process gets the same tensors), fed the
same inputs, and compared with OUR resident forward (eager kernels, the one-code-path reference):
relative L2 and bitwise equality. Times are steady-state medians of single forwards (warm-up
excluded; min/median/max and n reported), with peak reserved/allocated bytes after a reset.

Peers (each in its own subprocess, because ComfyUI reads ``--async-offload`` at import time):

- ours-resident-forward   our NextDiT resident, bf16, compiled kernels (the same-process baseline)
- comfyui-full            ComfyUI 0.3.64 ``comfy.ldm.lumina.model.NextDiT`` with NewBie dims,
                          ``comfy.ops.disable_weight_init`` (what ComfyUI picks for bf16 weights
                          computed in bf16), sharing our tensors (``load_state_dict(assign=True)``)
- comfyui-lowvram-{4,2}gb[-async]  the same model in ``comfy.model_patcher.ModelPatcher``
                          (load cuda, offload cpu), ``patch_model(lowvram_model_memory=budget -
                          activation allowance)``, capped by ``set_per_process_memory_fraction``
- diffusers-group-{block,leaf}  ``diffusers.hooks.apply_group_offloading`` on our NextDiT,
                          use_stream + record_stream (block_level with 1 block per group, leaf_level)
- accelerate-sequential   ``accelerate.cpu_offload(model, cuda)``

ComfyUI conventions, handled so the comparison means something: its NextDiT takes the noise level
(``t = 1 - timesteps``) and returns the negated velocity, so it gets ``1 - t`` and its output is
negated back (both exact: t = 0.625). It has no ``clip_text_pooled_proj``/``time_text_embed``,
so ours runs with ``clip_text_pooled=None`` (the official fallback c = t_emb) for every row. Its
joint mask is only right when every caption of the batch has the same valid length, so the
default caption is 256 tokens, all valid, for both CFG halves (no mask is passed to ComfyUI,
exactly as its ``model_base.Lumina2`` does for an unpadded caption); ``--cap-valid`` pads.

The ComfyUI code is never committed: extract a snapshot into the git-ignored out/ folder.

    git -C /work/.mirror/Comfy-Org+ComfyUI/repo archive HEAD comfy comfy_api comfy_execution \\
        comfy_config comfyui_version.py folder_paths.py utils node_helpers.py | tar -x -C out/comfyui
    python bench/peers.py --out out/peers --with-ours              # GPU: every row, ~3-4 min
    python bench/peers.py --out out/peers --peers comfyui-full,diffusers-group-leaf
    python bench/peers.py --out /tmp/peers --smoke                  # CPU: tiny dims, 2 forwards
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from newbie_core.models.dit import DiTConfig, NextDiT, build_dit, flops_per_forward  # noqa: E402
from newbie_core.models.dit.attention import RMSNorm  # noqa: E402
from newbie_core.models.dit.fused import EAGER, kernels  # noqa: E402

sys.path.insert(0, str(REPO / "bench"))
from comfy_peer import comfy_forward, comfy_nextdit, import_comfy  # noqa: E402

GB = 2**30
FULL_WEIGHT_BYTES = 3_486_636_096 * 2          # NewBie DiT in bf16
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
ROW_TAG = "PEERS_ROW "
T_FLOW = 0.625                      # ours: 0 = noise, 1 = clean; ComfyUI gets 1 - t = 0.375 (exact)
Forward = Callable[[dict], torch.Tensor]


@dataclass(frozen=True)
class Peer:
    name: str
    kind: str                       # ours | comfy-full | comfy-lowvram | diffusers | accelerate
    budget_gb: float | None = None
    async_offload: bool = False
    mode: str = ""                  # diffusers offload_type
    slow: bool = False              # fewer timed forwards


PEERS = {p.name: p for p in [
    Peer("ours-resident-forward", "ours"),
    Peer("comfyui-full", "comfy-full"),
    Peer("comfyui-lowvram-4gb", "comfy-lowvram", 4.0, slow=True),
    Peer("comfyui-lowvram-4gb-async", "comfy-lowvram", 4.0, async_offload=True, slow=True),
    Peer("comfyui-lowvram-2gb", "comfy-lowvram", 2.0, slow=True),
    Peer("comfyui-lowvram-2gb-async", "comfy-lowvram", 2.0, async_offload=True, slow=True),
    Peer("diffusers-group-block", "diffusers", mode="block_level"),
    Peer("diffusers-group-leaf", "diffusers", mode="leaf_level"),
    Peer("accelerate-sequential", "accelerate", slow=True),
]}
DEFAULT_PEERS = [n for n in PEERS if n != "ours-resident-forward"]


@dataclass(frozen=True)
class Pass:
    """One input shape: image side in pixels, batch (2 = CFG pair)."""
    size: int
    batch: int

    @classmethod
    def parse(cls, text: str) -> "Pass":
        size, _, batch = text.partition("x")
        return cls(int(size), int(batch or 1))


# --- weights and inputs -------------------------------------------------------------------------
def seeded_dit(config: DiTConfig, device: torch.device, seed: int, dtype: torch.dtype = torch.bfloat16) -> NextDiT:
    """Our NextDiT with non-trivial weights drawn on ``device`` (gates and adaLN not zero)."""
    model = build_dit(config, "meta", dtype).to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g, device=device, dtype=p.dtype)
            if p.ndim == 2:
                p.copy_(r * (0.5 / p.shape[1] ** 0.5))
            elif name.endswith("bias"):
                p.copy_(r * 0.02)
            else:
                p.copy_(1 + 0.1 * r)
    return model.eval().requires_grad_(False)


def make_inputs(config: DiTConfig, p: Pass, cap_len: int, cap_valid: int, device: torch.device,
                seed: int, dtype: torch.dtype = torch.bfloat16) -> dict:
    g = torch.Generator(device=device).manual_seed(seed + p.size)
    side = p.size // 8                                                      # FLUX VAE: 8 px / latent
    x = torch.randn(p.batch, config.in_channels, side, side, generator=g, device=device).to(dtype)
    cap = torch.randn(p.batch, cap_len, config.cap_feat_dim, generator=g, device=device).to(dtype)
    mask = (torch.arange(cap_len, device=device)[None] < cap_valid).long().expand(p.batch, -1).contiguous()
    t = torch.full((p.batch,), T_FLOW, device=device)
    return {"x": x, "t": t, "cap": cap, "mask": mask, "cap_valid": cap_valid}


def ours_forward(model: NextDiT) -> Forward:
    return lambda i: model(i["x"], i["t"], i["cap"], i["mask"], None)


# --- ComfyUI (its NextDiT: comfy_peer.py) ---------------------------------------------------------
LUMINA2_MEMORY_USAGE_FACTOR = 1.2     # comfy/supported_models.py, class Lumina2 (0.3.64)


def lowvram_weight_bytes(p: Pass, budget_gb: float, allowance_gb: float | None, mm=None) -> int:
    """Weights a ModelPatcher partial load keeps on the GPU under ``budget_gb`` of free VRAM.

    By default ComfyUI's own rule (``load_models_gpu``, 0.3.64): free memory minus
    max(``minimum_inference_memory()``, the model's ``memory_required`` for one latent + the
    extra reserve), where ``memory_required`` is latent area x 2 bytes x 0.01 x the Lumina-2
    memory usage factor, in MiB. ``allowance_gb`` replaces that subtrahend. ``mm`` is
    ``comfy.model_management`` (the child imports it); without it, 1.2 GiB is assumed.
    """
    if allowance_gb is not None:
        return max(1, int((budget_gb - allowance_gb) * GB))
    area = (p.size // 8) ** 2                      # one latent of the CFG pair, as ComfyUI's minimum
    required = area * 2 * 0.01 * LUMINA2_MEMORY_USAGE_FACTOR * 2**20
    inference = mm.minimum_inference_memory() if mm is not None else 1.2 * GB
    reserve = mm.extra_reserved_memory() if mm is not None else 0.4 * GB
    return max(128 * 2**20, int(budget_gb * GB - max(inference, required + reserve)))


# --- timing -------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_forwards(fn: Forward, inputs: dict, device: torch.device, warmup: int, n: int) -> tuple[list[float], torch.Tensor, float]:
    """Milliseconds of ``n`` single forwards after ``warmup`` ones; the output; the first call's ms."""
    times, out, first = [], None, 0.0
    with torch.inference_mode():
        for k in range(warmup + n):
            sync(device)
            start = time.perf_counter()
            out = fn(inputs)
            sync(device)
            ms = (time.perf_counter() - start) * 1e3
            if k == 0:
                first = ms
            if k >= warmup:
                times.append(ms)
    return times, out, first


def compare(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, bool]:
    d = out.double() - ref.double()
    return float(d.norm() / ref.double().norm()), bool(torch.equal(out, ref))


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()})"


# --- building one peer --------------------------------------------------------------------------
@dataclass
class Built:
    forward: Forward
    notes: list[str]
    cleanup: Callable[[], None] = lambda: None


def keep_block_norms_on(model: NextDiT, device: torch.device) -> int:
    """Move the blocks' RMSNorm weights to ``device`` and return their bytes.

    Leaf-level offloading onloads a module's weights when that module is called; our blocks hand
    the norm weights to fused kernels without calling the norm modules, so their hooks never fire
    and the weights would stay on the CPU (the device error of the 2026-12-02 visits). They are
    0.1 MiB a block: kept on the GPU, every matmul weight is still offloaded leaf by leaf.
    """
    moved = 0
    for name, module in model.named_modules():
        if isinstance(module, RMSNorm) and name.split(".")[0] in ("layers", "noise_refiner", "context_refiner"):
            module.weight.data = module.weight.data.to(device)
            moved += module.weight.numel() * module.weight.element_size()
    return moved


def build_peer(peer: Peer, ours: NextDiT, config: DiTConfig, device: torch.device, opts, first: Pass) -> Built:
    """Turn the resident reference model into the peer; ``ours`` may be moved or hooked."""
    cpu = torch.device("cpu")
    if peer.kind == "ours":
        compiled = device.type == "cuda"
        ours.set_kernels(kernels(compiled))
        return Built(ours_forward(ours), [f"compiled kernels={compiled}"])
    if peer.kind == "diffusers":
        from diffusers.hooks import apply_group_offloading
        streams = device.type == "cuda"
        ours.to(cpu)
        kw = {"num_blocks_per_group": 1} if peer.mode == "block_level" else {}
        apply_group_offloading(ours, onload_device=device, offload_device=cpu, offload_type=peer.mode,
                               use_stream=streams, record_stream=streams, **kw)
        notes = [f"{peer.mode}, use_stream={streams}, record_stream={streams}"]
        if peer.mode == "leaf_level":
            notes.append(f"blocks' RMSNorm weights kept on the GPU ({keep_block_norms_on(ours, device) / 2**20:.1f} MiB)")
        return Built(ours_forward(ours), notes)
    if peer.kind == "accelerate":
        from accelerate import cpu_offload
        ours.to(cpu)
        # Our blocks hand their norm weights to fused functions instead of calling the norm
        # modules, so per-leaf hooks would never fire there: accelerate loads each whole block.
        cpu_offload(ours, execution_device=device, preload_module_classes=["JointTransformerBlock"])
        return Built(ours_forward(ours), ["accelerate.cpu_offload, preload_module_classes=JointTransformerBlock "
                                          "(weights copied per call, no pinning, no prefetch)"])
    mm, notes = import_comfy(Path(opts.comfy), peer.async_offload, device.type == "cpu")
    import comfy.ops
    model = comfy_nextdit(config, ours, comfy.ops.disable_weight_init)
    notes.append("comfy.ops.disable_weight_init (ComfyUI's pick for bf16 weights in bf16)")
    if peer.kind == "comfy-full":
        return Built(comfy_forward(model), notes)
    import comfy.model_patcher
    model.to(cpu)
    ours.to(cpu)
    _empty_cache(device)
    if device.type == "cuda":
        fraction = peer.budget_gb * GB / torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(fraction, device)
        notes.append(f"capped at {peer.budget_gb} GiB (fraction {fraction:.4f})")
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=cpu)
    total = patcher.model_size()
    if opts.smoke:   # tiny weights fit any real budget: keep the same share resident as at full size
        budget = int(total * peer.budget_gb / (FULL_WEIGHT_BYTES / GB))
    else:
        budget = lowvram_weight_bytes(first, peer.budget_gb, opts.allowance_gb, mm)
    patcher.patch_model(device_to=device, lowvram_model_memory=budget, load_weights=True)
    notes.append(f"lowvram_model_memory {budget / 2**20:.1f} MiB, resident weights "
                 f"{patcher.loaded_size() / 2**20:.1f} of {total / 2**20:.1f} MiB, NUM_STREAMS {mm.NUM_STREAMS}")
    return Built(comfy_forward(model), notes, lambda: torch.cuda.set_per_process_memory_fraction(1.0, device)
                 if device.type == "cuda" else None)


def _empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --- one peer, every pass: the child process ----------------------------------------------------
def run_peer(name: str, opts) -> list[dict]:
    """Rows for one peer (one per pass). Failures become rows with "error"."""
    peer = PEERS[name]
    device = torch.device(opts.device)
    if device.type == "cuda" and device.index is None:     # ComfyUI's memory calls need an index
        device = torch.device("cuda", torch.cuda.current_device())
    config = DiTConfig.tiny() if opts.smoke else DiTConfig.newbie_exp01()
    passes = [Pass.parse(s) for s in opts.passes.split(",")]
    warmup, n = (1, opts.n_slow) if peer.slow else (opts.warmup, opts.n)
    date, where = datetime.date.today().isoformat(), machine(device)

    def row(p: Pass, **fields) -> dict:
        return {"row": name, "forward_only": True, "size": p.size, "cfg": p.batch == 2,
                "budget_gb": peer.budget_gb, "dtype": opts.dtype, **fields, "date": date, "machine": where}

    try:
        ours = seeded_dit(config, device, opts.seed, DTYPES[opts.dtype])
        ours.set_kernels(EAGER)
        inputs = [make_inputs(config, p, opts.cap_len, opts.cap_valid, device, opts.seed, DTYPES[opts.dtype])
                  for p in passes]
        with torch.inference_mode():
            refs = [ours_forward(ours)(i) for i in inputs]
        start = time.perf_counter()
        built = build_peer(peer, ours, config, device, opts, passes[0])
        setup_s = time.perf_counter() - start
    except Exception as e:  # noqa: BLE001 - any failure of a peer is a row, not a dead run
        return [row(p, error=f"{type(e).__name__}: {e}") for p in passes]
    rows = []
    for p, inp, ref in zip(passes, inputs, refs):
        try:
            _empty_cache(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            times, out, first = time_forwards(built.forward, inp, device, warmup, n)
            rel, equal = compare(out, ref)
            ms = statistics.median(times)
            flops = flops_per_forward(config, p.batch, opts.cap_valid, (p.size // 16) ** 2)
            peak = ((torch.cuda.max_memory_reserved(device) / GB, torch.cuda.max_memory_allocated(device) / GB)
                    if device.type == "cuda" else (None, None))
            notes = built.notes + [f"warm-up {warmup} (first call {first:.1f} ms), setup {setup_s:.1f} s"]
            if peer.slow:
                notes.append(f"slow peer: {n} timed forwards")
            rows.append(row(p, ms_per_step=ms, ms_min=min(times), ms_max=max(times), n=n,
                            peak_reserved_gb=peak[0], peak_allocated_gb=peak[1],
                            tflops=flops / (ms * 1e-3) / 1e12, rel_l2_vs_ours=rel,
                            bitwise_equal_to_ours=equal, notes="; ".join(notes)))
        except Exception as e:  # noqa: BLE001
            rows.append(row(p, error=f"{type(e).__name__}: {e}", notes="; ".join(built.notes)))
    built.cleanup()
    return rows


# --- the driver ---------------------------------------------------------------------------------
def child_argv(name: str, opts) -> list[str]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--device", opts.device,
            "--dtype", opts.dtype, "--passes", opts.passes, "--cap-len", str(opts.cap_len), "--cap-valid", str(opts.cap_valid),
            "--seed", str(opts.seed), "--n", str(opts.n), "--n-slow", str(opts.n_slow),
            "--warmup", str(opts.warmup), "--comfy", str(opts.comfy), "--out", str(opts.out)]
    if opts.allowance_gb is not None:
        argv += ["--allowance-gb", str(opts.allowance_gb)]
    return argv + (["--smoke"] if opts.smoke else [])


def repro_commands(opts, names: list[str]) -> list[str]:
    """The command lines that reproduce this run: the driver, then one per peer process."""
    driver = [Path(sys.executable).name, "bench/peers.py", "--out", str(opts.out), "--peers", ",".join(names),
              "--device", opts.device, "--dtype", opts.dtype, "--passes", opts.passes, "--cap-len", str(opts.cap_len),
              "--cap-valid", str(opts.cap_valid), "--n", str(opts.n), "--n-slow", str(opts.n_slow),
              "--warmup", str(opts.warmup), "--seed", str(opts.seed), "--comfy", str(opts.comfy)] + (["--smoke"] if opts.smoke else [])
    return [shlex.join(driver)] + [shlex.join(child_argv(n, opts)) for n in names]


def run_child_process(name: str, opts) -> list[dict]:
    try:
        done = subprocess.run(child_argv(name, opts), capture_output=True, text=True, timeout=opts.timeout,
                              cwd=REPO)
    except subprocess.TimeoutExpired:
        return [{"row": name, "forward_only": True, "error": f"timed out after {opts.timeout} s"}]
    rows = [json.loads(line[len(ROW_TAG):]) for line in done.stdout.splitlines() if line.startswith(ROW_TAG)]
    if done.returncode or not rows:
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        rows.append({"row": name, "forward_only": True,
                     "error": f"process exited {done.returncode}: " + " | ".join(tail)})
    return rows


def summary(r: dict) -> str:
    head = f"{r['row']:<28} {r.get('size', '?')!s:>5} cfg={r.get('cfg', '?')!s:<5}"
    if "error" in r:
        return f"{head} ERROR {r['error']}"
    peak = "-" if r["peak_reserved_gb"] is None else f"{r['peak_reserved_gb']:.2f}/{r['peak_allocated_gb']:.2f} GiB"
    return (f"{head} {r['ms_per_step']:9.1f} ms [{r['ms_min']:.1f}..{r['ms_max']:.1f}, n={r['n']}] "
            f"peak {peak} {r['tflops']:.1f} TFLOP/s rel_l2 {r['rel_l2_vs_ours']:.2e} "
            f"bitwise={r['bitwise_equal_to_ours']}")


def parse_args(argv: list[str] | None = None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for peers.json")
    ap.add_argument("--peers", default=",".join(DEFAULT_PEERS), help=f"comma list of {', '.join(PEERS)}")
    ap.add_argument("--with-ours", action="store_true", help="also run ours-resident-forward (compiled)")
    ap.add_argument("--smoke", action="store_true", help="tiny dims (DiTConfig.tiny), CPU-sized passes")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--dtype", choices=list(DTYPES), default=None,
                    help="weights and compute (default bf16; smoke fp32: bf16 matmuls crawl on CPU)")
    ap.add_argument("--passes", default=None, help="SIZExBATCH list (default 1024x2,512x1; smoke 64x2,32x1)")
    ap.add_argument("--cap-len", type=int, default=None, help="caption tokens, padded (default 256; smoke 16)")
    ap.add_argument("--cap-valid", type=int, default=None, help="valid tokens per caption (default: all)")
    ap.add_argument("--n", type=int, default=None, help="timed forwards (default 10; smoke 2)")
    ap.add_argument("--n-slow", type=int, default=None, help="timed forwards of slow peers (default 3; smoke 2)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--allowance-gb", type=float, default=None,
                    help="VRAM the lowvram loads leave free beside the weights (default: ComfyUI's own rule)")
    ap.add_argument("--comfy", type=Path, default=REPO / "out" / "comfyui", help="ComfyUI snapshot folder")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=int, default=300, help="seconds per peer process")
    ap.add_argument("--in-process", action="store_true", help="no subprocesses (async peers then fail)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    opts = ap.parse_args(argv)
    opts.device = opts.device or ("cuda" if torch.cuda.is_available() else "cpu")
    opts.dtype = opts.dtype or ("fp32" if opts.smoke else "bf16")
    opts.passes = opts.passes or ("64x2,32x1" if opts.smoke else "1024x2,512x1")
    opts.cap_len = opts.cap_len or (16 if opts.smoke else 256)
    opts.cap_valid = opts.cap_valid or opts.cap_len
    opts.n = opts.n or (2 if opts.smoke else 10)
    opts.n_slow = opts.n_slow or (2 if opts.smoke else 3)
    if opts.smoke:
        opts.warmup = min(opts.warmup, 1)
    names = [s for s in opts.peers.split(",") if s]
    if opts.with_ours and "ours-resident-forward" not in names:
        names.insert(0, "ours-resident-forward")
    unknown = [s for s in names if s not in PEERS]
    if unknown:
        ap.error(f"unknown peer(s) {unknown}; choose from {', '.join(PEERS)}")
    if not 0 < opts.cap_valid <= opts.cap_len:
        ap.error(f"--cap-valid {opts.cap_valid} must be in 1..--cap-len {opts.cap_len}")
    for s in opts.passes.split(","):
        if Pass.parse(s).size % 16:
            ap.error(f"--passes {s}: image side must be a multiple of 16 px")
    opts.names = names
    return opts


def main(argv: list[str] | None = None) -> list[dict]:
    opts = parse_args(argv)
    if opts.child:
        for r in run_peer(opts.child, opts):
            print(ROW_TAG + json.dumps(r), flush=True)
        return []
    opts.out.mkdir(parents=True, exist_ok=True)
    path, rows = opts.out / "peers.json", []
    for name in opts.names:
        new = run_peer(name, opts) if opts.in_process else run_child_process(name, opts)
        rows += new
        path.write_text(json.dumps({"commands": repro_commands(opts, opts.names), "rows": rows}, indent=1))
        for r in new:
            print(summary(r), flush=True)
    return rows


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
