"""Host side of the blocks: pinned per-block buffers, a staging ring, and a process-wide cache.

Three ways to hold a model's blocks in host RAM, chosen per model under a host budget:

- ``PINNED``: one pinned buffer per block holding the whole block in storage layout. Copies
  are true async DMA; a second generation reads nothing from disk (the store is cached).
- ``STAGING``: a few pinned staging buffers; each use reads the block from the memory-mapped
  file (``read_block``), packs it into a free staging buffer and copies from there. Host RAM
  stays at a few blocks; the page cache does the rest.
- ``DISK``: one ordinary (pageable) buffer, re-filled from the file each use. For when even a
  pinned staging ring does not fit.

Pinned buffers are registered with ``cudaHostRegister`` on an ordinary allocation, because
torch's pinned allocator rounds every request up to a power of two (a 175 MB block would take
256 MB). Packing copies tensor by tensor from ``read_block``'s mmap-backed tensors and drops
each one at once, and the reader's memory maps are dropped every few blocks (``drop_maps``),
so a model never has two full copies in host RAM.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Iterable, MutableMapping, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import torch

from ..file_identity import file_identity
from .budget import fmt_bytes
from .copy_engine import CopyEngine
from .fp8 import pack_block
from .layout import BlockLayout

log = logging.getLogger(__name__)

ReadBlock = Callable[[int], MutableMapping[str, torch.Tensor]]


class HostMode(str, Enum):
    PINNED = "pinned"
    STAGING = "staging"
    DISK = "disk"


def host_ram_peak() -> int | None:
    """This process's peak resident set (VmHWM) in bytes, or None where /proc is absent."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@dataclass(frozen=True)
class CacheKey:
    """Identifies one model's host copy: its files (path, size, mtime), key set and storage."""
    files: tuple[tuple[str, int, int], ...]
    keys: int
    storage: str


def copy_id(key: CacheKey) -> str:
    """What names one model's host copy across layouts: its first file (the plan uses the same)."""
    return key.files[0][0] if key.files else repr(key)


def cache_key(paths: Iterable[os.PathLike | str], keys: Iterable[str], storage: str) -> CacheKey:
    files = tuple(file_identity(p) for p in paths)
    return CacheKey(files, hash(tuple(sorted(keys))), str(storage))


def alloc_host(nbytes: int, pin: bool) -> torch.Tensor:
    """A 1-D uint8 host buffer; pinned (page-locked) at its exact size when ``pin``."""
    buf = torch.empty(nbytes, dtype=torch.uint8)
    if pin:
        rc = torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), nbytes, 0)
        if int(getattr(rc, "value", rc)) != 0:
            log.warning("cudaHostRegister failed (%s); falling back to torch's pinned allocator", rc)
            return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        _REGISTERED[buf.data_ptr()] = nbytes
    return buf


def free_host(buf: torch.Tensor) -> None:
    if _REGISTERED.pop(buf.data_ptr(), None) is not None:
        torch.cuda.cudart().cudaHostUnregister(buf.data_ptr())


_REGISTERED: dict[int, int] = {}


def choose_host_mode(total_bytes: int, max_block_bytes: int, host_budget: int | None,
                     staging_buffers: int = 2) -> HostMode:
    """Whole pinned copy if it fits the host budget, else a pinned staging ring, else disk."""
    if host_budget is None or total_bytes <= host_budget:
        return HostMode.PINNED
    if staging_buffers * max_block_bytes <= host_budget:
        return HostMode.STAGING
    return HostMode.DISK


