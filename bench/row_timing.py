"""Timing one benchmark row: a whole generation under a VRAM budget, with its steady-state
step median, peaks per stage, streamed bytes and host RAM peak; and the small measurements every
row script shares (the pinned link, a budget cap, final-latent drift). run_benchmarks.py builds
its tables from these, gguf_bench.py and link_throttle_bench.py reuse them.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from newbie_core.models.dit import build_dit, flops_per_forward  # noqa: E402
from newbie_core.pipeline import (CONDITIONING_CACHE, GenerationRequest, MemorySettings, Models,  # noqa: E402
                                  SamplingSettings, StorageDType, generate, load_dit_handle,
                                  load_text_encoder_handle, load_vae_handle)
from newbie_core.pipeline.placed import stored_block_bytes  # noqa: E402
from newbie_core.pipeline.sample import use_graphs  # noqa: E402
from newbie_core.prompt import prepare_texts  # noqa: E402

GB = 2**30


def sampling_bench_parser(doc: str, steps: int) -> argparse.ArgumentParser:
    """The arguments the sampling-row scripts share: the full-size files' folder, steps, the
    JSON output and a CPU --smoke run on tiny files (gguf_bench, link_throttle_bench, ring_slots)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", nargs="?", default="/tmp/full")
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--smoke", action="store_true")
    return ap


PROMPT = ("<character_1>\n<n>hatsune_miku</n>\n<gender>1girl</gender>\n<appearance>aqua_hair, twintails, "
          "very_long_hair, aqua_eyes</appearance>\n<clothing>sailor_collar, pleated_skirt, detached_sleeves"
          "</clothing>\n<expression>smile, open_mouth</expression>\n<action>waving, looking_at_viewer</action>\n"
          "<position>center</position>\n</character_1>\n\n<general_tags>\n<count>1girl, solo</count>\n<style>anime "
          "style</style>\n<background>outdoors, beach</background>\n<lighting>sunlight</lighting>\n<quality>very "
          "aesthetic, masterpiece, no text</quality>\n</general_tags>\n\n<caption>A girl with long aqua twintails "
          "waves at the viewer on a sunny beach, smiling with her mouth open.</caption>")


def pinned_bandwidth(device: torch.device, nbytes: int = GB) -> float:
    host = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    times = []
    for _ in range(6):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dev.copy_(host, non_blocking=True)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del host, dev
    torch.cuda.empty_cache()
    return nbytes / statistics.median(times[1:])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_host_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def set_budget(device: torch.device, budget_gb: float | None) -> None:
    """Cap this process's CUDA allocations at ``budget_gb`` (None lifts the cap), as a card of
    that size would; torch wants the device's index, which ``torch.device("cuda")`` leaves out."""
    index = torch.cuda.current_device() if device.index is None else device.index
    total = torch.cuda.get_device_properties(index).total_memory
    torch.cuda.set_per_process_memory_fraction(1.0 if budget_gb is None else min(1.0, budget_gb * GB / total), index)


def load_models(root: Path, dtype: str) -> Models:
    storage = StorageDType.FP8 if dtype == "fp8" else StorageDType.BF16
    return Models(load_dit_handle(root / "diffusion_models" / "NewBie-Image-Exp0.1-bf16.safetensors", storage),
                  load_text_encoder_handle(root / "text_encoders" / "gemma_3_4b_it_bf16.safetensors",
                                           root / "text_encoders" / "jina_clip_v2_bf16.safetensors",
                                           storage),
                  load_vae_handle(root / "vae" / "ae.safetensors"))


def dit_block_bytes(handle, plan, dtype: torch.dtype = torch.bfloat16) -> list[int]:
    """The DiT's blocks' bytes as ``plan`` stores them (pipeline.placed.stored_block_bytes)."""
    return stored_block_bytes(build_dit(handle.ckpt.config, "meta", dtype), plan, dtype, handle.ckpt.source)


def streamed_bytes_per_forward(models: Models, plan, compute: str) -> int:
    stored = dit_block_bytes(models.dit, plan, torch.float16 if compute == "fp16" else torch.bfloat16)
    return sum(stored[i] for i in plan.streamed_per_forward)


def steady_steps(seconds: list[float]) -> list[float]:
    """The steps a steady state is measured on: without the first (weight uploads, eager warm-up)
    and, from 6 steps on, without the second too (with CUDA graphs it captures every block)."""
    skip = 2 if len(seconds) >= 6 else 1
    return seconds[skip:] or seconds


