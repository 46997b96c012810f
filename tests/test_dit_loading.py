"""NewBie DiT checkpoint loading: every layout, config inference and clear refusals."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from newbie_core.models.checkpoint import CheckpointError
from newbie_core.models.dit import DiTConfig, build_dit, load_dit_weights, open_dit
from newbie_core.models.dit.loading import expected_shapes
from newbie_core.tiny.dit import write_tiny_dit

TINY = DiTConfig.tiny()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    return write_tiny_dit(tmp_path_factory.mktemp("tiny_dit"))


def _header_only(path: Path, shapes: dict[str, tuple[int, ...]], dtype: str = "BF16") -> Path:
    """A sparse safetensors file: a real header, no data written (so 7 GB costs nothing)."""
    header, offset = {}, 0
    for key, shape in shapes.items():
        n = 2 * int(torch.Size(shape).numel())
        header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        f.truncate(8 + len(blob) + offset)
    return path


def test_tiny_writer_is_deterministic(tmp_path):
    a, b = write_tiny_dit(tmp_path / "a"), write_tiny_dit(tmp_path / "b")
    files_a = sorted(p for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files_a) == 7
    for fa in files_a:
        assert fa.read_bytes() == (tmp_path / "b" / fa.relative_to(tmp_path / "a")).read_bytes(), fa
    assert a.keys() == b.keys()
    assert write_tiny_dit(tmp_path / "c", seed=1)["dit"].read_bytes() != a["dit"].read_bytes()


@pytest.mark.parametrize("name, layout, dtype", [
    ("dit", "official", torch.bfloat16), ("dit_fp16", "official", torch.float16),
    ("dit_fp8_e4m3fn", "official", torch.float8_e4m3fn), ("dit_prefixed", "official+prefix", torch.bfloat16),
    ("dit_disty0", "diffusers", torch.bfloat16), ("dit_hf_repo", "official", torch.bfloat16),
    ("dit_hf_transformer", "official", torch.bfloat16)])
def test_every_layout_opens_with_official_keys(tiny, name, layout, dtype):
    ckpt = open_dit(tiny[name])
    assert (ckpt.layout, ckpt.stored_dtype, ckpt.config) == (layout, dtype, TINY)
    expected = set(expected_shapes(TINY))
    allowed_missing = {"norm_final.weight"} if name == "dit_disty0" else set()
    assert set(ckpt.source.keys()) == expected - allowed_missing


@pytest.mark.parametrize("name", ["dit_prefixed", "dit_disty0", "dit_hf_repo"])
def test_renamed_layouts_give_identical_tensors(tiny, name):
    ref, other = open_dit(tiny["dit"]).source, open_dit(tiny[name]).source
    for key in other.keys():
        assert torch.equal(ref.get(key), other.get(key)), key
    assert other.shape("layers.0.attention.qkv.weight") == (TINY.qkv_rows, TINY.dim)


def test_load_weights_from_meta_and_run(tiny):
    ckpt = open_dit(tiny["dit_fp8_e4m3fn"])
    model = load_dit_weights(build_dit(ckpt.config), ckpt, "cpu", torch.float32)
    params = dict(model.named_parameters())
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in params.values())
    fp8 = ckpt.source.get("layers.1.feed_forward.w2.weight")
    assert torch.equal(params["layers.1.feed_forward.w2.weight"], fp8.float())
    bf16 = open_dit(tiny["dit"]).source.get("layers.1.feed_forward.w2.weight").float()
    assert (fp8.float() - bf16).abs().max() < 0.1 * bf16.abs().max()   # fp8 e4m3: 3 mantissa bits
    x, cap = torch.randn(1, 16, 4, 6), torch.randn(1, 5, TINY.cap_feat_dim)
    with torch.no_grad():
        out = model(x, torch.tensor([0.5]), cap, torch.ones(1, 5, dtype=torch.bool), torch.randn(1, 32))
    assert out.shape == x.shape and torch.isfinite(out).all() and out.std() > 1e-3


def test_load_without_blocks_leaves_them_on_meta(tiny):
    ckpt = open_dit(tiny["dit_disty0"])                        # no norm_final.weight: filled with ones
    model = load_dit_weights(build_dit(ckpt.config), ckpt, "cpu", torch.bfloat16, include_blocks=False)
    assert model.layers[0].attention.qkv.weight.is_meta
    assert not model.x_embedder.weight.is_meta and model.x_embedder.weight.dtype == torch.bfloat16
    assert torch.equal(model.norm_final.weight, torch.ones(TINY.dim, dtype=torch.bfloat16))


def test_full_size_config_is_inferred_from_shapes(tmp_path):
    shapes = expected_shapes(DiTConfig.newbie_exp01())
    assert len(shapes) == 535
    del shapes["norm_final.weight"]                            # optional in re-packs
    ckpt = open_dit(_header_only(tmp_path / "full.safetensors", shapes))
    assert ckpt.config == DiTConfig.newbie_exp01() and len(ckpt.source) == 534


def _tiny_state() -> dict[str, torch.Tensor]:
    return {k: torch.zeros(s, dtype=torch.bfloat16) for k, s in expected_shapes(TINY).items()}


def _save(path: Path, tensors: dict[str, torch.Tensor], axes: bool = True) -> Path:
    save_file(tensors, str(path), metadata={"newbie.axes_dims": "[8, 12, 12]"} if axes else None)
    return path


def test_missing_and_misshaped_tensors_are_named(tmp_path):
    state = _tiny_state()
    del state["layers.2.feed_forward.w3.weight"]
    with pytest.raises(CheckpointError, match=r"missing.*layers\.2\.feed_forward\.w3\.weight"):
        open_dit(_save(tmp_path / "missing.safetensors", state))
    state = _tiny_state()
    state["noise_refiner.1.attention.out.weight"] = torch.zeros(96, 95, dtype=torch.bfloat16)
    with pytest.raises(CheckpointError, match=r"noise_refiner\.1\.attention\.out\.weight: expected \[96, 96\], found \[96, 95\]"):
        open_dit(_save(tmp_path / "shape.safetensors", state))


def test_missing_axes_metadata_is_explained(tmp_path):
    with pytest.raises(CheckpointError, match="newbie.axes_dims"):
        open_dit(_save(tmp_path / "noaxes.safetensors", _tiny_state(), axes=False))


def test_truncated_and_non_safetensors_files(tiny, tmp_path):
    data = tiny["dit"].read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.safetensors.*truncated"):
        open_dit(tmp_path / "cut.safetensors")
    (tmp_path / "model.ckpt").write_bytes(b"PK\x03\x04 this is a zip/pickle, not safetensors" * 10)
    with pytest.raises(CheckpointError, match="model.ckpt.*pickle"):
        open_dit(tmp_path / "model.ckpt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="empty: no DiT weights found"):
        open_dit(tmp_path / "empty")


FOREIGN = {
    "flux": (["double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight"], "FLUX"),
    "sd3": (["joint_blocks.0.x_block.attn.qkv.weight"], "SD3"),
    "sdxl": (["model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.label_emb.0.0.weight"], "SDXL"),
    "sd1": (["model.diffusion_model.input_blocks.0.0.weight", "cond_stage_model.x.weight"], "SD1"),
    "vae": (["decoder.conv_in.weight", "encoder.conv_in.weight"], "VAE"),
    "gemma": (["model.layers.0.self_attn.q_proj.weight", "model.embed_tokens.weight"], "Gemma"),
    "jina": (["roberta.encoder.layers.0.mixer.Wqkv.weight"], "Jina"),
    "lumina2": (["cap_embedder.1.weight", "noise_refiner.0.attention.k_norm.weight",
                 "layers.0.attention.qkv.weight"], "Lumina"),
    "unknown": (["foo.bar"], "unknown layout"),
}


@pytest.mark.parametrize("kind", sorted(FOREIGN))
def test_foreign_checkpoints_are_refused_with_what_they_look_like(tmp_path, kind):
    keys, expected = FOREIGN[kind]
    path = _save(tmp_path / f"{kind}.safetensors", {k: torch.zeros(2) for k in keys})
    with pytest.raises(CheckpointError, match=f"{kind}.safetensors: not a NewBie-image DiT.*{expected}"):
        open_dit(path)
