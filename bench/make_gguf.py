"""Convert the full-size random safetensors (bench/full_size.py) into GGUF DiT and Gemma files.

The DiT follows ComfyUI-GGUF's tool (arch lumina2, official names; embedders, refiners, final
layer and 1-D tensors unquantised; F16 where a K-quant block does not divide a row). Gemma
follows llama.cpp's converter (llama.cpp names, norms +1, tokenizer in the metadata).
Quantisation: newbie_core.models.gguf.quantize (gguf.quants, plus a plain K-quant packer).

    python bench/make_gguf.py /tmp/newbie_full --types Q8_0 Q4_K Q6_K
    python bench/make_gguf.py --smoke            # tiny files on the CPU, seconds
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import torch

from gguf import GGMLQuantizationType as T, GGUFWriter
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from newbie_core.models.dit.loading import AXES_METADATA_KEY  # noqa: E402
from newbie_core.tiny.gguf_files import (_gemma_gguf_name, add_spm_tokenizer, dit_tensor_type, encode_tensor,  # noqa: E402
                                         gemma_tensor_type)
from tiny_files import tiny_checkpoints  # noqa: E402

THREADS = max(1, (os.cpu_count() or 1) // 4)     # per conversion; four conversions run side by side


def _add_all(writer: GGUFWriter, items: Iterable[tuple[str, torch.Tensor, T]], window: int = 16) -> None:
    """Quantise on a thread pool (numpy releases the GIL in its loops), add in file order; at most
    ``window`` tensors are in flight, so memory stays a few tensors, not the model."""
    pending: deque[tuple[str, Future]] = deque()

    def add_oldest() -> None:
        name, future = pending.popleft()
        array, raw = future.result()
        writer.add_tensor(name, array, raw_dtype=raw)
    with ThreadPoolExecutor(THREADS) as pool:
        for name, value, qtype in items:
            pending.append((name, pool.submit(encode_tensor, value, qtype)))
            if len(pending) > window:
                add_oldest()
        while pending:
            add_oldest()


def convert_dit(src: Path, dst: Path, qtype: T) -> Path:
    writer = GGUFWriter(str(dst), "lumina2")
    with safe_open(str(src), "pt") as f:
        meta = f.metadata() or {}
        if AXES_METADATA_KEY in meta:
            writer.add_string(AXES_METADATA_KEY, meta[AXES_METADATA_KEY])
        _add_all(writer, ((key, t, dit_tensor_type(key, tuple(t.shape), qtype))
                          for key in f.keys() for t in (f.get_tensor(key),)))
    return _finish(writer, dst)


def convert_gemma(src: Path, dst: Path, qtype: T) -> Path:
    writer = GGUFWriter(str(dst), "gemma3")
    with safe_open(str(src), "pt") as f:
        spm = f.get_tensor("spiece_model").numpy().tobytes()
        with tempfile.NamedTemporaryFile(suffix=".model") as tmp:
            tmp.write(spm)
            tmp.flush()
            add_spm_tokenizer(writer, Path(tmp.name))
        for key, value in (f.metadata() or {}).items():
            if key.startswith("newbie.gemma."):
                writer.add_string(key, value)
        def items() -> Iterator[tuple[str, torch.Tensor, T]]:
            for key in f.keys():
                if key == "spiece_model" or not key.startswith("model."):
                    continue
                t = f.get_tensor(key)
                yield (_gemma_gguf_name(key), t.float() + 1.0 if key.endswith("norm.weight") else t,
                       gemma_tensor_type(key, tuple(t.shape), qtype))
        _add_all(writer, items())
    return _finish(writer, dst)


def _finish(writer: GGUFWriter, dst: Path) -> Path:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", nargs="?", default="/tmp/newbie_full", help="folder of bench/full_size.py's files")
    ap.add_argument("--types", nargs="+", default=["Q8_0", "Q4_K", "Q6_K"])
    ap.add_argument("--smoke", action="store_true", help="tiny checkpoints on the CPU instead")
    args = ap.parse_args(argv)
    if args.smoke:
        paths = tiny_checkpoints("newbie_gguf_smoke_")
        root = paths.root
        dit, gemma = Path(paths.dit), Path(paths.gemma)
    else:
        root = Path(args.root)
        dit = root / "diffusion_models" / "NewBie-Image-Exp0.1-bf16.safetensors"
        gemma = root / "text_encoders" / "gemma_3_4b_it_bf16.safetensors"
    jobs = []
    for name in args.types:
        for kind, src, folder in (("dit", dit, "diffusion_models"), ("gemma", gemma, "text_encoders")):
            dst = root / folder / f"{'NewBie-Image-Exp0.1' if kind == 'dit' else 'gemma-3-4b-it'}-{name}.gguf"
            if not dst.exists():
                jobs.append((kind, name, src, dst))
    with ProcessPoolExecutor(max(1, min(4, len(jobs)))) as pool:
        for line in pool.map(_convert_job, jobs):
            print(line, flush=True)


def _convert_job(job: tuple[str, str, Path, Path]) -> str:
    kind, name, src, dst = job
    start = time.perf_counter()
    (convert_dit if kind == "dit" else convert_gemma)(src, dst, T[name])
    return f"{kind} {name}: {dst.stat().st_size / 1e9:.2f} GB in {time.perf_counter() - start:.1f} s -> {dst}"


if __name__ == "__main__":
    main()
