"""FLUX VAE: both file layouts, the raw-latent convention, tiling, the memory model, wrong files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from newbie_core.models.checkpoint import CheckpointError
from newbie_core.models.vae import build_vae, from_image_01, to_image_01
from newbie_core.models.vae_loading import (FLUX_VAE_CONFIG, VaeLayout, bfl_to_diffusers_key, expected_shapes,
                                            open_vae)
from newbie_core.models.vae_memory import choose_tile, estimate_decode_bytes, estimate_encode_bytes
from newbie_core.models.vae_tiling import BlendMode, decode_tiled, encode_tiled, tile_starts
from newbie_core.tiny.vae import bfl_vae_shapes, tiny_vae_tensors, write_tiny_vae

# Tiled vs untiled decode of the tiny VAE (24x24 latent, 16-cell tiles, overlap 8): blended tiles
# differ by at most ~0.23 (outputs span about +-3; GroupNorm statistics and the mid-block
# attention are per tile), while abutting tiles with no overlap differ by >= 2.0 at the seams.
TILE_TOLERANCE = 0.5


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_vae(tmp_path_factory.mktemp("vae"), seed=0)


@pytest.fixture(scope="module")
def vae(tiny):
    torch.manual_seed(0)
    return build_vae(open_vae(tiny["vae"]), "cpu", torch.float32)


def _latent(h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 16, h, w, generator=torch.Generator().manual_seed(seed))


# -- loading ----------------------------------------------------------------------------------
def test_both_layouts_load_identical_weights_and_decode(tiny, vae):
    bfl, dif = open_vae(tiny["vae"]), open_vae(tiny["vae_diffusers"])
    assert (bfl.layout, dif.layout) == (VaeLayout.BFL, VaeLayout.DIFFUSERS)
    assert bfl.config == dif.config
    assert bfl.config["block_out_channels"] == [32, 32, 32, 32]  # read from shapes, not assumed
    assert sorted(bfl.source.keys()) == sorted(dif.source.keys())
    for key in bfl.source.keys():
        assert torch.equal(bfl.source.get(key), dif.source.get(key)), key
    other = build_vae(dif, "cpu", torch.float32)
    z = _latent(8, 8)
    assert torch.equal(vae.decode(z), other.decode(z))


def test_bfl_conversion_matches_diffusers_own_converter(tiny):
    """diffusers' single-file converter is an independent oracle for the BFL -> diffusers names."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    ckpt = open_vae(tiny["vae"])
    ours = ckpt.source
    theirs = convert_ldm_vae_checkpoint(tiny_vae_tensors(seed=0), ckpt.config)
    assert set(theirs) == set(ours.keys())
    for key, value in theirs.items():
        assert torch.equal(ours.get(key), value), key


@pytest.mark.parametrize("channels", [(128, 256, 512, 512), (32, 64, 64, 64)])
def test_bfl_conversion_covers_every_key(channels):
    """Real channel counts include nin_shortcut convs, which the equal-width tiny VAE lacks."""
    config = dict(FLUX_VAE_CONFIG, block_out_channels=list(channels))
    want = expected_shapes(config)
    got = {}
    for key, shape in bfl_vae_shapes(channels).items():
        name = bfl_to_diffusers_key(key, n_up=4)
        got[name] = shape[:2] if ".attentions.0.to_" in name and len(shape) == 4 else shape
    assert got == want
    if channels[0] == 128:
        assert len(want) == 244
        assert sum(torch.Size(s).numel() for s in want.values()) == 83_819_683  # spec: ~84 M


def test_wider_tiny_with_shortcuts_loads_and_decodes(tmp_path):
    paths = write_tiny_vae(tmp_path, seed=1, channels=(32, 64, 64, 64))
    ckpt = open_vae(paths["vae"])
    assert ckpt.config["block_out_channels"] == [32, 64, 64, 64]
    assert "decoder.up_blocks.3.resnets.0.conv_shortcut.weight" in ckpt.source
    out = build_vae(ckpt).decode(_latent(4, 4))
    assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()


def test_legacy_diffusers_attention_names_load(tiny, tmp_path):
    from safetensors.torch import load_file
    tensors = load_file(str(tiny["vae_diffusers"] / "diffusion_pytorch_model.safetensors"))
    legacy = {k.replace(".to_q.", ".query.").replace(".to_out.0.", ".proj_attn."): v for k, v in tensors.items()}
    assert legacy.keys() != tensors.keys()
    save_file(legacy, str(tmp_path / "legacy.safetensors"))
    ckpt = open_vae(tmp_path / "legacy.safetensors")
    assert ckpt.layout is VaeLayout.DIFFUSERS
    key = "decoder.mid_block.attentions.0.to_q.weight"
    assert torch.equal(ckpt.source.get(key), tensors[key])


