"""NextDiT math on CPU: patchify, RoPE packing, conditioning, chunking and the placement seam."""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import functional_call

from newbie_core.models.dit import ActivationChunks, DiTConfig, NextDiT, estimate_activation_bytes, flops_per_forward
from newbie_core.models.dit.attention import sdpa_attention
from newbie_core.models.dit.fused import finite_fp16, qkv_norm_rope
from newbie_core.models.dit.embedders import patchify, timestep_features, unpatchify
from newbie_core.models.dit.estimate import AttentionKernel
from newbie_core.models.dit.model import _joint_positions, _pack_tokens
from newbie_core.models.dit.rope import image_positions, rope_cos_sin

CFG = DiTConfig.tiny()


def _random_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> NextDiT:
    """Tiny model with non-trivial weights (no zero gates), as the tiny writer draws them."""
    torch.manual_seed(seed)
    model = NextDiT(CFG)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.normal_(0, 0.05)
            elif name.endswith("bias"):
                p.normal_(0, 0.02)
            else:
                p.copy_(1 + 0.1 * torch.randn_like(p))
    return model.to(dtype).eval()


def _inputs(lens=(9, 5), h=8, w=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    b, length = len(lens), max(lens) + 2
    x = torch.randn(b, 16, h, w, generator=g)
    cap = torch.randn(b, length, CFG.cap_feat_dim, generator=g)
    mask = torch.arange(length)[None] < torch.tensor(lens)[:, None]
    pooled = torch.randn(b, CFG.clip_text_dim, generator=g)
    t = torch.tensor([0.25] * b)
    return x, t, cap, mask, pooled


def test_patchify_layout_and_inverse():
    x = torch.randn(2, 16, 6, 10)
    tokens = patchify(x, 2)
    assert tokens.shape == (2, 15, 64)
    # token index = row * (W/2) + col; feature = ph*32 + pw*16 + c (spec §2.5)
    row, col, ph, pw, c = 1, 3, 1, 0, 5
    assert tokens[1, row * 5 + col, ph * 32 + pw * 16 + c] == x[1, c, 2 * row + ph, 2 * col + pw]
    assert torch.equal(unpatchify(tokens, 2, 16, 6, 10), x)


def test_rope_positions_for_padded_cfg_batch():
    lens, n_img = [9, 5], 4 * 6
    img_pos = image_positions(lens, 4, 6, torch.device("cpu"))
    assert img_pos[:, :, 0].tolist() == [[9] * n_img, [5] * n_img]
    assert img_pos[0, 7].tolist() == [9, 1, 1]              # token 7 = row 1, col 1 of a 6-wide grid
    cap, img = torch.randn(2, 11, 4), torch.randn(2, n_img, 4)
    mask, pos = _joint_positions(lens, img_pos)
    joint = _pack_tokens(cap, img, lens)
    assert joint.shape[1] == 9 + n_img
    # sample 1: caption 0..4, image right after its valid caption, then padding
    assert pos[1, :5, 0].tolist() == list(range(5))
    assert torch.equal(joint[1, 5:5 + n_img], img[1]) and torch.equal(joint[1, :5], cap[1, :5])
    assert mask[1].tolist() == [True] * (5 + n_img) + [False] * 4
    assert not joint[1, 5 + n_img:].any() and mask[0].all()
    no_mask, _ = _joint_positions([9, 9], img_pos)
    assert no_mask is None                                  # nothing padded: no mask, fast kernels


def test_rope_angles_and_interleaved_rotation():
    pos = torch.tensor([[[3, 5, 7]]])
    cos, sin = rope_cos_sin(pos, (8, 12, 12), 10000.0)
    assert cos.shape == (1, 1, 16)
    # pair 4 + 2 belongs to axis 1 (pairs 4..9), k = 2: angle = 5 * 10000^(-4/12)
    assert math.isclose(math.atan2(sin[0, 0, 6], cos[0, 0, 6]), 5 * 10000 ** (-4 / 12), rel_tol=1e-6)
    x = torch.randn(1, 1, 4, 32)                          # two query heads, one key, one value head
    w = 1 + 0.1 * torch.randn(32)
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w
    ref = torch.view_as_real(torch.view_as_complex(normed.unflatten(-1, (16, 2))) * torch.complex(cos, sin)[:, :, None])
    q, k, _ = qkv_norm_rope(x, w, w, cos, sin, 1e-5, 2)
    assert torch.allclose(torch.cat([q, k], dim=2), ref.flatten(-2)[:, :, :3], atol=1e-6)


def test_adaln_vector_matches_hand_computation():
    model = _random_model()
    t, pooled = torch.tensor([0.0, 0.7]), torch.randn(2, CFG.clip_text_dim)
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half) / half)
    feats = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], dim=-1)
    assert torch.allclose(timestep_features(t), feats)
    m0, m2 = model.t_embedder.mlp[0], model.t_embedder.mlp[2]
    t_emb = torch.nn.functional.silu(feats @ m0.weight.T + m0.bias) @ m2.weight.T + m2.bias
    norm_w, proj = model.clip_text_pooled_proj[0].weight, model.clip_text_pooled_proj[1]
    p = pooled * torch.rsqrt(pooled.pow(2).mean(-1, keepdim=True) + 1e-5) * norm_w
    p = p @ proj.weight.T + proj.bias
    lin = model.time_text_embed[1]
    c = torch.nn.functional.silu(torch.cat([t_emb, p], -1)) @ lin.weight.T + lin.bias
    with torch.no_grad():
        assert torch.allclose(model.adaln_vector(t, pooled), c, atol=1e-5)


