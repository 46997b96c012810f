"""Block streaming on CPU through a hostile fake copy stream: streamed == resident, bit for bit.

The fake stream (placement.copy_engine.FakeCopyStream) delays every copy until an event after
it is waited on and fills each destination with NaN the moment a copy into it is queued, so a
missing ``copy_done`` wait shows up as NaN, and a missing ``compute_done`` wait raises
StreamRaceError. test_placement_stream_order.py removes each wait on purpose and watches the
failure appear.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import weakref

import pytest
import torch
from torch import nn

from newbie_core.placement import (FakeCopyStream, HostBlockStore, HostMode, PlacementOOMError, Report,
                                   ResidentModules, StagePlan, Storage, resolve_budget, block_sizes, dequantize, measure_stage, model_layouts,
                                   plan_stage, quantize, run_with_oom_retry, stage_guard, stream_blocks)
from newbie_core.placement.fp8 import pack_block, upcast_block
from newbie_core.placement.layout import FP8, compute_layout, fp8_layout

D, H, N_BLOCKS = 64, 256, 6


class RMSNorm(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(x.dtype) * self.weight


class ToyBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention_norm = RMSNorm(D)
        self.w1 = nn.Linear(D, H)
        self.w2 = nn.Linear(H, D, bias=False)
        self.adaLN_modulation = nn.Linear(D, D)

    def forward(self, x, c, *, gate: float = 1.0):
        h = self.w2(torch.nn.functional.gelu(self.w1(self.attention_norm(x))))   # (B, T, D)
        return x + gate * h * (1 + self.adaLN_modulation(c)).unsqueeze(1)


class ToyModel(nn.Module):
    """Follows the placement seam: block_sequence() + block_runner(index, block, *args, **kw)."""

    def __init__(self, n: int = N_BLOCKS, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.layers = nn.ModuleList(ToyBlock() for _ in range(n))
        for p in self.parameters():
            nn.init.normal_(p, std=0.3)
        self.to(torch.bfloat16)
        self.block_runner = lambda i, block, *a, **k: block(*a, **k)

    def block_sequence(self):
        return [(f"layers.{i}", b) for i, b in enumerate(self.layers)]

    def forward(self, x, c):
        for i, (_, block) in enumerate(self.block_sequence()):
            x = self.block_runner(i, block, x, c, gate=0.5)
        return x


class CountingReader:
    """read_block over the toy model's own weights, counting calls (a stand-in for safe_open)."""

    def __init__(self, model: ToyModel):
        self.model, self.calls = model, 0

    def __call__(self, index: int) -> dict[str, torch.Tensor]:
        self.calls += 1
        block = self.model.layers[index]
        return {k: v.detach().clone() for k, v in list(block.named_parameters()) + list(block.named_buffers())}


def inputs(step: int):
    g = torch.Generator().manual_seed(100 + step)
    return (torch.randn(2, 5, D, generator=g).to(torch.bfloat16),
            torch.randn(2, D, generator=g).to(torch.bfloat16))


def manual_plan(model, resident: tuple[int, ...], slots: int, depth: int, storage: Storage,
                materialized: tuple[int, ...] = ()) -> StagePlan:
    """A StagePlan with exactly these knobs (the planner's own choices are tested elsewhere)."""
    sizes = block_sizes(model)
    base = plan_stage("toy", sizes, 2**40)
    n = len(sizes)
    ring = [i for i in range(n) if i not in resident or (storage is Storage.FP8 and i not in materialized)]
    streamed = [i for i in range(n) if i not in resident]
    return dataclasses.replace(
        base, resident=resident, materialized=materialized, storage=(storage,) * n, slots=slots if ring else 0,
        prefetch_depth=depth,
        slot_bytes=max((sizes[i].compute_bytes for i in ring), default=0),
        staging_bytes=max((sizes[i].fp8_bytes for i in streamed), default=0) if storage is Storage.FP8 else 0)


def toy_store(model, plan, reader=None, mode=HostMode.PINNED) -> HostBlockStore:
    """The host store for ``plan``'s layouts, read from the toy model's own weights (unpinned)."""
    return HostBlockStore([l.storage for l in model_layouts(model, plan)], reader or CountingReader(model), mode,
                          pin=False)


