"""The plans behind a visit's measured rows, recomputed on any machine, beside what was measured.

Planning reads only file headers, so full-size files with real headers and no data (sparse:
kilobytes on disk) give the exact plans of the benchmark's full-size checkpoints. This writes
such hollow files (safetensors and GGUF, the layouts bench/full_size.py and bench/make_gguf.py
write) and prints, for each host-RAM row of bench/host_ram.json, the plan's predicted host peak
against the measured VmHWM, the way a CUDA process plans it. It found plans predicting 1.2-1.4
GiB below the runs (2026-12-02) with no GPU at hand.

    python bench/offline_plans.py /tmp/hollow          # writes the hollow files once, then the table
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T, GGUFWriter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import full_size  # noqa: E402
from host_ram_bench import STORAGES  # noqa: E402
from newbie_core.models.dit import DiTConfig  # noqa: E402
from newbie_core.models.dit.loading import AXES_METADATA_KEY, expected_shapes  # noqa: E402
from newbie_core.tiny.gguf_files import (_gemma_gguf_name, add_spm_tokenizer, dit_tensor_type,  # noqa: E402
                                         gemma_tensor_type)
from newbie_core.tiny.vae import bfl_vae_shapes  # noqa: E402

GiB = 2**30
GGUF_ALIGN = 32


def hollow_safetensors(path: Path, shapes: dict[str, tuple[int, ...]], real: dict[str, bytes],
                       metadata: dict[str, str]) -> Path:
    """A safetensors file whose bf16 tensors are holes of the right size; ``real`` tensors (the
    tokenizer models) are written as uint8 bytes."""
    header, offset, blobs = {}, 0, []
    for key in sorted([*shapes, *real]):
        if key in real:
            n = len(real[key])
            header[key] = {"dtype": "U8", "shape": [n], "data_offsets": [offset, offset + n]}
            blobs.append((offset, real[key]))
        else:
            n = 2 * int(np.prod(shapes[key]))
            header[key] = {"dtype": "BF16", "shape": list(shapes[key]), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps({**header, "__metadata__": metadata}).encode()
    text += b" " * (-len(text) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for at, data in blobs:
            f.seek(8 + len(text) + at)
            f.write(data)
        f.truncate(8 + len(text) + offset)
    return path


def _nbytes(shape: tuple[int, ...], qtype: T) -> int:
    per, size = GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape)) // per * size


def hollow_gguf(path: Path, arch: str, tensors: list[tuple[str, tuple[int, ...], T]], metadata=None) -> Path:
    """A GGUF file with real metadata and tensor infos and a hole where the data goes."""
    writer = GGUFWriter(str(path), arch)
    if metadata:
        metadata(writer)
    for name, shape, qtype in tensors:
        if qtype in (T.F32, T.F16):
            writer.add_tensor_info(name, shape, np.float32 if qtype is T.F32 else np.float16, _nbytes(shape, qtype))
        else:
            per, size = GGML_QUANT_SIZES[qtype]
            writer.add_tensor_info(name, (*shape[:-1], shape[-1] // per * size), np.uint8, _nbytes(shape, qtype),
                                   raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    end = -(-os.path.getsize(path) // GGUF_ALIGN) * GGUF_ALIGN
    for _, shape, qtype in tensors:
        end = -(-end // GGUF_ALIGN) * GGUF_ALIGN + _nbytes(shape, qtype)
    with open(path, "r+b") as f:
        f.truncate(end)
    return path


def write_hollow_models(root: Path, quant_types: tuple[str, ...] = ("Q8_0", "Q4_K")) -> None:
    """The full-size files of bench/full_size.py and bench/make_gguf.py, hollow, under ``root``."""
    config = DiTConfig.newbie_exp01()
    spm = {"gemma": (full_size.FIXTURES / "gemma_tiny.model").read_bytes(),
           "jina": (full_size.FIXTURES / "xlmr_tiny_aligned.model").read_bytes()}
    files = {
        "diffusion_models/NewBie-Image-Exp0.1-bf16.safetensors": (expected_shapes(config), {}, {"format": "pt"}),
        "text_encoders/gemma_3_4b_it_bf16.safetensors": (full_size.gemma_shapes(), {"spiece_model": spm["gemma"]},
                                                         {"format": "pt"}),
        "text_encoders/jina_clip_v2_bf16.safetensors": (full_size.jina_shapes(), {"spiece_model": spm["jina"]},
                                                        {"newbie.jina.num_attention_heads": json.dumps(16)}),
        "vae/ae.safetensors": (bfl_vae_shapes((128, 256, 512, 512)), {}, {"format": "pt"}),
    }
    for name, (shapes, real, meta) in files.items():
        if not (root / name).exists():
            hollow_safetensors(root / name, shapes, real, meta)
    for q in quant_types:
        qtype = T[q]
        dit = root / f"diffusion_models/NewBie-Image-Exp0.1-{q}.gguf"
        if not dit.exists():
            hollow_gguf(dit, "lumina2", [(k, s, dit_tensor_type(k, tuple(s), qtype))
                                         for k, s in sorted(expected_shapes(config).items())],
                        lambda w: w.add_string(AXES_METADATA_KEY, json.dumps(list(config.axes_dims))))
        gemma = root / f"text_encoders/gemma-3-4b-it-{q}.gguf"
        if not gemma.exists():
            hollow_gguf(gemma, "gemma3", [(_gemma_gguf_name(k), s, gemma_tensor_type(k, tuple(s), qtype))
                                          for k, s in sorted(full_size.gemma_shapes().items())],
                        lambda w: add_spm_tokenizer(w, full_size.FIXTURES / "gemma_tiny.model"))


# The GPU machine's rates, measured there on 2026-12-02 (placement/bandwidth.py's probes), which a
# CUDA process's sampling plan is made with; this machine has no GPU to measure.
H200_LINK = 55.2e9
H200_MATMUL = {torch.bfloat16: 803e12, torch.float16: 770e12, torch.float8_e4m3fn: 1378e12}


def host_rows(root: Path, measured: list[dict]) -> list[dict]:
    """Each measured host-RAM row with an explicit RAM budget, beside its plan's prediction."""
    from newbie_core.pipeline import (GenerationRequest, MemorySettings, Models, SamplingSettings, load_dit_handle,
                                      load_text_encoder_handle, load_vae_handle)
    from newbie_core.pipeline import sample
    from newbie_core.pipeline.generate import host_plan
    sample.link_bandwidth = lambda device: H200_LINK
    sample.matmul_throughput = lambda device, dtype: H200_MATMUL[dtype]
    out = []
    for r in measured:
        if "host_ram_peak_gb" not in r or r.get("ram_budget_gb") is None or r.get("temperature") != "warm":
            continue
        dit, gemma, dtype = STORAGES[r["storage"]]
        models = Models(load_dit_handle(root / "diffusion_models" / dit, dtype),
                        load_text_encoder_handle(root / "text_encoders" / gemma,
                                                 root / "text_encoders/jina_clip_v2_bf16.safetensors"),
                        load_vae_handle(root / "vae/ae.safetensors"))
        memory = MemorySettings(vram_budget_gb=r["vram_budget_gb"], ram_budget_gb=r["ram_budget_gb"],
                                fp8_streaming=dtype == "fp8")
        request = GenerationRequest(prompt="a girl in a garden, masterpiece", width=r["size"], height=r["size"],
                                    sampling=SamplingSettings(steps=r["steps"], seed=1), memory=memory)
        plan = host_plan(models, request, torch.device("cuda"))
        out.append({"storage": r["storage"], "ram_budget_gb": r["ram_budget_gb"], "vram_budget_gb": r["vram_budget_gb"],
                    "measured_gib": r["host_ram_peak_gb"], "measured_pinned_gib": r["pinned_gb"],
                    "predicted_gib": plan.predicted_peak / GiB,
                    "planned_cached_gib": plan.peak_cached / GiB,
                    "evicts": [e for row in plan.rows for e in row.evicted]})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", type=Path, nargs="?", default=Path("/tmp/hollow"))
    ap.add_argument("--host-ram", type=Path, default=Path(__file__).with_name("host_ram.json"))
    args = ap.parse_args(argv)
    write_hollow_models(args.root)
    doc = json.loads(args.host_ram.read_text())
    print("| storage | RAM budget | VRAM budget | measured VmHWM GiB | predicted GiB | host copies measured / "
          "planned GiB | evicts |\n|---|---|---|---|---|---|---|")
    for r in host_rows(args.root, doc["rows"] if isinstance(doc, dict) else doc):
        print(f"| {r['storage']} | {r['ram_budget_gb']} | {r['vram_budget_gb']} | {r['measured_gib']:.2f} | "
              f"{r['predicted_gib']:.2f} | {r['measured_pinned_gib']:.2f} / {r['planned_cached_gib']:.2f} | "
              f"{', '.join(r['evicts']) or '-'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
