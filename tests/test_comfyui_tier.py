"""ComfyUI tier: the pack inside a real ComfyUI checkout (skipped unless COMFYUI_PATH is set).

Run from the repo root with the ComfyUI venv:
    COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy-venv/bin/python -m pytest -q tests
Optional: NEWBIE_TIER_PACK=<dir> runs the tier against another pack with the same contract
(used to prove the harness); NEWBIE_SCREENSHOT_DIR=<folder> keeps the frontend screenshots.

Contract with the pack (what these tests assume):
* `workflows/*.json` are UI-format workflows that run with the tiny checkpoints
  (`newbie_core.tiny.build_tiny_checkpoints`) registered as diffusion_models/text_encoders/vae.
* The sampler node's class name contains "Sampler"; it reports progress through
  `comfy_adapter.progress_bar` and calls `comfy_adapter.check_interrupted` every step.
* The pack counts real text-encoder runs in a module attribute (an int, or a dict of ints that
  is summed) named by ENCODER_COUNTER (default `newbie_core.pipeline.encode:ENCODER_CALLS`,
  relative to the pack).
"""

from __future__ import annotations

import gc
import importlib
import importlib.util
import json
import os
import sys
import types
from pathlib import Path

import pytest
import torch

import comfyui_support as cs  # tests/ is on pytest's pythonpath (pyproject)

REPO_ROOT = Path(__file__).resolve().parents[1]
COMFY_ROOT = os.environ.get("COMFYUI_PATH")
PACK_DIR = Path(os.environ.get("NEWBIE_TIER_PACK", REPO_ROOT)).resolve()
WORKFLOWS = list(cs.iter_workflows(PACK_DIR / "workflows"))
# Another frontend than the snapshot's 1.27: the static folder of a comfyui-frontend-package wheel
# (e.g. 1.58), served with ComfyUI's --front-end-root.
FRONTEND_ROOT = os.environ.get("NEWBIE_TIER_FRONTEND_ROOT")
ENCODER_COUNTER = os.environ.get("NEWBIE_TIER_ENCODER_COUNTER", "newbie_core.pipeline.encode:ENCODER_CALLS")
MODEL_FOLDERS = ("diffusion_models", "text_encoders", "vae")

pytestmark = [pytest.mark.comfyui,
              pytest.mark.skipif(not COMFY_ROOT, reason="COMFYUI_PATH not set (ComfyUI tier)")]
CORE_SAMPLER_NODES = {"KSampler", "KSamplerAdvanced", "SamplerCustomAdvanced", "SamplerCustom"}


def _uses_pack_sampler(path: Path) -> bool:
    types = {n["type"] for n in json.loads(path.read_text())["nodes"]}
    return any("Sampler" in t and t not in CORE_SAMPLER_NODES for t in types)


# The first workflow driven by the pack's own sampler (others use core KSampler on its MODEL).
PACK_SAMPLER_WORKFLOWS = [p for p in WORKFLOWS if _uses_pack_sampler(p)] or WORKFLOWS
needs_workflows = pytest.mark.skipif(
    not WORKFLOWS, reason=f"{PACK_DIR / 'workflows'} has no *.json yet: nothing to run in ComfyUI")


@pytest.fixture(scope="session")
def comfy_env(tmp_path_factory):
    return cs.init_comfy(COMFY_ROOT, tmp_path_factory.mktemp("comfy_out"))


@pytest.fixture(scope="session")
def tiny_models(comfy_env, tmp_path_factory) -> Path:
    from newbie_core.tiny import build_tiny_checkpoints
    root = tmp_path_factory.mktemp("tiny_models")
    build_tiny_checkpoints(root)
    for name in MODEL_FOLDERS:
        comfy_env.folder_paths.add_model_folder_path(name, str(root / name), is_default=True)
    return root


@pytest.fixture(scope="session")
def adapter(comfy_env):
    """The repo's adapter module, loaded without the rest of the pack: a bare package over nodes/
    (its __init__ is not run), so the adapter's own relative imports resolve."""
    package = types.ModuleType("newbie_tier_nodes")
    package.__path__ = [str(REPO_ROOT / "nodes")]
    sys.modules.setdefault("newbie_tier_nodes", package)
    module = importlib.import_module("newbie_tier_nodes.comfy_adapter")
    assert module.comfy_running() and isinstance(module.get_adapter(), module.ComfyAdapter)
    return module


