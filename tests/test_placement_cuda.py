"""CUDA tier of the placement core: real streams, real OOM, real VRAM accounting.

Skipped without a GPU (conftest). Run on a GPU machine with
``python -m pytest -q -s tests/test_placement_cuda.py`` (``-s`` shows the measured numbers).
"""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch
from torch import nn

from newbie_core.placement import (HostBlockStore, HostMode, PlacementOOMError, Report, StagePlan, Storage,
                                   block_sizes, measure_stage, model_layouts, plan_stage, run_with_oom_retry,
                                   stage_guard, stream_blocks)

pytestmark = pytest.mark.cuda
DEV = torch.device("cuda")


class Block(nn.Module):
    def __init__(self, d: int, h: int):
        super().__init__()
        self.norm = nn.LayerNorm(d, elementwise_affine=True)
        self.w1 = nn.Linear(d, h)
        self.w2 = nn.Linear(h, d, bias=False)
        self.adaLN_modulation = nn.Linear(d, d)

    def forward(self, x, c):
        h = self.w2(torch.nn.functional.gelu(self.w1(self.norm(x))))   # (B, T, D)
        return x + h * torch.tanh(self.adaLN_modulation(c)).unsqueeze(1)


class Toy(nn.Module):
    """Weights live on the CPU; the GPU only ever sees them through the placement core."""

    def __init__(self, n: int, d: int, h: int):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(Block(d, h) for _ in range(n))
        for p in self.parameters():
            nn.init.normal_(p, std=d ** -0.5)
        self.to(torch.bfloat16).requires_grad_(False)
        self.block_runner = lambda i, b, *a, **k: b(*a, **k)

    def block_sequence(self):
        return [(f"layers.{i}", b) for i, b in enumerate(self.layers)]

    def forward(self, x, c):
        for i, (_, b) in enumerate(self.block_sequence()):
            x = self.block_runner(i, b, x, c)
        return x


def reader(model):
    def read_block(i):
        b = model.layers[i]
        return {k: v.detach().clone() for k, v in list(b.named_parameters()) + list(b.named_buffers())}
    return read_block


def knobs(model, resident, slots, storage) -> StagePlan:
    sizes = block_sizes(model)
    n = len(sizes)
    ring = [i for i in range(n) if i not in resident or storage is Storage.FP8]
    streamed = [i for i in range(n) if i not in resident]
    return dataclasses.replace(
        plan_stage("toy", sizes, 2**50), resident=tuple(resident), storage=(storage,) * n,
        slots=slots if ring else 0, prefetch_depth=max(0, slots - 1) if ring else 0,
        slot_bytes=max((sizes[i].compute_bytes for i in ring), default=0),
        staging_bytes=max((sizes[i].fp8_bytes for i in streamed), default=0) if storage is Storage.FP8 else 0)


def run(model, plan, xs, mode=HostMode.PINNED):
    store = HostBlockStore([l.storage for l in model_layouts(model, plan)], reader(model), mode)
    with torch.no_grad(), stream_blocks(model, plan, store, DEV) as session:
        outs = [model(x, c) for x, c in xs]
    torch.cuda.synchronize()
    store.close()
    return outs, session


def inputs(n, b, t, d):
    g = torch.Generator(device="cuda").manual_seed(1)
    return [(torch.randn(b, t, d, device=DEV, generator=g, dtype=torch.bfloat16),
             torch.randn(b, d, device=DEV, generator=g, dtype=torch.bfloat16)) for _ in range(n)]


@pytest.mark.parametrize("storage", [Storage.BF16, Storage.FP8])
@pytest.mark.parametrize("mode", [HostMode.PINNED, HostMode.STAGING])
def test_streamed_equals_resident_bitwise_on_a_real_stream(storage, mode):
    model = Toy(8, 512, 2048)
    xs = inputs(4, 2, 1024, 512)
    ref, _ = run(model, knobs(model, range(8), 2, storage), xs)
    for resident, slots in [((), 2), ((), 3), ((5, 6, 7), 2), ((2, 3, 4, 5, 6, 7), 3)]:
        outs, _ = run(model, knobs(model, resident, slots, storage), xs, mode)
        for a, b in zip(ref, outs):
            assert torch.equal(a, b), f"{storage} {mode} resident={resident} slots={slots}"