def test_open_vae_accepts_parent_folder_and_prefixed_bundle(tiny, tmp_path):
    assert open_vae(tiny["vae_diffusers"].parent).layout is VaeLayout.DIFFUSERS  # .../NewBie-image-Exp0.1
    bundled = {f"first_stage_model.{k}": v for k, v in tiny_vae_tensors(seed=0).items()}
    bundled["model.diffusion_model.x_embedder.weight"] = torch.zeros(2, 2)
    save_file(bundled, str(tmp_path / "bundle.safetensors"))
    ckpt = open_vae(tmp_path / "bundle.safetensors")
    assert ckpt.layout is VaeLayout.BFL
    assert torch.equal(ckpt.source.get("decoder.conv_in.weight"), bundled["first_stage_model.decoder.conv_in.weight"])


# -- the wrapper ------------------------------------------------------------------------------
def test_encode_decode_shapes_and_decode_is_not_constant(vae):
    image = vae.decode(_latent(6, 10))
    assert image.shape == (1, 3, 48, 80) and image.dtype == torch.float32
    assert torch.isfinite(image).all() and image.std() > 0.1
    latent = vae.encode(image.clamp(-1, 1))
    assert latent.shape == (1, 16, 6, 10)


def test_wrapper_speaks_raw_latents(vae):
    """No (z - shift) * scale inside: decode(z) is exactly the AutoencoderKL's decoder on z."""
    z = _latent(4, 4)
    assert torch.equal(vae.decode(z), vae.model.decode(z).sample.float())
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    mode = vae.model.encode(image).latent_dist.mean
    assert torch.equal(vae.encode(image), mode)  # posterior mode, unnormalised, no sampling noise
    assert torch.equal(vae.encode(image), vae.encode(image))


def test_image_conversions_round_trip():
    comfy = torch.rand(2, 5, 7, 3)
    x = from_image_01(comfy)
    assert x.shape == (2, 3, 5, 7) and x.min() >= -1 and x.max() <= 1
    assert torch.allclose(to_image_01(x), comfy, atol=1e-6)
    assert to_image_01(torch.full((1, 3, 2, 2), 5.0)).max() == 1.0  # clamped


def test_wrapper_rejects_wrong_shapes(vae):
    with pytest.raises(ValueError, match="divisible by 8"):
        vae.encode(torch.zeros(1, 3, 12, 16))
    with pytest.raises(ValueError, match=r"\(B, 16, h, w\)"):
        vae.decode(torch.zeros(1, 4, 8, 8))


# -- tiling -----------------------------------------------------------------------------------
def test_tile_starts_cover_exactly():
    assert tile_starts(10, 16, 4) == [0]
    for size, tile, overlap in [(24, 16, 8), (100, 32, 8), (33, 16, 4)]:
        starts = tile_starts(size, tile, overlap)
        assert starts[0] == 0 and starts[-1] + tile == size
        assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))


@pytest.fixture(scope="module")
def decoded(vae):
    z = _latent(24, 24)
    return z, vae.decode(z)


def test_tiled_decode_matches_untiled_and_naive_tiling_does_not(vae, decoded):
    z, ref = decoded
    blended = (decode_tiled(vae, z, 16, 8) - ref).abs().max().item()
    naive = (decode_tiled(vae, z, 12, 0, BlendMode.NONE) - ref).abs().max().item()  # abutting tiles
    assert blended < TILE_TOLERANCE < naive, (blended, naive)


def test_one_tile_is_bitwise_untiled(vae):
    z = _latent(8, 6)
    assert torch.equal(decode_tiled(vae, z, 8, 4), vae.decode(z))


def test_tiled_encode_matches_untiled_and_naive_tiling_does_not(vae, decoded):
    image = decoded[1].clamp(-1, 1)
    ref = vae.encode(image)
    blended = (encode_tiled(vae, image, 128, 64) - ref).abs().max().item()
    naive = (encode_tiled(vae, image, 96, 0, BlendMode.NONE) - ref).abs().max().item()
    assert blended < TILE_TOLERANCE < naive, (blended, naive)


def test_tiling_rejects_bad_arguments(vae):
    with pytest.raises(ValueError, match="overlap < tile"):
        decode_tiled(vae, _latent(8, 8), 8, 8)
    with pytest.raises(ValueError, match="multiples of 8"):
        encode_tiled(vae, torch.zeros(1, 3, 64, 64), 60, 8)