@pytest.fixture(scope="session")
def pack(comfy_env, tiny_models):
    if not WORKFLOWS:
        pytest.skip(f"{PACK_DIR / 'workflows'} has no *.json yet: the pack's nodes are not ready")
    ok, module, log = cs.load_pack(comfy_env, PACK_DIR)
    assert ok and module is not None, f"pack failed to import in ComfyUI:\n{log}"
    return module


@pytest.fixture
def cpu(comfy_env):
    return comfy_env.mm.get_torch_device()


def _prompt(comfy_env, wf_path: Path, input_dir: Path | None = None) -> tuple[dict, dict]:
    """API prompt of a bundled workflow, shrunk for the tiny checkpoints, with its input images."""
    workflow = json.loads(wf_path.read_text())
    mappings = comfy_env.nodes.NODE_CLASS_MAPPINGS
    prompt = cs.shrink_for_tiny(cs.ui_to_api(workflow, mappings), mappings)
    cs.write_input_images(prompt, input_dir or comfy_env.folder_paths.get_input_directory())
    return prompt, workflow


def _encoder_runs(pack_module) -> int:
    mod_name, attr = ENCODER_COUNTER.split(":")
    module = importlib.import_module(f"{pack_module.__name__}.{mod_name}")
    assert hasattr(module, attr), f"the pack must count encoder runs in {mod_name}.{attr} (ENCODER_COUNTER)"
    value = getattr(module, attr)
    return int(sum(value.values())) if isinstance(value, dict) else int(value)


def _handles(comfy_env) -> list:
    return [lm.model for lm in comfy_env.mm.current_loaded_models
            if type(lm.model.model).__name__ == "NewBieResidentWeights"]


# ------------------------------------------------------------------ adapter inside real ComfyUI

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
    assert _handles(comfy_env) == []


def test_dropped_handle_leaves_no_entry(comfy_env, adapter, cpu):
    adapter.register_unloadable("forgotten", 1 << 20, lambda: None, device=cpu)
    gc.collect()
    comfy_env.mm.cleanup_models()
    assert _handles(comfy_env) == []


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


# ------------------------------------------------------------------ the pack and its workflows

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
    prompt, workflow = _prompt(comfy_env, wf_path)
    executor = comfy_env.execution.PromptExecutor(cs.StubServer(), cache_type=comfy_env.execution.CacheType.CLASSIC)
    result = cs.run_prompt(comfy_env, executor, prompt, {"extra_pnginfo": {"workflow": workflow}})
    assert result.success, result.message("execution_error")
    assert result.message("execution_success") is not None
    saving = [nid for nid, node in prompt.items() if node["class_type"] in ("SaveImage", "PreviewImage")]
    assert saving, f"{wf_path.name} has no SaveImage/PreviewImage node"
    for nid in saving:
        files = cs.saved_images(comfy_env, {nid: result.outputs.get(nid, {})})
        assert files, f"node {nid} saved no image"
        size = cs.expected_size(prompt, nid)
        for path in files:
            with Image.open(path) as img:
                assert size is None or img.size == size, (path, img.size, size)


def _sampler_id(prompt: dict, pack) -> str:
    ids = [nid for nid, n in prompt.items() if n["class_type"] in pack.NODE_CLASS_MAPPINGS and "Sampler" in n["class_type"]]
    assert ids, "no pack node with 'Sampler' in its class name"
    return ids[0]


def _run_cancelling(comfy_env, prompt: dict, node: str) -> tuple[list, object, object]:
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
    executor = comfy_env.execution.PromptExecutor(cs.StubServer(), cache_type=comfy_env.execution.CacheType.CLASSIC)
    try:
        return hits, cs.run_prompt(comfy_env, executor, prompt), executor
    finally:
        comfy_env.comfy_utils.set_progress_bar_global_hook(previous)


