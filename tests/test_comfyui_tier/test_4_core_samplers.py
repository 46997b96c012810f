"""ComfyUI tier: the pack's MODEL under core samplers (skipped unless COMFYUI_PATH is set)."""

from __future__ import annotations

import pytest
import torch

import comfyui_run as cr  # tests/ is on pytest's pythonpath (pyproject)
from comfyui_tier import (COMFY_ROOT, encoder_runs, pack_handles, model_prompt, run_cancelling, saved_latent,
                          width_1000_prompt, width_error, needs_workflows)

pytestmark = [pytest.mark.comfyui,
              pytest.mark.skipif(not COMFY_ROOT, reason="COMFYUI_PATH not set (ComfyUI tier)")]


def test_core_ksampler_on_pack_model_matches_pack_sampler(comfy_env, pack):
    """Core KSampler (euler, simple) on the pack's MODEL and the pack's sampler fed the same
    sigmas through SIGMAS give the same latent; so do KSamplerAdvanced and SamplerCustomAdvanced
    with ModelSamplingAuraFlow at the default shift."""
    common = {"seed": 7, "cfg": 4.0}
    prompt = model_prompt({
        "10": {"class_type": "KSampler", "inputs": {"model": ["4", 0], "positive": ["3", 0], "negative": ["3", 1],
                                                    "latent_image": ["5", 0], "steps": 4, "sampler_name": "euler",
                                                    "scheduler": "simple", "denoise": 1.0, **common}},
        "11": {"class_type": "BasicScheduler", "inputs": {"model": ["4", 0], "scheduler": "simple", "steps": 4,
                                                          "denoise": 1.0}},
        "12": {"class_type": "NewBieSampler", "inputs": {"dit": ["1", 0], "positive": ["3", 0], "negative": ["3", 1],
                                                         "latent": ["5", 0], "steps": 4, "sampler": "euler",
                                                         "shift": 6.0, "denoise": 1.0, "sigmas": ["11", 0], **common}},
        "13": {"class_type": "ModelSamplingAuraFlow", "inputs": {"model": ["4", 0], "shift": 6.0}},
        "14": {"class_type": "KSamplerAdvanced", "inputs": {
            "model": ["13", 0], "add_noise": "enable", "noise_seed": 7, "steps": 4, "cfg": 4.0,
            "sampler_name": "euler", "scheduler": "simple", "positive": ["3", 0], "negative": ["3", 1],
            "latent_image": ["5", 0], "start_at_step": 0, "end_at_step": 10000, "return_with_leftover_noise": "disable"}},
        "15": {"class_type": "RandomNoise", "inputs": {"noise_seed": 7}},
        "16": {"class_type": "CFGGuider", "inputs": {"model": ["13", 0], "positive": ["3", 0], "negative": ["3", 1],
                                                     "cfg": 4.0}},
        "17": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "18": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["15", 0], "guider": ["16", 0],
                                                                 "sampler": ["17", 0], "sigmas": ["11", 0],
                                                                 "latent_image": ["5", 0]}},
        "19": {"class_type": "NewBieSampler", "inputs": {"dit": ["1", 0], "positive": ["3", 0], "negative": ["3", 1],
                                                         "latent": ["5", 0], "steps": 4, "sampler": "euler",
                                                         "shift": 6.0, "denoise": 1.0, "core_sampler": ["17", 0],
                                                         **common}},
        **{f"2{i}": {"class_type": "SaveLatent", "inputs": {"samples": [src, 0], "filename_prefix": f"eq{i}"}}
           for i, src in enumerate(["10", "12", "14", "18", "19"])},
    })
    executor = comfy_env.execution.PromptExecutor(cr.StubServer(), cache_type=comfy_env.execution.CacheType.CLASSIC)
    result = cr.run_prompt(comfy_env, executor, prompt)
    assert result.success, result.message("execution_error")
    core, ours, advanced, custom, ours_core = (saved_latent(comfy_env, result.outputs, f"2{i}") for i in range(5))
    assert core.shape == ours.shape == (1, 16, 6, 8)
    assert torch.isfinite(core).all() and core.std() > 0.1
    scale = float(ours.abs().max())
    assert torch.allclose(core, ours, rtol=0, atol=1e-5 * scale), float((core - ours).abs().max())
    for other in (advanced, custom, ours_core):
        assert torch.allclose(core, other, rtol=0, atol=1e-5 * scale), float((core - other).abs().max())
    # A different seed must change the image: the comparison above is not vacuous.
    prompt["10"]["inputs"]["seed"] = 8
    again = cr.run_prompt(comfy_env, executor, prompt)
    assert again.success and not torch.allclose(saved_latent(comfy_env, again.outputs, "20"), core, atol=1e-2)