def run(model, plan, steps=3, mode=HostMode.PINNED, engine=None):
    engine = engine or FakeCopyStream()
    reader = CountingReader(model)
    store = toy_store(model, plan, reader, mode)
    outs = []
    with stream_blocks(model, plan, store, "cpu", engine=engine) as session:
        for step in range(steps):
            outs.append(model(*inputs(step)))
    return outs, session, reader


def reference(model, storage: Storage):
    everything = tuple(range(N_BLOCKS))
    return run(model, manual_plan(model, everything, 2, 1, storage))[0]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls on a shared 2-core machine: thread spin-waits cost more than the maths."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model():
    return ToyModel()


@pytest.mark.parametrize("storage", [Storage.BF16, Storage.FP8])
@pytest.mark.parametrize("slots,depth", [(1, 0), (2, 1), (3, 1), (3, 2)])
@pytest.mark.parametrize("resident", [(), (4, 5), (1, 2, 3, 4, 5)])
def test_streamed_equals_resident_bitwise(model, storage, slots, depth, resident):
    ref = reference(model, storage)
    outs, session, _ = run(model, manual_plan(model, resident, slots, depth, storage))
    for step, (a, b) in enumerate(zip(ref, outs)):
        assert not torch.isnan(b).any(), f"NaN at step {step}: a slot was read before its copy landed"
        assert torch.equal(a, b), f"step {step} differs from the resident run"


@pytest.mark.parametrize("resident", [(), (0, 1, 2, 3, 4, 5)])
def test_bound_weights_are_never_inference_tensors(model, resident):
    """Streamed and resident blocks see weights of the same kind inside the sampler's
    inference_mode: torch.compile guards on the dispatch keys, and inference-tensor slot views
    made streamed blocks run other compiled kernels than resident ones (issue 10)."""
    seen = []
    hook = model.layers[0].w1.register_forward_pre_hook(lambda m, a: seen.append(m.weight.is_inference()))
    try:
        plan = manual_plan(model, resident, 2, 1, Storage.BF16)
        with stream_blocks(model, plan, toy_store(model, plan), "cpu", engine=FakeCopyStream()):
            with torch.inference_mode():
                model(*inputs(0))
                model(*inputs(1))
    finally:
        hook.remove()
    assert seen == [False, False]


def test_resident_run_matches_plain_module_forward(model):
    """The packed-view path computes what the module's own weights compute."""
    with torch.no_grad():
        plain = [model(*inputs(s)) for s in range(2)]
    ref = reference(model, Storage.BF16)
    for a, b in zip(plain, ref):
        assert torch.equal(a, b)


def test_resident_uploads_overlap_the_first_forward(model):
    """bf16 resident blocks: the session does not wait for their copies up front; each block's
    first use waits for its own copy (the hostile fake lands a copy only when it is waited on)."""
    everything = tuple(range(N_BLOCKS))
    plan = manual_plan(model, everything, 2, 1, Storage.BF16)
    engine = FakeCopyStream()
    store = toy_store(model, plan)
    with stream_blocks(model, plan, store, "cpu", engine=engine):
        assert engine.pending == N_BLOCKS, "every upload is still in flight when compute may start"
        out = model(*inputs(0))
        assert engine.pending == 0
    assert torch.equal(out, reference(model, Storage.BF16)[0])
    # fp8 storage passes through upcasts on other streams: those copies are waited for up front.
    fp8 = manual_plan(model, everything, 2, 1, Storage.FP8, materialized=everything)
    engine = FakeCopyStream()
    store = toy_store(model, fp8)
    with stream_blocks(model, fp8, store, "cpu", engine=engine):
        assert engine.pending == 0


def test_copies_into_new_buffers_wait_for_earlier_main_stream_work(model):
    """The session's buffers may reuse memory that earlier main-stream work still touches: its
    first side-stream copy must come after a wait on a main event recorded when it started."""
    calls = []

    class Recording(FakeCopyStream):
        def main_record(self):
            event = super().main_record()
            calls.append(("main_record", event))
            return event

        def side_wait(self, event):
            calls.append(("side_wait", event))
            super().side_wait(event)

        def copy(self, dst, src, side_only=False):
            calls.append(("copy", None))
            super().copy(dst, src, side_only)

    run(model, manual_plan(model, (1, 3, 5), 2, 1, Storage.BF16), steps=1, engine=Recording())
    first_copy = calls.index(("copy", None))
    assert calls[0][0] == "main_record" and ("side_wait", calls[0][1]) in calls[:first_copy]


