"""The copy stream: where weights travel, ordered against compute with events only.

Three streams matter. The *main* stream is whatever stream is current when the model runs: all
compute, and every allocation the placement core makes (ring, resident buffers). The *side*
(copy) stream carries host->device copies; the *upcast* stream turns fp8 and packed blocks
into compute layout (or, for a compute-layout block that came through staging, copies it into
its slot). The upcast has its own stream so that the copy engine never waits for an upcast: at
512² an upcast on the copy stream stretched every block's transfer (measured on an H200).
They are ordered only by events:

- ``main_wait(copy_done)`` before compute reads a slot the side stream filled;
- ``side_wait(compute_done)`` before the side stream overwrites a slot compute has read;
- ``host_wait(copy_done)`` before the CPU overwrites a pinned staging buffer a copy reads;
- ``upcast(fn, after)`` waits every event of ``after`` (the staging copy's, and the compute
  event that frees the slot) on the upcast stream, runs ``fn`` there and returns the event
  compute waits on;
- ``side_wait(upcast_done)`` before a copy overwrites a staging buffer an upcast reads.

No tensor is ever allocated on the side stream: the side stream only writes into buffers the
main stream allocated, so the caching allocator never sees a cross-stream free and
``record_stream`` is never needed (its pitfall: the block is held until the *later* of the
streams' work, which silently grows reserved memory). Before those buffers are freed the main
stream waits for the side stream (:meth:`drain`), so reuse by the allocator is safe.

:class:`FakeCopyStream` is the CPU stand-in used by the tests. It is deliberately hostile: side
work is queued and lands only when an event after it is waited on; every destination is
filled with NaN bytes the moment a copy into it is *queued*; and overwriting memory the main
stream consumed, without first waiting for a main event recorded after that, raises
:class:`StreamRaceError`, and so does a copy into a staging buffer that an upcast reads, queued
without waiting for that upcast's event (on the GPU the upcast stream runs apart from the copy
stream). A missing wait therefore shows up as NaNs or as that error.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch


class CopyEngine(Protocol):
    def copy(self, dst: torch.Tensor, src: torch.Tensor, side_only: bool = False) -> None: ...
    def upcast(self, fn: Callable[[], None], after: Sequence[Any], writes: Sequence[torch.Tensor] = (),
               reads: Sequence[torch.Tensor] = ()) -> Any: ...
    def side_record(self) -> Any: ...
    def side_wait(self, event: Any) -> None: ...
    def main_record(self) -> Any: ...
    def main_wait(self, event: Any) -> None: ...
    def host_wait(self, event: Any) -> None: ...
    def drain(self) -> None: ...


class CudaCopyEngine:
    """A real side CUDA stream. Nothing here blocks the host except :meth:`host_wait`."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device)
        self.upcast_stream = torch.cuda.Stream(self.device)

    def _main(self) -> torch.cuda.Stream:
        return torch.cuda.current_stream(self.device)

    def copy(self, dst: torch.Tensor, src: torch.Tensor, side_only: bool = False) -> None:
        with torch.cuda.stream(self.stream):
            dst.copy_(src, non_blocking=True)

    def upcast(self, fn: Callable[[], None], after: Sequence[torch.cuda.Event | None],
               writes: Sequence[torch.Tensor] = (), reads: Sequence[torch.Tensor] = ()) -> torch.cuda.Event:
        for event in after:
            if event is not None:
                self.upcast_stream.wait_event(event)
        with torch.cuda.stream(self.upcast_stream):
            fn()   # must allocate nothing: see the module docstring
        event = torch.cuda.Event()
        event.record(self.upcast_stream)
        return event

    def side_record(self) -> torch.cuda.Event:
        event = torch.cuda.Event()
        event.record(self.stream)
        return event

    def side_wait(self, event: torch.cuda.Event | None) -> None:
        if event is not None:
            self.stream.wait_event(event)

    def main_record(self) -> torch.cuda.Event:
        event = torch.cuda.Event()
        event.record(self._main())
        return event

    def main_wait(self, event: torch.cuda.Event | None) -> None:
        if event is not None:
            self._main().wait_event(event)

    def host_wait(self, event: torch.cuda.Event | None) -> None:
        if event is not None:
            event.synchronize()

    def drain(self) -> None:
        """A full barrier: main waits for both side streams, and later side work waits for
        everything before it (e.g. the upcast stream reading a resident buffer the copy stream
        just filled: a missing edge measured as a non-bitwise fp8 run on the H200)."""
        main = self._main()
        main.wait_stream(self.stream)
        main.wait_stream(self.upcast_stream)
        self.stream.wait_stream(main)
        self.upcast_stream.wait_stream(main)


class ImmediateCopyEngine:
    """CPU execution without streams: every operation happens at once, events are None."""

    def copy(self, dst: torch.Tensor, src: torch.Tensor, side_only: bool = False) -> None:
        dst.copy_(src)

    def upcast(self, fn: Callable[[], None], after: Sequence[None], writes: Sequence[torch.Tensor] = (),
               reads: Sequence[torch.Tensor] = ()) -> None:
        fn()

    def side_record(self) -> None:
        return None

    def side_wait(self, event: None) -> None:
        pass

    def main_record(self) -> None:
        return None

    def main_wait(self, event: None) -> None:
        pass

    def host_wait(self, event: None) -> None:
        pass

    def drain(self) -> None:
        pass


def make_engine(device: torch.device | str) -> CopyEngine:
    device = torch.device(device)
    return CudaCopyEngine(device) if device.type == "cuda" else ImmediateCopyEngine()


class StreamRaceError(RuntimeError):
    """The fake stream saw the side stream overwrite memory the main stream may still read."""


