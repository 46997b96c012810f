"""GPU benchmarks: the full-size random-weight NewBie pipeline under VRAM budgets.

Every row is a whole generation (encode + sample + decode) with a warm host cache and a cold
conditioning cache. The budget is enforced with ``torch.cuda.set_per_process_memory_fraction``,
so going over raises OOM instead of passing quietly. Writes ``results.json`` (one object per
row) and ``BENCHMARKS.part.md`` (tables) into ``--out``.

    python bench/full_size.py /tmp/newbie_full
    python bench/run_benchmarks.py --models /tmp/newbie_full --out $OUT            # all rows
    python bench/run_benchmarks.py --models /tmp/newbie_full --out $OUT --quick    # smoke test
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from newbie_core.pipeline import (MemorySettings, Models, SamplingSettings, StorageDType,  # noqa: E402
                                  load_dit_handle, load_text_encoder_handle, load_vae_handle)
from newbie_core.pipeline.sample import run_sampling  # noqa: E402
from newbie_core.pipeline.encode import encode_texts  # noqa: E402
from newbie_core.placement import HOST_CACHE, Report, active_allocator, use_expandable_segments  # noqa: E402
from newbie_core.prompt import prepare_texts  # noqa: E402
from row_timing import (GB, PROMPT, latent_drift, load_models, pinned_bandwidth, run_row,  # noqa: E402
                        set_budget, summary, try_row)

log = logging.getLogger("bench")


def resident_with_chunks(models: Models, device, size: int, cfg: float, chunks, steps: int,
                         fp8_compute: bool = False) -> torch.Tensor:
    """Sampling-stage latent of an all-resident run with the given chunk sizes (for bitwise checks)."""
    texts = prepare_texts(PROMPT)
    memory = MemorySettings(attention_chunk=chunks[0] or -1, ffn_chunk=chunks[1] or -1, fp8_compute=fp8_compute)
    pos, neg = encode_texts(models.encoders, texts, memory, device, Report(), None)
    start = torch.zeros(1, 16, size // 8, size // 8)
    sampling = SamplingSettings(steps=steps, cfg=cfg, seed=0)
    return run_sampling(models.dit, pos, neg, start, sampling, memory, device, Report(), 100 * GB).latent


def profile_sampling(models: Models, device, size: int, cfg: float, budget_gb: float | None, steps: int = 4,
                     fp8_compute: bool = False) -> dict:
    """Where a step's time goes: GEMM / attention / elementwise / copies / idle, and the top kernels."""
    from forward_bench import breakdown, top_kernels
    texts = prepare_texts(PROMPT)
    pos, neg = encode_texts(models.encoders, texts, MemorySettings(), device, Report(), None)
    start = torch.zeros(1, 16, size // 8, size // 8)
    set_budget(device, budget_gb)
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        t0 = time.perf_counter()
        run_sampling(models.dit, pos, neg, start, SamplingSettings(steps=steps, cfg=cfg),
                     MemorySettings(fp8_compute=fp8_compute), device, Report(),
                     None if budget_gb is None else int(budget_gb * GB))
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    set_budget(device, None)

    def dev_time(e) -> float:
        return float(getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0)) / 1e6
    events = prof.key_averages()
    h2d = sum(dev_time(e) for e in events if "HtoD" in e.key)
    kernels = sum(dev_time(e) for e in events
                  if not e.key.startswith("aten::") and "Memcpy" not in e.key and "Memset" not in e.key)
    top = sorted(((dev_time(e), e.key) for e in events), reverse=True)[:12]
    storage = "fp8" if models.dit.storage is StorageDType.FP8 else "bf16"
    return {"size": f"{size}x{size}", "cfg": cfg != 1.0, "budget_gb": budget_gb, "storage": storage,
            "fp8_compute": fp8_compute,
            "steps": steps, "wall_s": wall,
            "kernel_s": kernels, "h2d_copy_s": h2d, "top": [[round(t, 4), k[:90]] for t, k in top],
            "per_step_ms": {k: round(v / steps, 2) if isinstance(v, float) else v // steps
                            for k, v in breakdown(prof, wall).items()},
            "top_per_step": top_kernels(prof, per=steps)}


# (size, cfg, budget GB, storage, CUDA graphs); the first row of a size is its resident base.
FOCUS = [(512, 1.0, None, "bf16", None), (512, 1.0, 4, "fp8", None), (512, 1.0, 2, "fp8", None),
         (512, 1.0, 4, "bf16", None), (1024, 5.0, None, "bf16", None), (1024, 5.0, 4, "fp8", None),
         (1024, 5.0, 2, "fp8", None), (1024, 5.0, 2, "bf16", None)]
