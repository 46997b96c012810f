"""GGUF DiT rows (issue 13, item 3): Q8_0 and Q4_K files at resident, 4 GB and 2 GB.

1024² with CFG, 28 steps, the sampling stage alone on fixed random conditioning (the encoders
are not what is measured). Per row: steady-state median s/step with its spread, peak reserved
VRAM, bytes moved to the GPU per step, the roofline (max of the same file's resident step and
those bytes over the measured pinned bandwidth), bitwise equality with the same file's resident
run at the same chunk sizes, and the final-latent drift against the bf16 file's resident latent.
Also the Triton dequant time of one joint layer's weights per quant type.

    python bench/make_gguf.py /tmp/full --types Q8_0 Q4_K
    python bench/gguf_bench.py /tmp/full --out $OUT/gguf.json
    python bench/gguf_bench.py --smoke               # tiny files on the CPU
"""

from __future__ import annotations

import datetime
import json
import statistics
import sys
from pathlib import Path

import torch
from gguf import GGMLQuantizationType as T

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from newbie_core.models.dit import build_dit  # noqa: E402
from newbie_core.models.gguf.dequant import block_geometry, dequantize  # noqa: E402
from newbie_core.pipeline import Conditioning, MemorySettings, SamplingSettings, StorageDType, load_dit_handle  # noqa: E402
from newbie_core.pipeline.sample import run_sampling  # noqa: E402
from newbie_core.placement import Report, active_allocator, use_expandable_segments  # noqa: E402

from lora_bench import _conds  # noqa: E402
from row_timing import (latent_drift, pinned_bandwidth, reset_host_peak, sampling_bench_parser,  # noqa: E402
                        set_budget, steady_steps)
from tiny_files import tiny_checkpoints  # noqa: E402

GB = 2**30


