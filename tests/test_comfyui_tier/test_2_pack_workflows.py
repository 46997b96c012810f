"""ComfyUI tier: the pack and its bundled workflows, run in-process (skipped unless COMFYUI_PATH is set)."""

from __future__ import annotations

import json

import pytest
import torch

import comfyui_run as cr  # tests/ is on pytest's pythonpath (pyproject)
import comfyui_workflow as cw
from comfyui_tier import (COMFY_ROOT, PACK_DIR, PACK_SAMPLER_WORKFLOWS, WORKFLOWS, encoder_runs, pack_handles,
                          tier_prompt, run_cancelling, needs_workflows)

pytestmark = [pytest.mark.comfyui,
              pytest.mark.skipif(not COMFY_ROOT, reason="COMFYUI_PATH not set (ComfyUI tier)")]


def test_pack_nodes_registered(comfy_env, pack):
    mappings = pack.NODE_CLASS_MAPPINGS
    assert mappings, "the pack exports no nodes"
    for name, cls in mappings.items():
        assert comfy_env.nodes.NODE_CLASS_MAPPINGS[name] is cls
        assert cls.RELATIVE_PYTHON_MODULE == f"custom_nodes.{PACK_DIR.name}"
        json.dumps(cls.INPUT_TYPES())


@needs_workflows
@pytest.mark.parametrize("wf_path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_executes(comfy_env, pack, wf_path):
    from PIL import Image
    prompt, workflow = tier_prompt(comfy_env, wf_path)
    executor = comfy_env.execution.PromptExecutor(cr.StubServer(), cache_type=comfy_env.execution.CacheType.CLASSIC)
    result = cr.run_prompt(comfy_env, executor, prompt, {"extra_pnginfo": {"workflow": workflow}})
    assert result.success, result.message("execution_error")
    assert result.message("execution_success") is not None
    saving = [nid for nid, node in prompt.items() if node["class_type"] in ("SaveImage", "PreviewImage")]
    assert saving, f"{wf_path.name} has no SaveImage/PreviewImage node"
    for nid in saving:
        files = cr.saved_images(comfy_env, {nid: result.outputs.get(nid, {})})
        assert files, f"node {nid} saved no image"
        size = cw.expected_size(prompt, nid)
        for path in files:
            with Image.open(path) as img:
                assert size is None or img.size == size, (path, img.size, size)


def _sampler_id(prompt: dict, pack) -> str:
    ids = [nid for nid, n in prompt.items() if n["class_type"] in pack.NODE_CLASS_MAPPINGS and "Sampler" in n["class_type"]]
    assert ids, "no pack node with 'Sampler' in its class name"
    return ids[0]


@needs_workflows
def test_cancel_during_sampler_interrupts_and_releases(comfy_env, pack):
    prompt, _ = tier_prompt(comfy_env, PACK_SAMPLER_WORKFLOWS[0])
    sampler = _sampler_id(prompt, pack)
    hits, result, executor = run_cancelling(comfy_env, prompt, sampler)
    assert hits, "the sampler never reported progress through comfy_adapter.progress_bar"
    interrupted = result.message("execution_interrupted")
    assert interrupted is not None and interrupted["node_id"] == sampler, result.messages
    assert hits == [hits[0]], "the sampler kept stepping after Cancel (check_interrupted missing)"
    assert not comfy_env.mm.processing_interrupted()
    handles = pack_handles(comfy_env)
    comfy_env.mm.unload_all_models()
    assert pack_handles(comfy_env) == [] and not any(h.resident for h in handles)
    if torch.cuda.is_available():
        assert torch.cuda.memory_allocated() < 64 << 20, "weights still on the GPU after unload"
    again = cr.run_prompt(comfy_env, executor, prompt)
    assert again.success, again.message("execution_error")


@needs_workflows
def test_conditioning_cache_skips_encoders_on_rerun(comfy_env, pack):
    prompt, _ = tier_prompt(comfy_env, PACK_SAMPLER_WORKFLOWS[0])
    make = lambda: comfy_env.execution.PromptExecutor(cr.StubServer(), cache_type=comfy_env.execution.CacheType.CLASSIC)
    first_executor = make()
    before = encoder_runs(pack)
    assert cr.run_prompt(comfy_env, first_executor, prompt).success
    after_first = encoder_runs(pack)
    # ComfyUI's own cache: the identical prompt is served entirely from the output cache.
    rerun = cr.run_prompt(comfy_env, first_executor, prompt)
    assert rerun.success and rerun.cached == set(prompt)
    # A fresh executor has no output cache, so every node runs again; the pack's own
    # conditioning cache must still answer without running the encoders.
    fresh = cr.run_prompt(comfy_env, make(), prompt)
    assert fresh.success and fresh.cached == set()
    assert encoder_runs(pack) == after_first, "text encoders ran again for an unchanged prompt"
    assert after_first >= before