CALIBRATION = [(1024, 5.0, None, "bf16"), (1024, 5.0, 4, "bf16"), (1024, 5.0, 2, "bf16"), (1024, 5.0, 2, "fp8"),
               (1024, 5.0, None, "fp8"), (512, 1.0, None, "bf16"), (512, 1.0, 2, "bf16"), (768, 5.0, 3, "bf16"),
               (1536, 5.0, 6, "bf16"), (768, 1.0, 2, "fp8"),
               # chunked FFN (the planner picks the chunk): the chunk sizes were not fitted on
               (1024, 5.0, 1.5, "bf16"), (1024, 5.0, 1.5, "fp8"), (1280, 5.0, 2, "bf16"), (1536, 5.0, 3, "bf16")]


def compare_to(row: dict, base: dict, bandwidth: float) -> None:
    """Ratios against the resident row of the same size and cfg, and the roofline."""
    row["ratio_to_resident"] = row["s_per_step"] / base["s_per_step"]
    row["whole_ratio_to_resident"] = row["whole_s"] / base["whole_s"]
    row["roofline_s_per_step"] = max(base["s_per_step"], row["streamed_bytes_per_step"] / bandwidth)


def focus_rows(models: dict, device, bandwidth: float) -> None:
    """The rows that missed their targets, 12 steps each, printed only."""
    for dtype in ("bf16", "fp8"):       # warm the host caches
        run_row(models[dtype], device, 512, 1.0, None, dtype, 2)
    bases: dict[int, dict] = {}
    for size, cfg, budget, dtype, graphs in FOCUS:
        row = try_row(models[dtype], device, size, cfg, budget, dtype, 12, graphs=graphs)
        if row is None:
            continue
        compare_to(row, bases.setdefault(size, row), bandwidth)
        print(summary(row), flush=True)
    for size, cfg, dtype in ((512, 1.0, "fp8"), (1024, 5.0, "fp8")):
        prof = profile_sampling(models[dtype], device, size, cfg, 2)
        print("profile:", json.dumps(prof), flush=True)


def upload_rows(models: dict, device, steps: int = 6) -> list[dict]:
    """What the sampling stage spends outside its steps (mostly uploading resident weights):
    stage seconds minus the sum of the step times, and the first step's excess over the rest."""
    out = []
    for size, cfg, dtype, budget in ((1024, 5.0, "bf16", None), (512, 1.0, "bf16", None),
                                     (1024, 5.0, "fp8", None), (1024, 5.0, "bf16", 4)):
        run_row(models[dtype], device, size, cfg, budget, dtype, 2)          # warm caches and kernels
        for _ in range(2):
            row = run_row(models[dtype], device, size, cfg, budget, dtype, steps)
            first = row["_step_seconds"][0]
            rec = {"size": row["size"], "cfg": row["cfg"], "dtype": dtype, "budget_gb": budget,
                   "resident_blocks": row["resident_blocks"], "sample_stage_s": row["stage_seconds"]["sample"],
                   "outside_steps_s": row["stage_seconds"]["sample"] - sum(row["_step_seconds"]),
                   "first_step_excess_s": first - row["s_per_step"], "s_per_step": row["s_per_step"]}
            print("upload:", json.dumps(rec), flush=True)
            out.append(rec)
    return out


def calibration_rows(models: dict, device) -> list[dict]:
    """Predicted vs measured stage peaks on sizes the constants were not fitted on (3 steps each)."""
    for dtype in ("bf16", "fp8"):
        run_row(models[dtype], device, 512, 5.0, None, dtype, 2)
    out = []
    for size, cfg, budget, dtype in CALIBRATION:
        row = try_row(models[dtype], device, size, cfg, budget, dtype, 3)
        if row is None:
            continue
        print(summary(row), flush=True)
        out.append({k: v for k, v in row.items() if not k.startswith("_")})
    return out


