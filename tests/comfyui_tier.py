"""What the ComfyUI tier's test files (tests/test_comfyui_tier/) share: the pack under test, its
bundled workflows, and helpers that turn them into prompts and read back what a run left.

The environment variables and the contract with the pack: tests/test_comfyui_tier/conftest.py.
Nothing here imports ComfyUI at module level.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import pytest
import torch

import comfyui_run as cr  # tests/ is on pytest's pythonpath (pyproject)
import comfyui_workflow as cw

REPO_ROOT = Path(__file__).resolve().parents[1]
COMFY_ROOT = os.environ.get("COMFYUI_PATH")
PACK_DIR = Path(os.environ.get("NEWBIE_TIER_PACK", REPO_ROOT)).resolve()
WORKFLOWS = list(cw.iter_workflows(PACK_DIR / "workflows"))
# Another frontend than the snapshot's 1.27: the static folder of a comfyui-frontend-package wheel
# (e.g. 1.58), served with ComfyUI's --front-end-root.
FRONTEND_ROOT = os.environ.get("NEWBIE_TIER_FRONTEND_ROOT")
ENCODER_COUNTER = os.environ.get("NEWBIE_TIER_ENCODER_COUNTER", "newbie_core.pipeline.encode:ENCODER_CALLS")
MODEL_FOLDERS = ("diffusion_models", "text_encoders", "vae")
CORE_SAMPLER_NODES = {"KSampler", "KSamplerAdvanced", "SamplerCustomAdvanced", "SamplerCustom"}


def uses_pack_sampler(path: Path) -> bool:
    types = {n["type"] for n in json.loads(path.read_text())["nodes"]}
    return any("Sampler" in t and t not in CORE_SAMPLER_NODES for t in types)


# The first workflow driven by the pack's own sampler (others use core KSampler on its MODEL).
PACK_SAMPLER_WORKFLOWS = [p for p in WORKFLOWS if uses_pack_sampler(p)] or WORKFLOWS
needs_workflows = pytest.mark.skipif(
    not WORKFLOWS, reason=f"{PACK_DIR / 'workflows'} has no *.json yet: nothing to run in ComfyUI")


def tier_prompt(comfy_env, wf_path: Path, input_dir: Path | None = None) -> tuple[dict, dict]:
    """API prompt of a bundled workflow, shrunk for the tiny checkpoints, with its input images."""
    workflow = json.loads(wf_path.read_text())
    mappings = comfy_env.nodes.NODE_CLASS_MAPPINGS
    prompt = cw.shrink_for_tiny(cw.ui_to_api(workflow, mappings), mappings)
    cw.write_input_images(prompt, input_dir or comfy_env.folder_paths.get_input_directory())
    return prompt, workflow


def encoder_runs(pack_module) -> int:
    mod_name, attr = ENCODER_COUNTER.split(":")
    module = importlib.import_module(f"{pack_module.__name__}.{mod_name}")
    assert hasattr(module, attr), f"the pack must count encoder runs in {mod_name}.{attr} (ENCODER_COUNTER)"
    value = getattr(module, attr)
    return int(sum(value.values())) if isinstance(value, dict) else int(value)


def pack_handles(comfy_env) -> list:
    return [lm.model for lm in comfy_env.mm.current_loaded_models
            if type(lm.model.model).__name__ == "NewBieResidentWeights"]


def run_cancelling(comfy_env, prompt: dict, node: str) -> tuple[list, object, object]:
    """Run ``prompt``, pressing Cancel (what POST /interrupt does) whenever ``node`` reports
    progress; returns the progress values it reported, the run's result and the executor (its
    caches are what a next run reuses)."""
    from comfy_execution.utils import get_executing_context
    hits = []

    def hook(value, total, preview, node_id=None, prompt_id=None):
        ctx = get_executing_context()
        if (node_id or (ctx.node_id if ctx else None)) == node:
            hits.append(value)
            comfy_env.mm.interrupt_current_processing(True)

    previous = comfy_env.comfy_utils.PROGRESS_BAR_HOOK
    comfy_env.comfy_utils.set_progress_bar_global_hook(hook)
    executor = comfy_env.execution.PromptExecutor(cr.StubServer(), cache_type=comfy_env.execution.CacheType.CLASSIC)
    try:
        return hits, cr.run_prompt(comfy_env, executor, prompt), executor
    finally:
        comfy_env.comfy_utils.set_progress_bar_global_hook(previous)


TINY_LOADERS = {
    "1": {"class_type": "NewBieDiTLoader", "inputs": {"dit_name": "NewBie-Image-Exp0.1-bf16.safetensors",
                                                      "storage": "bf16"}},
    "2": {"class_type": "NewBieTextEncoderLoader", "inputs": {"gemma_name": "gemma_3_4b_it_bf16.safetensors",
                                                              "jina_name": "jina_clip_v2_bf16.safetensors",
                                                              "gemma_storage": "bf16"}},
    "3": {"class_type": "NewBieTextEncode", "inputs": {"text_encoders": ["2", 0], "positive": "a cat on a mat",
                                                       "negative": "blurry, low quality", "compat": False}},
    "4": {"class_type": "NewBieDiTToModel", "inputs": {"dit": ["1", 0]}},
    "5": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 48, "batch_size": 1}},
}


def saved_latent(comfy_env, outputs: dict, node_id: str) -> torch.Tensor:
    from safetensors.torch import load_file
    entry = outputs[node_id]["latents"][0]
    path = Path(comfy_env.folder_paths.get_output_directory()) / entry["subfolder"] / entry["filename"]
    return load_file(str(path))["latent_tensor"]


def model_prompt(sampler_nodes: dict) -> dict:
    prompt = json.loads(json.dumps(TINY_LOADERS))
    prompt.update(sampler_nodes)
    return prompt


def width_1000_prompt(comfy_env, pack) -> tuple[dict, str]:
    """A bundled workflow whose latent node asks for a custom 1000x1024 (not a multiple of 16)."""
    for wf in PACK_SAMPLER_WORKFLOWS:
        prompt, _ = tier_prompt(comfy_env, wf)
        latent = [k for k, n in prompt.items() if n["class_type"] == "NewBieEmptyLatent"]
        if latent:
            custom = next(c for c in comfy_env.nodes.NODE_CLASS_MAPPINGS["NewBieEmptyLatent"].INPUT_TYPES()
                          ["required"]["resolution"][0] if c.startswith("custom"))
            prompt[latent[0]]["inputs"].update(resolution=custom, width=1000, height=1024)
            return prompt, latent[0]
    pytest.skip("no bundled workflow uses NewBieEmptyLatent")


def width_error(node_errors: dict, node_id: str) -> dict:
    assert list(node_errors) == [node_id], node_errors            # only the latent node is refused
    errors = node_errors[node_id]["errors"]
    width = [e for e in errors if e["extra_info"].get("input_name") == "width"]
    assert width, errors
    return width[0]
