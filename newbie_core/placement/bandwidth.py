"""Measured rates for the roofline and the planner: the host-to-GPU pinned copy, sequential disk
reads, and the GPU's matmul throughput.

Users' links differ by 5x (PCIe 3.0 x16 ~12 GB/s, 5.0 x16 ~50 GB/s, less on laptop x8/x4 slots),
and their GPUs' compute by more, so a constant would mislead every plan. Each figure is measured
once with a short timed copy, read or matmul, and kept in the user cache dir (``platformdirs``),
keyed by what it depends on: the GPU's name and driver for the link, the same and the dtype for
the matmul, the file system's device for the disk. A later run reads the file.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

log = logging.getLogger(__name__)

CACHE_FILE = "bandwidth.json"
LINK_PROBE_BYTES = 256 * 2**20
DISK_PROBE_BYTES = 512 * 2**20
READ_CHUNK = 8 * 2**20
MATMUL_PROBE_N = 4096        # 137 GFLOP per product: long enough to time, big enough to fill a GPU
# How each kind of figure is logged: bytes/s as GB/s, FLOP/s as TFLOP/s.
UNITS = {"GB/s": 1e9, "TFLOP/s": 1e12}


def cache_dir() -> Path:
    import platformdirs
    return Path(platformdirs.user_cache_dir("newbie-lowvram", appauthor=False))


def _load(folder: Path) -> dict[str, float]:
    try:
        return {k: float(v) for k, v in json.loads((folder / CACHE_FILE).read_text()).items()}
    except (OSError, ValueError, AttributeError):
        return {}


def cached(key: str, measure: Callable[[], float], folder: Path | None = None, unit: str = "GB/s") -> float:
    """The figure (bytes/s, FLOP/s) stored under ``key``, measured (and stored) the first time;
    ``unit`` (a key of :data:`UNITS`) is only how the log line prints it."""
    folder = folder or cache_dir()
    known = _load(folder)
    if key in known and known[key] > 0:
        return known[key]
    value = float(measure())
    known[key] = value
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / (CACHE_FILE + ".tmp")
        tmp.write_text(json.dumps(known, indent=1, sort_keys=True))
        tmp.replace(folder / CACHE_FILE)
    except OSError as e:     # a read-only home still gets the figure, just not kept
        log.warning("could not keep the measured figure %s in %s: %s", key, folder, e)
    log.info("measured %s: %.1f %s", key, value / UNITS[unit], unit)
    return value


def _gpu(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device)
    driver = getattr(torch._C, "_cuda_getDriverVersion", lambda: 0)()
    return f"{name}:driver {driver}"


def link_key(device: torch.device) -> str:
    """GPU name and driver: what the pinned copy bandwidth depends on (with the slot)."""
    return f"link:{_gpu(device)}"


def measure_link(device: torch.device, nbytes: int = LINK_PROBE_BYTES, repeats: int = 3) -> float:
    """Best of a few timed pinned host -> device copies, in bytes/s."""
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst.copy_(src, non_blocking=True)        # warm-up: the first copy maps the pages
    best = _best_seconds(functools.partial(dst.copy_, src, non_blocking=True), repeats)
    del src, dst
    torch.cuda.empty_cache()      # the probe's buffers must not lower the auto budget that follows
    host_empty = getattr(torch._C, "_host_emptyCache", None)
    if host_empty is not None:    # nor stay pinned in torch's host cache (256 MiB of page-locked RAM)
        host_empty()
    return nbytes / best


def link_bandwidth(device: torch.device, measure: Callable[[torch.device], float] = measure_link,
                   key: Callable[[torch.device], str] = link_key, folder: Path | None = None) -> float:
    """This machine's host -> GPU pinned copy bandwidth (bytes/s), measured once and cached."""
    return cached(key(device), lambda: measure(device), folder)


def matmul_key(device: torch.device, dtype: torch.dtype) -> str:
    """GPU name, driver and dtype: what the matmul rate depends on (e4m3 runs ~2x bf16 on Hopper)."""
    return f"matmul:{_gpu(device)}:{str(dtype).removeprefix('torch.')}"


def measure_matmul(device: torch.device, dtype: torch.dtype, n: int = MATMUL_PROBE_N, inner: int = 10,
                   repeats: int = 3) -> float:
    """Best of a few timed runs of ``inner`` square ``n``-matmuls, in FLOP/s (2*n^3 each).

    e4m3 goes through ``torch._scaled_mm`` (per-tensor scales, bf16 out), as fp8 compute does.
    The warm-up picks cuBLAS's kernel and lifts the clocks before anything is timed."""
    seconds = _time_matmul(device, dtype, n, inner, repeats)
    torch.cuda.empty_cache()      # the operands are gone: their memory goes back to the driver
    return 2 * n ** 3 / seconds


def _time_matmul(device: torch.device, dtype: torch.dtype, n: int, inner: int, repeats: int) -> float:
    if dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype).t()         # column-major, as _scaled_mm wants
        one = torch.ones((), device=device)
        run = lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)   # noqa: E731
    else:
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        out = torch.empty(n, n, device=device, dtype=dtype)
        run = lambda: torch.matmul(a, b, out=out)   # noqa: E731
    for _ in range(3):
        run()
    return _best_seconds(run, repeats, inner)


def _best_seconds(run: Callable[[], object], repeats: int, inner: int = 1) -> float:
    """The fastest of ``repeats`` CUDA-event-timed runs of ``inner`` calls, in seconds per call."""
    best = float("inf")
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            run()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3 / inner)
    return best


def matmul_throughput(device: torch.device, dtype: torch.dtype,
                      measure: Callable[[torch.device, torch.dtype], float] = measure_matmul,
                      key: Callable[[torch.device, torch.dtype], str] = matmul_key,
                      folder: Path | None = None) -> float:
    """This GPU's square-matmul rate in ``dtype`` (FLOP/s), measured once and cached: the peak
    the planner divides a block's FLOPs by."""
    return cached(key(device, dtype), lambda: measure(device, dtype), folder, unit="TFLOP/s")


def disk_key(path: os.PathLike | str) -> str:
    return f"disk:dev {os.stat(path).st_dev}"


def measure_disk(path: os.PathLike | str, nbytes: int = DISK_PROBE_BYTES) -> float:
    """Sequential read of up to ``nbytes`` of ``path`` in bytes/s, the file's cached pages dropped
    first where the OS allows (else a warm figure, which only overstates the disk)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        read, t0 = 0, time.perf_counter()
        while read < nbytes:
            chunk = os.read(fd, min(READ_CHUNK, nbytes - read))
            if not chunk:
                break
            read += len(chunk)
        seconds = time.perf_counter() - t0
    finally:
        os.close(fd)
    return read / max(seconds, 1e-9)


def disk_bandwidth(path: os.PathLike | str, measure: Callable[[os.PathLike | str], float] = measure_disk,
                   key: Callable[[os.PathLike | str], str] = disk_key, folder: Path | None = None) -> float:
    """Sequential read bandwidth (bytes/s) of the disk holding ``path``, measured once and cached."""
    return cached(key(path), lambda: measure(path), folder)