def test_ring_wraps_across_forwards_and_counts_bytes(model):
    plan = manual_plan(model, (5,), 2, 1, Storage.BF16)
    _, session, reader = run(model, plan, steps=4)
    assert reader.calls == N_BLOCKS, "a pinned store reads each block from disk exactly once"
    per_forward = sum(l.storage.nbytes for l in model_layouts(model, plan)[:5])
    # 4 forwards of 5 streamed blocks, the resident block once, plus the wrap-around prefetch
    # (depth 1: the next block to compute and one more) of the never-run 5th forward.
    layouts = model_layouts(model, plan)
    wrap = layouts[0].storage.nbytes + layouts[1].storage.nbytes
    assert session.bytes_h2d == 4 * per_forward + layouts[5].storage.nbytes + wrap


@pytest.mark.parametrize("materialized", [(0, 1, 2, 3, 4, 5), (1, 4), (5,)])
def test_fp8_blocks_upcast_once_equal_per_use_upcasts(model, materialized):
    """Resident fp8 blocks kept at compute dtype give the bits of every-use upcasts, and leave the ring."""
    ref = reference(model, Storage.FP8)
    plan = manual_plan(model, (1, 2, 4, 5) if len(materialized) < 6 else tuple(range(N_BLOCKS)), 2, 1,
                       Storage.FP8, materialized)
    assert not set(plan.ring_blocks) & set(materialized)
    outs, session, _ = run(model, plan)
    for a, b in zip(ref, outs):
        assert torch.equal(a, b)
    assert session.runner is None and not session.resident


def test_fp8_streaming_halves_transferred_bytes(model):
    _, s16, _ = run(model, manual_plan(model, (), 2, 1, Storage.BF16), steps=1)
    _, s8, _ = run(model, manual_plan(model, (), 2, 1, Storage.FP8), steps=1)
    assert s8.bytes_h2d < 0.6 * s16.bytes_h2d


def test_fp8_upcast_equals_dequantised_reference(model):
    block = model.layers[0]
    tensors = dict(block.named_parameters())
    compute = compute_layout([(k, tuple(v.shape), v.dtype) for k, v in tensors.items()])
    storage = fp8_layout(compute)
    packed = torch.empty(storage.nbytes, dtype=torch.uint8)
    pack_block({k: v.detach() for k, v in tensors.items()}, storage, packed)
    out = torch.empty(compute.nbytes, dtype=torch.uint8)
    upcast_block(storage, compute, packed, out)
    got = compute.views(out)
    for e in storage.entries:
        if e.dtype == FP8:
            q, scale = quantize(tensors[e.name].detach())
            assert torch.equal(got[e.name], dequantize(q, scale)), e.name
        else:
            assert torch.equal(got[e.name], tensors[e.name]), f"{e.name} must stay bf16 bit for bit"
    kept = {e.name for e in storage.entries if e.dtype != FP8}
    assert kept == {"attention_norm.weight", "w1.bias", "adaLN_modulation.weight", "adaLN_modulation.bias"}


def test_fp8_input_keeps_bytes_and_scale_one():
    w = torch.randn(4, 4).to(FP8)
    q, scale = quantize(w)
    assert q is w and scale.item() == 1.0


def test_session_restores_runner_and_frees_on_exception(model):
    before = model.block_runner
    plan = manual_plan(model, (), 2, 1, Storage.BF16)
    store = toy_store(model, plan)
    with pytest.raises(RuntimeError, match="boom"):
        with stream_blocks(model, plan, store, "cpu", engine=FakeCopyStream()) as session:
            model(*inputs(0))
            raise RuntimeError("boom")
    assert model.block_runner is before
    assert session.ring is None and session.runner is None


def test_interrupted_forward_resyncs(model):
    """A forward cut short mid-way (an exception inside block 2) must not shift later forwards."""
    plan = manual_plan(model, (5,), 3, 2, Storage.FP8)
    ref = reference(model, Storage.FP8)
    store = toy_store(model, plan)
    with stream_blocks(model, plan, store, "cpu", engine=FakeCopyStream()):
        x, c = inputs(0)
        for i, (_, block) in enumerate(model.block_sequence()[:3]):   # a forward abandoned after block 2
            x = model.block_runner(i, block, x, c, gate=0.5)
        outs = [model(*inputs(s)) for s in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(ref, outs))