@needs_workflows
def test_cancel_during_sampler_interrupts_and_releases(comfy_env, pack):
    prompt, _ = _prompt(comfy_env, PACK_SAMPLER_WORKFLOWS[0])
    sampler = _sampler_id(prompt, pack)
    hits, result, executor = _run_cancelling(comfy_env, prompt, sampler)
    assert hits, "the sampler never reported progress through comfy_adapter.progress_bar"
    interrupted = result.message("execution_interrupted")
    assert interrupted is not None and interrupted["node_id"] == sampler, result.messages
    assert hits == [hits[0]], "the sampler kept stepping after Cancel (check_interrupted missing)"
    assert not comfy_env.mm.processing_interrupted()
    handles = _handles(comfy_env)
    comfy_env.mm.unload_all_models()
    assert _handles(comfy_env) == [] and not any(h.resident for h in handles)
    if torch.cuda.is_available():
        assert torch.cuda.memory_allocated() < 64 << 20, "weights still on the GPU after unload"
    again = cs.run_prompt(comfy_env, executor, prompt)
    assert again.success, again.message("execution_error")


@needs_workflows
def test_conditioning_cache_skips_encoders_on_rerun(comfy_env, pack):
    prompt, _ = _prompt(comfy_env, PACK_SAMPLER_WORKFLOWS[0])
    make = lambda: comfy_env.execution.PromptExecutor(cs.StubServer(), cache_type=comfy_env.execution.CacheType.CLASSIC)
    first_executor = make()
    before = _encoder_runs(pack)
    assert cs.run_prompt(comfy_env, first_executor, prompt).success
    after_first = _encoder_runs(pack)
    # ComfyUI's own cache: the identical prompt is served entirely from the output cache.
    rerun = cs.run_prompt(comfy_env, first_executor, prompt)
    assert rerun.success and rerun.cached == set(prompt)
    # A fresh executor has no output cache, so every node runs again; the pack's own
    # conditioning cache must still answer without running the encoders.
    fresh = cs.run_prompt(comfy_env, make(), prompt)
    assert fresh.success and fresh.cached == set()
    assert _encoder_runs(pack) == after_first, "text encoders ran again for an unchanged prompt"
    assert after_first >= before


# ------------------------------------------------------------------ HTTP server and frontend

@pytest.fixture(scope="module")
def http_server(comfy_env, tiny_models, tmp_path_factory):
    if not WORKFLOWS:
        pytest.skip("no bundled workflows yet")
    base = tmp_path_factory.mktemp("comfy_base")
    custom = base / "packs"
    custom.mkdir()
    (custom / PACK_DIR.name).symlink_to(PACK_DIR, target_is_directory=True)
    yaml_path = cs.write_server_config(base / "extra_model_paths.yaml", custom,
                                       {name: tiny_models / name for name in MODEL_FOLDERS})
    extra = ("--cpu",) if not torch.cuda.is_available() else ()
    if FRONTEND_ROOT:
        extra += ("--front-end-root", FRONTEND_ROOT)
    with cs.ComfyServer(COMFY_ROOT, base / "root", yaml_path, extra_args=extra) as server:
        yield server


@needs_workflows
def test_http_prompt_roundtrip(comfy_env, pack, http_server):
    prompt, workflow = _prompt(comfy_env, PACK_SAMPLER_WORKFLOWS[0], http_server.base_dir / "input")
    assert f"{PACK_DIR.name}" in http_server.log() and "IMPORT FAILED" not in http_server.log()
    entry = cs.wait_history(http_server.url, cs.post_prompt(http_server.url, prompt, workflow))
    assert entry["status"]["status_str"] == "success", entry["status"]
    images = [img for out in entry["outputs"].values() for img in out.get("images", [])]
    assert images and all((http_server.base_dir / img["type"] / img["subfolder"] / img["filename"]).is_file()
                          for img in images)


@needs_workflows
@pytest.mark.skipif(cs.chromium_path() is None or importlib.util.find_spec("playwright") is None,
                    reason="needs Debian chromium and the playwright package")