# -- memory model ----------------------------------------------------------------------------
def test_memory_model_hits_calibration_and_scales():
    cfg, bf16 = FLUX_VAE_CONFIG, torch.bfloat16
    at_1024 = estimate_decode_bytes(cfg, 1, 128, 128, bf16)
    assert abs(at_1024 - 2.55e9) < 0.01e9  # the calibration point
    at_2048 = estimate_decode_bytes(cfg, 1, 256, 256, bf16)
    assert 3.9 * at_1024 < at_2048 < 4.1 * at_1024  # activations scale with pixels
    # Materialised (h*w)^2 attention scores (math SDPA backend) dominate at 2048^2: 34 GB of them.
    assert estimate_decode_bytes(cfg, 1, 256, 256, bf16, scores_materialized=True) > 3 * at_2048
    assert estimate_decode_bytes(cfg, 2, 128, 128, bf16) > 1.9 * at_1024
    assert estimate_decode_bytes(cfg, 1, 128, 128, torch.float32) > 1.9 * at_1024
    assert estimate_decode_bytes(cfg, 1, 128, 128, bf16, 64) < 0.5 * at_1024
    assert estimate_encode_bytes(cfg, 1, 128, 128, bf16) < at_1024
    assert estimate_encode_bytes(cfg, 1, 128, 128, bf16, 64) < estimate_encode_bytes(cfg, 1, 128, 128, bf16)


def test_choose_tile_shrinks_with_budget():
    cfg, bf16 = FLUX_VAE_CONFIG, torch.bfloat16
    assert choose_tile(64 * 2**30, 128, 128, bf16, cfg) is None
    tiles = [choose_tile(int(gb * 2**30), 128, 128, bf16, cfg) for gb in (2.0, 1.0, 0.5)]
    assert all(t is not None for t in tiles) and tiles[0] > tiles[1] > tiles[2], tiles
    for gb, tile in zip((2.0, 1.0, 0.5), tiles):
        assert estimate_decode_bytes(cfg, 1, 128, 128, bf16, tile) <= gb * 2**30
    assert choose_tile(1, 128, 128, bf16, cfg) == 16  # nothing fits: the smallest tile


# -- wrong files ------------------------------------------------------------------------------
def _sd_vae_tensors() -> dict[str, torch.Tensor]:
    tensors = {k: torch.zeros(s) for k, s in bfl_vae_shapes((32, 32, 32, 32), latent=4).items()}
    tensors |= {"quant_conv.weight": torch.zeros(8, 8, 1, 1), "post_quant_conv.weight": torch.zeros(4, 4, 1, 1)}
    return tensors


def test_refuses_sd_vae_in_either_layout(tmp_path):
    save_file(_sd_vae_tensors(), str(tmp_path / "sdxl_vae.safetensors"))
    with pytest.raises(CheckpointError, match="4-channel SD VAE, NewBie needs the 16-channel FLUX VAE"):
        open_vae(tmp_path / "sdxl_vae.safetensors")
    folder = tmp_path / "sd" / "vae"
    folder.mkdir(parents=True)
    save_file({bfl_to_diffusers_key(k, 4): v for k, v in _sd_vae_tensors().items()},
              str(folder / "diffusion_pytorch_model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"latent_channels": 4}))
    with pytest.raises(CheckpointError, match="4-channel SD VAE"):
        open_vae(folder.parent)


@pytest.mark.parametrize("tensors, what", [
    ({"layers.0.attention.qkv.weight": torch.zeros(4, 4), "x_embedder.weight": torch.zeros(4, 4)}, "diffusion model"),
    ({"model.embed_tokens.weight": torch.zeros(4, 4), "model.layers.0.self_attn.q_proj.weight": torch.zeros(4, 4)},
     "text encoder"),
])
def test_refuses_dit_and_text_encoder(tmp_path, tensors, what):
    save_file(tensors, str(tmp_path / "x.safetensors"))
    with pytest.raises(CheckpointError, match=what):
        open_vae(tmp_path / "x.safetensors")


def test_missing_and_truncated_tensors_are_clear_errors(tmp_path):
    tensors = tiny_vae_tensors(seed=0)
    del tensors["decoder.up.0.block.1.conv2.weight"]
    save_file(tensors, str(tmp_path / "partial.safetensors"))
    with pytest.raises(CheckpointError, match="missing tensor.*decoder.up_blocks.3.resnets.1.conv2.weight"):
        open_vae(tmp_path / "partial.safetensors")
    full = tmp_path / "full.safetensors"
    save_file(tiny_vae_tensors(seed=0), str(full))
    data = full.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        open_vae(tmp_path / "cut.safetensors")


def test_refuses_pickles_and_missing_paths(tmp_path):
    (tmp_path / "vae.pt").write_bytes(b"not opened")
    with pytest.raises(CheckpointError, match="pickled"):
        open_vae(tmp_path / "vae.pt")
    with pytest.raises(CheckpointError, match="no such file"):
        open_vae(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="no VAE found"):
        open_vae(tmp_path)