def run_row(models: Models, device, size: int, cfg: float, budget_gb: float | None, dtype: str, steps: int,
            compute: str = "bf16", chunks: tuple[int, int] = (0, 0), graphs: bool | None = None,
            vae_tile: int = 0, fp8_compute: bool = False) -> dict:
    CONDITIONING_CACHE.clear()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        set_budget(device, budget_gb)
    reset_host_peak()
    memory = MemorySettings(vram_budget_gb=budget_gb, compute_dtype=compute, attention_chunk=chunks[0],
                            ffn_chunk=chunks[1], fp8_streaming=dtype == "fp8", cuda_graphs=graphs,
                            vae_tile_px=vae_tile, fp8_compute=fp8_compute)
    request = GenerationRequest(prompt=PROMPT, width=size, height=size,
                                sampling=SamplingSettings(steps=steps, cfg=cfg, seed=0), memory=memory)
    sync(device)
    start = time.perf_counter()
    result = generate(models, request, device)
    sync(device)
    whole = time.perf_counter() - start
    if cuda:
        set_budget(device, None)
    plan = result.sample_plan
    steady = steady_steps(result.step_seconds)
    s_step = statistics.median(steady)
    cap = int(models.encoders.gemma.tokenizer([prepare_texts(PROMPT).gemma_pos]).attention_mask.sum())
    batch = 2 if cfg != 1.0 else 1
    flops = flops_per_forward(models.dit.ckpt.config, batch, cap, (size // 16) ** 2, caption_refined=True)
    recs = {r.name: r for r in result.report.records}
    return {
        "row": "ours", "dtype": dtype if compute == "bf16" else compute, "size": f"{size}x{size}",
        "cfg": cfg != 1.0, "budget_gb": budget_gb, "fp8_compute": fp8_compute,
        "storage": models.dit.storage.value, "ram_budget_gb": memory.ram_budget_gb,    # None: auto
        "peak_vram_gb": max(r.peak_reserved or 0 for r in recs.values()) / GB,
        "stage_peaks_gb": {k: (r.peak_reserved or 0) / GB for k, r in recs.items()},
        "stage_peaks_allocated_gb": {k: (r.peak_allocated or 0) / GB for k, r in recs.items()},
        "predicted_peaks_gb": {k: (r.predicted_peak or 0) / GB for k, r in recs.items()},
        "stage_seconds": {k: r.seconds for k, r in recs.items()},
        "stage_alloc_retries": {k: r.alloc_retries for k, r in recs.items() if r.alloc_retries is not None},
        "s_per_step": s_step, "s_step_min": min(steady), "s_step_max": max(steady), "steady_steps": len(steady),
        "whole_s": whole, "tflops": flops / s_step / 1e12,
        "host_ram_peak_gb": max((r.host_ram_peak or 0) for r in recs.values()) / GB,
        "streamed_bytes_per_step": streamed_bytes_per_forward(models, plan, compute),
        "resident_blocks": len(plan.resident), "n_blocks": plan.n_blocks, "chunks": [plan.attn_chunk, plan.ffn_chunk],
        "slots": plan.slots, "materialized_blocks": len(plan.materialized), "predicted_step_s": plan.predicted_step_s,
        "cuda_graphs": use_graphs(memory, batch, cap + (size // 16) ** 2, device),
        "_latent": result.latent, "_step_seconds": list(result.step_seconds),
    }


def try_row(models: Models, device, size: int, cfg: float, budget_gb: float | None, dtype: str, steps: int,
            **kwargs) -> dict | None:
    """:func:`run_row`, or None after printing why it failed: a failed row is reported and the
    others still run (the budget cap is lifted again)."""
    try:
        return run_row(models, device, size, cfg, budget_gb, dtype, steps, **kwargs)
    except Exception as e:   # noqa: BLE001 - any failure of one row
        set_budget(device, None)
        print(f"ROW FAILED {size} cfg={cfg} {dtype} budget={budget_gb}: {type(e).__name__}: {e}", flush=True)
        return None


def summary(row: dict) -> str:
    stages = " ".join(f"{k}={row['stage_peaks_gb'][k]:.2f}/{row['predicted_peaks_gb'][k]:.2f}"
                      for k in row["stage_peaks_gb"])
    return (f"{row['size']} cfg={row['cfg']} {row['dtype']} budget={row['budget_gb']}: {row['s_per_step'] * 1e3:.1f} ms/step "
            f"(x{row.get('ratio_to_resident', 1):.3f}, roofline {row.get('roofline_s_per_step', 0) * 1e3:.1f} ms) "
            f"whole {row['whole_s']:.2f} s (x{row.get('whole_ratio_to_resident', 1):.3f}) {row['tflops']:.0f} TFLOP/s "
            f"resident {row['resident_blocks']} (kept at compute dtype {row.get('materialized_blocks', 0)}) "
            f"slots {row['slots']} chunks {row['chunks']} graphs {row.get('cuda_graphs', True)} "
            f"bitwise {row.get('bitwise_equal_to_resident')} | measured/predicted GB {stages} | stage s "
            + " ".join(f"{k}={v:.2f}" for k, v in row["stage_seconds"].items())
            + (" | alloc retries " + " ".join(f"{k}={v}" for k, v in retries.items())
               if (retries := row.get("stage_alloc_retries")) else ""))


def latent_drift(lat: torch.Tensor, ref: torch.Tensor) -> dict:
    """Final-latent difference against a reference, relative to the reference's RMS / norm."""
    diff, rms = (lat - ref).abs(), ref.pow(2).mean().sqrt()
    return {"max_abs_rel": float(diff.max() / rms), "mean_abs_rel": float(diff.mean() / rms),
            "rel_l2": float((lat - ref).norm() / ref.norm())}


