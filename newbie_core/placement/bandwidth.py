"""Measured bandwidths for the roofline: the host-to-GPU pinned copy, and sequential disk reads.

Users' links differ by 5x (PCIe 3.0 x16 ~12 GB/s, 5.0 x16 ~50 GB/s, less on laptop x8/x4 slots),
so a constant would mislead every plan. Each figure is measured once with a short timed copy or
read, and kept in the user cache dir (``platformdirs``), keyed by what it depends on: the GPU's
name and driver for the link, the file system's device for the disk. A later run reads the file.
"""

from __future__ import annotations

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


def cache_dir() -> Path:
    import platformdirs
    return Path(platformdirs.user_cache_dir("newbie-lowvram", appauthor=False))


def _load(folder: Path) -> dict[str, float]:
    try:
        return {k: float(v) for k, v in json.loads((folder / CACHE_FILE).read_text()).items()}
    except (OSError, ValueError, AttributeError):
        return {}


def cached(key: str, measure: Callable[[], float], folder: Path | None = None) -> float:
    """The bandwidth (bytes/s) stored under ``key``, measured (and stored) the first time."""
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
        log.warning("could not keep the measured bandwidth in %s: %s", folder, e)
    log.info("measured %s: %.1f GB/s", key, value / 1e9)
    return value


def link_key(device: torch.device) -> str:
    """GPU name and driver: what the pinned copy bandwidth depends on (with the slot)."""
    name = torch.cuda.get_device_name(device)
    driver = getattr(torch._C, "_cuda_getDriverVersion", lambda: 0)()
    return f"link:{name}:driver {driver}"


def measure_link(device: torch.device, nbytes: int = LINK_PROBE_BYTES, repeats: int = 3) -> float:
    """Best of a few timed pinned host -> device copies, in bytes/s."""
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst.copy_(src, non_blocking=True)        # warm-up: the first copy maps the pages
    best = float("inf")
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src, non_blocking=True)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return nbytes / best


def link_bandwidth(device: torch.device, measure: Callable[[torch.device], float] = measure_link,
                   key: Callable[[torch.device], str] = link_key, folder: Path | None = None) -> float:
    """This machine's host -> GPU pinned copy bandwidth (bytes/s), measured once and cached."""
    return cached(key(device), lambda: measure(device), folder)


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
