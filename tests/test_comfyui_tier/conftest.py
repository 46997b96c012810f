"""ComfyUI tier: the pack inside a real ComfyUI checkout (skipped unless COMFYUI_PATH is set).

Run from the repo root with the ComfyUI venv (`tests/test_comfyui_tier` instead of `tests`: the tier alone):
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

Fixtures shared by this folder's test files. The session-scoped ones (ComfyUI imported into this
process, the tiny checkpoints registered with it, the pack loaded as a custom node) are created
once per pytest run: ComfyUI's initialisation is expensive and global. The files are numbered so
that they run in the order of the single file they were split from, and the folder keeps that
file's name, so in a run of the whole suite the tier still runs where it did (after test_comfy_compat.py).
"""

from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path

import pytest

import comfyui_run as cr  # tests/ is on pytest's pythonpath (pyproject)
from comfyui_tier import COMFY_ROOT, MODEL_FOLDERS, PACK_DIR, REPO_ROOT, WORKFLOWS


@pytest.fixture(scope="session")
def comfy_env(tmp_path_factory):
    return cr.init_comfy(COMFY_ROOT, tmp_path_factory.mktemp("comfy_out"))


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
    ok, module, log = cr.load_pack(comfy_env, PACK_DIR)
    assert ok and module is not None, f"pack failed to import in ComfyUI:\n{log}"
    return module


@pytest.fixture
def cpu(comfy_env):
    return comfy_env.mm.get_torch_device()