def test_pack_model_holds_no_weights_and_releases_its_session(comfy_env, pack):
    mappings = comfy_env.nodes.NODE_CLASS_MAPPINGS
    dit = mappings["NewBieDiTLoader"]().load("NewBie-Image-Exp0.1-bf16.safetensors", "bf16")[0]
    model = mappings["NewBieDiTToModel"]().convert(dit)[0]
    assert model.model_size() < 1 << 16, "the MODEL must not carry the DiT's weights"
    assert not any(p.device.type != "meta" and p.numel() > 0 for p in model.model.parameters())
    clone = model.clone()
    assert type(clone) is type(model) and clone.model is model.model and clone.is_dynamic() is False
    te = mappings["NewBieTextEncoderLoader"]().load("gemma_3_4b_it_bf16.safetensors", "jina_clip_v2_bf16.safetensors",
                                                    "bf16")[0]
    pos, neg = mappings["NewBieTextEncode"]().encode(te, "a cat", "")
    latent = {"samples": torch.zeros(1, 16, 4, 4)}
    placed = model.model.placed
    handles_during, scope = [], placed.budget_scope

    class Recording:                      # how many pack handles ComfyUI sees while the session is open
        def __init__(self, *args):
            self.inner = scope(*args)

        def __enter__(self):
            value = self.inner.__enter__()
            handles_during.append(len(pack_handles(comfy_env)))
            return value

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

    placed.budget_scope = Recording
    with torch.inference_mode():
        out = mappings["KSampler"]().sample(clone, 3, 2, 3.0, "euler", "simple", pos, neg, latent)[0]
    assert out["samples"].shape == (1, 16, 4, 4) and placed.opened == 1 and placed.forwards == 2
    # On a GPU the placed weights are announced by one handle for the run; the CPU has no VRAM to share.
    assert handles_during == [1 if torch.cuda.is_available() else 0]
    assert pack_handles(comfy_env) == [], "the handle must go when the session closes"
    assert placed.last_plan is not None
    assert not placed.is_open, "the placement session must close when sampling ends"
    assert placed.shape is None
    with pytest.raises(ValueError, match="LoRA"):
        clone.add_patches({"diffusion_model.layers.0.attention.qkv.weight": (torch.zeros(1),)}, 1.0)


def test_core_lora_loader_on_pack_model_fails_clearly(comfy_env, pack, tiny_models, tmp_path):
    """Core LoraLoaderModelOnly on the pack's MODEL must not give a silently unpatched image."""
    from safetensors.torch import save_file
    folder = tmp_path / "loras"
    folder.mkdir()
    save_file({"diffusion_model.layers.0.attention.qkv.lora_A.weight": torch.zeros(4, 64),
               "diffusion_model.layers.0.attention.qkv.lora_B.weight": torch.zeros(192, 4)},
              str(folder / "tiny_lora.safetensors"))
    comfy_env.folder_paths.add_model_folder_path("loras", str(folder))
    mappings = comfy_env.nodes.NODE_CLASS_MAPPINGS
    dit = mappings["NewBieDiTLoader"]().load("NewBie-Image-Exp0.1-bf16.safetensors", "bf16")[0]
    model = mappings["NewBieDiTToModel"]().convert(dit)[0]
    with pytest.raises(ValueError, match="pack's LoRA loader"):
        mappings["LoraLoaderModelOnly"]().load_lora_model_only(model, "tiny_lora.safetensors", 0.8)
    same = mappings["LoraLoaderModelOnly"]().load_lora_model_only(model, "tiny_lora.safetensors", 0.0)[0]
    assert same is model                                  # strength 0: ComfyUI returns the input untouched