def test_padded_sample_equals_unpadded_run():
    """Sample 1 with a short caption must give the same velocity alone and inside a padded CFG batch."""
    model = _random_model()
    x, t, cap, mask, pooled = _inputs(lens=(9, 5))
    with torch.no_grad():
        both = model(x, t, cap, mask, pooled)
        alone = model(x[1:], t[1:], cap[1:, :5], mask[1:, :5], pooled[1:])
    assert torch.allclose(both[1:], alone, atol=1e-5)
    assert both.shape == x.shape and both.dtype == x.dtype


def test_chunked_attention_and_ffn_agree_with_plain():
    model = _random_model()
    args = _inputs(lens=(9, 5))
    with torch.no_grad():
        plain = model(*args)
        model.set_chunking(ActivationChunks(attn_query_chunk=7, ffn_token_chunk=13))
        assert all(b.attention.query_chunk == 7 and b.feed_forward.token_chunk == 13
                   for _, b in model.block_sequence())
        chunked = model(*args)
    assert torch.allclose(plain, chunked, atol=1e-5)
    q, k, v = torch.randn(2, 30, 3, 32), torch.randn(2, 30, 1, 32), torch.randn(2, 30, 1, 32)
    mask = torch.arange(30)[None] < torch.tensor([[30], [21]])
    full = sdpa_attention(q, k, v, mask, 0.2)
    assert torch.allclose(full, sdpa_attention(q, k, v, mask, 0.2, query_chunk=8), atol=1e-6)
    with pytest.raises(ValueError, match="positive"):
        ActivationChunks(attn_query_chunk=0)


def test_block_runner_called_once_per_block_in_order():
    model = _random_model()
    calls = []

    def runner(index, block, *args):
        calls.append((index, block))
        return block(*args)

    model.block_runner = runner
    with torch.no_grad():
        model(*_inputs())
    names = [n for n, _ in model.block_sequence()]
    assert names[:4] == ["context_refiner.0", "context_refiner.1", "noise_refiner.0", "noise_refiner.1"]
    assert names[4:] == [f"layers.{i}" for i in range(CFG.n_layers)]
    assert [i for i, _ in calls] == list(range(len(names)))
    assert [b for _, b in calls] == [b for _, b in model.block_sequence()]


def test_functional_call_runner_is_bitwise_identical():
    """The placement runner swaps weights in with functional_call; it must change nothing."""
    model = _random_model()
    args = _inputs()
    with torch.no_grad():
        direct = model(*args)
        copies = {id(b): {k: v.clone() for k, v in b.state_dict().items()} for _, b in model.block_sequence()}
        model.block_runner = lambda i, block, *a: functional_call(block, copies[id(block)], a)
        wrapped = model(*args)
    assert torch.equal(direct, wrapped)