@dataclass(frozen=True)
class FakeEvent:
    stream: str   # "side" (copy), "upcast" or "main"
    seq: int


def _span(t: torch.Tensor) -> tuple[int, int]:
    start = t.data_ptr()
    return start, start + t.numel() * t.element_size()


def _poison(t: torch.Tensor) -> None:
    """All bytes 0xFF: NaN in bf16, fp16, fp32 and e4m3fn."""
    t.view(torch.uint8).fill_(0xFF) if t.is_contiguous() else t.fill_(float("nan"))


class FakeCopyStream:
    """A hostile, deterministic stand-in for a CUDA side stream on CPU (see module docstring)."""

    def __init__(self) -> None:
        self._queue: list[tuple[int, Callable[[], None]]] = []
        self._side_seq = 0
        self._main_seq = 0
        self._side_horizon = 0                     # newest main event the side stream waited on
        self._consumed: list[tuple[int, int, int]] = []   # (start, end, main seq of the consuming wait)
        self._landed_writes: list[tuple[int, int, int]] = []  # (start, end, side seq)
        self._upcast_reads: list[tuple[int, int, int]] = []   # (start, end, seq of the reading upcast)
        self._upcast_horizon = 0                   # newest upcast event the copy stream waited on
        self.copies = 0
        self.bytes_copied = 0

    # -- side stream ----------------------------------------------------------------------
    def _enqueue_write(self, writes: Sequence[torch.Tensor], op: Callable[[], None], side_only: bool = False,
                       at_once: bool = False) -> None:
        for t in writes:
            start, end = _span(t)
            for c_start, c_end, seq in self._consumed:
                if start < c_end and c_start < end and self._side_horizon <= seq:
                    raise StreamRaceError(
                        "side stream overwrites memory the main stream consumed without waiting for a "
                        "main-stream event recorded after that use (missing compute_done wait)")
            _poison(t)
        self._side_seq += 1
        seq = self._side_seq
        spans = [] if side_only else [_span(t) for t in writes]   # side-only buffers: main never reads

        def landed() -> None:
            op()
            self._landed_writes.extend((s, e, seq) for s, e in spans)
        if at_once:
            landed()
        else:
            self._queue.append((seq, landed))

    def copy(self, dst: torch.Tensor, src: torch.Tensor, side_only: bool = False) -> None:
        """``side_only``: the destination is read only by later side work (fp8 staging)."""
        start, end = _span(dst)
        if any(start < r_end and r_start < end for r_start, r_end, _ in self._upcast_reads):
            raise StreamRaceError("a copy overwrites a staging buffer an upcast may still read (missing wait "
                                  "for that upcast's event)")
        self.copies += 1
        self.bytes_copied += src.numel() * src.element_size()
        self._enqueue_write([dst], lambda: dst.copy_(src), side_only)   # src is read when it lands

    def upcast(self, fn: Callable[[], None], after: Sequence[FakeEvent | None],
               writes: Sequence[torch.Tensor] = (), reads: Sequence[torch.Tensor] = ()) -> FakeEvent:
        """The upcast stream. After a side event (the staging copy) it lands with the side queue;
        with nothing to wait for on the side it runs at once, on whatever its source holds now
        (so an upcast that forgot its copy event reads the NaN-poisoned staging buffer). A
        main-stream event in ``after`` counts as a side wait: it frees the slot compute was
        reading. ``reads`` (staging buffers) stay claimed until a copy waits on the returned event."""
        events = [e for e in after if e is not None]
        for event in events:
            if event.stream == "main":
                self._after_main(event)
        self._enqueue_write(list(writes), fn, at_once=not any(e.stream != "main" for e in events))
        seq = self._side_seq
        self._upcast_reads.extend((*_span(t), seq) for t in reads)
        return FakeEvent("upcast", seq)

    def side_record(self) -> FakeEvent:
        return FakeEvent("side", self._side_seq)

    def side_wait(self, event: FakeEvent | None) -> None:
        """A main event frees memory compute read; an upcast event frees the staging it read."""
        if event is None or event.stream == "side":
            return                                  # the copy stream is in order with itself
        if event.stream == "upcast":
            self._upcast_horizon = max(self._upcast_horizon, event.seq)
            self._upcast_reads = [r for r in self._upcast_reads if r[2] > self._upcast_horizon]
            return
        self._after_main(event)

    def _after_main(self, event: FakeEvent) -> None:
        self._side_horizon = max(self._side_horizon, event.seq)
        self._consumed = [c for c in self._consumed if c[2] >= self._side_horizon]

    # -- main stream and host -------------------------------------------------------------
    def _land(self, upto: int) -> None:
        while self._queue and self._queue[0][0] <= upto:
            self._queue.pop(0)[1]()

    def main_record(self) -> FakeEvent:
        self._main_seq += 1
        return FakeEvent("main", self._main_seq)

    def main_wait(self, event: FakeEvent | None) -> None:
        if event is None:
            return
        if event.stream == "main":
            raise ValueError("main_wait expects a copy or upcast event")
        self._land(event.seq)
        self._main_seq += 1
        # Whatever the side stream wrote up to this event may now be read by the main stream.
        keep = []
        for s, e, seq in self._landed_writes:
            if seq <= event.seq:
                self._consumed.append((s, e, self._main_seq))
            else:
                keep.append((s, e, seq))
        self._landed_writes = keep

    def host_wait(self, event: FakeEvent | None) -> None:
        if event is not None:
            self._land(event.seq)

    def drain(self) -> None:
        self.main_wait(self.side_record())
        self._upcast_reads.clear()              # everything queued has landed, upcasts included

    @property
    def pending(self) -> int:
        return len(self._queue)