def table_rows(models: dict, device, bandwidth: float, size: int, cfg: float, budgets: list, steps: int,
               bf16_budgets: list | None = None, repeat_resident: bool = False) -> list[dict]:
    """One size: resident and budgeted rows in bf16 and fp8, each checked bitwise against resident.
    ``bf16_budgets`` (default ``budgets``) must start with None: the resident row is the base.
    ``repeat_resident`` runs the bf16 resident row twice and records the run-to-run spread."""
    rows, resident = [], {}
    for dtype in ("bf16", "fp8"):
        # Warm this dtype's host cache and kernels right before its rows: the host cache keeps one
        # copy per model file, so the other dtype's rows have replaced it.
        run_row(models[dtype], device, size, cfg, None, dtype, 3)
        for budget in (bf16_budgets if bf16_budgets is not None and dtype == "bf16" else budgets):
            row = try_row(models[dtype], device, size, cfg, budget, dtype, steps)
            if row is None:
                continue
            if budget is None:
                resident[dtype] = row
                row["row"] = "resident" if dtype == "bf16" else "ours"
                if repeat_resident and dtype == "bf16":
                    again = run_row(models[dtype], device, size, cfg, None, dtype, steps)
                    row["repeat_s_per_step"] = again["s_per_step"]
                    row["repeat_bitwise_equal"] = bool(torch.equal(again["_latent"], row["_latent"]))
            compare_to(row, resident["bf16"], bandwidth)
            same = resident[dtype]
            ref = same["_latent"] if row["chunks"] == same["chunks"] else \
                resident_with_chunks(models[dtype], device, size, cfg, row["chunks"], steps)
            row["bitwise_equal_to_resident"] = bool(torch.equal(row["_latent"], ref))
            print(summary(row), flush=True)
            rows.append(row)
    return rows


def fp8_compute_rows(models: dict, device, bandwidth: float, rows: list[dict], steps: int) -> list[dict]:
    """Optional fp8 compute (off by default) at 1024² CFG: resident with bf16 files, and fp8
    storage under 4 and 2 GB. Each is checked bitwise against the fp8-compute resident run with
    its chunk sizes, and its final latent against the bf16 resident row (the drift it costs)."""
    base = next(r for r in rows if r["row"] == "resident" and r["size"] == "1024x1024")
    out = []
    for dtype, budgets in (("bf16", [None]), ("fp8", [4, 2])):
        run_row(models[dtype], device, 1024, 5.0, None, dtype, 3, fp8_compute=True)      # warm: compile, cache
        for budget in budgets:
            row = try_row(models[dtype], device, 1024, 5.0, budget, dtype, steps, fp8_compute=True)
            if row is None:
                continue
            row["row"] = "ours-fp8-compute"
            compare_to(row, base, bandwidth)
            ref = row["_latent"] if budget is None else \
                resident_with_chunks(models[dtype], device, 1024, 5.0, row["chunks"], steps, fp8_compute=True)
            row["bitwise_equal_to_resident"] = bool(torch.equal(row["_latent"], ref))
            row["drift_vs_bf16"] = latent_drift(row["_latent"], base["_latent"])
            print(summary(row), "drift", json.dumps(row["drift_vs_bf16"]), flush=True)
            out.append(row)
    return out


def drift_vs_bf16(models: dict, device, rows: list[dict], size: int, cfg: float, steps: int) -> tuple[dict, dict]:
    """Final-latent drift of fp16 compute and fp8 storage against the bf16 resident row."""
    name = f"{size}x{size}"
    ref = next(r for r in rows if r["row"] == "resident" and r["size"] == name)["_latent"]
    fp16 = run_row(models["bf16"], device, size, cfg, None, "bf16", steps, compute="fp16")
    fp8 = next(r for r in rows if r["dtype"] == "fp8" and r["budget_gb"] is None and r["size"] == name)
    drift = {label: latent_drift(lat, ref) for label, lat in (("fp16", fp16["_latent"]), ("fp8", fp8["_latent"]))}
    fp16.pop("_latent")
    fp16["row"] = "ours"
    return drift, fp16


def cold_row(models: dict, device, steps: int) -> dict:
    """Resident 1024² CFG with an empty host cache and the page cache dropped: disk reads count."""
    HOST_CACHE.clear()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3")
    except OSError:
        pass
    row = run_row(models["bf16"], device, 1024, 5.0, None, "bf16", steps)
    row["row"] = "resident (cold, disk reads)"
    return row


# The seed article's recipes on our pipeline, with the article's own figures beside them
# (RTX 3090, 50 steps, CFG 7): peak GB and seconds per image.
SEED_ARTICLE = {"seed-staged-bf16": (14.1, 51.6), "seed-cpu-offload-fp16": (13.0, 56.3), "seed-full-gpu": (15.8, 48.2)}


