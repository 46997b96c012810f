"""The benchmark scripts' CPU smoke modes, so they cannot rot between GPU visits (issue 10)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _script(name: str):
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_forward_bench_smoke_times_and_compares():
    from newbie_core.models.dit import DiTConfig
    rows = _script("forward_bench").run(DiTConfig.tiny(), 64, True, "cpu", 2, ["eager"], False)
    assert rows[0]["n"] == 2 and rows[0]["ms"] > 0 and rows[0]["rel_l2_vs_eager"] == 0.0


def test_forward_bench_sorts_kernels_into_categories():
    fb = _script("forward_bench")
    assert fb.category("nvjet_sm90_tst_320x128_64x3_1x2_h_bz_coopB_TNT") == "gemm"
    assert fb.category("cudnn_generated_fort_native_sdpa_sm90_flash_fprop") == "attention"
    assert fb.category("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0") == "elementwise"
    assert fb.category("Memcpy HtoD (Pinned -> Device)") == "copies"


@pytest.mark.slow
def test_run_benchmarks_smoke_writes_a_row_the_report_reads(tmp_path):
    _script("run_benchmarks").smoke(tmp_path)
    rows = json.loads((tmp_path / "results.json").read_text())
    assert rows[0]["row"] == "ours" and rows[0]["steady_steps"] >= 1 and rows[0]["whole_s"] > 0
    lines = _script("report").rows_table(rows, "64x64", True)
    assert len(lines) == 3 and "| ours | bf16 | none |" in lines[2]


def test_steady_steps_leave_out_warm_up_and_capture():
    steady = _script("run_benchmarks").steady_steps
    assert steady([9.0, 5.0, 1.0, 1.0, 1.0, 1.0]) == [1.0] * 4
    assert steady([9.0, 1.0, 1.0]) == [1.0, 1.0]
    assert steady([3.0]) == [3.0]
