"""CPU tier: the loader nodes and the memory settings node (see nodes_support for how the pack is loaded)."""

from __future__ import annotations

import os

import pytest
import torch

from nodes_support import adapter, models, nodes, pack  # noqa: F401  (fixtures)
from nodes_support import call, mod  # tests/ is on pytest's pythonpath (pyproject)


# ---------------------------------------------------------------------------------- loaders

def test_loaders_return_handles_and_fingerprint_files_not_nan(nodes, models, adapter, tiny_dir):
    pipeline = mod("newbie_core.pipeline")
    dit, te, vae = models
    assert isinstance(dit, pipeline.DiTHandle) and isinstance(te, pipeline.TextEncoderHandle)
    assert isinstance(vae, pipeline.VaeHandle) and vae.dtype == "fp32"
    loader = nodes["NewBieDiTLoader"]
    first = loader.IS_CHANGED(dit_name="NewBie-Image-Exp0.1-bf16.safetensors", storage="bf16")
    assert isinstance(first, str) and first == loader.IS_CHANGED(dit_name="NewBie-Image-Exp0.1-bf16.safetensors",
                                                                storage="fp8")
    path = tiny_dir / "diffusion_models" / "NewBie-Image-Exp0.1-bf16.safetensors"
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    try:
        assert loader.IS_CHANGED(dit_name="NewBie-Image-Exp0.1-bf16.safetensors", storage="bf16") != first
    finally:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    te_changed = nodes["NewBieTextEncoderLoader"].IS_CHANGED(
        gemma_name="gemma_3_4b_it_bf16.safetensors", jina_name="jina_clip_v2_bf16.safetensors", gemma_storage="bf16")
    assert "gemma_3_4b_it_bf16" in te_changed and "jina_clip_v2_bf16" in te_changed
    assert "NewBie-Image-Exp0.1-bf16.safetensors" in nodes["NewBieDiTLoader"].INPUT_TYPES()["required"]["dit_name"][0]


def test_missing_model_file_error_names_the_folder(nodes, adapter):
    with pytest.raises(FileNotFoundError, match=r"'diffusion_models'.*models/diffusion_models"):
        call(nodes["NewBieDiTLoader"], dit_name="nope.safetensors", storage="bf16")
    with pytest.raises(FileNotFoundError, match="text_encoders"):
        call(nodes["NewBieTextEncoderLoader"], gemma_name="gemma_3_4b_it_bf16.safetensors",
             jina_name="missing_jina.safetensors", gemma_storage="fp8")
    assert nodes["NewBieVAELoader"].IS_CHANGED(vae_name="gone.safetensors", dtype="bf16") == "missing:vae/gone.safetensors"


# ---------------------------------------------------------------------------------- settings

def test_memory_settings_node_and_node_overrides(nodes):
    settings_mod = mod("nodes.settings_node")
    memory, = call(nodes["NewBieMemorySettings"], vram_budget_gb=7.0, ram_budget_gb=0.0, attention_slicing="1024",
                   ffn_chunking="off", fp8_streaming=True, vae_tile=512, compute_dtype="fp16")
    assert isinstance(memory, mod("newbie_core.pipeline").MemorySettings)
    assert (memory.vram_budget_gb, memory.ram_budget_gb, memory.attention_chunk, memory.ffn_chunk) == (7.0, None, 1024, -1)
    assert memory.fp8_streaming and memory.vae_tile_px == 512 and memory.compute_dtype == "fp16"
    auto, = call(nodes["NewBieMemorySettings"], vram_budget_gb=0.0, ram_budget_gb=12.0, attention_slicing="auto",
                 ffn_chunking="auto", fp8_streaming=False, vae_tile=0, compute_dtype="bf16")
    assert auto.vram_budget_gb is None and auto.ram_budget_gb == 12.0 and auto.attention_chunk == 0
    assert auto.compile is None and auto.cuda_graphs is None              # the optional switches' default
    assert auto.fp8_compute is False
    off, = call(nodes["NewBieMemorySettings"], vram_budget_gb=0.0, ram_budget_gb=0.0, attention_slicing="auto",
                ffn_chunking="auto", fp8_streaming=False, vae_tile=0, compute_dtype="bf16", compile="off",
                cuda_graphs="on", fp8_compute=True)
    assert off.compile is False and off.cuda_graphs is True and off.fp8_compute is True
    problem = nodes["NewBieMemorySettings"].VALIDATE_INPUTS(fp8_compute=True)   # the fallback adapter: the CPU
    assert problem.startswith("fp8_compute: fp8 compute needs an NVIDIA GPU")
    # A node's own non-default widget wins; "from settings" / 0 keep the connected settings.
    resolved = settings_mod.resolve_memory(memory, 3.5, "auto", settings_mod.FROM_SETTINGS)
    assert (resolved.vram_budget_gb, resolved.attention_chunk, resolved.ffn_chunk) == (3.5, 0, -1)
    assert settings_mod.resolve_memory(memory, 0.0) == memory
    with pytest.raises(ValueError, match="vae_tile"):
        call(nodes["NewBieMemorySettings"], vram_budget_gb=0.0, ram_budget_gb=0.0, attention_slicing="auto",
             ffn_chunking="auto", fp8_streaming=False, vae_tile=100, compute_dtype="bf16")


def test_vram_etiquette_frees_registers_and_always_unregisters(pack):
    """On a GPU device the stage first asks ComfyUI for room, then registers a handle sized to the
    plan's weights, and drops it afterwards, also when the stage fails."""
    ad = mod("nodes.comfy_adapter")
    settings_mod = mod("nodes.settings_node")
    MemorySettings = mod("newbie_core.pipeline").MemorySettings

    class Recorder(ad.FallbackAdapter):
        def __init__(self):
            super().__init__()
            self.calls = []

        def free_vram(self, n, device, keep=()):
            self.calls.append(("free", n))
            return 0

        def register_unloadable(self, name, size, fn, device=None):
            self.calls.append(("register", name, size))
            return super().register_unloadable(name, size, fn, device)

        def unregister(self, handle):
            self.calls.append(("unregister", handle.name))
            super().unregister(handle)

    rec = Recorder()
    previous = ad.set_adapter(rec)
    try:
        gpu = torch.device("cuda")
        budgets = []
        with settings_mod.vram_for_stage("stage A", gpu, MemorySettings(vram_budget_gb=2.0), lambda: 10**12,
                                         lambda b: budgets.append(b) or 123) as budget:
            assert rec.calls == [("free", 2 * 2**30), ("register", "stage A", 123)]
            assert len(rec.handles) == 1 and budget == 2 * 2**30 == budgets[0]
        assert rec.calls[-1] == ("unregister", "stage A") and rec.handles == []
        with pytest.raises(RuntimeError, match="boom"):
            with settings_mod.vram_for_stage("stage B", gpu, MemorySettings(vram_budget_gb=1.0), lambda: 5, lambda b: 7):
                raise RuntimeError("boom")
        assert rec.calls[-1] == ("unregister", "stage B") and rec.handles == []
        rec.calls.clear()
        with settings_mod.vram_for_stage("cpu stage", torch.device("cpu"), MemorySettings(), lambda: 1, lambda b: 1) as b:
            assert b is None
        assert rec.calls == []          # no VRAM on the CPU: nothing asked, nothing registered
    finally:
        ad.set_adapter(previous)