def seed_rows(models: dict, device, steps: int) -> list[dict]:
    """seed-staged-bf16: encode, free the encoders, sample with attention slicing, decode with VAE
    slicing (tiles); seed-cpu-offload-fp16: each model moved whole to the GPU for its stage, fp16.
    seed-full-gpu (every model resident at once) has no equivalent in a staged pipeline: its
    sampling step is the resident row's, its peak the sum of all four models."""
    rows = []
    for name, kwargs in (("seed-staged-bf16", dict(chunks=(1024, 0), vae_tile=512)),
                         ("seed-cpu-offload-fp16", dict(compute="fp16"))):
        row = try_row(models["bf16"], device, 1024, 5.0, None, "bf16", steps, **kwargs)
        if row is None:
            continue
        gb, sec = SEED_ARTICLE[name]
        row.update(row=name, seed_article_peak_gb=gb, seed_article_s_per_image=sec,
                   notes="our pipeline with the recipe's settings; the article's figures are an RTX 3090, "
                         "50 steps, CFG 7")
        print(summary(row), flush=True)
        rows.append(row)
    return rows


def cold_first_row(models: dict, device, steps: int) -> dict:
    """The very first generation of the process, with an empty inductor cache: torch.compile
    builds the DiT's fused kernels inside it (the first-call cost), then the same row warm.

    The caches are pointed at fresh folders here (inductor reads the variables at each compile),
    since a visit's earlier parts share one cache: without this the row measured a cache read.
    """
    fresh = tempfile.mkdtemp(prefix="inductor_cold_")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = fresh
    os.environ["TRITON_CACHE_DIR"] = os.path.join(fresh, "triton")
    row = run_row(models["bf16"], device, 1024, 5.0, None, "bf16", steps)
    row["row"] = "resident (first run: compiles, cold inductor cache)"
    row["inductor_cache"] = "empty"
    warm = run_row(models["bf16"], device, 1024, 5.0, None, "bf16", steps)
    row["compile_s"] = row["whole_s"] - warm["whole_s"]
    print(f"first run {row['whole_s']:.2f} s, warm {warm['whole_s']:.2f} s: compile and first-use cost "
          f"{row['compile_s']:.2f} s", flush=True)
    return row


def smoke(out: Path) -> None:
    """Every code path of one benchmark row on tiny models and the CPU (what CI runs)."""
    from newbie_core.tiny import default_tiny_checkpoints
    tiny = default_tiny_checkpoints()
    models = Models(load_dit_handle(tiny.dit), load_text_encoder_handle(tiny.gemma, tiny.jina),
                    load_vae_handle(tiny.vae))
    device = torch.device("cpu")
    row = run_row(models, device, 64, 5.0, None, "bf16", 2)
    row.pop("_latent")
    row.pop("_step_seconds")
    compare_to(row, row, 1e9)
    row["bitwise_equal_to_resident"] = True          # it is the resident row
    print(summary(row), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps([row], indent=1))


