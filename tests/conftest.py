"""Shared fixtures. Test modules live without __init__.py (ComfyUI's root has a `tests` package)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import os

import pytest
import torch
from hypothesis import settings

REPO_ROOT = Path(__file__).resolve().parents[1]
PACK_NAME = "newbie_lowvram_pack"

# CI draws the same examples every run: a property that fails there fails again, and a green run
# is not luck. Locally hypothesis keeps exploring (and keeps its found failures in its database).
settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")


def load_pack():
    """Import the repository as the package ComfyUI would see (relative imports included)."""
    if PACK_NAME in sys.modules:
        return sys.modules[PACK_NAME]
    spec = importlib.util.spec_from_file_location(
        PACK_NAME, REPO_ROOT / "__init__.py", submodule_search_locations=[str(REPO_ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_NAME] = module
    spec.loader.exec_module(module)
    return module


def pytest_collection_modifyitems(config, items):
    has_cuda = torch.cuda.is_available()
    for item in items:
        if "cuda" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """One set of tiny checkpoints in every supported layout, built once per test run."""
    from newbie_core.tiny import build_tiny_checkpoints
    root = tmp_path_factory.mktemp("tiny")
    build_tiny_checkpoints(root)
    return root


@pytest.fixture(scope="session")
def tiny_models(tiny_dir):
    """Handles to the tiny checkpoints (DiT, Gemma + Jina, VAE); nothing is loaded until used."""
    from newbie_core.pipeline import Models, load_dit_handle, load_text_encoder_handle, load_vae_handle
    from newbie_core.tiny import build_tiny_checkpoints
    paths = build_tiny_checkpoints(tiny_dir)
    return Models(load_dit_handle(paths.dit), load_text_encoder_handle(paths.gemma, paths.jina),
                  load_vae_handle(paths.vae))
