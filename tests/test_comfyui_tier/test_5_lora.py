"""ComfyUI tier: the pack's LoRA node (skipped unless COMFYUI_PATH is set)."""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import pytest
import torch

import comfyui_run as cr  # tests/ is on pytest's pythonpath (pyproject)
from comfyui_tier import COMFY_ROOT, TINY_LOADERS, saved_latent

pytestmark = [pytest.mark.comfyui,
              pytest.mark.skipif(not COMFY_ROOT, reason="COMFYUI_PATH not set (ComfyUI tier)")]


LORA_NAMES = {"peft": os.path.join("newbie_tiny_peft", "adapter_model.safetensors"),
              "lokr": "newbie_tiny_lokr.safetensors"}


@pytest.fixture(scope="module")
def tiny_loras(comfy_env, tiny_models) -> Path:
    """models/loras of the tiny checkpoints (build_tiny_checkpoints writes the trainer's layouts)."""
    folder = tiny_models / "loras"
    assert all((folder / name).is_file() for name in LORA_NAMES.values())
    comfy_env.folder_paths.add_model_folder_path("loras", str(folder))
    return folder


def _lora_prompt(strengths: dict[str, float] | None) -> dict:
    """The pack's sampler and core KSampler on the pack's MODEL, both after a LoRA chain
    (`strengths`: layout -> strength, in order; None: no LoRA node at all)."""
    prompt = json.loads(json.dumps(TINY_LOADERS))
    dit = ["1", 0]
    for i, (fmt, strength) in enumerate((strengths or {}).items()):
        prompt[f"6{i}"] = {"class_type": "NewBieLoraLoader", "inputs": {"dit": dit, "lora_name": LORA_NAMES[fmt],
                                                                       "strength": strength}}
        dit = [f"6{i}", 0]
    prompt["4"]["inputs"]["dit"] = dit
    prompt.update({
        "10": {"class_type": "NewBieSampler", "inputs": {"dit": dit, "positive": ["3", 0], "negative": ["3", 1],
                                                         "latent": ["5", 0], "seed": 5, "steps": 2, "cfg": 4.0,
                                                         "sampler": "euler", "shift": 6.0, "denoise": 1.0,
                                                         "sigmas": ["12", 0]}},
        "11": {"class_type": "KSampler", "inputs": {"model": ["4", 0], "positive": ["3", 0], "negative": ["3", 1],
                                                    "latent_image": ["5", 0], "seed": 5, "steps": 2, "cfg": 4.0,
                                                    "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}},
        "12": {"class_type": "BasicScheduler", "inputs": {"model": ["4", 0], "scheduler": "simple", "steps": 2,
                                                          "denoise": 1.0}},
        "20": {"class_type": "SaveLatent", "inputs": {"samples": ["10", 0], "filename_prefix": "lora_pack"}},
        "21": {"class_type": "SaveLatent", "inputs": {"samples": ["11", 0], "filename_prefix": "lora_core"}},
    })
    return prompt


def _lora_latents(comfy_env, executor, strengths) -> tuple[torch.Tensor, torch.Tensor]:
    result = cr.run_prompt(comfy_env, executor, _lora_prompt(strengths))
    assert result.success, result.message("execution_error")
    return saved_latent(comfy_env, result.outputs, "20"), saved_latent(comfy_env, result.outputs, "21")


def test_pack_lora_node_changes_the_image_and_strength_0_is_no_lora(comfy_env, pack, tiny_loras):
    """The pack's LoRA node between the DiT loader and either sampler: strength 0 is bitwise the
    no-LoRA image, a real strength changes it, for the pack's sampler and core KSampler alike."""
    make = lambda: comfy_env.execution.PromptExecutor(cr.StubServer(), cache_type=comfy_env.execution.CacheType.CLASSIC)
    plain = _lora_latents(comfy_env, make(), None)
    zero = _lora_latents(comfy_env, make(), {"peft": 0.0})
    for fmt in LORA_NAMES:
        patched = _lora_latents(comfy_env, make(), {fmt: 1.0})
        for base, with_lora in zip(plain, patched):
            assert torch.isfinite(with_lora).all()
            change = float((with_lora - base).norm() / base.norm())
            assert change > 1e-3, f"{fmt} LoRA at strength 1 did not change the latent ({change:.2e})"
    for base, same in zip(plain, zero):
        assert torch.equal(base, same), "strength 0 must give the no-LoRA latent exactly"
    # On the same sigmas the two samplers agree with the LoRA on, as they do without it: both got the patch.
    pack_latent, core_latent = patched
    scale = float(pack_latent.abs().max())
    assert torch.allclose(pack_latent, core_latent, rtol=0, atol=1e-5 * scale)


def test_lora_strength_change_reads_no_dit_block_tensors(comfy_env, pack, tiny_loras, monkeypatch):
    """Only the strength changes between two runs on one executor: ComfyUI reruns the LoRA node
    and both samplers, and nothing is read from the DiT file: the blocks come from the host
    cache, the small non-block tensors from the checkpoint's host copies."""
    checkpoint = importlib.import_module(f"{pack.__name__}.newbie_core.models.checkpoint")
    placement = importlib.import_module(f"{pack.__name__}.newbie_core.placement")
    lora_module = importlib.import_module(f"{pack.__name__}.newbie_core.models.lora")
    executor = comfy_env.execution.PromptExecutor(cr.StubServer(), cache_type=comfy_env.execution.CacheType.CLASSIC)
    first = _lora_latents(comfy_env, executor, {"peft": 1.0, "lokr": 0.5})      # warm
    reads: list[tuple[str, str]] = []
    original = checkpoint.TensorSource._get_raw

    def counting(self, key):
        reads.append((str(getattr(self, "files", "?")), key))
        return original(self, key)

    monkeypatch.setattr(checkpoint.TensorSource, "_get_raw", counting)
    misses, lora_reads = placement.HOST_CACHE.misses, lora_module.LORA_READS["files"]
    result = cr.run_prompt(comfy_env, executor, _lora_prompt({"peft": 0.4, "lokr": 0.5}))
    assert result.success, result.message("execution_error")
    assert {"1", "2", "3", "5"} <= result.cached, "the loaders and the encoder must come from ComfyUI's cache"
    assert not {"60", "10", "11"} & result.cached, "the strength change must rerun the LoRA node and samplers"
    second = (saved_latent(comfy_env, result.outputs, "20"), saved_latent(comfy_env, result.outputs, "21"))
    assert not torch.equal(first[0], second[0]) and not torch.equal(first[1], second[1])
    assert placement.HOST_CACHE.misses == misses, "a DiT block store was rebuilt from the file"
    assert lora_module.LORA_READS["files"] == lora_reads, "an unchanged LoRA file was read again"
    dit_reads = [key for files, key in reads if "NewBie-Image-Exp0.1" in files]
    block_reads = [k for k in dit_reads if k.startswith(("layers.", "noise_refiner.", "context_refiner."))]
    assert block_reads == [], f"DiT block tensors were read again: {block_reads[:5]} ({len(block_reads)})"
    # The small non-block tensors (embedders, final layer) were read once, by the warm-up, and are
    # kept beside the checkpoint: this run reads nothing of the DiT file at all.
    assert dit_reads == [], f"DiT tensors were read again: {dit_reads[:5]} ({len(dit_reads)})"
