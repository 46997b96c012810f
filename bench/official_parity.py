"""Our Next-DiT forward against the official ``NextDiT_CLIP``, on the same random weights.

The official repository is not part of this project: pass a checkout of
NewBieAI-Lab/NewBie-image-Exp0.1 (``models/model.py``). Its bf16 path calls flash-attn's varlen
kernel; where flash-attn is absent a stand-in runs the same per-sequence attention through SDPA
in the input dtype (exact in fp32). Reported for a padded CFG pair (two caption lengths):

- fp32: ours vs official, relative L2 and max |d| / RMS (the target is 1e-5);
- bf16: ours and official, each against the official fp32 forward (ours must drift no more).

    python bench/official_parity.py --official /path/to/NewBie-image-Exp0.1 [--device cuda] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from newbie_core.models.dit import DiTConfig, NextDiT  # noqa: E402
from newbie_core.models.dit.fused import kernels  # noqa: E402


def _stub_flash_attn() -> None:
    """flash_attn / flash_attn.bert_padding stand-ins with the semantics the official code uses."""
    if "flash_attn" in sys.modules:
        return

    def varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
               causal=False, softmax_scale=None):
        out = torch.empty_like(q)
        for a, b in zip(cu_seqlens_q.tolist(), cu_seqlens_q.tolist()[1:]):
            qs, ks, vs = (t[a:b].transpose(0, 1)[None] for t in (q, k, v))        # (1, H, n, D)
            o = F.scaled_dot_product_attention(qs, ks, vs, scale=softmax_scale, enable_gqa=True)
            out[a:b] = o[0].transpose(0, 1)
        return out

    def pad_input(x, indices, batch, seqlen):
        out = x.new_zeros(batch * seqlen, *x.shape[1:])
        out[indices] = x
        return out.view(batch, seqlen, *x.shape[1:])

    flash = types.ModuleType("flash_attn")
    flash.flash_attn_varlen_func = varlen
    padding = types.ModuleType("flash_attn.bert_padding")
    padding.index_first_axis = lambda x, idx: x[idx]
    padding.pad_input = pad_input
    padding.unpad_input = None
    flash.bert_padding = padding
    sys.modules["flash_attn"], sys.modules["flash_attn.bert_padding"] = flash, padding


def official_model(repo: Path, dims: dict):
    _stub_flash_attn()
    sys.path.insert(0, str(repo))
    from models.model import NextDiT_CLIP  # type: ignore[import-not-found]
    model = NextDiT_CLIP(in_channels=16, qk_norm=True, axes_lens=[1024, 512, 512], **dims)
    # Trained with apex's FusedRMSNorm, whose eps default is 1e-5 (spec §2.12); the vanilla
    # fallback the official code uses without apex defaults q/k/pooled norms to 1e-6.
    for m in model.modules():
        if type(m).__name__ == "RMSNorm":
            m.eps = 1e-5
    return model


def ours_like(official) -> NextDiT:
    sd = official.state_dict()
    blk = official.layers[0]
    head = blk.attention.head_dim
    config = DiTConfig(dim=official.dim, n_layers=len(official.layers), n_noise_refiner=len(official.noise_refiner),
                       n_context_refiner=len(official.context_refiner), n_heads=official.n_heads,
                       n_kv_heads=blk.attention.n_local_kv_heads, ffn_dim=sd["layers.0.feed_forward.w1.weight"].shape[0],
                       cap_feat_dim=sd["cap_embedder.1.weight"].shape[1],
                       clip_text_dim=sd["clip_text_pooled_proj.1.weight"].shape[0],
                       adaln_dim=min(official.dim, 1024), axes_dims=tuple(official.axes_dims))
    assert config.head_dim == head
    ours = NextDiT(config)
    missing, unexpected = ours.load_state_dict(sd, strict=False)
    assert not missing, missing
    return ours


def randomise(model, seed: int) -> None:
    """Non-trivial weights everywhere (the official init zeroes gates and time_text_embed)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 / p.shape[1] ** 0.5))
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            else:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))