def sample_row(path: Path, device: torch.device, budget_gb: float | None, size: int, steps: int,
               chunks: tuple[int, int] = (0, 0), storage: StorageDType = StorageDType.BF16,
               link_gbps: float | None = None, conds: tuple[Conditioning, Conditioning] | None = None,
               cap_slack_gb: float | None = 0.0) -> dict:
    """One sampling run's row; ``link_gbps`` plans for that link instead of the measured one.
    ``conds`` replaces the fixed random conditioning. The process is capped at the budget plus
    ``cap_slack_gb`` (0: a card of exactly the budget's size), and not at all with None."""
    handle = load_dit_handle(path, storage)
    conds = conds or _conds(handle.ckpt.config, 300 if device.type == "cuda" else 7)
    report = Report()
    memory = MemorySettings(attention_chunk=chunks[0], ffn_chunk=chunks[1], link_gbps=link_gbps)
    cuda = device.type == "cuda"
    cap_gb = None if budget_gb is None or cap_slack_gb is None or not cuda else budget_gb + cap_slack_gb
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        set_budget(device, cap_gb)           # the budget is the card: enforced, as in the pipeline rows
    budget = None if budget_gb is None else int(budget_gb * GB)
    reset_host_peak()
    try:
        result = run_sampling(handle, *conds, torch.zeros(1, 16, size // 8, size // 8),
                              SamplingSettings(steps=steps, cfg=5.0), memory, device, report, budget)
    finally:
        if cuda:
            set_budget(device, None)
    steady = steady_steps(result.step_seconds)
    record = report.records[-1]
    plan = result.plan
    label = "gguf" if path.suffix == ".gguf" else storage.value      # callers name the GGUF's quant type
    return {"storage": label, "file": path.name, "budget_gb": budget_gb, "size": f"{size}x{size}", "cfg": True, "steps": steps,
            "s_per_step": statistics.median(steady), "s_step_min": min(steady), "s_step_max": max(steady),
            "peak_reserved_gb": (record.peak_reserved or 0) / GB, "predicted_peak_gb": (record.predicted_peak or 0) / GB,
            "bytes_h2d_per_step": record.bytes_h2d / steps, "alloc_retries": record.alloc_retries,
            "ram_budget_gb": None, "host_ram_peak_gb": (record.host_ram_peak or 0) / GB,   # RAM: auto
            "cap_gb": cap_gb, "resident_blocks": len(plan.resident),
            "predicted_step_s": plan.predicted_step_s,
            "n_blocks": plan.n_blocks, "chunks": [plan.attn_chunk, plan.ffn_chunk], "_latent": result.latent,
            "_plan": plan, "_handle": handle}


def dequant_ms_per_layer(device: torch.device, qtype: T, elements: int) -> float:
    """Median ms to decode one joint layer's weights (``elements`` values) on the device."""
    from triton.testing import do_bench
    from newbie_core.models.gguf.triton_dequant import try_decode_into
    per, nbytes = block_geometry(qtype)
    blocks = elements // per
    raw = torch.randint(0, 256, (blocks, nbytes), dtype=torch.uint8, device=device)
    raw[:, 0:2] = torch.full((blocks, 1), 0.01, device=device).half().view(torch.uint8)   # finite d
    src, out = raw.reshape(-1), torch.empty(blocks * per, dtype=torch.bfloat16, device=device)
    if not try_decode_into(qtype, src, out):
        return do_bench(lambda: out.copy_(dequantize(qtype, src, (blocks * per,))), return_mode="median")
    return do_bench(lambda: try_decode_into(qtype, src, out), return_mode="median")


def main(argv: list[str] | None = None) -> None:
    ap = sampling_bench_parser(__doc__, steps=28)
    ap.add_argument("--types", nargs="+", default=["fp8", "Q8_0", "Q4_K"],
                    help="fp8 = the bf16 file with fp8 storage (the bytes-per-step comparison), or GGUF types")
    ap.add_argument("--budgets", default="none,4,2")
    args = ap.parse_args(argv)
    use_expandable_segments()            # as the CLI runs: before the first CUDA allocation
    if args.smoke:
        from make_gguf import main as make
        tiny = tiny_checkpoints("gguf_bench_")
        root, bf16 = tiny.root, tiny.dit
        make([str(root), "--types", *[t for t in args.types if t != "fp8"]])
        device, size, steps, budgets = torch.device("cpu"), 64, 3, [None]
    else:
        root = Path(args.root)
        bf16 = root / "diffusion_models" / "NewBie-Image-Exp0.1-bf16.safetensors"
        device, size, steps = torch.device("cuda"), 1024, args.steps
        budgets = [None if b == "none" else float(b) for b in args.budgets.split(",")]
    bandwidth = pinned_bandwidth(device) if device.type == "cuda" else float("inf")
    base = sample_row(bf16, device, None, size, steps)
    stamp = {"machine": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
             "allocator": active_allocator(device).value,
             "date": datetime.date.today().isoformat(), "bandwidth_gbps": bandwidth / 1e9}
    rows = []
    layer = sum(p.numel() for n, p in build_dit(load_dit_handle(bf16).ckpt.config, "meta").named_parameters()
                if n.startswith("layers.0.") and p.ndim == 2)
    for name in args.types:
        fp8 = name == "fp8"
        path = bf16 if fp8 else bf16.parent / f"NewBie-Image-Exp0.1-{name}.gguf"
        storage = StorageDType.FP8 if fp8 else StorageDType.BF16
        dequant = dequant_ms_per_layer(device, T[name], layer) if device.type == "cuda" and not fp8 else None
        resident = None
        for budget in budgets:
            row = sample_row(path, device, budget, size, steps, storage=storage)
            row["storage"] = "fp8" if fp8 else f"gguf-{name.lower()}"
            if budget is None:
                resident = row
            same = resident["_latent"] if row["chunks"] == resident["chunks"] else \
                sample_row(path, device, None, size, steps, tuple(c or -1 for c in row["chunks"]), storage)["_latent"]
            row["bitwise_equal_to_resident"] = bool(torch.equal(row["_latent"], same))
            row["drift_vs_bf16"] = latent_drift(row["_latent"], base["_latent"])
            row["ratio_to_bf16_resident"] = row["s_per_step"] / base["s_per_step"]
            row["roofline_s_per_step"] = max(resident["s_per_step"], row["bytes_h2d_per_step"] / bandwidth)
            row["x_roofline"] = row["s_per_step"] / row["roofline_s_per_step"]
            if dequant is not None:
                row["dequant_ms_per_layer"] = dequant          # a property of the type, timed once
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if not k.startswith("_")}), flush=True)
    base_row = {k: v for k, v in base.items() if not k.startswith("_")}
    print("bf16 base:", json.dumps(base_row), flush=True)
    if args.out:
        clean = [{**{k: v for k, v in r.items() if not k.startswith("_")}, **stamp} for r in [base_row, *rows]]
        args.out.write_text(json.dumps(clean, indent=1) + "\n")


if __name__ == "__main__":
    main()
