"""The sampling planner plans with this machine's measured link and compute rates (cached once),
or the user's link figure; on the CPU with none. CPU only: every measurement is a fake."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import replace

import pytest
import torch

from newbie_core.models.dit import DiTConfig, build_dit
from newbie_core.models.dit.estimate import joint_block_flops
from newbie_core.pipeline.placed import PlacementInputs, plan_for
from newbie_core.pipeline.settings import MemorySettings
from newbie_core.pipeline import sample
from newbie_core.placement import BlockSize, MiB, StorageChoice, plan_stage
from newbie_core.placement import bandwidth as bw
from newbie_core.placement.plan import UNBOUNDED

MB = 10**6


@pytest.fixture(autouse=True)
def _library_logs_reach_caplog():
    """The CLI's configure_logging (run by any earlier CLI test) stops ``newbie_core`` records
    from propagating; these tests read them with caplog, and leave the logger as they found it."""
    root = logging.getLogger("newbie_core")
    saved = root.propagate, root.level, list(root.handlers)
    root.propagate = True
    yield
    root.propagate, root.level, root.handlers[:] = saved[0], saved[1], saved[2]


# -- the cached figures -------------------------------------------------------------------------

def test_the_matmul_rate_is_measured_once_per_gpu_and_dtype_then_read_from_the_cache(tmp_path, caplog):
    calls = []

    def fake_measure(device, dtype):
        calls.append((device, dtype))
        return 400e12 if dtype is torch.bfloat16 else 800e12

    key = lambda d, t: f"matmul:{d}:driver 1:{t}"     # noqa: E731
    with caplog.at_level(logging.INFO, logger=bw.__name__):
        assert bw.matmul_throughput("gpu-a", torch.bfloat16, fake_measure, key, tmp_path) == 400e12
    assert "400.0 TFLOP/s" in caplog.text and "GB/s" not in caplog.text
    assert bw.matmul_throughput("gpu-a", torch.bfloat16, fake_measure, key, tmp_path) == 400e12
    assert calls == [("gpu-a", torch.bfloat16)], "the second call reads the cache file"
    assert bw.matmul_throughput("gpu-a", torch.float8_e4m3fn, fake_measure, key, tmp_path) == 800e12
    assert len(calls) == 2, "another dtype is another figure"
    stored = json.loads((tmp_path / bw.CACHE_FILE).read_text())
    assert stored == {"matmul:gpu-a:driver 1:torch.bfloat16": 400e12,
                      "matmul:gpu-a:driver 1:torch.float8_e4m3fn": 800e12}


def test_the_link_and_the_matmul_rate_share_the_cache_file_and_log_their_own_units(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger=bw.__name__):
        bw.link_bandwidth("gpu-a", lambda d: 12e9, lambda d: "link:a", tmp_path)
        bw.matmul_throughput("gpu-a", torch.float16, lambda d, t: 1.5e14, lambda d, t: "matmul:a", tmp_path)
    assert "measured link:a: 12.0 GB/s" in caplog.text
    assert "measured matmul:a: 150.0 TFLOP/s" in caplog.text
    assert json.loads((tmp_path / bw.CACHE_FILE).read_text()) == {"link:a": 12e9, "matmul:a": 1.5e14}


def test_the_matmul_key_names_the_dtype(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA Test")
    assert bw.matmul_key("cuda", torch.bfloat16) != bw.matmul_key("cuda", torch.float16)
    assert bw.matmul_key("cuda", torch.bfloat16).startswith("matmul:NVIDIA Test:driver ")
    assert bw.matmul_key("cuda", torch.bfloat16).endswith(":bfloat16")
    assert bw.link_key("cuda").startswith("link:NVIDIA Test:driver "), "the link's key is as before"


# -- the planner with rates ---------------------------------------------------------------------

BLOCK = 100 * MB
UNIFORM = [BlockSize(f"b{i}", BLOCK) for i in range(16)]
CHUNKS = ((None, None), (2048, 4096), (1024, 2048))


def act(attn, ffn) -> int:
    """Made up, monotone: 1 GB unchunked, 0.6 and 0.4 GB chunked."""
    return {None: 1000, 2048: 600, 1024: 400}[attn] * MB


def _plan(budget, blocks=UNIFORM, **kw):
    return plan_stage("sample", blocks, budget, activation_bytes=act, chunk_candidates=CHUNKS, **kw)


def _all_resident_budget(blocks, chunk) -> int:
    """The peak of every block resident at ``chunk``: a budget just too small for the largest chunks."""
    p = plan_stage("sample", blocks, UNBOUNDED, activation_bytes=act, chunk_candidates=(chunk,))
    assert p.streamed == ()
    return p.predicted_peak


def test_a_slow_link_shrinks_chunks_before_residents_and_a_fast_one_the_other_way():
    budget = _all_resident_budget(UNIFORM, CHUNKS[1])
    compute = 5e-3                                    # a 100 MB copy: 10 ms at 10 GB/s, 2 ms at 50 GB/s
    slow = _plan(budget, bandwidth=10e9, block_compute_s=compute)
    fast = _plan(budget, bandwidth=50e9, block_compute_s=compute)
    assert slow.streamed == () and (slow.attn_chunk, slow.ffn_chunk) == CHUNKS[1]
    assert "copies are slower than compute" not in slow.reason, "nothing streams, so nothing to say"
    assert fast.attn_chunk is None and len(fast.streamed) > 0
    assert "copies are slower than compute" not in fast.reason
    assert slow.predicted_step_s == pytest.approx(16 * compute)
    assert fast.predicted_step_s == pytest.approx(16 * compute), "the fast link's copies hide"


def test_a_slow_link_that_must_stream_says_so_and_keeps_the_smallest_chunks():
    budget = _all_resident_budget(UNIFORM, CHUNKS[2]) - 3 * BLOCK        # some blocks must stream
    slow = _plan(budget, bandwidth=10e9, block_compute_s=5e-3)
    fast = _plan(budget, bandwidth=50e9, block_compute_s=5e-3)
    assert slow.streamed and (slow.attn_chunk, slow.ffn_chunk) == CHUNKS[2]
    assert "copies are slower than compute here, so chunks shrank before residents" in slow.reason
    assert fast.attn_chunk is None, "a hidden link streams more blocks to keep the largest chunks"
    assert len(fast.resident) < len(slow.resident)


def test_a_few_large_blocks_among_small_ones_do_not_shrink_every_blocks_chunks():
    # A GGUF file's shape: 4 unquantised refiner blocks (167 MB, a 3.3 ms copy) among 36 quantised
    # ones (88 MB, 1.8 ms) against 3 ms of compute: copies keep up on average, so the plan streams
    # with the largest chunks; the same bytes in every block would be transfer-bound.
    mixed = [BlockSize(f"b{i}", 167 * MB, 92 * MB, (167 if i < 4 else 88) * MB) for i in range(40)]
    budget = _all_resident_budget(mixed, CHUNKS[2]) - 20 * 167 * MB
    p = _plan(budget, mixed, storage=StorageChoice.PACKED, bandwidth=50e9, block_compute_s=3e-3)
    assert p.streamed and p.attn_chunk is None
    assert "copies are slower than compute" not in p.reason
    big = [BlockSize(f"b{i}", 167 * MB, 92 * MB, 167 * MB) for i in range(40)]
    q = _plan(budget, big, storage=StorageChoice.PACKED, bandwidth=50e9, block_compute_s=3e-3)
    assert "copies are slower than compute here" in q.reason and q.attn_chunk is not None


def test_predicted_step_is_n_computes_plus_the_exposed_copies():
    # 40 MB copies in 2 ms and hide behind 4 ms of compute; 120 MB ones take 6 ms and show 2 ms.
    blocks = [BlockSize(f"b{i}", (120 if i % 3 == 0 else 40) * MB) for i in range(12)]
    link, compute = 20e9, 4e-3
    p = _plan(_all_resident_budget(blocks, CHUNKS[2]) - 4 * 120 * MB, blocks,
              bandwidth=link, block_compute_s=compute)
    streamed = [blocks[i].compute_bytes for i in p.streamed]
    assert 40 * MB in streamed and 120 * MB in streamed, "both kinds of block stream"
    exposed = streamed.count(120 * MB) * (120 * MB / link - compute)
    assert exposed > 0
    assert p.predicted_step_s == pytest.approx(12 * compute + exposed, rel=1e-12)
    assert _plan(p.budget, blocks).predicted_step_s is None, "no rates, no prediction"


def test_the_render_states_the_rates_and_the_predicted_time():
    budget = _all_resident_budget(UNIFORM, CHUNKS[2]) - 3 * BLOCK
    text = _plan(budget, bandwidth=12.5e9, block_compute_s=3.25e-3).render()
    assert "link 12.5 GB/s, compute 3.25 ms per block" in text
    assert "predicted time per forward" in text
    bare = _plan(budget).render()
    assert "GB/s" not in bare and "predicted time per forward" not in bare


def _tiny_inputs(**kw) -> tuple:
    model = build_dit(DiTConfig.tiny(), "meta", torch.bfloat16)

    def tiny_act(attn, ffn) -> int:
        return {None: 9, 64: 8}[attn] * MiB

    inputs = PlacementInputs(stage="sample", files=(), storage=StorageChoice.BF16, compute_dtype=torch.bfloat16,
                             always_resident_bytes=0, activation_bytes=tiny_act,
                             chunk_candidates=((None, None), (64, 128)), **kw)
    return model, inputs


def test_plan_for_passes_the_inputs_rates_to_the_planner():
    model, bare = _tiny_inputs()
    budget = plan_for(model, replace(bare, chunk_candidates=((64, 128),)), None).predicted_peak
    slow = plan_for(model, replace(bare, bandwidth=1e6, block_compute_s=1e-3), budget)
    fast = plan_for(model, replace(bare, bandwidth=1e12, block_compute_s=1e-3), budget)
    assert (slow.bandwidth, slow.block_compute_s) == (1e6, 1e-3)
    assert slow.streamed == () and slow.attn_chunk == 64, "a slow link keeps every block resident"
    assert fast.attn_chunk is None and fast.streamed, "a fast link streams to keep the largest chunks"
    assert plan_for(model, bare, budget) == replace(fast, bandwidth=None, block_compute_s=None,
                                                    predicted_step_s=None), "no rates plan as a hidden link"
    assert fast.predicted_step_s == pytest.approx(fast.n_blocks * 1e-3)


# -- plan_sampling ------------------------------------------------------------------------------

def _forbid_measuring(monkeypatch):
    def refuse(*args, **kw):
        raise AssertionError("measured on the CPU")
    monkeypatch.setattr(sample, "link_bandwidth", refuse)
    monkeypatch.setattr(sample, "matmul_throughput", refuse)


def test_plan_sampling_on_the_cpu_measures_nothing_and_plans_without_rates(tiny_models, monkeypatch):
    from newbie_core.pipeline.sample import plan_sampling
    _forbid_measuring(monkeypatch)
    for memory in (MemorySettings(), MemorySettings(link_gbps=12.0)):
        _, inputs, plan = plan_sampling(tiny_models.dit, memory, 2, 16, 64, 64, torch.device("cpu"), None)
        assert inputs.bandwidth is None and inputs.block_compute_s is None
        assert plan.predicted_step_s is None and plan.bandwidth is None


def _plan_on_fake_cuda(tiny_models, monkeypatch, memory, budget=None):
    """plan_sampling's CUDA branch with the probes faked: nothing here touches a GPU."""
    from newbie_core.pipeline.sample import plan_sampling
    calls = []

    def link(device):
        calls.append(("link", device.type))
        return 30e9

    def matmul(device, dtype):
        calls.append(("matmul", dtype))
        return 200e12 if dtype is torch.bfloat16 else 400e12

    monkeypatch.setattr(sample, "link_bandwidth", link)
    monkeypatch.setattr(sample, "matmul_throughput", matmul)
    memory = replace(memory, compile=False, cuda_graphs=False)
    _, inputs, plan = plan_sampling(tiny_models.dit, memory, 2, 16, 64, 64, torch.device("cuda"), budget)
    return inputs, plan, calls


