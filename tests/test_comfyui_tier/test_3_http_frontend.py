"""ComfyUI tier: ComfyUI's HTTP server and its frontend (skipped unless COMFYUI_PATH is set).

The server is a module-scoped fixture: every test that talks to it lives in this file, so it
starts once per run."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

import comfyui_http as ch  # tests/ is on pytest's pythonpath (pyproject)
import comfyui_workflow as cw
from comfyui_tier import (COMFY_ROOT, FRONTEND_ROOT, MODEL_FOLDERS, PACK_DIR, PACK_SAMPLER_WORKFLOWS, WORKFLOWS,
                          tier_prompt, width_1000_prompt, width_error, needs_workflows)

pytestmark = [pytest.mark.comfyui,
              pytest.mark.skipif(not COMFY_ROOT, reason="COMFYUI_PATH not set (ComfyUI tier)")]


@pytest.fixture(scope="module")
def http_server(comfy_env, tiny_models, tmp_path_factory):
    if not WORKFLOWS:
        pytest.skip("no bundled workflows yet")
    base = tmp_path_factory.mktemp("comfy_base")
    custom = base / "packs"
    custom.mkdir()
    (custom / PACK_DIR.name).symlink_to(PACK_DIR, target_is_directory=True)
    yaml_path = ch.write_server_config(base / "extra_model_paths.yaml", custom,
                                       {name: tiny_models / name for name in MODEL_FOLDERS})
    extra = ("--cpu",) if not torch.cuda.is_available() else ()
    if FRONTEND_ROOT:
        extra += ("--front-end-root", FRONTEND_ROOT)
    with ch.ComfyServer(COMFY_ROOT, base / "root", yaml_path, extra_args=extra) as server:
        yield server


@needs_workflows
def test_http_prompt_roundtrip(comfy_env, pack, http_server):
    prompt, workflow = tier_prompt(comfy_env, PACK_SAMPLER_WORKFLOWS[0], http_server.base_dir / "input")
    assert f"{PACK_DIR.name}" in http_server.log() and "IMPORT FAILED" not in http_server.log()
    entry = ch.wait_history(http_server.url, ch.post_prompt(http_server.url, prompt, workflow))
    assert entry["status"]["status_str"] == "success", entry["status"]
    images = [img for out in entry["outputs"].values() for img in out.get("images", [])]
    assert images and all((http_server.base_dir / img["type"] / img["subfolder"] / img["filename"]).is_file()
                          for img in images)


@needs_workflows
@pytest.mark.skipif(ch.chromium_path() is None or importlib.util.find_spec("playwright") is None,
                    reason="needs Debian chromium and the playwright package")
def test_frontend_loads_workflows_without_missing_nodes(comfy_env, pack, http_server, tmp_path):
    folder = Path(os.environ.get("NEWBIE_SCREENSHOT_DIR") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    for wf_path in WORKFLOWS:
        workflow = json.loads(wf_path.read_text())
        tier_prompt(comfy_env, wf_path, http_server.base_dir / "input")   # its input images: newer frontends
        png = folder / f"{wf_path.stem}.png"                          # flag a Load Image without its file
        result = ch.frontend_check(http_server.url, workflow, png)
        assert result["have_registry"] and result["missing"] == [], result["missing"]
        assert result["count"] == len(workflow["nodes"])
        assert png.stat().st_size > 10_000
        ours = cw.ui_to_api(workflow, comfy_env.nodes.NODE_CLASS_MAPPINGS)
        theirs = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in result["prompt"].items()}
        assert ours == theirs, "converter and frontend disagree on the API prompt"


@needs_workflows
@pytest.mark.skipif(ch.chromium_path() is None or importlib.util.find_spec("playwright") is None,
                    reason="needs Debian chromium and the playwright package")
def test_memory_report_shows_on_the_canvas(comfy_env, pack, http_server, tmp_path):
    """Frontend 1.27 (the one this snapshot ships), or the one NEWBIE_TIER_FRONTEND_ROOT points at:
    after a run queued from the UI, the Memory Report node displays the plans and measured peaks
    (js/newbie_report.js)."""
    wf_path = next(p for p in WORKFLOWS if p.stem == "newbie_t2i_16gb_1024")
    prompt, _ = tier_prompt(comfy_env, wf_path, http_server.base_dir / "input")
    folder = Path(os.environ.get("NEWBIE_SCREENSHOT_DIR") or tmp_path)
    text = ch.frontend_run_and_read(http_server.url, prompt, "NewBieMemoryReport", "report",
                                    folder / "memory_report_on_canvas.png")
    assert "== plan: sample ==" in text and "== measured ==" in text, text[:500]


@needs_workflows
def test_http_prompt_refuses_width_1000_with_the_widget_named(comfy_env, pack, http_server):
    import urllib.error
    prompt, node_id = width_1000_prompt(comfy_env, pack)
    with pytest.raises(urllib.error.HTTPError) as refused:
        ch.post_prompt(http_server.url, prompt)
    assert refused.value.code == 400
    body = json.loads(refused.value.read())
    e = width_error(body["node_errors"], node_id)
    assert "width: image size 1000x1024 is not a multiple of 16" in e["details"]
    queue = ch.http_json(http_server.url + "/queue")
    assert queue["queue_running"] == [] and queue["queue_pending"] == []   # nothing was queued