def test_cancel_from_core_ksampler_interrupts_and_releases(comfy_env, pack):
    prompt = model_prompt({
        "10": {"class_type": "KSampler", "inputs": {"model": ["4", 0], "positive": ["3", 0], "negative": ["3", 1],
                                                    "latent_image": ["5", 0], "seed": 3, "steps": 5, "cfg": 4.0,
                                                    "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}},
        "20": {"class_type": "SaveLatent", "inputs": {"samples": ["10", 0], "filename_prefix": "cancel"}},
    })
    hits, result, executor = run_cancelling(comfy_env, prompt, "10")
    assert hits == [1], f"KSampler kept stepping after Cancel: progress {hits}"
    interrupted = result.message("execution_interrupted")
    assert interrupted is not None and interrupted["node_id"] == "10", result.messages
    assert not comfy_env.mm.processing_interrupted()
    assert pack_handles(comfy_env) == [], "the DiT's handle must be gone after a cancelled run"
    again = cr.run_prompt(comfy_env, executor, prompt)
    assert again.success, again.message("execution_error")


def test_core_samplers_and_schedulers_run_on_pack_model(comfy_env, pack):
    combos = [("res_multistep", "simple"), ("dpmpp_2m", "beta"), ("euler", "karras"), ("heun", "normal")]
    nodes = {"13": {"class_type": "ModelSamplingAuraFlow", "inputs": {"model": ["4", 0], "shift": 3.0}}}
    for i, (sampler, scheduler) in enumerate(combos):
        nodes[f"3{i}"] = {"class_type": "KSampler", "inputs": {
            "model": ["13", 0], "positive": ["3", 0], "negative": ["3", 1], "latent_image": ["5", 0], "seed": 1,
            "steps": 3, "cfg": 3.0, "sampler_name": sampler, "scheduler": scheduler, "denoise": 1.0}}
        nodes[f"4{i}"] = {"class_type": "SaveLatent", "inputs": {"samples": [f"3{i}", 0], "filename_prefix": f"c{i}"}}
    executor = comfy_env.execution.PromptExecutor(cr.StubServer(), cache_type=comfy_env.execution.CacheType.CLASSIC)
    result = cr.run_prompt(comfy_env, executor, model_prompt(nodes))
    assert result.success, result.message("execution_error")
    latents = [saved_latent(comfy_env, result.outputs, f"4{i}") for i in range(len(combos))]
    for combo, lat in zip(combos, latents):
        assert lat.shape == (1, 16, 6, 8) and torch.isfinite(lat).all() and lat.std() > 0.1, combo
    assert not torch.allclose(latents[0], latents[1], atol=1e-3), "different samplers gave the same latent"


@needs_workflows
def test_validate_prompt_refuses_width_1000_at_queue_time(comfy_env, pack):
    import asyncio
    prompt, node_id = width_1000_prompt(comfy_env, pack)
    runs = encoder_runs(pack)
    valid, error, _, node_errors = asyncio.run(comfy_env.execution.validate_prompt("w1000", prompt, None))
    assert valid is False, error
    e = width_error(node_errors, node_id)
    assert e["type"] == "custom_validation_failed"
    assert "width: image size 1000x1024 is not a multiple of 16" in e["details"] and "1008x1024" in e["details"]
    assert encoder_runs(pack) == runs                              # refused before anything ran