@pytest.mark.parametrize("mode", [HostMode.PINNED, HostMode.STAGING])
def test_compute_layout_blocks_among_fp8_ones_stream_bitwise_on_real_streams(mode):
    """bf16 blocks in an fp8 ring (a GGUF file's F16 refiners among its quantised blocks) go
    through staging and a device copy into the slot: still bitwise."""
    mixed = (Storage.FP8, Storage.BF16, Storage.BF16, Storage.FP8, Storage.FP8, Storage.BF16, Storage.FP8, Storage.FP8)
    model = Toy(8, 512, 2048)
    xs = inputs(4, 2, 1024, 512)

    def plan(resident, slots):
        base = knobs(model, resident, slots, Storage.FP8)    # staging holds a bf16 block, as the planner sizes it
        return dataclasses.replace(base, storage=mixed, staging_bytes=base.slot_bytes if base.staging_bytes else 0)
    ref, _ = run(model, plan(range(8), 2), xs)
    for resident, slots in [((), 2), ((), 3), ((0, 7), 2)]:
        outs, _ = run(model, plan(resident, slots), xs, mode)
        for a, b in zip(ref, outs):
            assert torch.equal(a, b), f"{mode} resident={resident} slots={slots}"


def test_host_buffers_are_pinned_at_exact_size():
    model = Toy(2, 256, 1024)
    ls = [l.storage for l in model_layouts(model, Storage.BF16)]
    store = HostBlockStore(ls, reader(model), HostMode.PINNED)
    assert all(b.is_pinned() for b in store._blocks)
    assert store.host_bytes == sum(l.nbytes for l in ls)
    store.close()


def test_measured_peak_stays_under_the_prediction():
    model = Toy(12, 1024, 4096)
    b, t, d, h = 2, 2048, 1024, 4096
    act = lambda a, f: 6 * b * t * max(d, h) * 2   # noqa: E731 - a generous estimate for this toy
    plan = plan_stage("toy", block_sizes(model), 400 * 2**20, activation_bytes=act)
    assert plan.streamed and plan.resident
    xs = inputs(2, b, t, d)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_reserved()
    report = Report()
    store = HostBlockStore([l.storage for l in model_layouts(model, plan)], reader(model), HostMode.PINNED)
    with measure_stage(report, "toy", DEV, plan.predicted_peak) as rec:
        with torch.no_grad(), stream_blocks(model, plan, store, DEV) as session:
            for x, c in xs:
                model(x, c)
        rec.bytes_h2d = session.bytes_h2d
    store.close()
    r = report.records[0]
    print("\n" + plan.render() + "\n" + report.render())
    assert r.peak_reserved - base <= plan.predicted_peak


def test_vram_returns_to_baseline_after_exception_and_interrupt():
    model = Toy(6, 1024, 4096)
    plan = knobs(model, (3, 4, 5), 2, Storage.FP8)
    xs = inputs(1, 2, 256, 1024)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    baseline = torch.cuda.memory_allocated()
    for exc in (RuntimeError("injected"), KeyboardInterrupt()):
        store = HostBlockStore([l.storage for l in model_layouts(model, plan)], reader(model), HostMode.PINNED)
        with pytest.raises(type(exc)):
            with stage_guard("toy", DEV) as guard, torch.no_grad(), stream_blocks(model, plan, store, DEV):
                guard.hold(torch.empty(64 * 2**20, dtype=torch.uint8, device=DEV))
                model(*xs[0])
                raise exc
        store.close()
        assert torch.cuda.memory_allocated() <= baseline