def test_frontend_loads_workflows_without_missing_nodes(comfy_env, pack, http_server, tmp_path):
    folder = Path(os.environ.get("NEWBIE_SCREENSHOT_DIR") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    for wf_path in WORKFLOWS:
        workflow = json.loads(wf_path.read_text())
        _prompt(comfy_env, wf_path, http_server.base_dir / "input")   # its input images: newer frontends
        png = folder / f"{wf_path.stem}.png"                          # flag a Load Image without its file
        result = cs.frontend_check(http_server.url, workflow, png)
        assert result["have_registry"] and result["missing"] == [], result["missing"]
        assert result["count"] == len(workflow["nodes"])
        assert png.stat().st_size > 10_000
        ours = cs.ui_to_api(workflow, comfy_env.nodes.NODE_CLASS_MAPPINGS)
        theirs = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in result["prompt"].items()}
        assert ours == theirs, "converter and frontend disagree on the API prompt"


# ------------------------------------------------------------------ the pack's MODEL under core samplers

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


def _saved_latent(comfy_env, outputs: dict, node_id: str) -> torch.Tensor:
    from safetensors.torch import load_file
    entry = outputs[node_id]["latents"][0]
    path = Path(comfy_env.folder_paths.get_output_directory()) / entry["subfolder"] / entry["filename"]
    return load_file(str(path))["latent_tensor"]


def _model_prompt(sampler_nodes: dict) -> dict:
    prompt = json.loads(json.dumps(TINY_LOADERS))
    prompt.update(sampler_nodes)
    return prompt