def test_input_validation():
    model = _random_model()
    x, t, cap, mask, pooled = _inputs()
    left_padded = mask.flip(1)
    with pytest.raises(ValueError, match="right-padded"):
        model(x, t, cap, left_padded, pooled)
    with pytest.raises(ValueError, match="multiples of 2"):
        model(x[..., :7], t, cap, mask, pooled)


def test_fp16_clamp_only_touches_fp16():
    big = torch.tensor([float("inf"), -float("inf"), float("nan"), 1.0])
    assert finite_fp16(big, torch.float16).tolist() == [65504.0, -65504.0, 0.0, 1.0]
    assert torch.equal(finite_fp16(big, torch.bfloat16).isinf(), big.isinf())
    model = _random_model(dtype=torch.float16)
    with torch.no_grad():
        out = model(*_inputs())
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_official_config_parameter_count():
    with torch.device("meta"):
        model = NextDiT(DiTConfig.newbie_exp01())
    assert sum(p.numel() for p in model.parameters()) == 3_486_636_096
    assert len(model.state_dict()) == 535 and len(model.block_sequence()) == 40


def test_estimates_respond_to_chunking_and_kernel():
    cfg, dt = DiTConfig.newbie_exp01(), torch.bfloat16
    base = estimate_activation_bytes(cfg, 2, 300, 4096, dt, kernel=AttentionKernel.MATH)
    chunked = estimate_activation_bytes(cfg, 2, 300, 4096, dt, attn_query_chunk=512, kernel="math")
    efficient = estimate_activation_bytes(cfg, 2, 300, 4096, dt, kernel="efficient")
    assert base > chunked > 0 and base > efficient
    # math scores at S=4396: 2*24*S^2*(2*2+1) bytes dominate (~4.6 GB)
    assert 4.0e9 < base < 6.0e9
    assert estimate_activation_bytes(cfg, 2, 300, 4096, dt, ffn_token_chunk=1024) < efficient
    flops = flops_per_forward(cfg, 2, 300, 4096)
    # ~2 * params * tokens is the matmul floor; attention adds on top
    assert 2 * 3.3e9 * 2 * 4396 < flops < 2 * 3.6e9 * 2 * 4396 * 1.5


@pytest.mark.cuda
def test_cuda_bf16_matches_cpu_fp32_and_chunks_agree():
    args = _inputs(lens=(9, 5))
    with torch.no_grad():
        ref = _random_model()(*args)
        gpu = _random_model(dtype=torch.bfloat16).cuda()          # same seed: same weights
        cuda_args = [a.cuda() for a in args]
        out = gpu(*cuda_args).float().cpu()
        gpu.set_chunking(ActivationChunks(attn_query_chunk=16, ffn_token_chunk=32))
        chunked = gpu(*cuda_args).float().cpu()
    assert (out - ref).norm() / ref.norm() < 0.03
    assert (chunked - out).norm() / out.norm() < 0.01


@pytest.mark.parametrize("lens", [(9, 5), (7, 7)], ids=["padded", "unpadded"])
def test_a_refined_caption_made_once_gives_every_steps_forward_bit_for_bit(lens):
    """The caption refiners see the conditioning alone: made once and passed to each step's
    forward, they give the forward that makes them itself, bit for bit, and that forward runs
    none of the context refiner's blocks."""
    model = _random_model(3, torch.bfloat16)
    x, _, cap, mask, pooled = _inputs(lens)
    x = x.bfloat16()
    ran: list[int] = []
    model.block_runner = lambda i, block, *a, **k: (ran.append(i), block(*a, **k))[1]
    with torch.no_grad():
        caption = model.refine_caption(cap, mask)
        assert ran == list(range(CFG.n_context_refiner)) and caption.shape == (2, cap.shape[1], CFG.dim)
        for t in (0.1, 0.6):
            ran.clear()
            given = model(x, torch.tensor([t, t]), cap, mask, pooled, caption=caption)
            assert ran == list(range(CFG.n_context_refiner, CFG.n_blocks))
            assert torch.equal(given, model(x, torch.tensor([t, t]), cap, mask, pooled))
        with pytest.raises(ValueError, match="refined caption"):
            model(x, torch.tensor([0.1, 0.1]), cap, mask, pooled, caption=caption[:1])
    assert model.caption_blocks() == tuple(f"context_refiner.{i}" for i in range(CFG.n_context_refiner))