def test_oom_recovers_at_half_budget():
    model = Toy(16, 1024, 4096)      # 16 blocks of ~16.8 MiB
    xs = inputs(1, 1, 256, 1024)
    torch.nn.functional.linear(xs[0][0], torch.zeros(8, 1024, device=DEV, dtype=torch.bfloat16))  # cuBLAS workspace
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(DEV).total_memory
    cap = torch.cuda.memory_reserved() + 200 * 2**20
    used = []

    def attempt(budget):
        plan = plan_stage("toy", block_sizes(model), budget, activation_bytes=lambda a, f: 8 * 2**20)
        used.append((budget, len(plan.resident)))
        store = HostBlockStore([l.storage for l in model_layouts(model, plan)], reader(model), HostMode.PINNED)
        try:
            with torch.no_grad(), stream_blocks(model, plan, store, DEV):
                return model(*xs[0])
        finally:
            store.close()

    torch.cuda.set_per_process_memory_fraction(cap / total)
    try:
        out = run_with_oom_retry(attempt, 360 * 2**20, stage="toy", device=DEV)
        assert out.isfinite().all()
        assert len(used) == 2 and used[1][1] < used[0][1], "the retry planned with fewer resident blocks"
        with pytest.raises(PlacementOOMError, match="fp8"):
            run_with_oom_retry(attempt, 2000 * 2**20, stage="toy", device=DEV)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)


def test_transfer_hides_behind_compute():
    """Fully streamed forwards cost about what resident ones do once a block's compute exceeds its copy."""
    model = Toy(10, 3072, 8192)      # ~100 MB per block in bf16
    xs = inputs(5, 2, 16384, 3072)

    def timed(plan):
        store = HostBlockStore([l.storage for l in model_layouts(model, plan)], reader(model), HostMode.PINNED)
        with torch.no_grad(), stream_blocks(model, plan, store, DEV):
            model(*xs[0])
            torch.cuda.synchronize()
            start = time.perf_counter()
            for x, c in xs[1:]:
                model(x, c)
            torch.cuda.synchronize()
            dt = (time.perf_counter() - start) / (len(xs) - 1)
        store.close()
        return dt

    resident = timed(knobs(model, range(10), 2, Storage.BF16))
    streamed = timed(knobs(model, (), 3, Storage.BF16))
    fp8 = timed(knobs(model, (), 3, Storage.FP8))
    nbytes = block_sizes(model)[0].compute_bytes
    print(f"\nper forward: resident {resident * 1e3:.1f} ms, streamed bf16 {streamed * 1e3:.1f} ms, "
          f"streamed fp8 {fp8 * 1e3:.1f} ms; block {nbytes / 1e6:.0f} MB, compute {resident / 10 * 1e3:.2f} ms/block")
    assert streamed < 1.25 * resident


def test_stage_counts_allocator_retries_at_the_cap():
    """A stage whose allocations run into the budget cap reports each free-the-cache-and-retry,
    and one that stays under it reports none: the figure that tells a plan too tight to run fast."""
    total = torch.cuda.get_device_properties(DEV).total_memory
    torch.cuda.empty_cache()
    base = torch.cuda.memory_reserved(DEV)
    torch.cuda.set_per_process_memory_fraction((base + 96 * 2**20) / total)      # the current device
    try:
        report = Report()
        with measure_stage(report, "roomy", DEV):
            a = torch.empty(32 * 2**20, dtype=torch.uint8, device=DEV)
            del a
        with measure_stage(report, "tight", DEV):
            held = torch.empty(60 * 2**20, dtype=torch.uint8, device=DEV)
            del held                        # cached for the default stream only
            with torch.cuda.stream(torch.cuda.Stream(DEV)):
                other = torch.empty(60 * 2**20, dtype=torch.uint8, device=DEV)   # 120 MiB > the cap
                del other
        roomy, tight = report.records
        assert roomy.alloc_retries == 0
        assert tight.alloc_retries is not None and tight.alloc_retries >= 1, report.render()
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
