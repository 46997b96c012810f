"""ComfyUI tier: the adapter inside real ComfyUI (skipped unless COMFYUI_PATH is set)."""

from __future__ import annotations

import gc

import pytest
import torch

from comfyui_tier import COMFY_ROOT, pack_handles  # tests/ is on pytest's pythonpath (pyproject)

pytestmark = [pytest.mark.comfyui,
              pytest.mark.skipif(not COMFY_ROOT, reason="COMFYUI_PATH not set (ComfyUI tier)")]


def test_handle_is_evicted_by_comfy_and_calls_unload(comfy_env, adapter, cpu):
    calls = []
    handle = adapter.register_unloadable("tiny DiT", 3 << 20, lambda: calls.append("dit"), device=cpu)
    assert adapter.is_registered(handle) and handle.resident
    assert comfy_env.mm.loaded_models()[0] is handle
    assert handle.model_size() == 3 << 20 and handle.loaded_size() == 3 << 20
    comfy_env.mm.load_models_gpu([handle])          # a re-load must not unload our weights
    assert calls == [] and adapter.is_registered(handle)
    comfy_env.mm.unload_all_models()
    assert calls == ["dit"] and not adapter.is_registered(handle) and not handle.resident


def test_free_vram_keeps_requested_handles_and_unregister_is_silent(comfy_env, adapter, cpu):
    calls = []
    keep = adapter.register_unloadable("encoder", 1 << 20, lambda: calls.append("keep"), device=cpu)
    drop = adapter.register_unloadable("vae", 1 << 20, lambda: calls.append("drop"), device=cpu)
    adapter.free_vram(1 << 62, cpu, keep=[keep])    # more than any machine has: evict all it may
    assert calls == ["drop"] and adapter.is_registered(keep) and not adapter.is_registered(drop)
    adapter.unregister(keep)
    assert calls == ["drop"] and not adapter.is_registered(keep)
    assert pack_handles(comfy_env) == []


def test_dropped_handle_leaves_no_entry(comfy_env, adapter, cpu):
    adapter.register_unloadable("forgotten", 1 << 20, lambda: None, device=cpu)
    gc.collect()
    comfy_env.mm.cleanup_models()
    assert pack_handles(comfy_env) == []


def test_model_paths_through_folder_paths(adapter, tiny_models):
    assert "NewBie-Image-Exp0.1-bf16.safetensors" in adapter.models_dir_list("diffusion_models")
    assert adapter.full_path("vae", "ae.safetensors") == str(tiny_models / "vae" / "ae.safetensors")
    with pytest.raises(FileNotFoundError, match=r"text_encoders.*tiny_models"):
        adapter.full_path("text_encoders", "missing.safetensors")


def test_progress_reaches_hook_and_cancel_raises_comfy_exception(comfy_env, adapter):
    seen = []
    previous = comfy_env.comfy_utils.PROGRESS_BAR_HOOK
    comfy_env.comfy_utils.set_progress_bar_global_hook(lambda v, t, p, node_id=None: seen.append((v, t, node_id)))
    try:
        adapter.progress_bar(4, "12").update_absolute(2, 4, None)
    finally:
        comfy_env.comfy_utils.set_progress_bar_global_hook(previous)
    assert seen == [(2, 4, "12")]
    adapter.check_interrupted()                       # no Cancel: nothing happens
    comfy_env.mm.interrupt_current_processing(True)
    with pytest.raises(comfy_env.mm.InterruptProcessingException):
        adapter.check_interrupted()
    assert not comfy_env.mm.processing_interrupted()  # the flag is consumed


def test_latent_preview_uses_flux_format(comfy_env, adapter, monkeypatch):
    from comfy.cli_args import args, LatentPreviewMethod
    latent = torch.randn(2, 16, 8, 12)
    monkeypatch.setattr(args, "preview_method", LatentPreviewMethod.NoPreviews)
    assert adapter.preview_image_from_latent(latent) is None
    monkeypatch.setattr(args, "preview_method", LatentPreviewMethod.Latent2RGB)
    fmt, image, max_size = adapter.preview_image_from_latent(latent)
    assert fmt == "JPEG" and image.size == (12, 8) and max_size > 0