def test_plan_sampling_on_cuda_uses_the_measured_link_and_a_joint_block_over_the_matmul_rate(tiny_models,
                                                                                              monkeypatch):
    config = tiny_models.dit.ckpt.config
    inputs, plan, calls = _plan_on_fake_cuda(tiny_models, monkeypatch, MemorySettings())
    assert calls == [("link", "cuda"), ("matmul", torch.bfloat16)]
    assert inputs.bandwidth == 30e9 and plan.bandwidth == 30e9
    flops = joint_block_flops(config, 2, 16 + (64 // 16) ** 2)
    assert flops > 0
    rate = 200e12 * sample.FORWARD_EFFICIENCY[False]        # the peak, at what a forward reaches of it
    assert inputs.block_compute_s == pytest.approx(flops / rate, rel=1e-12)
    # all resident: no copies; the caption refiners run once per stage, not per forward
    assert plan.once and plan.predicted_step_s == pytest.approx((plan.n_blocks - len(plan.once)) * flops / rate)
    assert plan.allocator == inputs.allocator == "native", "a CUDA plan made on a CPU box assumes the native allocator"


def test_plan_sampling_estimates_the_activations_for_the_allocator_that_runs(tiny_models, monkeypatch):
    from newbie_core.placement import Allocator
    native = _plan_on_fake_cuda(tiny_models, monkeypatch, MemorySettings())[0]
    monkeypatch.setattr(sample, "active_allocator", lambda device: Allocator.EXPANDABLE)
    expandable = _plan_on_fake_cuda(tiny_models, monkeypatch, MemorySettings())[0]
    assert expandable.allocator == "expandable"
    assert expandable.activation_bytes(None, None) < native.activation_bytes(None, None)


def test_the_users_link_figure_replaces_the_measurement_and_fp8_compute_uses_the_e4m3_rate(tiny_models,
                                                                                            monkeypatch):
    inputs, _, calls = _plan_on_fake_cuda(tiny_models, monkeypatch, MemorySettings(link_gbps=8.0, fp8_compute=True))
    assert calls == [("matmul", torch.float8_e4m3fn)], "the link is not measured when the user gives it"
    assert inputs.bandwidth == 8e9
    assert inputs.block_compute_s == pytest.approx(
        joint_block_flops(tiny_models.dit.ckpt.config, 2, 32) / (400e12 * sample.FORWARD_EFFICIENCY[True]), rel=1e-12)


def test_a_failed_probe_plans_without_rates(tiny_models, monkeypatch, caplog):
    from newbie_core.pipeline.sample import plan_sampling

    def broken(*args):
        raise RuntimeError("CUDA out of memory")
    monkeypatch.setattr(sample, "link_bandwidth", broken)
    memory = MemorySettings(compile=False, cuda_graphs=False)
    with caplog.at_level(logging.WARNING):
        _, inputs, plan = plan_sampling(tiny_models.dit, memory, 2, 16, 64, 64, torch.device("cuda"), None)
    assert inputs.bandwidth is None and inputs.block_compute_s is None and plan.predicted_step_s is None
    assert "planning without them" in caplog.text


def test_joint_block_flops_grow_with_batch_and_quadratically_in_attention():
    config = DiTConfig.tiny()
    one = joint_block_flops(config, 1, 256)
    assert joint_block_flops(config, 2, 256) == 2 * one
    assert joint_block_flops(config, 1, 512) > 2 * one, "attention is quadratic in the sequence"


# -- the user's link figure ---------------------------------------------------------------------

@pytest.mark.parametrize("bad", [0, -3.0, float("nan"), float("inf")])
def test_link_gbps_must_be_positive_and_finite(bad):
    with pytest.raises(ValueError, match=r"link_gbps must be a positive, finite number of GB/s \(or None: "
                                         r"measured\), got "):
        MemorySettings(link_gbps=bad)


def test_link_gbps_is_gigabytes_per_second():
    assert MemorySettings(link_gbps=12.5).link_bytes_per_s == 12.5e9
    assert MemorySettings().link_bytes_per_s is None


@pytest.mark.parametrize("bad", ["0", "-1", "nan", "inf"])
def test_the_cli_refuses_a_bad_link_figure_before_loading_anything(tmp_path, capsys, bad):
    from newbie_core import cli
    rc = cli.main(["generate", "--prompt", "1girl", "--out", str(tmp_path / "o.png"), f"--link-gbps={bad}"])
    assert rc == cli.EXIT_BAD_INPUT
    assert "error: --link-gbps: must be a positive number of GB/s" in capsys.readouterr().err


def test_the_cli_link_figure_reaches_the_memory_settings(tmp_path):
    from newbie_core import cli
    args = cli.build_parser().parse_args(["generate", "--prompt", "1girl", "--out", str(tmp_path / "o.png"),
                                          "--link-gbps", "25"])
    request = cli._request(args, cli.check_args(args))
    assert request.memory.link_gbps == 25.0
    plain = cli.build_parser().parse_args(["generate", "--prompt", "1girl", "--out", str(tmp_path / "o.png")])
    assert cli._request(plain, cli.check_args(plain)).memory.link_gbps is None


# -- the throttle bench -------------------------------------------------------------------------

def test_the_throttle_bench_plans_its_throttled_rows_for_the_throttled_link(monkeypatch, tmp_path):
    import importlib.util
    import sys
    from pathlib import Path

    import newbie_core.tiny
    bench_dir = Path(__file__).resolve().parents[1] / "bench"
    sys.path.insert(0, str(bench_dir))
    spec = importlib.util.spec_from_file_location("bench_link_throttle_rates", bench_dir / "link_throttle_bench.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)
    seen = []

    def fake_row(path, device, budget, size, steps, storage=None, link_gbps=None):
        seen.append(link_gbps)
        return {"s_per_step": 1.0, "bytes_h2d_per_step": 1e9, "chunks": [None, None], "resident_blocks": 3}

    monkeypatch.setattr(bench, "sample_row", fake_row)
    monkeypatch.setattr(newbie_core.tiny, "build_tiny_checkpoints", lambda root: None)
    assert bench.main(["--smoke"]) == 0
    assert seen == [None, 12], "the unthrottled row plans with the measured link, the throttled one with 12 GB/s"


def test_plan_text_uses_the_users_link_figure_and_says_so(tiny_models, monkeypatch):
    """--plan's host table takes its copy roofline from the user's link, not a measurement, and
    names the figure as given (the disk is still measured)."""
    from newbie_core.pipeline import GenerationRequest, SamplingSettings, describe_plan
    _forbid_measuring(monkeypatch)
    monkeypatch.setattr(bw, "link_bandwidth", lambda *a: (_ for _ in ()).throw(AssertionError("measured")))
    monkeypatch.setattr(bw, "disk_bandwidth", lambda path: 1e9)
    monkeypatch.setattr(sample, "matmul_throughput", lambda device, dtype: 100e12)
    memory = MemorySettings(vram_budget_gb=1, link_gbps=9.0, compile=False, cuda_graphs=False)
    request = GenerationRequest(prompt="a", width=64, height=64, sampling=SamplingSettings(steps=2), memory=memory)
    text = describe_plan(tiny_models, request, torch.device("cuda"))
    assert "given link 9.0 GB/s, measured disk 1.00 GB/s" in text
    assert re.search(r"rates planned with\s+link 9\.0 GB/s", text), "the sampling plan uses it too"


def test_staged_storage_streams_on_two_slots_and_keeps_the_third_slots_bytes_resident():
    """fp8 copies land in per-slot staging buffers, so a third slot would only hold bytes that
    keep blocks resident (planner.py, "Ring slots"); bf16 copies go straight into their slot
    and keep the third while residents go."""
    blocks = [BlockSize(f"b{i}", BLOCK, fp8_bytes=BLOCK // 2) for i in range(16)]
    hidden, exposed = {}, dict(bandwidth=5e9, block_compute_s=5e-3)
    for rates, budget in ((hidden, _all_resident_budget(blocks, CHUNKS[0]) * 7 // 10),
                          (exposed, _all_resident_budget(blocks, CHUNKS[2]) // 2)):    # some must stream
        two = _plan(budget, blocks, storage="fp8", **rates)
        three = _plan(budget, blocks, storage="fp8", staged_slots=3, **rates)
        assert two.streamed and (two.slots, three.slots) == (2, 3)
        assert len(two.resident) > len(three.resident), "the third slot's bytes keep blocks resident"
    bf16 = _plan(_all_resident_budget(blocks, CHUNKS[0]) * 7 // 10, blocks, storage="bf16")
    assert bf16.streamed and bf16.slots == 3


def test_a_third_staged_slot_when_asked_is_kept_until_nothing_stays_resident():
    blocks = [BlockSize(f"b{i}", BLOCK, fp8_bytes=BLOCK // 2) for i in range(16)]
    rates = dict(bandwidth=5e9, block_compute_s=5e-3)
    for staged, depth in ((3, 3), (2, 2)):
        walk, budget = [], UNBOUNDED
        while True:                                        # walk the budget down the whole chain
            try:
                p = _plan(budget, blocks, storage="fp8", staged_slots=staged, **rates)
            except ValueError:
                break
            walk.append((len(p.resident), p.slots))
            budget = p.predicted_peak - 1
        streaming = [w for w in walk if w[0] < 16]
        assert streaming[-1] == (0, 2), "the very last plan runs on two slots"
        assert all(slots == depth for _, slots in streaming[:-1]), streaming
        assert [r for r, _ in streaming] == sorted((r for r, _ in streaming), reverse=True)


def test_a_slow_link_shrinks_chunks_for_residents_only_as_far_as_the_caller_allows():
    """Chunks in many pieces cost more launches than residents save (planner.py): below the
    caller's transfer_chunks a slow link keeps its residents at the smallest allowed chunks, and
    smaller chunks come only once nothing is resident, to fit at all."""
    budget = _all_resident_budget(UNIFORM, CHUNKS[2]) - 3 * BLOCK
    rates = dict(bandwidth=10e9, block_compute_s=5e-3)
    free = _plan(budget, **rates)
    capped = _plan(budget, transfer_chunks=CHUNKS[:2], **rates)
    assert (free.attn_chunk, free.ffn_chunk) == CHUNKS[2]
    assert (capped.attn_chunk, capped.ffn_chunk) == CHUNKS[1] and len(capped.resident) < len(free.resident)
    assert capped.streamed and "copies are slower than compute" in capped.reason
    tiny = _plan_or_none(_all_resident_budget(UNIFORM, CHUNKS[2]) - 13 * BLOCK, transfer_chunks=CHUNKS[:2], **rates)
    assert tiny is not None and not tiny.resident and (tiny.attn_chunk, tiny.ffn_chunk) == CHUNKS[2], \
        "the smallest chunks remain to fit at all"


def _plan_or_none(budget, **kw):
    from newbie_core.placement import BudgetTooSmallError
    try:
        return _plan(budget, **kw)
    except BudgetTooSmallError:
        return None


def test_the_sampling_plan_allows_a_slow_link_chunks_of_at_most_four_pieces():
    cands = sample.chunk_candidates(MemorySettings(), 2, 4400)
    allowed = sample.transfer_chunks(cands, 2, 4400)
    assert (None, None) in allowed and len(allowed) < len(cands)
    assert all(-(-4400 // a) <= 4 for a, _ in allowed if a) and all(-(-8800 // f) <= 4 for _, f in allowed if f)
    assert (1152, 2304) in allowed and (384, 768) not in allowed and (384, 768) in cands
