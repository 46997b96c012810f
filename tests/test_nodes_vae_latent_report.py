"""CPU tier: the latent, VAE, memory report and LoRA nodes, and ComfyUI unloading the host copies
(see nodes_support for how the pack is loaded)."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
import torch

from nodes_support import adapter, conds, models, nodes, pack  # noqa: F401  (fixtures)
from nodes_support import PACK, call, empty, mod, sample  # tests/ is on pytest's pythonpath (pyproject)


# ---------------------------------------------------------------------------------- latent, VAE, report

def test_empty_latent_presets_custom_and_errors(nodes):
    cls = nodes["NewBieEmptyLatent"]
    presets = cls.INPUT_TYPES()["required"]["resolution"][0]
    assert presets[0] == "1024x1024 (1:1)" and len(presets) == 52
    latent, = call(cls, resolution="1024x1024 (1:1)", width=16, height=16, batch_size=2)
    assert latent["samples"].shape == (2, 16, 128, 128) and not latent["samples"].any()
    wide = next(p for p in presets if p.startswith("2048x512"))
    assert call(cls, resolution=wide, width=64, height=64, batch_size=1)[0]["samples"].shape == (1, 16, 64, 256)
    assert empty(nodes, 80, 48)["samples"].shape == (1, 16, 6, 10)
    with pytest.raises(ValueError, match="multiple of 16"):
        empty(nodes, 100, 64)


def test_vae_decode_encode_and_memory_report(nodes, models, conds):
    _, _, vae = models
    latent, s_report = sample(nodes, models, conds, empty(nodes, 48, 32))
    image, v_report = call(nodes["NewBieVAEDecode"], vae=vae, latent=latent, tile_size=0, overlap=64)
    assert image.shape == (1, 32, 48, 3) and image.dtype == torch.float32
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0 and image.std() > 1e-4
    tiled, _ = call(nodes["NewBieVAEDecode"], vae=vae, latent=latent, tile_size=32, overlap=8)
    assert tiled.shape == image.shape and "32 px tiles" in _.plans[0][1]
    encoded, = call(nodes["NewBieVAEEncode"], vae=vae, image=image)
    assert encoded["samples"].shape == (1, 16, 4, 6)
    with pytest.raises(ValueError, match="multiples of 16"):
        call(nodes["NewBieVAEEncode"], vae=vae, image=torch.rand(1, 40, 64, 3))
    with pytest.raises(ValueError, match="multiples of 8"):
        call(nodes["NewBieVAEDecode"], vae=vae, latent=latent, tile_size=100, overlap=64)
    out = call(nodes["NewBieMemoryReport"], sampler_report=s_report, vae_report=v_report)
    text = out["result"][0]
    assert out["ui"]["text"] == [text]
    assert "== plan: sample ==" in text and "== plan: decode ==" in text and "== measured ==" in text
    assert text.index("plan: sample") < text.index("plan: decode")
    assert re.search(r"^sample\s", text, re.M) and re.search(r"^decode\s", text, re.M)
    assert call(nodes["NewBieMemoryReport"])["result"][0].startswith("(connect")


def test_lora_loader_chains_and_changes_the_sample(nodes, models, conds, adapter):
    loader = nodes["NewBieLoraLoader"]
    peft, lokr = "newbie_tiny_peft/adapter_model.safetensors", "newbie_tiny_lokr.safetensors"
    assert loader.INPUT_TYPES()["required"]["lora_name"][0] == [lokr, peft]
    one, = call(loader, dit=models[0], lora_name=peft, strength=0.8)
    two, = call(loader, dit=one, lora_name=lokr, strength=0.5)
    assert [(Path(s.path).name, s.strength) for s in two.loras] == [("adapter_model.safetensors", 0.8),
                                                                     (lokr, 0.5)]
    assert models[0].loras == ()                      # the input handle is left as it was
    latent = empty(nodes)
    plain = sample(nodes, models, conds, latent)[0]["samples"]
    patched = sample(nodes, (two,) + models[1:], conds, latent)[0]["samples"]
    assert (plain - patched).abs().max() > 1e-3


def test_comfyui_unloading_the_pack_frees_its_host_copies(pack, adapter, tiny_dir):
    """After a stage, the host copies stay behind a weightless handle: ComfyUI's unload (here the
    fallback's 'Unload models') frees them, the pinned buffers with them."""
    settings_node = mod("nodes.settings_node")
    placement = importlib.import_module(f"{PACK}.newbie_core.placement")
    layout_mod = importlib.import_module(f"{PACK}.newbie_core.placement.layout")
    memory = importlib.import_module(f"{PACK}.newbie_core.pipeline").MemorySettings(vram_budget_gb=1.0)
    files = sorted((tiny_dir / "diffusion_models").iterdir())[:1]
    layout = layout_mod.compute_layout([("w", (64, 64), torch.float32)])
    cache = placement.HOST_CACHE
    cache.clear()                       # earlier tests' copies
    cache.get(placement.cache_key(files, ["w"], "bf16"), [layout] * 3, lambda i: {"w": torch.ones(64, 64)}, None,
              pin=False)
    other = tiny_dir / "vae"
    kept = cache.get(placement.cache_key(sorted(other.iterdir())[:1], ["w"], "bf16"), [layout],
                     lambda i: {"w": torch.ones(64, 64)}, None, pin=False)
    before = cache.used()
    assert before == 4 * layout.nbytes
    gpu = torch.device("cuda")          # a device object only: the fallback adapter calls no CUDA
    with settings_node.vram_for_stage("NewBie DiT", gpu, memory, lambda: 0, lambda b: 0, host_files=files):
        pass
    handle = next(h for h in adapter.handles if h.name == "NewBie DiT (host copies)")
    assert cache.used() == before
    adapter.unload_all()
    assert handle.unload_calls == 1
    assert cache.used() == before - 3 * layout.nbytes == kept.host_bytes
    cache.clear()