def test_core_ksampler_on_pack_model_matches_pack_sampler(comfy_env, pack):
    """Core KSampler (euler, simple) on the pack's MODEL and the pack's sampler fed the same
    sigmas through SIGMAS give the same latent; so do KSamplerAdvanced and SamplerCustomAdvanced
    with ModelSamplingAuraFlow at the default shift."""
    common = {"seed": 7, "cfg": 4.0}
    prompt = _model_prompt({
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
    executor = comfy_env.execution.PromptExecutor(cs.StubServer(), cache_type=comfy_env.execution.CacheType.CLASSIC)
    result = cs.run_prompt(comfy_env, executor, prompt)
    assert result.success, result.message("execution_error")
    core, ours, advanced, custom, ours_core = (_saved_latent(comfy_env, result.outputs, f"2{i}") for i in range(5))
    assert core.shape == ours.shape == (1, 16, 6, 8)
    assert torch.isfinite(core).all() and core.std() > 0.1
    scale = float(ours.abs().max())
    assert torch.allclose(core, ours, rtol=0, atol=1e-5 * scale), float((core - ours).abs().max())
    for other in (advanced, custom, ours_core):
        assert torch.allclose(core, other, rtol=0, atol=1e-5 * scale), float((core - other).abs().max())
    # A different seed must change the image: the comparison above is not vacuous.
    prompt["10"]["inputs"]["seed"] = 8
    again = cs.run_prompt(comfy_env, executor, prompt)
    assert again.success and not torch.allclose(_saved_latent(comfy_env, again.outputs, "20"), core, atol=1e-2)


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
            handles_during.append(len(_handles(comfy_env)))
            return value

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

    placed.budget_scope = Recording
    with torch.inference_mode():
        out = mappings["KSampler"]().sample(clone, 3, 2, 3.0, "euler", "simple", pos, neg, latent)[0]
    assert out["samples"].shape == (1, 16, 4, 4) and placed.opened == 1 and placed.forwards == 2
    # On a GPU the placed weights are announced by one handle for the run; the CPU has no VRAM to share.
    assert handles_during == [1 if torch.cuda.is_available() else 0]
    assert _handles(comfy_env) == [], "the handle must go when the session closes"
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
    prompt = _model_prompt({
        "10": {"class_type": "KSampler", "inputs": {"model": ["4", 0], "positive": ["3", 0], "negative": ["3", 1],
                                                    "latent_image": ["5", 0], "seed": 3, "steps": 5, "cfg": 4.0,
                                                    "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}},
        "20": {"class_type": "SaveLatent", "inputs": {"samples": ["10", 0], "filename_prefix": "cancel"}},
    })
    hits, result, executor = _run_cancelling(comfy_env, prompt, "10")
    assert hits == [1], f"KSampler kept stepping after Cancel: progress {hits}"
    interrupted = result.message("execution_interrupted")
    assert interrupted is not None and interrupted["node_id"] == "10", result.messages
    assert not comfy_env.mm.processing_interrupted()
    assert _handles(comfy_env) == [], "the DiT's handle must be gone after a cancelled run"
    again = cs.run_prompt(comfy_env, executor, prompt)
    assert again.success, again.message("execution_error")


@needs_workflows
@pytest.mark.skipif(cs.chromium_path() is None or importlib.util.find_spec("playwright") is None,
                    reason="needs Debian chromium and the playwright package")
def test_memory_report_shows_on_the_canvas(comfy_env, pack, http_server, tmp_path):
    """Frontend 1.27 (the one this snapshot ships), or the one NEWBIE_TIER_FRONTEND_ROOT points at:
    after a run queued from the UI, the Memory Report node displays the plans and measured peaks
    (js/newbie_report.js)."""
    wf_path = next(p for p in WORKFLOWS if p.stem == "newbie_t2i_16gb_1024")
    prompt, _ = _prompt(comfy_env, wf_path, http_server.base_dir / "input")
    folder = Path(os.environ.get("NEWBIE_SCREENSHOT_DIR") or tmp_path)
    text = cs.frontend_run_and_read(http_server.url, prompt, "NewBieMemoryReport", "report",
                                    folder / "memory_report_on_canvas.png")
    assert "== plan: sample ==" in text and "== measured ==" in text, text[:500]


def test_core_samplers_and_schedulers_run_on_pack_model(comfy_env, pack):
    combos = [("res_multistep", "simple"), ("dpmpp_2m", "beta"), ("euler", "karras"), ("heun", "normal")]
    nodes = {"13": {"class_type": "ModelSamplingAuraFlow", "inputs": {"model": ["4", 0], "shift": 3.0}}}
    for i, (sampler, scheduler) in enumerate(combos):
        nodes[f"3{i}"] = {"class_type": "KSampler", "inputs": {
            "model": ["13", 0], "positive": ["3", 0], "negative": ["3", 1], "latent_image": ["5", 0], "seed": 1,
            "steps": 3, "cfg": 3.0, "sampler_name": sampler, "scheduler": scheduler, "denoise": 1.0}}
        nodes[f"4{i}"] = {"class_type": "SaveLatent", "inputs": {"samples": [f"3{i}", 0], "filename_prefix": f"c{i}"}}
    executor = comfy_env.execution.PromptExecutor(cs.StubServer(), cache_type=comfy_env.execution.CacheType.CLASSIC)
    result = cs.run_prompt(comfy_env, executor, _model_prompt(nodes))
    assert result.success, result.message("execution_error")
    latents = [_saved_latent(comfy_env, result.outputs, f"4{i}") for i in range(len(combos))]
    for combo, lat in zip(combos, latents):
        assert lat.shape == (1, 16, 6, 8) and torch.isfinite(lat).all() and lat.std() > 0.1, combo
    assert not torch.allclose(latents[0], latents[1], atol=1e-3), "different samplers gave the same latent"


def _width_1000(comfy_env, pack) -> tuple[dict, str]:
    """A bundled workflow whose latent node asks for a custom 1000x1024 (not a multiple of 16)."""
    for wf in PACK_SAMPLER_WORKFLOWS:
        prompt, _ = _prompt(comfy_env, wf)
        latent = [k for k, n in prompt.items() if n["class_type"] == "NewBieEmptyLatent"]
        if latent:
            custom = next(c for c in comfy_env.nodes.NODE_CLASS_MAPPINGS["NewBieEmptyLatent"].INPUT_TYPES()
                          ["required"]["resolution"][0] if c.startswith("custom"))
            prompt[latent[0]]["inputs"].update(resolution=custom, width=1000, height=1024)
            return prompt, latent[0]
    pytest.skip("no bundled workflow uses NewBieEmptyLatent")


def _width_error(node_errors: dict, node_id: str) -> dict:
    assert list(node_errors) == [node_id], node_errors            # only the latent node is refused
    errors = node_errors[node_id]["errors"]
    width = [e for e in errors if e["extra_info"].get("input_name") == "width"]
    assert width, errors
    return width[0]


@needs_workflows
def test_validate_prompt_refuses_width_1000_at_queue_time(comfy_env, pack):
    import asyncio
    prompt, node_id = _width_1000(comfy_env, pack)
    runs = _encoder_runs(pack)
    valid, error, _, node_errors = asyncio.run(comfy_env.execution.validate_prompt("w1000", prompt, None))
    assert valid is False, error
    e = _width_error(node_errors, node_id)
    assert e["type"] == "custom_validation_failed"
    assert "width: image size 1000x1024 is not a multiple of 16" in e["details"] and "1008x1024" in e["details"]
    assert _encoder_runs(pack) == runs                              # refused before anything ran


@needs_workflows
def test_http_prompt_refuses_width_1000_with_the_widget_named(comfy_env, pack, http_server):
    import urllib.error
    prompt, node_id = _width_1000(comfy_env, pack)
    with pytest.raises(urllib.error.HTTPError) as refused:
        cs.post_prompt(http_server.url, prompt)
    assert refused.value.code == 400
    body = json.loads(refused.value.read())
    e = _width_error(body["node_errors"], node_id)
    assert "width: image size 1000x1024 is not a multiple of 16" in e["details"]
    queue = cs.http_json(http_server.url + "/queue")
    assert queue["queue_running"] == [] and queue["queue_pending"] == []   # nothing was queued


# ------------------------------------------------------------------ the pack's LoRA node

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
    result = cs.run_prompt(comfy_env, executor, _lora_prompt(strengths))
    assert result.success, result.message("execution_error")
    return _saved_latent(comfy_env, result.outputs, "20"), _saved_latent(comfy_env, result.outputs, "21")


def test_pack_lora_node_changes_the_image_and_strength_0_is_no_lora(comfy_env, pack, tiny_loras):
    """The pack's LoRA node between the DiT loader and either sampler: strength 0 is bitwise the
    no-LoRA image, a real strength changes it, for the pack's sampler and core KSampler alike."""
    make = lambda: comfy_env.execution.PromptExecutor(cs.StubServer(), cache_type=comfy_env.execution.CacheType.CLASSIC)
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
    executor = comfy_env.execution.PromptExecutor(cs.StubServer(), cache_type=comfy_env.execution.CacheType.CLASSIC)
    first = _lora_latents(comfy_env, executor, {"peft": 1.0, "lokr": 0.5})      # warm
    reads: list[tuple[str, str]] = []
    original = checkpoint.TensorSource._get_raw

    def counting(self, key):
        reads.append((str(getattr(self, "files", "?")), key))
        return original(self, key)

    monkeypatch.setattr(checkpoint.TensorSource, "_get_raw", counting)
    misses, lora_reads = placement.HOST_CACHE.misses, lora_module.LORA_READS["files"]
    result = cs.run_prompt(comfy_env, executor, _lora_prompt({"peft": 0.4, "lokr": 0.5}))
    assert result.success, result.message("execution_error")
    assert {"1", "2", "3", "5"} <= result.cached, "the loaders and the encoder must come from ComfyUI's cache"
    assert not {"60", "10", "11"} & result.cached, "the strength change must rerun the LoRA node and samplers"
    second = (_saved_latent(comfy_env, result.outputs, "20"), _saved_latent(comfy_env, result.outputs, "21"))
    assert not torch.equal(first[0], second[0]) and not torch.equal(first[1], second[1])
    assert placement.HOST_CACHE.misses == misses, "a DiT block store was rebuilt from the file"
    assert lora_module.LORA_READS["files"] == lora_reads, "an unchanged LoRA file was read again"
    dit_reads = [key for files, key in reads if "NewBie-Image-Exp0.1" in files]
    block_reads = [k for k in dit_reads if k.startswith(("layers.", "noise_refiner.", "context_refiner."))]
    assert block_reads == [], f"DiT block tensors were read again: {block_reads[:5]} ({len(block_reads)})"
    # The small non-block tensors (embedders, final layer) were read once, by the warm-up, and are
    # kept beside the checkpoint: this run reads nothing of the DiT file at all.
    assert dit_reads == [], f"DiT tensors were read again: {dit_reads[:5]} ({len(dit_reads)})"
