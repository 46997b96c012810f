"""bench/peers.py smoke mode: every peer that runs on this machine gives a real row (issue 10).

ComfyUI peers need a snapshot (out/comfyui, or COMFYUI_PATH) and its deps (einops, scipy);
they skip cleanly without them. Rows are checked for agreement with our resident forward, never
for speed.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

from comfy_snapshot import COMFY_SNAPSHOT as COMFY  # tests/ is on pytest's pythonpath (pyproject)

REPO = Path(__file__).resolve().parents[1]


def _load_peers():
    spec = importlib.util.spec_from_file_location("bench_peers", REPO / "bench" / "peers.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module          # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


peers = _load_peers()


def _comfy_usable() -> bool:
    return ((COMFY / "comfy" / "model_management.py").is_file()
            and all(importlib.util.find_spec(m) for m in ("einops", "scipy", "psutil")))


needs_comfy = pytest.mark.skipif(not _comfy_usable(), reason=f"no usable ComfyUI snapshot at {COMFY}")


def _opts(tmp_path: Path, *extra: str):
    return peers.parse_args(["--out", str(tmp_path), "--smoke", "--device", "cpu", "--passes", "32x2",
                             "--n", "1", "--n-slow", "1", "--comfy", str(COMFY), *extra])


def _row(tmp_path: Path, name: str) -> dict:
    (row,) = peers.run_peer(name, _opts(tmp_path))
    assert "error" not in row, row["error"]
    assert row["row"] == name and row["forward_only"] and row["n"] == 1 and row["ms_per_step"] > 0
    assert row["ms_min"] <= row["ms_per_step"] <= row["ms_max"]
    return row


@pytest.mark.parametrize("name", ["ours-resident-forward", "diffusers-group-block", "diffusers-group-leaf",
                                  "accelerate-sequential"])
def test_our_model_under_every_hook_framework_is_bitwise_ours(tmp_path, name):
    if name != "ours-resident-forward":
        # diffusers' group offloading calls accelerate's send_to_device, and its import of it is
        # guarded: without accelerate it fails with a NameError (seen in the clean CI venv).
        pytest.importorskip("accelerate")
    row = _row(tmp_path, name)
    assert row["bitwise_equal_to_ours"] and row["rel_l2_vs_ours"] == 0.0


@needs_comfy
@pytest.mark.parametrize("name", ["comfyui-full", "comfyui-lowvram-2gb"])
def test_comfyui_nextdit_matches_ours_after_its_time_and_sign_conventions(tmp_path, name):
    # fp32 smoke: a wrong convention (t vs 1 - t, sign) would give a relative error near 1
    row = _row(tmp_path, name)
    assert row["rel_l2_vs_ours"] < 1e-4
    if "lowvram" in name:
        resident, total = map(float, re.search(r"resident weights ([\d.]+) of ([\d.]+) MiB", row["notes"]).groups())
        assert 0 < resident < total          # the partial-load (cast per forward) path really ran


@needs_comfy
def test_async_peer_runs_in_its_own_process_with_two_streams(tmp_path):
    peers.main(["--out", str(tmp_path), "--smoke", "--device", "cpu", "--passes", "32x2", "--n-slow", "1",
                "--comfy", str(COMFY), "--peers", "comfyui-lowvram-2gb-async"])
    saved = json.loads((tmp_path / "peers.json").read_text())
    (row,) = saved["rows"]
    assert "error" not in row, row["error"]
    assert "NUM_STREAMS 2" in row["notes"] and row["rel_l2_vs_ours"] < 1e-4
    assert any("--child comfyui-lowvram-2gb-async" in c for c in saved["commands"])


def test_a_peer_that_cannot_start_is_an_error_row_not_a_crash(tmp_path):
    opts = _opts(tmp_path, "--comfy", str(tmp_path / "nowhere"))
    (row,) = peers.run_peer("comfyui-full", opts)
    assert "--comfy" in row["error"] and row["row"] == "comfyui-full"


def test_lowvram_loads_follow_comfyuis_own_rule():
    """Free VRAM minus max(minimum_inference_memory, memory_required of one latent + the reserve),
    as load_models_gpu computes it; an explicit allowance replaces the subtrahend."""
    class FakeMM:
        @staticmethod
        def minimum_inference_memory():
            return int(1.2 * 2**30)

        @staticmethod
        def extra_reserved_memory():
            return 400 * 2**20
    p, gib = peers.Pass(1024, 2), 2**30
    inference = FakeMM.minimum_inference_memory()
    assert peers.lowvram_weight_bytes(p, 4.0, None, FakeMM) == 4 * gib - inference
    # 4096x4096 (512x512 latent): memory_required = 512*512*2*0.01*1.2 MiB = 6291 MiB dominates
    big = peers.lowvram_weight_bytes(peers.Pass(4096, 2), 16.0, None, FakeMM)
    assert big == int(16 * gib - (512 * 512 * 2 * 0.01 * 1.2 * 2**20 + 400 * 2**20))
    assert peers.lowvram_weight_bytes(p, 2.0, None, FakeMM) == 2 * gib - inference
    assert peers.lowvram_weight_bytes(p, 4.0, 1.5, FakeMM) == int(2.5 * gib)
    assert peers.lowvram_weight_bytes(p, 1.0, None, FakeMM) == 128 * 2**20        # ComfyUI's floor