def inputs(config: DiTConfig, lens=(23, 9), hw=(16, 24), seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    b, length = len(lens), max(lens) + 3
    x = torch.randn(b, 16, *hw, generator=g)
    cap = torch.randn(b, length, config.cap_feat_dim, generator=g)
    mask = (torch.arange(length)[None] < torch.tensor(lens)[:, None]).long()
    pooled = torch.randn(b, config.clip_text_dim, generator=g)
    t = torch.tensor([0.3, 0.3])
    return x, t, cap, mask, pooled


def stats(out: torch.Tensor, ref: torch.Tensor) -> dict:
    d = (out.double() - ref.double())
    return {"rel_l2": float(d.norm() / ref.double().norm()),
            "max_abs_over_rms": float(d.abs().max() / ref.double().pow(2).mean().sqrt())}


def compare(repo: Path, dims: dict, device: str, seed: int = 0) -> dict:
    # Each model compiles afresh, independent of the one before. (Before the fused functions kept
    # one compiled copy per dtype and feature size, a second model's variants on top of the
    # first's reached dynamo's 8 per function and ran eager bodies: mid's bf16 forward on
    # 2026-12-03.)
    torch._dynamo.reset()
    torch.manual_seed(seed)
    official = official_model(repo, dims)
    randomise(official, seed)
    ours = ours_like(official)
    official, ours = official.to(device).eval(), ours.to(device).eval()
    ours.set_kernels(kernels(None if device.startswith("cuda") else False))
    x, t, cap, mask, pooled = (a.to(device) for a in inputs(ours.config))
    with torch.no_grad():
        ref = official(x, t, cap, mask, clip_text_pooled=pooled)
        out32 = ours(x, t, cap, mask, pooled)
        official.to(torch.bfloat16)
        ours.to(torch.bfloat16)
        off16 = official(x.bfloat16(), t, cap.bfloat16(), mask, clip_text_pooled=pooled.bfloat16())
        ours16 = ours(x.bfloat16(), t, cap.bfloat16(), mask, pooled.bfloat16())
    return {"dims": dims, "device": device, "kernels": repr(ours.kernels),
            "fp32_ours_vs_official": stats(out32, ref),
            "bf16_official_vs_fp32": stats(off16.float(), ref), "bf16_ours_vs_fp32": stats(ours16.float(), ref)}


# (name, official constructor dims); ffn hidden = 4 * dim * 2/3 * 1.5 = 4 * dim, as NewBie's 9216 / 2304
DIMS = {
    "tiny": dict(dim=96, n_layers=3, n_refiner_layers=2, n_heads=3, n_kv_heads=1, multiple_of=32,
                 ffn_dim_multiplier=1.5, cap_feat_dim=64, clip_text_dim=32, axes_dims=[8, 12, 12]),
    "mid": dict(dim=576, n_layers=4, n_refiner_layers=2, n_heads=6, n_kv_heads=2, multiple_of=256,
                ffn_dim_multiplier=1.5, cap_feat_dim=256, clip_text_dim=128, axes_dims=[32, 32, 32]),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--official", type=Path, required=True, help="a NewBie-image-Exp0.1 checkout")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = [{"model": name, **compare(args.official, dims, args.device)} for name, dims in DIMS.items()]
    for r in rows:
        print(f"{r['model']:5s} {r['device']:5s} fp32 ours-official rel {r['fp32_ours_vs_official']['rel_l2']:.2e} | "
              f"bf16 vs fp32: official rel {r['bf16_official_vs_fp32']['rel_l2']:.2e} "
              f"max/rms {r['bf16_official_vs_fp32']['max_abs_over_rms']:.2e}; ours rel "
              f"{r['bf16_ours_vs_fp32']['rel_l2']:.2e} max/rms {r['bf16_ours_vs_fp32']['max_abs_over_rms']:.2e}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
