"""Per-stage time and measured peaks, set beside the plan's prediction.

On CUDA a stage resets torch's peak statistics at entry and reads ``max_memory_allocated`` /
``max_memory_reserved`` at exit (one synchronize at the *end* of a stage, never inside one).
On CPU only time is recorded. Host RAM peak is the process's VmHWM.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch

from .budget import fmt_bytes
from .host_budget import bytes_read, pinned_bytes
from .host_store import host_ram_peak


@dataclass
class StageRecord:
    name: str
    seconds: float
    peak_allocated: int | None = None
    peak_reserved: int | None = None
    predicted_peak: int | None = None
    baseline_allocated: int | None = None
    bytes_h2d: int = 0
    host_ram_peak: int | None = None
    pinned_bytes: int | None = None      # page-locked host copies held at the stage's end
    bytes_read: int | None = None        # read from storage during the stage (page-cache hits excluded)
    # times the caching allocator hit the budget cap, freed its cache and tried again: each one
    # synchronizes every stream, so a stage that retries every step is paying for a plan too tight
    alloc_retries: int | None = None


@dataclass
class Report:
    records: list[StageRecord] = field(default_factory=list)

    def add(self, record: StageRecord) -> StageRecord:
        self.records.append(record)
        return record

    def to_dict(self) -> dict:
        return {"stages": [asdict(r) for r in self.records]}

    def render(self) -> str:
        head = ("stage", "time", "peak alloc", "peak reserved", "predicted", "baseline", "H2D", "host RAM peak",
                "pinned", "disk read", "alloc retries")
        rows = [head] + [(r.name, f"{r.seconds:.2f} s", fmt_bytes(r.peak_allocated), fmt_bytes(r.peak_reserved),
                          fmt_bytes(r.predicted_peak), fmt_bytes(r.baseline_allocated), fmt_bytes(r.bytes_h2d),
                          fmt_bytes(r.host_ram_peak), fmt_bytes(r.pinned_bytes), fmt_bytes(r.bytes_read),
                          "-" if r.alloc_retries is None else str(r.alloc_retries))
                         for r in self.records]
        widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)


def _alloc_retries(device: torch.device) -> int:
    """The caching allocator's running count of free-the-cache-and-retry events."""
    return int(torch.cuda.memory_stats(device).get("num_alloc_retries", 0))


@contextmanager
def measure_stage(report: Report, name: str, device: torch.device | str,
                  predicted_peak: int | None = None) -> Iterator[StageRecord]:
    """Time a stage and record its peaks; the caller may set ``record.bytes_h2d`` inside."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    record = StageRecord(name, 0.0, predicted_peak=predicted_peak)
    if cuda:
        # Cached-but-free segments of earlier stages would count in this stage's reserved peak
        # (and stay away from other programs): give them back first, and again at the end.
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        record.baseline_allocated = torch.cuda.memory_allocated(device)
        retries_before = _alloc_retries(device)
    read_before = bytes_read()
    start = time.perf_counter()
    try:
        yield record
    finally:
        if cuda:
            torch.cuda.synchronize(device)
            record.peak_allocated = torch.cuda.max_memory_allocated(device)
            record.peak_reserved = torch.cuda.max_memory_reserved(device)
            record.alloc_retries = _alloc_retries(device) - retries_before
            torch.cuda.empty_cache()
        record.seconds = time.perf_counter() - start
        record.host_ram_peak = host_ram_peak()
        record.pinned_bytes = pinned_bytes()
        read_after = bytes_read()
        if read_before is not None and read_after is not None:
            record.bytes_read = read_after - read_before
        report.add(record)