def final_run(models: dict, device, bandwidth: float, steps: int, sections: set[str], save, save_extra) -> None:
    """One GPU visit: the cold first run, the main rows at both sizes (the resident row twice, for
    its spread), the seed recipes, the fp8-compute rows, the profiles and the drift, saved after
    every group so a visit cut short keeps what it measured."""
    rows: list[dict] = []
    extra: dict = {"bandwidth_gbps": bandwidth / 1e9, "torch": torch.__version__}
    save_extra(extra)          # the roofline's bandwidth, whichever groups run (collect.py reads it)
    if "first" in sections:
        rows.append(cold_first_row(models, device, steps))
        save(rows)
    if "1024" in sections:
        rows += table_rows(models, device, bandwidth, 1024, 5.0, [None, 4, 2], steps, repeat_resident=True)
        save(rows)
    if "512" in sections:
        rows += table_rows(models, device, bandwidth, 512, 1.0, [None, 2], steps)
        save(rows)
    if "seed" in sections:
        rows += seed_rows(models, device, steps)
        save(rows)
    if sections & {"fp8c", "drift"} and not any(r["row"] == "resident" and r["size"] == "1024x1024" for r in rows):
        rows += table_rows(models, device, bandwidth, 1024, 5.0, [None], steps)
    if "fp8c" in sections:
        rows += fp8_compute_rows(models, device, bandwidth, rows, steps)
        save(rows)
    if "profiles" in sections:
        extra["profiles"] = []
        for d, b, fp8c in (("bf16", None, False), ("bf16", 2, False), ("fp8", 2, False), ("bf16", None, True)):
            p = profile_sampling(models[d], device, 1024, 5.0, b, fp8_compute=fp8c)
            print("profile:", json.dumps({k: v for k, v in p.items() if k != "top"}), flush=True)
            extra["profiles"].append(p)
            save_extra(extra)
    if "drift" in sections:
        extra["drift"], fp16 = drift_vs_bf16(models, device, rows, 1024, 5.0, steps)
        print("drift vs bf16:", json.dumps(extra["drift"]), flush=True)
        save_extra(extra)
        rows.append(fp16)
        save(rows)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--calibrate", action="store_true", help="only check predicted vs measured stage peaks")
    parser.add_argument("--focus", action="store_true", help="only the rows that missed their targets, 12 steps")
    parser.add_argument("--upload", action="store_true",
                        help="only the sampling stage's time outside its steps (weight uploads), into upload.json")
    parser.add_argument("--final", action="store_true",
                        help="the reduced set for one visit: first run (compile), 1024² none/4/2 GB and 512² none/2 GB "
                             "in bf16 and fp8, the seed recipes, the profiles")
    parser.add_argument("--smoke", action="store_true", help="one tiny row on the CPU (CI)")
    parser.add_argument("--fp8-compute", action="store_true",
                        help="only the bf16 resident base and the fp8-compute rows, into results_fp8_compute.json")
    parser.add_argument("--sections", default="first,1024,512,seed,fp8c,profiles,drift",
                        help="with --final: which groups to run (comma list), so a visit can split them")
    parser.add_argument("--fp8-1024", action="store_true",
                        help="only the 1024² CFG fp8 rows and their resident base, into results_fp8_1024.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.smoke:
        return smoke(args.out)
    if args.models is None:
        parser.error("--models is required (except with --smoke)")
    use_expandable_segments()            # as the CLI runs: before the first CUDA allocation
    device = torch.device("cuda", torch.cuda.current_device())
    args.out.mkdir(parents=True, exist_ok=True)
    bandwidth = pinned_bandwidth(device)
    print(f"pinned H2D bandwidth: {bandwidth / 1e9:.1f} GB/s", flush=True)
    models = {d: load_models(args.models, d) for d in ("bf16", "fp8")}
    if args.focus:
        return focus_rows(models, device, bandwidth)
    if args.upload:
        (args.out / "upload.json").write_text(json.dumps(upload_rows(models, device), indent=1))
        return None
    if args.calibrate:
        (args.out / "calibration.json").write_text(json.dumps(calibration_rows(models, device), indent=1))
        return None
    steps = 6 if args.quick else args.steps
    budgets = [None, 2] if args.quick else [None, 16, 8, 4, 2]
    stamp = {"machine": torch.cuda.get_device_name(device), "date": datetime.date.today().isoformat(),
             "allocator": active_allocator(device).value}

    def save(rows: list[dict], name: str = "results.json") -> None:   # after every group: a cut-short run keeps its rows
        clean = [{**{k: v for k, v in r.items() if not k.startswith("_")}, **stamp} for r in rows]
        (args.out / name).write_text(json.dumps(clean, indent=1))
    if args.final or args.fp8_compute:
        sections = {"fp8c"} if args.fp8_compute else set(args.sections.split(","))
        final_run(models, device, bandwidth, steps, sections,
                  lambda rows: save(rows, "results_fp8_compute.json" if args.fp8_compute else "results.json"),
                  lambda extra: (args.out / "extra.json").write_text(json.dumps(extra, indent=1)))
        return None
    if args.fp8_1024:
        save(table_rows(models, device, bandwidth, 1024, 5.0, budgets, steps, bf16_budgets=[None]),
             "results_fp8_1024.json")
        return None
    rows = table_rows(models, device, bandwidth, 1024, 5.0, budgets, steps)
    save(rows)
    rows += table_rows(models, device, bandwidth, 512, 1.0, budgets, steps)
    save(rows)
    drift, fp16 = drift_vs_bf16(models, device, rows, 1024, 5.0, steps)
    rows.append(fp16)
    print("drift vs bf16:", json.dumps(drift), flush=True)
    profiles = [profile_sampling(models[d], device, size, cfg, 2)
                for size, cfg in ((1024, 5.0), (512, 1.0)) for d in ("bf16", "fp8")]
    for p in profiles:
        print("profile:", json.dumps({k: v for k, v in p.items() if k != "top"}), flush=True)
    extra = {"bandwidth_gbps": bandwidth / 1e9, "drift": drift, "profiles": profiles, "torch": torch.__version__}
    (args.out / "extra.json").write_text(json.dumps(extra, indent=1))
    rows.append(cold_row(models, device, steps))
    save(rows)
    print("done", flush=True)
    return None


if __name__ == "__main__":
    main()