# -- clean failure and accounting --------------------------------------------------------------

def test_stage_guard_frees_the_session_on_exception_and_interrupt(model):
    plan = manual_plan(model, (4, 5), 2, 1, Storage.FP8)
    for exc in (RuntimeError("boom"), KeyboardInterrupt()):
        store = toy_store(model, plan)
        released = []
        with pytest.raises(type(exc)):
            with stage_guard("sample", "cpu") as guard, stream_blocks(model, plan, store, "cpu",
                                                                      engine=FakeCopyStream()) as session:
                extra = guard.hold(torch.empty(1000))
                refs = [weakref.ref(session.ring.buffer), weakref.ref(extra),
                        *(weakref.ref(b) for b in session.resident.values())]
                del extra
                guard.on_release(lambda: released.append(True))
                model(*inputs(0))
                raise exc
        gc.collect()
        assert released == [True]
        assert all(r() is None for r in refs), "ring, resident blocks and held tensors were dropped"


def test_oom_retry_halves_the_budget_once(caplog):
    seen = []

    def attempt(budget):
        seen.append(budget)
        if budget > 100:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return budget

    with caplog.at_level(logging.WARNING):
        assert run_with_oom_retry(attempt, 150, stage="sample", device="cpu") == 75
    assert seen == [150, 75] and "retrying once" in caplog.text


def test_without_a_budget_there_is_no_retry():
    seen = []

    def attempt(budget):
        seen.append(budget)
        raise torch.cuda.OutOfMemoryError("CUDA out of memory.")

    with pytest.raises(torch.cuda.OutOfMemoryError):
        run_with_oom_retry(attempt, None, stage="sample", device="cpu")
    assert seen == [None]


def test_second_oom_is_a_clear_error():
    def attempt(budget):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(PlacementOOMError) as err:
        run_with_oom_retry(attempt, 8 * 2**30, stage="sample", device="cpu", predicted_peak=lambda b: b - 1)
    msg = str(err.value)
    assert "8.00 GiB" in msg and "4.00 GiB" in msg and "fp8" in msg and "resolution" in msg


def test_report_on_cpu_records_time_only(model):
    report = Report()
    with measure_stage(report, "sample", "cpu", predicted_peak=123) as rec:
        _, session, _ = run(model, manual_plan(model, (), 2, 1, Storage.BF16), steps=1)
        rec.bytes_h2d = session.bytes_h2d
    r = report.records[0]
    assert r.seconds > 0 and r.peak_allocated is None and r.peak_reserved is None and r.bytes_h2d > 0
    assert report.to_dict()["stages"][0]["predicted_peak"] == 123
    assert "sample" in report.render() and "peak reserved" in report.render()


@pytest.mark.parametrize("budget_blocks,n_resident", [(100, 6), (4.5, 3), (2.1, 1), (1.0, 0)])
def test_planner_plans_run_and_match(model, budget_blocks, n_resident):
    """Plans straight from the planner, from all-resident down to all-streamed, run bit-exact."""
    sizes = block_sizes(model)
    budget = int(budget_blocks * 2 * 2**20)   # tiny blocks round to 2 MiB segments each
    plan = plan_stage("toy", sizes, budget)
    ref = reference(model, Storage.BF16)
    outs, _, _ = run(model, plan, steps=2)
    assert all(torch.equal(a, b) for a, b in zip(ref, outs))
    assert len(plan.resident) == n_resident


def test_resident_modules_place_count_and_release():
    placed = ResidentModules()
    emb = nn.Linear(8, 16)
    assert ResidentModules.module_bytes(emb, torch.bfloat16) == (8 * 16 + 16) * 2
    placed.place(emb, "cpu", torch.bfloat16)
    assert emb.weight.dtype == torch.bfloat16 and placed.nbytes == (8 * 16 + 16) * 2
    placed.release(emb)
    assert placed.nbytes == 0


def test_auto_budget_needs_cuda_and_sizes_parse():
    assert resolve_budget("5.5GB", "cpu") == 5_500_000_000
    with pytest.raises(ValueError, match="CUDA"):
        resolve_budget("auto", "cpu")
    with pytest.raises(ValueError, match="positive"):
        resolve_budget(0, "cpu")
