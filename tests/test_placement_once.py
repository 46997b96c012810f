"""Blocks that run once per stage (plan.once): streamed once ahead of the cycle, bit for bit.

A sampler keeps the output of blocks that see the conditioning alone (the DiT's caption
refiners) and runs only the other blocks at every step. The toy model here does the same: its
first two blocks make a "caption" once per conditioning; every forward then runs the rest.
Through the hostile fake copy stream (test_placement_streaming.py), a streamed stage must give
the resident result bit for bit, copy the once blocks once, and never resync in steady state.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from newbie_core.placement import FakeCopyStream, Storage, block_sizes, plan_stage, stream_blocks
from newbie_core.placement.runner import StreamingRunner

from test_placement_streaming import ToyModel, inputs, manual_plan, toy_store

ONCE = (0, 1)


class PrologueToy(ToyModel):
    """Blocks 0-1 refine the conditioning once (``prepare``); ``forward`` runs blocks 2.. on it."""

    def prepare(self, c: torch.Tensor) -> torch.Tensor:
        x = c.unsqueeze(1).expand(-1, 3, -1).contiguous()
        for i in ONCE:
            x = self.block_runner(i, self.layers[i], x, c, gate=0.5)
        return x.mean(1)

    def forward(self, x, c):
        for i in range(len(ONCE), len(self.layers)):
            x = self.block_runner(i, self.layers[i], x, c, gate=0.5)
        return x


def _run(model, plan, conds: list[int], steps: int, engine=None):
    """``steps`` forwards per conditioning in ``conds`` (a seed each), prepared once each."""
    outs = []
    with stream_blocks(model, plan, toy_store(model, plan), "cpu", engine=engine or FakeCopyStream()) as session:
        for seed in conds:
            c = model.prepare(inputs(seed)[1])
            outs += [model(inputs(step)[0], c) for step in range(steps)]
    return outs, session


def _once_plan(model, resident=(), slots=2, storage=Storage.BF16):
    return dataclasses.replace(manual_plan(model, resident, slots, slots - 1, storage), once=ONCE)


@pytest.fixture
def resyncs(monkeypatch):
    calls: list[int] = []
    original = StreamingRunner._resync
    monkeypatch.setattr(StreamingRunner, "_resync", lambda self, block: (calls.append(block), original(self, block))[1])
    return calls


@pytest.mark.parametrize("slots", [2, 3])
@pytest.mark.parametrize("storage", [Storage.BF16, Storage.FP8])
def test_once_blocks_stream_once_ahead_of_the_cycle(slots, storage, resyncs):
    model = PrologueToy()
    resident, _ = _run(model, _once_plan(model, tuple(range(6)), storage=storage), [7], steps=4)
    plan = _once_plan(model, resident=(3,), slots=slots, storage=storage)
    assert plan.prologue_blocks == ONCE and plan.cycle_blocks == ((2, 3, 4, 5) if storage is Storage.FP8 else (2, 4, 5))
    streamed, session = _run(model, plan, [7], steps=4)
    assert all(torch.equal(a, b) for a, b in zip(resident, streamed))
    assert not resyncs, "the cycle starts after the prologue: no resync in steady state"
    sizes = [s.storage_bytes(storage) for s in block_sizes(model)]
    per_forward = sum(sizes[i] for i in plan.streamed_per_forward)
    # after the last block the ring has issued depth + 1 positions more: the next forward's first
    ahead = sum(sizes[b] for b in plan.cycle_blocks[: plan.prefetch_depth + 1] if b not in plan.resident)
    resident_bytes = sizes[3]
    assert session.bytes_h2d == resident_bytes + sum(sizes[i] for i in ONCE) + 4 * per_forward + ahead


def test_a_new_conditioning_runs_a_new_prologue(resyncs):
    """The caller prepares again (another conditioning, or CFG switched off): the runner starts
    a new prologue at its next position, once per prepare, and the results stay exact."""
    model = PrologueToy()
    resident, _ = _run(model, _once_plan(model, tuple(range(6))), [7, 8, 9], steps=2)
    streamed, _ = _run(model, _once_plan(model, slots=3), [7, 8, 9], steps=2)
    assert all(torch.equal(a, b) for a, b in zip(resident, streamed))
    assert resyncs == [0, 0], "one resync per later prepare, none inside a forward"


def test_a_stage_whose_only_ring_blocks_run_once_issues_nothing_after_them(resyncs):
    model = PrologueToy()
    everything_else = tuple(i for i in range(6) if i not in ONCE)
    resident, _ = _run(model, _once_plan(model, tuple(range(6))), [7, 8], steps=3)
    plan = _once_plan(model, resident=everything_else)
    assert plan.cycle_blocks == () and plan.prologue_blocks == ONCE
    streamed, session = _run(model, plan, [7, 8], steps=3)
    assert all(torch.equal(a, b) for a, b in zip(resident, streamed))
    sizes = [s.compute_bytes for s in block_sizes(model)]
    assert session.bytes_h2d == sum(sizes[i] for i in everything_else) + 2 * sum(sizes[i] for i in ONCE)


def test_the_planner_spends_residency_on_the_blocks_every_forward_runs():
    model = PrologueToy(n=12)
    sizes = block_sizes(model)
    full = plan_stage("toy", sizes, 2**40, once=ONCE)
    assert full.resident == tuple(range(12)) and not full.streamed, "all resident when everything fits"
    budgets = range(full.predicted_peak, 0, -max(1, full.predicted_peak // 40))
    plans = []
    for budget in budgets:
        try:
            plans.append(plan_stage("toy", sizes, budget, once=ONCE))
        except ValueError:
            break
    partial = [p for p in plans if 0 < len(p.resident) < 12]
    assert partial, "the sweep must reach budgets with some blocks resident"
    for p in partial:
        assert not set(ONCE) & set(p.resident), "a once block holds VRAM only when every block does"
        assert p.streamed_per_forward == tuple(i for i in p.streamed if i not in ONCE)
    for big, small in zip(plans, plans[1:]):
        assert len(small.resident) <= len(big.resident)
    plain = plan_stage("toy", sizes, partial[0].budget)
    assert len(partial[0].resident) >= len(plain.resident)
    assert "run once per stage" in partial[0].render()
    with pytest.raises(ValueError, match="once blocks"):
        plan_stage("toy", sizes, 2**40, once=(12,))


def test_a_once_block_in_compute_layout_copies_straight_into_its_slot(resyncs):
    """A GGUF file's F16 caption refiners among packed blocks: the prologue's compute-layout
    blocks go straight into their slot, so the staging buffers hold only the cycle's fp8 (or
    packed) blocks, smaller than a compute-layout block; streamed == resident, bit for bit."""
    model = PrologueToy()
    mixed = (Storage.BF16, Storage.BF16) + (Storage.FP8,) * 4
    everything = _once_plan(model, tuple(range(6)), storage=Storage.FP8)
    resident, _ = _run(model, dataclasses.replace(everything, storage=mixed), [7, 8], steps=3)
    plan = _once_plan(model, resident=(), slots=2, storage=Storage.FP8)
    sizes = block_sizes(model)
    plan = dataclasses.replace(plan, storage=mixed, staging_bytes=max(sizes[i].fp8_bytes for i in range(2, 6)))
    assert plan.staging_bytes < sizes[0].compute_bytes
    streamed, session = _run(model, plan, [7, 8], steps=3)
    assert all(torch.equal(a, b) for a, b in zip(resident, streamed))
    assert resyncs == [0], "the second conditioning's prologue is the one resync"
