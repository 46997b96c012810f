"""Write full-size random-weight NewBie checkpoints in the real ComfyUI file layouts.

Random weights behave like the real ones for speed and memory, and these files go through the
same loaders as the published ones. Tensors are drawn on the GPU when there is one (seconds
instead of minutes for 16 GB). The tokenizers are the tiny fixtures: their ids are a subset of
the real vocabularies, which keep their full embedding tables.

    python bench/full_size.py /tmp/newbie_full
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from newbie_core.models.dit import DiTConfig  # noqa: E402
from newbie_core.models.dit.loading import expected_shapes  # noqa: E402
from newbie_core.tiny.vae import bfl_vae_shapes  # noqa: E402

FIXTURES = Path(__file__).resolve().parents[1] / "newbie_core" / "tiny" / "fixtures"
GEMMA = dict(vocab=262208, hidden=2560, layers=34, heads=8, kv=4, head_dim=256, mlp=10240)
JINA = dict(vocab=250002, hidden=1024, layers=24, ffn=4096)


def _spm(name: str) -> torch.Tensor:
    return torch.frombuffer(bytearray((FIXTURES / name).read_bytes()), dtype=torch.uint8)


def _draw(shapes: dict[str, tuple[int, ...]], norm_center: float, seed: int, device: str) -> dict[str, torch.Tensor]:
    gen = torch.Generator(device=device).manual_seed(seed)
    out = {}
    for key, shape in sorted(shapes.items()):
        noise = torch.randn(shape, generator=gen, device=device)
        if len(shape) >= 2:
            value = noise * 0.02
        elif key.endswith(".bias"):
            value = noise * 0.01
        else:
            value = norm_center + noise * 0.05
        out[key] = value.to(torch.bfloat16).cpu()
    return out


def gemma_shapes() -> dict[str, tuple[int, ...]]:
    d = GEMMA
    h, q, kv = d["hidden"], d["heads"] * d["head_dim"], d["kv"] * d["head_dim"]
    shapes = {"model.embed_tokens.weight": (d["vocab"], h), "model.norm.weight": (h,)}
    for i in range(d["layers"]):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                       p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
                       p + "self_attn.q_norm.weight": (d["head_dim"],), p + "self_attn.k_norm.weight": (d["head_dim"],),
                       p + "mlp.gate_proj.weight": (d["mlp"], h), p + "mlp.up_proj.weight": (d["mlp"], h),
                       p + "mlp.down_proj.weight": (h, d["mlp"])})
        for norm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm"):
            shapes[p + norm + ".weight"] = (h,)
    return shapes


def jina_shapes() -> dict[str, tuple[int, ...]]:
    d = JINA
    h, f = d["hidden"], d["ffn"]
    shapes = {"model.embeddings.word_embeddings.weight": (d["vocab"], h),
              "model.embeddings.token_type_embeddings.weight": (1, h),
              "model.emb_ln.weight": (h,), "model.emb_ln.bias": (h,)}
    for i in range(d["layers"]):
        p = f"model.encoder.layers.{i}."
        shapes.update({p + "mixer.Wqkv.weight": (3 * h, h), p + "mixer.Wqkv.bias": (3 * h,),
                       p + "mixer.out_proj.weight": (h, h), p + "mixer.out_proj.bias": (h,),
                       p + "mlp.fc1.weight": (f, h), p + "mlp.fc1.bias": (f,),
                       p + "mlp.fc2.weight": (h, f), p + "mlp.fc2.bias": (h,)})
        for norm in ("norm1", "norm2"):
            shapes[p + norm + ".weight"] = (h,)
            shapes[p + norm + ".bias"] = (h,)
    return shapes


def write_full_size(root: Path, device: str | None = None) -> dict[str, Path]:
    """The four ComfyUI files at full size under ``root`` (skips files already written)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    paths = {"dit": root / "diffusion_models" / "NewBie-Image-Exp0.1-bf16.safetensors",
             "gemma": root / "text_encoders" / "gemma_3_4b_it_bf16.safetensors",
             "jina": root / "text_encoders" / "jina_clip_v2_bf16.safetensors",
             "vae": root / "vae" / "ae.safetensors"}
    jobs = {
        "dit": lambda: _draw(expected_shapes(DiTConfig.newbie_exp01()), 1.0, 0, device),
        "gemma": lambda: {**_draw(gemma_shapes(), 0.0, 1, device), "spiece_model": _spm("gemma_tiny.model")},
        "jina": lambda: {**_draw(jina_shapes(), 1.0, 2, device), "spiece_model": _spm("xlmr_tiny_aligned.model")},
        "vae": lambda: _draw(bfl_vae_shapes((128, 256, 512, 512)), 1.0, 3, device),
    }
    meta = {"jina": {"newbie.jina.num_attention_heads": json.dumps(16)}}
    for name, path in paths.items():
        if path.exists():
            continue
        start = time.perf_counter()
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = jobs[name]()
        save_file(tensors, str(path), metadata=meta.get(name, {"format": "pt"}))
        print(f"{name}: {sum(t.numel() * t.element_size() for t in tensors.values()) / 1e9:.2f} GB "
              f"in {time.perf_counter() - start:.1f} s -> {path}", flush=True)
        del tensors
    return paths


def write_full_size_dit(root: Path, device: str | None = None) -> Path:
    """Only the DiT (what the CUDA tests need)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    path = root / "NewBie-Image-Exp0.1-bf16.safetensors"
    if not path.exists():
        save_file(_draw(expected_shapes(DiTConfig.newbie_exp01()), 1.0, 0, device), str(path))
    return path


if __name__ == "__main__":
    write_full_size(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/newbie_full"))