class HostBlockStore:
    """One model's blocks on the host in storage layout, handed out one block at a time."""

    def __init__(self, layouts: Sequence[BlockLayout], read_block: ReadBlock, mode: HostMode | str,
                 pin: bool | None = None, staging_buffers: int = 2):
        self.layouts = list(layouts)
        self.read_block = read_block
        self.mode = HostMode(mode)
        self.pin = torch.cuda.is_available() if pin is None else pin
        self.reads = 0
        self._blocks: list[torch.Tensor] = []
        self._staging: list[torch.Tensor] = []
        self._events: list[object] = []
        self._next = 0
        self._current = 0
        biggest = max(l.nbytes for l in self.layouts)
        if self.mode is HostMode.PINNED:
            try:
                for i, layout in enumerate(self.layouts):
                    self._blocks.append(alloc_host(layout.nbytes, self.pin))
                    self._fill(i, self._blocks[-1])
                    if i % 8 == 7:
                        self._drop_maps()     # keep the mapped pages to a few blocks while packing
                self._drop_maps()
            except BaseException:
                self.close()   # unregister what was pinned before the failure
                raise
        else:
            n = staging_buffers if self.mode is HostMode.STAGING else 1
            pin_staging = self.pin and self.mode is HostMode.STAGING
            self._staging = [alloc_host(biggest, pin_staging) for _ in range(n)]
            self._events = [None] * n
        log.info("host store: %d blocks, %s, %s of host RAM", len(self.layouts), self.mode.value,
                 fmt_bytes(self.host_bytes))

    @property
    def host_bytes(self) -> int:
        return sum(b.numel() for b in self._blocks) + sum(b.numel() for b in self._staging)

    def _fill(self, index: int, buf: torch.Tensor) -> None:
        tensors = self.read_block(index)
        self.reads += 1
        pack_block(tensors, self.layouts[index], buf)   # pops (drops) every source tensor
        del tensors
        if self.mode is not HostMode.PINNED:
            self._drop_maps()

    def _drop_maps(self) -> None:
        """Let the reader drop its memory maps: pages of a mapped file count in this process's
        resident set (VmHWM) until unmapped, so a model read through a map would otherwise sit
        in RAM twice, once packed here and once as mapped file pages."""
        drop = getattr(self.read_block, "drop_maps", None)
        if drop is not None:
            drop()

    def acquire(self, index: int, engine: CopyEngine) -> torch.Tensor:
        """Host buffer holding block ``index`` (storage layout), valid until :meth:`release`."""
        if self.mode is HostMode.PINNED:
            return self._blocks[index][: self.layouts[index].nbytes]
        k = self._current = self._next
        self._next = (k + 1) % len(self._staging)
        # The CPU is about to overwrite this staging buffer: the copy that last read it must have
        # landed. It was issued len(staging) blocks ago, so this rarely waits.
        engine.host_wait(self._events[k])
        buf = self._staging[k][: self.layouts[index].nbytes]
        self._fill(index, buf)
        return buf

    def release(self, index: int, copy_done: object) -> None:
        """``copy_done``: the side-stream event after the copy that read the acquired buffer."""
        if self.mode is not HostMode.PINNED:
            self._events[self._current] = copy_done

    def close(self) -> None:
        if self._blocks or self._staging:
            if any(b.data_ptr() in _REGISTERED for b in self._blocks + self._staging):
                torch.cuda.synchronize()   # no DMA may still read a buffer we unregister and free
        for buf in self._blocks + self._staging:
            free_host(buf)
        self._blocks, self._staging = [], []


class HostCache:
    """Process-wide cache of host stores under one host-RAM budget (least recently used goes)."""

    def __init__(self) -> None:
        self._stores: OrderedDict[CacheKey, HostBlockStore] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self.peak = 0     # most bytes held at once since the last reset_peak (tests compare the plan)

    def used(self) -> int:
        return sum(s.host_bytes for s in self._stores.values())

    def __len__(self) -> int:
        """How many model copies are held (one per model: a leak shows as a second)."""
        return len(self._stores)

    def reset_peak(self) -> None:
        self.peak = self.used()

    def entries(self) -> list[tuple[str, int]]:
        """(copy id, host bytes) per cached store, oldest first; the id is the first file's path."""
        return [(copy_id(k), s.host_bytes) for k, s in self._stores.items()]

    def make_room(self, host_budget: int | None, keep: CacheKey | None = None) -> None:
        """Evict the oldest stores (never ``keep``) until what is held fits ``host_budget``; a stage
        with other host tensors (an embedding table, the VAE) calls this before it loads them."""
        if host_budget is None:
            return
        for old_key in [k for k in self._stores if k != keep]:
            if self.used() <= host_budget:
                break
            old = self._stores.pop(old_key)
            log.info("host cache: evicting %s (%s)", old_key.files[:1], fmt_bytes(old.host_bytes))
            old.close()

    def drop_files(self, paths: Iterable[os.PathLike | str]) -> int:
        """Close and forget every store read from any of ``paths`` (their model was unloaded);
        returns the host bytes freed (pinned memory is unregistered)."""
        wanted = {str(Path(p).resolve()) for p in paths}
        freed = 0
        for key in [k for k in self._stores if any(f[0] in wanted for f in k.files)]:
            store = self._stores.pop(key)
            freed += store.host_bytes
            store.close()
        return freed

    def get(self, key: CacheKey, layouts: Sequence[BlockLayout], read_block: ReadBlock,
            host_budget: int | None = None, pin: bool | None = None) -> HostBlockStore:
        if key in self._stores:
            self.hits += 1
            self._stores.move_to_end(key)
            self.make_room(host_budget, keep=key)   # this stage's other host tensors may need room
            return self._stores[key]
        self.misses += 1
        # One model, one host copy: a copy of the same files in another layout (bf16 vs fp8,
        # another compute dtype) goes before the new one is built.
        for other in [k for k in self._stores if key.files and k.files == key.files]:
            log.info("host cache: replacing %s (%s layout)", other.files[:1], other.storage)
            self._stores.pop(other).close()
        total = sum(l.nbytes for l in layouts)
        biggest = max(l.nbytes for l in layouts)
        if host_budget is not None:
            while self._stores and self.used() + total > host_budget:
                old_key, old = self._stores.popitem(last=False)
                log.info("host cache: evicting %s (%s)", old_key.files[:1], fmt_bytes(old.host_bytes))
                old.close()
        room = None if host_budget is None else host_budget - self.used()
        store = HostBlockStore(layouts, read_block, choose_host_mode(total, biggest, room), pin=pin)
        self._stores[key] = store
        self.peak = max(self.peak, self.used())
        return store

    def clear(self) -> None:
        for store in self._stores.values():
            store.close()
        self._stores.clear()


HOST_CACHE = HostCache()
