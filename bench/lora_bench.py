"""LoRA cost on the full-size DiT: a rank-32 PEFT LoRA on every linear layer (random weights).

For each VRAM budget (resident, 4 GB, 2 GB) it samples without and with the LoRA and reports the
mean step time of each (steps after the first), the per-step overhead, and the apply time: reading
and mapping the LoRA (first time, and again from the cache as a strength change does). The LoRA
deltas are added on the GPU after each block lands, so the streamed rows pay them every step,
the resident rows once per stage.

    python bench/lora_bench.py --models /tmp/full          # GPU; writes the DiT there if missing
    python bench/lora_bench.py --smoke                     # CPU, tiny models, seconds
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from newbie_core.models.dit import DiTConfig, build_dit  # noqa: E402
from newbie_core.models.lora import LoraSpec, clear_cache, dit_lora_patches  # noqa: E402
from newbie_core.pipeline import Conditioning, MemorySettings, SamplingSettings, load_dit_handle  # noqa: E402
from newbie_core.pipeline.sample import run_sampling  # noqa: E402
from newbie_core.placement import Report  # noqa: E402
from newbie_core.tiny.lora import write_lora  # noqa: E402
from tiny_files import tiny_checkpoints  # noqa: E402

GB = 2**30


def _conds(config: DiTConfig, cap_tokens: int) -> tuple[Conditioning, Conditioning]:
    gen = torch.Generator().manual_seed(0)
    pos = Conditioning(torch.randn(cap_tokens, config.cap_feat_dim, generator=gen),
                       torch.randn(config.clip_text_dim, generator=gen))
    neg = Conditioning(torch.randn(1, config.cap_feat_dim, generator=gen), torch.randn(config.clip_text_dim, generator=gen))
    return pos, neg


def _mean_step(result) -> float:
    steps = result.step_seconds[1:] or result.step_seconds
    return sum(steps) / len(steps)


def run(dit_path: Path, lora_dir: Path, device: torch.device, budgets: list[tuple[str, int | None]], size: int,
        steps: int, cap_tokens: int) -> list[dict]:
    handle = load_dit_handle(dit_path)
    config = handle.ckpt.config
    lora = lora_dir / "peft_r32_all" / "adapter_model.safetensors"
    if not lora.exists():
        write_lora(lora, config, "peft", rank=32, alpha=32.0, std=0.01, targets="all", dtype=torch.bfloat16)
    meta = build_dit(config, "meta")
    clear_cache()
    t0 = time.perf_counter()
    dit_lora_patches([LoraSpec(str(lora))], meta, config)
    first_map = time.perf_counter() - t0
    t0 = time.perf_counter()
    dit_lora_patches([LoraSpec(str(lora), 0.5)], meta, config)
    cached_map = time.perf_counter() - t0
    conds = _conds(config, cap_tokens)
    start = torch.zeros(1, 16, size // 8, size // 8)
    sampling = SamplingSettings(steps=steps, cfg=5.0)
    rows = []
    for label, budget in budgets:
        def sample(h):
            t = time.perf_counter()
            r = run_sampling(h, *conds, start, sampling, MemorySettings(), device, Report(), budget)
            return r, time.perf_counter() - t
        sample(handle)                                         # warm the host cache
        plain, plain_s = sample(handle)
        patched, patched_s = sample(handle.with_lora(lora, 1.0))
        a, b = _mean_step(plain), _mean_step(patched)
        rows.append({"budget": label, "resident_blocks": len(patched.plan.resident), "n_blocks": patched.plan.n_blocks,
                     "step_s": a, "step_s_lora": b, "overhead": b / a - 1.0,
                     "stage_s": plain_s, "stage_s_lora": patched_s,
                     "predicted_peak_gib": patched.plan.predicted_peak / GB,
                     "lora_read_map_s": first_map, "lora_cached_map_s": cached_map})
        print(f"{label:>9}: {rows[-1]['resident_blocks']}/{rows[-1]['n_blocks']} resident, "
              f"{a * 1e3:.1f} -> {b * 1e3:.1f} ms/step ({rows[-1]['overhead'] * 100:+.1f} %), "
              f"stage {plain_s:.2f} -> {patched_s:.2f} s", flush=True)
    print(f"LoRA read + map {first_map:.2f} s, again from the cache (a strength change) {cached_map:.3f} s")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, help="folder with (or for) the full-size random DiT")
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = parser.parse_args()
    if args.smoke:
        tiny = tiny_checkpoints("lora_bench_")
        root, dit = tiny.root, tiny.dit
        cpu = torch.device("cpu")
        probe = run_sampling(load_dit_handle(dit), *_conds(DiTConfig.tiny(), 7), torch.zeros(1, 16, 8, 8),
                             SamplingSettings(steps=1), MemorySettings(), cpu, Report(), None)
        tight = probe.plan.predicted_peak - 3 * probe.plan.slot_bytes
        rows = run(dit, root, cpu, [("resident", None), ("tight", tight)], 64, 3, 7)
    else:
        if not torch.cuda.is_available():
            parser.error("the full-size benchmark needs a GPU; use --smoke on a CPU")
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from full_size import write_full_size_dit
        models = args.models or Path(tempfile.mkdtemp(prefix="newbie_full_"))
        dit = write_full_size_dit(models)
        rows = run(dit, models, torch.device("cuda"), [("resident", None), ("4 GB", 4 * GB), ("2 GB", 2 * GB)],
                   args.size, args.steps, 300)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
