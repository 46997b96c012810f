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
    sys.modules[spec.name] = module      # dataclasses look their module up there
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
    assert rows[0]["storage"] == "bf16" and rows[0]["ram_budget_gb"] is None and rows[0]["host_ram_peak_gb"] > 0
    lines = _script("report").rows_table(rows, "64x64", True)
    assert len(lines) == 3 and "| ours | bf16 | none |" in lines[2]


def test_steady_steps_leave_out_warm_up_and_capture():
    steady = _script("row_timing").steady_steps
    assert steady([9.0, 5.0, 1.0, 1.0, 1.0, 1.0]) == [1.0] * 4
    assert steady([9.0, 1.0, 1.0]) == [1.0, 1.0]
    assert steady([3.0]) == [3.0]


def test_fits_table_is_a_roofline_projection_in_markdown(capsys):
    fits = _script("fits")
    assert fits.main(["--smoke"]) == 0
    text = capsys.readouterr().out
    assert "not a measurement" in text and "GGUF rows: sampling from bench/gguf.json" in text
    lines = [l for l in text.splitlines() if l.startswith("| ") and "GB/s |" in l]
    assert len(lines) == len(fits.VRAM_GB) * len(fits.RAM_GB) * len(fits.LINKS_GBPS)
    rows = fits.SMOKE_ROWS
    # 4 GB card: only the 2 GB-budget rows fit; fp8 streams 3.83 GB per step: over 12 GB/s the link bounds.
    f = fits.fit(rows, 4, 16, 12, 3.0)
    assert f.dtype == "fp8" and f.budget_gb == 2 and f.bound == "link"
    assert abs(f.s_per_step - 3_832_965_120 / 12e9) < 1e-9
    assert abs(f.s_per_image - (28 * f.s_per_step + 4.64 - 28 * 0.135)) < 1e-9
    # At 50 GB/s the row's own measured step bounds; a 16 GB card holds the model resident.
    assert fits.fit(rows, 4, 16, 50, 3.0).bound == "compute"
    assert fits.fit(rows, 16, 32, 12, 3.0).budget_gb is None
    # 16 GB of RAM cannot keep bf16's 16 GB host peak: its encoders are evicted first.
    assert fits.fit([r for r in rows if r.dtype == "bf16"], 16, 16, 50, 3.0).host_note.startswith("encoders")


def test_fits_counts_the_whole_dit_for_eviction_and_keeps_exact_storage_within_the_tie_band():
    """A 2 GB row that keeps 8 of 40 blocks resident streams 32 blocks' bytes only; whether the DiT
    fits a PC's RAM once the encoders are evicted depends on all 40 (2.70 GiB streamed would fit
    8 GB's 6 GB, the 3.38 GiB DiT does not)."""
    fits = _script("fits")
    row = fits.Row("fp8", 2, 1.9, 0.123, 2_903_063_040, 4.22, 10.4, resident_blocks=8, n_blocks=40)
    assert row.dit_bytes == 2_903_063_040 * 40 // 32
    assert fits.fit([row], 4, 8, 25, 3.0).host_note.startswith("DiT streamed from disk")
    assert fits.fit([fits.Row("fp8", 2, 1.9, 0.123, 2_903_063_040, 4.22, 10.4)], 4, 8, 25, 3.0) \
        .host_note.startswith("encoders")                  # without block counts: the streamed bytes
    resident = [fits.Row("bf16", None, 7.06, 0.120, 0, 4.27, 15.7), fits.Row("fp8", None, 7.06, 0.120, 0, 4.17, 10.4)]
    assert fits.fit(resident, 8, 32, 25, 3.0).dtype == "bf16"       # 2.3 % faster: within the band
    faster = [resident[0], fits.Row("fp8", None, 7.06, 0.110, 0, 3.9, 10.4)]
    assert fits.fit(faster, 8, 32, 25, 3.0).dtype == "fp8"          # 8.7 % faster: picked


