"""The ring's stream order on CPU, through the hostile fake copy stream: every wait matters.

Each test removes one wait on purpose (a main-stream wait on a copy, a copy's wait on compute or
on an upcast, an upcast's wait on its copy or on compute) and watches the fake stream turn it
into NaNs or a StreamRaceError; the others check what the schedule may skip (staged copies never
wait for compute, so they run a ring ahead). Helpers and the toy model: test_placement_streaming.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from newbie_core.placement import FakeCopyStream, StagePlan, Storage, StreamRaceError

from test_placement_streaming import N_BLOCKS, manual_plan, model, one_thread, reference, run  # noqa: F401


def test_without_copy_done_wait_compute_reads_nan(model, monkeypatch):
    monkeypatch.setattr(FakeCopyStream, "main_wait", lambda self, event: None)
    outs, _, _ = run(model, manual_plan(model, (5,), 2, 1, Storage.BF16), steps=1, engine=FakeCopyStream())
    assert torch.isnan(outs[0]).any()


def test_without_compute_done_wait_the_race_is_caught(model, monkeypatch):
    monkeypatch.setattr(FakeCopyStream, "side_wait", lambda self, event: None)
    with pytest.raises(StreamRaceError):
        run(model, manual_plan(model, (), 2, 1, Storage.BF16), steps=2)


def test_fp8_upcast_without_its_copy_event_reads_nan(model, monkeypatch):
    """The upcast stream must wait for the staging copy; drop that wait and it upcasts NaN."""
    real = FakeCopyStream.upcast

    def forgetful(self, fn, after, writes=(), reads=()):
        return real(self, fn, [e for e in after if e is None or e.stream != "side"], writes, reads)
    monkeypatch.setattr(FakeCopyStream, "upcast", forgetful)
    outs, _, _ = run(model, manual_plan(model, (), 2, 1, Storage.FP8), steps=1)
    assert torch.isnan(outs[0]).any()


def test_staged_copy_without_the_upcast_wait_is_a_race(model, monkeypatch):
    """A streamed fp8 block's copy overwrites the slot's staging buffer: it must wait for the
    upcast that read the last block from there (on the GPU the two run on different streams)."""
    real = FakeCopyStream.side_wait
    monkeypatch.setattr(FakeCopyStream, "side_wait",
                        lambda self, event: None if event is not None and event.stream == "upcast" else real(self, event))
    with pytest.raises(StreamRaceError):
        run(model, manual_plan(model, (), 2, 1, Storage.FP8), steps=2)


def test_streamed_fp8_upcast_without_the_slot_wait_is_a_race(model, monkeypatch):
    """The staged copy no longer waits for compute, so the upcast into the slot must."""
    real = FakeCopyStream.upcast
    monkeypatch.setattr(FakeCopyStream, "upcast", lambda self, fn, after, writes=(), reads=():
                        real(self, fn, [e for e in after if e is None or e.stream != "main"], writes, reads))
    with pytest.raises(StreamRaceError):
        run(model, manual_plan(model, (), 2, 1, Storage.FP8), steps=2)


def test_staged_copies_run_a_ring_ahead_of_compute(model):
    """fp8 copies wait only for the upcast that freed their staging buffer, never for a compute
    event: on S slots the copy stream runs up to S blocks ahead, at no extra memory (fp8 under
    2 GB at 1024² CFG on an H200: 121.5 -> 119.0 ms per step)."""
    waits = []

    class Recording(FakeCopyStream):
        def side_wait(self, event):
            waits.append(event)
            super().side_wait(event)

    plan = manual_plan(model, (), 2, 1, Storage.FP8)
    outs, _, _ = run(model, plan, steps=3, engine=Recording())
    assert all(torch.equal(a, b) for a, b in zip(reference(model, Storage.FP8), outs))
    first_forward = 1 + N_BLOCKS                      # the session's opening barrier, then the ring
    assert [e.stream for e in waits[1:first_forward] if e is not None] == ["upcast"] * (N_BLOCKS - 2)
    assert all(e is None or e.stream == "upcast" for e in waits[1:])


MIXED = (Storage.FP8, Storage.FP8, Storage.BF16, Storage.BF16, Storage.FP8, Storage.FP8)


def mixed_plan(model, resident: tuple[int, ...] = ()) -> StagePlan:
    """fp8 blocks with two compute-layout blocks between them (a GGUF file's F16 refiners among
    its quantised blocks), on two slots; staging sized as the planner sizes it, by the largest
    streamed block's stored bytes (here a compute-layout one)."""
    plan = manual_plan(model, resident, 2, 1, Storage.FP8)
    return dataclasses.replace(plan, storage=MIXED, staging_bytes=plan.slot_bytes if len(resident) < N_BLOCKS else 0)


def test_compute_layout_blocks_in_a_staging_ring_go_through_staging(model):
    """A compute-layout block among fp8 ones lands in the slot's staging buffer with no compute
    wait, like the fp8 blocks (the copy stream never waits for compute), and a device copy on the
    upcast stream moves it into the slot; streamed == resident, bit for bit."""
    waits = []

    class Recording(FakeCopyStream):
        def side_wait(self, event):
            waits.append(event)
            super().side_wait(event)

    ref = run(model, mixed_plan(model, tuple(range(N_BLOCKS))))[0]
    outs, _, _ = run(model, mixed_plan(model), steps=3, engine=Recording())
    assert all(torch.equal(a, b) for a, b in zip(ref, outs))
    assert waits[1:] and all(e is None or e.stream == "upcast" for e in waits[1:]), "no compute wait on the copy stream"


def test_staging_to_slot_copy_without_the_compute_wait_is_a_race(model, monkeypatch):
    """The device copy from staging into the slot overwrites what compute read there. Every
    block here is in compute layout, so that copy is the only thing on the upcast stream."""
    plan = manual_plan(model, (), 2, 1, Storage.BF16)
    plan = dataclasses.replace(plan, staging_bytes=plan.slot_bytes)
    assert torch.equal(run(model, plan, steps=2)[0][1], reference(model, Storage.BF16)[1])
    real = FakeCopyStream.upcast
    monkeypatch.setattr(FakeCopyStream, "upcast", lambda self, fn, after, writes=(), reads=():
                        real(self, fn, [e for e in after if e is None or e.stream != "main"], writes, reads))
    with pytest.raises(StreamRaceError):
        run(model, plan, steps=2)


def test_a_ring_whose_staging_cannot_hold_a_streamed_block_is_refused(model):
    plan = dataclasses.replace(mixed_plan(model), staging_bytes=manual_plan(model, (), 2, 1, Storage.FP8).staging_bytes)
    with pytest.raises(ValueError, match="staging buffers of .* cannot hold streamed block 'layers.2'"):
        run(model, plan, steps=1)


def test_resident_fp8_upcast_without_the_slot_wait_is_a_race(model, monkeypatch):
    """A resident fp8 block's upcast overwrites its slot: it must wait for the compute that read it."""
    real = FakeCopyStream.upcast
    monkeypatch.setattr(FakeCopyStream, "upcast", lambda self, fn, after, writes=(), reads=(): real(self, fn, (), writes))
    with pytest.raises(StreamRaceError):
        run(model, manual_plan(model, tuple(range(N_BLOCKS)), 2, 1, Storage.FP8), steps=2)