def test_fits_summary_has_a_line_per_card_and_pc_with_each_links_pick(capsys):
    fits = _script("fits")
    assert fits.main(["--smoke", "--summary"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and " GB | " in line]
    assert len(lines) == len(fits.VRAM_GB) * len(fits.RAM_GB)
    four = next(line for line in lines if line.startswith("| 4 GB | 16 GB |"))
    f = fits.fit(fits.SMOKE_ROWS, 4, 16, 25, 3.0)
    assert "--dtype fp8 --vram-budget 2" in four and f"{f.s_per_image:.1f}" in four.split("|")[4]
    assert four.split("|")[4].count("/") == len(fits.LINKS_GBPS) - 1


def test_fits_reads_the_measured_results():
    fits = _script("fits")
    rows = fits.load_rows(BENCH / "results.json")
    assert {r.dtype for r in rows} == {"bf16", "fp8"} and any(r.budget_gb is None for r in rows)
    gguf = fits.load_gguf_rows(rows)
    assert {r.dtype for r in gguf} == {"gguf-q8_0", "gguf-q4_k"} and all(r.host_ram_peak_gb > 0 for r in gguf)
    # Over a slow link a 4 GB card is picked by the bytes it streams: Q4_K moves the fewest, and
    # fp8 (over twice Q4_K's bytes) would be bound by the link there.
    slow = fits.fit(rows + gguf, 4, 16, 12, 3.0)
    assert slow.dtype == "gguf-q4_k"
    assert fits.fit(rows, 4, 16, 12, 3.0).bound == "link"


@pytest.mark.slow
def test_forward_bench_fp8_compute_variant_runs_and_drifts_a_little():
    from newbie_core.models.dit import DiTConfig
    rows = _script("forward_bench").run(DiTConfig.tiny(), 64, True, "cpu", 2, ["eager", "compiled-fp8"], False)
    assert [r["row"] for r in rows] == ["ours-forward-eager", "ours-forward-compiled-fp8"]
    assert 1e-4 < rows[1]["rel_l2_vs_eager"] < 0.1


@pytest.mark.slow
def test_gguf_bench_smoke_rows_are_bitwise_and_carry_their_drift(tmp_path):
    out = tmp_path / "gguf.json"
    _script("gguf_bench").main(["--smoke", "--out", str(out)])
    rows = json.loads(out.read_text())
    assert [r["storage"] for r in rows] == ["bf16", "fp8", "gguf-q8_0", "gguf-q4_k"]
    assert all(r["ram_budget_gb"] is None and r["host_ram_peak_gb"] > 0 for r in rows)
    for r in rows[1:]:
        assert r["bitwise_equal_to_resident"] and 0 < r["drift_vs_bf16"]["rel_l2"] < 0.1
        assert r["x_roofline"] >= 1.0 - 1e-9


def test_cap_retries_runs_both_conditionings_uncapped_and_capped(tmp_path):
    out = tmp_path / "cap.json"
    _script("cap_retries").main(["--smoke", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [(r["conditioning"], r["cap_gb"]) for r in rows] == [("random", None)] * 3 + [("encoded", None)] * 3
    assert all(r["s_per_step"] > 0 and r["alloc_retries"] is None for r in rows)    # no allocator on the CPU
    assert {r["storage"] for r in rows} == {"fp8"}       # the row names the storage it ran, not bf16


@pytest.mark.slow
def test_soak_smoke_reports_no_growth(tmp_path):
    out = tmp_path / "soak.json"
    assert _script("soak").main(["--smoke", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert len(result["runs"]) == 6 and result["grew"] == []
    assert set(result["growth_after_first_mib"]) == {"allocated_mib", "reserved_mib", "pinned_mib", "rss_mib"}


@pytest.mark.slow
def test_host_ram_bench_smoke_rows_stay_within_their_budget(tmp_path):
    """--same-plan: the tiny models plan alike under 8 and 16 GB of RAM, so the 16 GB rows stand
    for the 8 GB ones instead of running again; the 8 GB rows ran and kept their budget."""
    out = tmp_path / "host_ram.json"
    _script("host_ram_bench").main(["--smoke", "--same-plan", "--out", str(out)])
    rows = json.loads(out.read_text())
    ran = [r for r in rows if "same_plan_as" not in r]
    assert {r["storage"] for r in ran} == {"bf16", "fp8", "gguf-q8_0", "gguf-q4_k"}
    assert {r["temperature"] for r in ran} == {"cold", "warm"} and {r["ram_budget_gb"] for r in ran} == {8}
    assert all("error" not in r and r["within_ram_budget"] for r in ran), [r.get("error") for r in ran]
    twins = [r for r in rows if "same_plan_as" in r]
    assert len(twins) == len(ran) and all(
        r["ram_budget_gb"] == 16 and r["same_plan_as"] == {"ram_budget_gb": 8, "vram_budget_gb": None,
                                                           "storage": r["storage"]} for r in twins)


@pytest.mark.slow
def test_lora_bench_smoke_reports_the_cost_per_budget(tmp_path):
    import subprocess
    out = tmp_path / "lora.json"
    proc = subprocess.run([sys.executable, str(BENCH / "lora_bench.py"), "--smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert [r["budget"] for r in rows] == ["resident", "tight"]
    assert rows[1]["resident_blocks"] < rows[1]["n_blocks"] and rows[0]["lora_cached_map_s"] >= 0


def test_collect_brings_a_visit_into_the_report_inputs(tmp_path):
    """A visit folder in the scripts' own output formats -> the files report.py reads."""
    visit, into = tmp_path / "visit", tmp_path / "bench"
    (visit / "rb").mkdir(parents=True)
    into.mkdir()
    stamp = {"date": "2026-12-02", "machine": "GPU"}
    (visit / "rb" / "results.json").write_text(json.dumps([{"row": "resident", **stamp}]))
    (visit / "rb" / "extra.json").write_text(json.dumps({"torch": "x", "profiles": []}))
    (visit / "peers.json").write_text(json.dumps({"commands": [], "rows": [{"row": "comfyui-full", "size": 1024}]}))
    (visit / "host_ram.json").write_text(json.dumps([{"ram_budget_gb": 16, "host_ram_peak_gb": 15.7,
                                                       "within_ram_budget": False}]))
    (visit / "soak.log").write_text("\n".join(json.dumps({"run": i, "allocated_mib": 1.0, "reserved_mib": 2.0,
                                                          "pinned_mib": 3.0, "rss_mib": 100.0 + i})
                                              for i in range(8)))
    (into / "extra.json").write_text(json.dumps({"official_parity_cuda": [1], "date": "2026-12-01"}))
    _script("collect").main(["--final", str(visit / "rb"), "--peers", str(visit / "peers.json"), "--host-ram",
                             str(visit / "host_ram.json"), "--soak", str(visit / "soak.log"), "--into", str(into)])
    results = json.loads((into / "results.json").read_text())
    assert results[1] == {"row": "comfyui-full", "size": "1024x1024", "forward_only": True, **stamp}
    extra = json.loads((into / "extra.json").read_text())
    assert extra["official_parity_cuda"] == [1] and extra["official_parity_date"] == "2026-12-01"
    assert json.loads((into / "host_ram.json").read_text())["rows"][0]["within_ram_budget"] is True  # GiB vs GiB
    soak = json.loads((into / "soak.json").read_text())
    assert soak["growth_after_first_mib"]["rss_mib"] == 7.0 and soak["growth_after_first_cycle_mib"]["rss_mib"] == 2.0


def test_collect_of_a_partial_visit_keeps_its_peers_beside_the_gguf_rows(tmp_path):
    """Only gguf.json, host_ram.json and extra.json change: the rows get the visit, extra.json the
    peers of that visit, its note and commands; the whole visit's results.json stays as it was."""
    visit, into = tmp_path / "visit", tmp_path / "bench"
    visit.mkdir()
    into.mkdir()
    (into / "results.json").write_text("[]")
    (into / "extra.json").write_text(json.dumps({"visit": "earlier", "profiles": [1]}))
    (visit / "gguf.json").write_text(json.dumps([{"storage": "gguf-q8_0", "s_per_step": 0.12}]))
    (visit / "peers.json").write_text(json.dumps({"commands": [], "rows": [
        {"row": "comfyui-full", "size": 1024, "cfg": True, "budget_gb": None, "ms_per_step": 147.0, "ms_min": 146.0,
         "ms_max": 149.0, "tflops": 447.0, "peak_reserved_gb": 8.3, "notes": "dropped"}]}))
    collect = _script("collect")
    (visit / "host_ram.json").write_text(json.dumps([{"ram_budget_gb": 8.0, "host_ram_peak_gb": 8.5}]))
    collect.main(["--gguf", str(visit / "gguf.json"), "--gguf-peers", str(visit / "peers.json"), "--gguf-note", "n",
                  "--host-ram", str(visit / "host_ram.json"), "--commands", "c1", "--into", str(into)])
    gguf = json.loads((into / "gguf.json").read_text())
    extra = json.loads((into / "extra.json").read_text())
    assert gguf[0]["visit"] == extra["gguf_peers_visit"] != extra["visit"] == "earlier"
    assert extra["gguf_peers"][0]["ms_per_step"] == 147.0 and "notes" not in extra["gguf_peers"][0]
    assert (extra["gguf_note"], extra["gguf_commands"], extra["profiles"]) == ("n", ["c1"], [1])
    assert (into / "results.json").read_text() == "[]"
    ram = json.loads((into / "host_ram.json").read_text())
    assert ram["visit"] == gguf[0]["visit"] and ram["rows"][0]["within_ram_budget"] is False
    with pytest.raises(SystemExit):
        collect.main(["--into", str(into)])


def test_gguf_section_shows_the_peers_of_its_own_visit_only(tmp_path, monkeypatch):
    small = _script("report_small_pc")
    monkeypatch.setattr(small, "HERE", tmp_path)
    row = {"storage": "gguf-q8_0", "budget_gb": 2.0, "s_per_step": 0.125, "s_step_min": 0.12, "s_step_max": 0.13,
           "peak_reserved_gb": 1.9, "predicted_peak_gb": 1.98, "bytes_h2d_per_step": 4e9, "resident_blocks": 0,
           "n_blocks": 40, "date": "2026-12-03", "bandwidth_gbps": 55.4, "visit": "v2", "visit_label": "partial visit v2"}
    peer = {"row": "comfyui-full", "size": 1024, "cfg": True, "budget_gb": None, "ms_per_step": 151.3, "ms_min": 150.2,
            "ms_max": 160.5, "tflops": None, "peak_reserved_gb": 8.34}
    (tmp_path / "gguf.json").write_text(json.dumps([row]))
    for visit, shown in (("v2", True), ("v1", False)):
        (tmp_path / "extra.json").write_text(json.dumps({"visit": "v0", "gguf_peers": [peer], "gguf_peers_visit": visit}))
        text = "\n".join(small.small_pc_sections())
        assert "partial visit v2" in text
        assert ("| comfyui-full | none | 151.3 (150.2-160.5) | - | 8.34 |" in text) is shown


def test_collect_keeps_the_rows_of_groups_a_visit_skipped_marked_with_their_visit(tmp_path):
    """--keep-rows: a visit that re-ran only some row groups keeps the others from the earlier
    results.json, marked, and never keeps the earlier peers or a row it measured again."""
    visit, into = tmp_path / "visit", tmp_path / "bench"
    (visit / "rb").mkdir(parents=True)
    into.mkdir()
    def ours(row, budget, s):
        return {"row": row, "size": "1024x1024", "dtype": "fp8", "budget_gb": budget, "s_per_step": s,
                "date": "2026-12-04", "machine": "GPU"}
    (visit / "rb" / "results.json").write_text(json.dumps([ours("ours", 2, 0.119)]))
    (visit / "rb" / "extra.json").write_text(json.dumps({"torch": "x"}))
    (visit / "peers.json").write_text(json.dumps({"rows": [{"row": "comfyui-full", "size": 1024}]}))
    (into / "results.json").write_text(json.dumps([ours("ours", 2, 0.123), ours("seed-staged-bf16", None, 0.128),
                                                   {"row": "comfyui-full", "size": "1024x1024", "forward_only": True}]))
    (into / "extra.json").write_text(json.dumps({"visit": "2026-12-03T10:00"}))
    _script("collect").main(["--final", str(visit / "rb"), "--peers", str(visit / "peers.json"), "--into", str(into),
                             "--keep-rows"])
    results = json.loads((into / "results.json").read_text())
    assert [(r["row"], r["s_per_step"], r.get("earlier_visit")) for r in results if not r.get("forward_only")] == [
        ("ours", 0.119, None), ("seed-staged-bf16", 0.128, "2026-12-03T10:00")]
    assert len([r for r in results if r.get("forward_only")]) == 1
    report = _script("report")
    assert report._earlier_note(results) == " (an earlier visit: 2026-12-03T10:00)"


def test_host_ram_comparisons_do_not_depend_on_row_order(tmp_path):
    """The unlimited-RAM base and the bf16 drift reference are found wherever they ran, so rows
    resumed from an earlier visit or run before their base still get their ratios."""
    import torch
    from safetensors.torch import save_file
    compare = _script("host_ram_bench").compare

    def row(ram, storage, seconds, temperature="warm"):
        return {"ram_budget_gb": ram, "vram_budget_gb": 4, "storage": storage, "temperature": temperature,
                "generation_s": seconds, "s_per_step": seconds / 10, "host_ram_peak_gb": 7.5}

    latents = {}
    for i, value in enumerate((1.0, 1.5)):
        latents[i] = tmp_path / f"{i}.safetensors"
        save_file({"latent": torch.full((4,), value)}, latents[i])
    rows = [row(8, "gguf-q4_k", 30.0), row(None, "bf16", 20.0), row(None, "bf16", 25.0, "cold")]
    compare(rows, {0: latents[1], 1: latents[0]})
    assert rows[0]["x_unlimited_generation"] == 1.5 and rows[0]["within_ram_budget"]
    assert rows[0]["latent_drift_vs_bf16"] == 0.5
    assert "x_unlimited_generation" not in rows[1] and "latent_drift_vs_bf16" not in rows[2]


def test_soak_names_the_runs_whose_rss_stepped_up():
    rss_steps = _script("soak").rss_steps
    rows = [{"run": i, "size": size, "budget_gb": None, "rss_mib": rss, "heap_in_use_mib": heap, "compiled_graphs": g}
            for i, (size, rss, heap, g) in enumerate([("512x512", 1000, 500, 4), ("640x512", 1113, 520, 4),
                                                      ("512x512", 1115, 520, 4), ("640x512", 1140, 545, 5)])]
    steps = rss_steps(rows)
    assert [(s["run"], s["new_size"], s["heap_in_use_mib"], s["new_graphs"]) for s in steps] == [
        (1, True, 20, 0), (3, False, 25, 1)]


def test_collect_reads_the_fp8_quantiser_table(tmp_path):
    log = tmp_path / "fp8_quant.log"
    log.write_text("operand      copy compiled div/w4/4096\n"
                   "x->qkv          19.2us/ 3133GB/s    53.5us/ 1124GB/s    50.6us/ 1189GB/s\n"
                   "W qkv           11.0us/ 2411GB/s    26.7us/  993GB/s    26.7us/  993GB/s\n"
                   "per block       30.2us    80.2us    77.3us\n")
    got = _script("collect").fp8_quant_from_log(log)
    assert got["variants"] == ["copy", "compiled", "div/w4/4096"]
    assert got["operands"]["W qkv"]["compiled"] == {"us": 26.7, "gbps": 993.0}
    assert got["per_block_us"]["div/w4/4096"] == 77.3


def test_fp8_quant_bench_smoke_prints_the_table_collect_reads(tmp_path, capsys):
    assert _script("fp8_quant_bench").main(["--smoke"]) == 0
    log = tmp_path / "fp8_quant.log"
    log.write_text(capsys.readouterr().out)
    got = _script("collect").fp8_quant_from_log(log)
    assert got["variants"] == ["copy", "eager"] and len(got["operands"]) == 9
    assert "differs" not in log.read_text() and got["per_block_us"]["eager"] > 0


def test_link_throttle_bench_projects_and_throttles_by_the_missing_link_time(tmp_path):
    bench = _script("link_throttle_bench")
    # 1 GB over 12 GB/s on a 50 GB/s machine: the side stream must stay busy 1/12 - 1/50 s longer.
    assert abs(bench.throttle_seconds(10**9, 12e9, 50e9) - (1 / 12 - 1 / 50)) < 1e-12
    assert bench.throttle_seconds(10**9, 60e9, 50e9) == 0.0            # a faster link: no wait
    assert bench.projection({"s_per_step": 0.13, "bytes_h2d_per_step": 3.84e9}, 12e9) == 0.32
    out = tmp_path / "throttle.json"
    assert bench.main(["--smoke", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert rows and all(not r["throttled"] and r["projected_s_per_step"] == r["s_per_step_unthrottled"] for r in rows)


def test_ring_slots_probe_plans_each_depth_and_restores_the_planner(tmp_path, monkeypatch):
    bench = _script("ring_slots")
    from newbie_core.pipeline import placed
    original, seen = placed.plan_stage, []

    def fake_row(path, device, budget, size, steps, storage, link_gbps):
        seen.append(dict(placed.plan_stage.keywords))
        plan = type("Plan", (), {"slots": placed.plan_stage.keywords["max_slots"]})()
        return {"_plan": plan, "resident_blocks": 0, "chunks": [None, None], "s_per_step": 0.1, "s_step_min": 0.1,
                "s_step_max": 0.1, "bytes_h2d_per_step": 0, "predicted_step_s": None, "peak_reserved_gb": 0,
                "predicted_peak_gb": 0}
    monkeypatch.setattr(bench, "sample_row", fake_row)
    rows = [bench.run_row(tmp_path, bench.torch.device("cpu"), "fp8", 2.0, 64, None, 2, slots, float("inf"), 0.0)
            for slots in (3, 2)]
    assert seen == [{"max_slots": 3, "staged_slots": 3}, {"max_slots": 2, "staged_slots": 2}]
    assert [r["slots"] for r in rows] == [3, 2] and placed.plan_stage is original
    out = tmp_path / "ring.json"
    monkeypatch.undo()
    assert bench.main(["--smoke", "--out", str(out)]) == 0
    assert [r["max_slots"] for r in json.loads(out.read_text())] == [3, 2]


def test_gguf_decode_bench_smoke_checks_each_variant(capsys):
    assert _script("gguf_decode_bench").main(["--smoke"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [l.split()[:2] for l in lines] == [["Q8_0", "copy"], ["Q8_0", "torch"], ["Q4_K", "copy"], ["Q4_K", "torch"]]
    assert not any("DIFFERS" in l for l in lines)


def test_hollow_files_have_real_headers_and_no_data(tmp_path):
    """offline_plans.py's files read like the real ones (names, dtypes, shapes, GGUF types, the
    tokenizer bytes) while their data is a hole."""
    from gguf import GGMLQuantizationType as T, GGUFReader
    from safetensors import safe_open
    bench = _script("offline_plans")
    st = bench.hollow_safetensors(tmp_path / "a.safetensors", {"w": (64, 32), "n": (32,)}, {"spiece_model": b"abc"},
                                  {"format": "pt"})
    with safe_open(str(st), "pt") as f:
        assert f.get_slice("w").get_shape() == [64, 32] and f.get_slice("n").get_dtype() == "BF16"
        assert bytes(f.get_tensor("spiece_model").tolist()) == b"abc"
    gg = bench.hollow_gguf(tmp_path / "b.gguf", "lumina2", [("w", (64, 256), T.Q4_K), ("n", (256,), T.F32)])
    tensors = {t.name: t for t in GGUFReader(str(gg)).tensors}
    assert tensors["w"].tensor_type == T.Q4_K and tensors["w"].n_bytes == 64 * 144
    assert tensors["n"].tensor_type == T.F32 and list(tensors["n"].shape) == [256]


def test_host_ram_resume_redoes_named_combos_and_plans_kept_rows(tmp_path, monkeypatch):
    """--redo runs a kept combo again (its plan changed); a kept row without a prediction gets its
    plan's, made now (a plan-only child), so no row lacks the predicted-vs-measured check."""
    bench = _script("host_ram_bench")
    calls = []

    def fake_run_row(cfg):
        calls.append(cfg)
        if cfg.get("plan_only"):
            return {"predicted_host_peak_gb": 9.0}
        return {"s_per_step": 1.0, "generation_s": 5.0, "host_ram_peak_gb": 7.0, "predicted_host_peak_gb": 7.5,
                "pinned_gb": 1.0, "bytes_read_gb": 2.0, "stages": []}
    monkeypatch.setattr(bench, "run_row", fake_run_row)
    monkeypatch.setattr(bench, "evict", lambda paths: None)
    monkeypatch.setattr(bench, "TARGETS", [(16, 8, "bf16"), (12, 8, "fp8")])
    kept = [{"storage": s, "ram_budget_gb": r, "vram_budget_gb": 8, "temperature": t, "steps": 4, "size": 1024,
             "s_per_step": 1.0, "generation_s": 5.0, "host_ram_peak_gb": 9.5, "predicted_host_peak_gb": None}
            for s, r in (("bf16", 16), ("fp8", 12)) for t in ("cold", "warm")]
    resume, out = tmp_path / "old.json", tmp_path / "new.json"
    resume.write_text(json.dumps(kept))
    bench.main([str(tmp_path), "--targets", "--resume", str(resume), "--redo", "16:8:bf16", "--out", str(out)])
    rows = json.loads(out.read_text())
    redone = [r for r in rows if r["storage"] == "bf16"]
    assert [r["temperature"] for r in redone] == ["cold", "warm"] and all(not r.get("earlier_visit") for r in redone)
    assert all(r["host_ram_peak_gb"] == 7.0 and r["prediction_not_below_measured"] for r in redone)
    fp8 = [r for r in rows if r["storage"] == "fp8"]
    assert all(r["earlier_visit"] and r["prediction_planned_later"] and r["predicted_host_peak_gb"] == 9.0
               and r["prediction_not_below_measured"] is False for r in fp8)      # 9.0 < 9.5 measured
    assert sum(bool(c.get("plan_only")) for c in calls) == 2


def test_collect_reads_the_decode_log_and_forward_variants(tmp_path):
    collect = _script("collect")
    log = tmp_path / "decode.log"
    log.write_text("Q8_0  copy                 68.2 us    3919 GB/s   1.00x copy\n"
                   "Q8_0  words/b256/w8        70.8 us    3774 GB/s   1.04x copy\n"
                   "Q4_K  bytes/b1/w4         210.8 us    1061 GB/s   3.59x copy  DIFFERS from the torch decode\n")
    got = collect.decode_from_log(log)
    assert [(r["qtype"], r["variant"], r["us"], r["differs"]) for r in got] == [
        ("Q8_0", "copy", 68.2, False), ("Q8_0", "words/b256/w8", 70.8, False), ("Q4_K", "bytes/b1/w4", 210.8, True)]


def test_fits_checked_step_adds_the_throttled_checks_overlap_loss(tmp_path):
    """The loss is the worst (measured - max(c, t)) / min(c, t) of the throttled rows; the checked
    step adds that share of the smaller term to the roofline's max."""
    fits = _script("fits")
    throttle = tmp_path / "throttle.json"
    throttle.write_text(json.dumps({"rows": [
        {"s_per_step": 0.15, "s_per_step_unthrottled": 0.10, "bytes_h2d_per_step": 2.5e9, "link_gbps": 25},  # t=0.1
        {"s_per_step": 0.30, "s_per_step_unthrottled": 0.10, "bytes_h2d_per_step": 3.6e9, "link_gbps": 12}]}))
    loss = fits.overlap_loss(throttle)
    assert loss == pytest.approx(0.5), "row 1: (0.15 - 0.10) / 0.10; row 2 lost nothing"
    f = fits.fit(fits.SMOKE_ROWS, 4, 16, 25, 3.0, loss)
    compute, copies = 0.135, 3_832_965_120 / 25e9
    assert f.s_per_step == pytest.approx(max(compute, copies))
    assert f.s_per_step_checked == pytest.approx(max(compute, copies) + 0.5 * min(compute, copies))
    resident = fits.fit(fits.SMOKE_ROWS, 16, 32, 25, 3.0, loss)
    assert resident.budget_gb is None and resident.s_per_step_checked == resident.s_per_step, "nothing streams"
    assert fits.overlap_loss(tmp_path / "absent.json") is None
    assert "checked s/step" in fits.render(fits.SMOKE_ROWS, loss=loss)


def test_stream_gaps_puts_each_compute_gap_down_to_what_compute_waited_for():
    """A synthetic trace: compute (stream 7) waits once for a copy, once for an upcast (stream 9)
    and once for nothing (the host); an upcast beside a compute kernel counts as sharing it."""
    classify = _script("stream_gaps").classify_gaps

    def kernel(tid, ts, dur):
        return {"ph": "X", "cat": "kernel", "name": "k", "tid": tid, "ts": ts, "dur": dur}
    events = [kernel(7, 0, 100), kernel(7, 150, 100), kernel(7, 300, 100), kernel(7, 500, 100),
              kernel(9, 80, 40),                  # beside compute for 20 us, ends mid-gap: not the cause
              {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy HtoD (Pinned -> Device)", "tid": 11, "ts": 60,
               "dur": 86},                        # ends at 146: compute resumes at 150
              kernel(9, 260, 36),                 # ends at 296: compute resumes at 300
              {"ph": "i", "name": "marker", "ts": 450}]
    got = classify(events)
    assert got["gaps"] == 3
    assert (got["gap_copy_s"], got["gap_upcast_s"], got["gap_host_s"]) == (50e-6, 50e-6, 100e-6)
    assert got["compute_s"] == 400e-6 and got["upcast_beside_compute_s"] == 20e-6
    events.append(kernel(9, 700, 10) | {"name": "decode"})
    names = _script("stream_gaps").kernel_names(events, top=1)
    assert names == {"7": [["k", 400.0, 4]], "9": [["k", 76.0, 2]]}, "top 1 per stream, by time"


def test_throttle_runs_are_numbered_and_the_run_before_a_change_stays_out_of_the_fits(tmp_path, monkeypatch):
    """collect.py keeps each throttle run, numbered, and a run from before a change beside them;
    the section prints every run of a row on one line and the before figures with their note,
    while the fits table's overlap loss reads the runs alone."""
    collect, small, fits = _script("collect"), _script("report_small_pc"), _script("fits")

    def row(s, chunks):
        return {"storage": "fp8", "budget_gb": 4.0, "link_gbps": 12, "s_per_step": s, "s_per_step_unthrottled": 0.1,
                "bytes_h2d_per_step": 1.2e9, "projected_s_per_step": 0.1, "x_projection": s / 0.1,
                "chunks": chunks, "resident_blocks": 28}
    runs = []
    for k, s in enumerate((0.12, 0.13)):
        runs.append(tmp_path / f"run{k}.json")
        runs[-1].write_text(json.dumps([row(s, [1152, 2304])]))
    before = tmp_path / "before.json"
    before.write_text(json.dumps([row(0.3, [384, 768])]))
    collect.write_throttle(tmp_path, runs, before, "12-piece chunks:", {"date": "d", "visit": "v"})
    doc = json.loads((tmp_path / "throttle.json").read_text())
    assert [r["run"] for r in doc["rows"]] == [1, 2] and doc["before"][0]["s_per_step"] == 0.3
    monkeypatch.setattr(small, "HERE", tmp_path)
    text = "\n".join(small.throttle_section())
    assert "| fp8 | 4.0 | 12 | 1152 / 2304 | 28 | 0.120 / 0.130 | 0.100 | 1.20 / 1.30 |" in text
    assert "Before: 12-piece chunks: fp8 4.0 GB at 12 GB/s 0.300 -> 0.120-0.130 s." in text
    assert fits.overlap_loss(tmp_path / "throttle.json") == pytest.approx(0.3), "(0.13 - 0.1) / 0.1, not the 2.0 before"
