"""Host RAM as a budget: what 'auto' means, what each model's host copy will cost, and what the
process really used (VmHWM, pinned bytes, bytes read from disk).

The host plan simulates :class:`host_store.HostCache` exactly: models are placed in stage order
(encoders, then the DiT, then the VAE); a model whose host copy does not fit beside the ones
cached before it evicts the oldest first (so the encoders' copies go before the DiT's is built),
and each model gets the mode :func:`host_store.choose_host_mode` gives for the room left:
the whole model pinned, a pinned staging ring of a few blocks (read from disk every use), or
one pageable buffer (read from disk every use). The predicted peak is the process baseline plus
the largest sum of live host copies and that stage's other host tensors. Because the cache and
the plan run the same rule, a plan within its budget is a run within its budget.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from .budget import GiB, MiB, fmt_bytes
from .host_store import HostMode, choose_host_mode

# 'auto' leaves this much of the available RAM (or 10 % of the total, if larger) to the OS,
# ComfyUI and the page cache the disk-streamed modes read through.
HOST_MARGIN = 2 * GiB
# What the process holds beside the host copies of the weights. On the CPU: Python + torch
# (measured ~1.2-1.6 GiB). A CUDA process also maps the CUDA libraries (cuBLAS, cuDNN), its context
# and the compiled kernels: measured on an H200 (torch 2.11, 2026-12-02), VmHWM minus the pinned
# host copies over five whole 1024² generations was 2.26-3.05 GiB, so 3.25 GiB; with 1.5 GiB the
# plans were 1.2-1.4 GiB below what the runs used.
PROCESS_BASELINE = 1536 * MiB
CUDA_PROCESS_BASELINE = 3328 * MiB


def process_baseline(device_type: str) -> int:
    """The baseline of a process computing on ``device_type`` ("cuda", "cpu", ...)."""
    return CUDA_PROCESS_BASELINE if device_type == "cuda" else PROCESS_BASELINE


class HostBudgetTooSmallError(ValueError):
    """Even one block does not fit the RAM budget beside the process baseline."""


def meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes ({} where /proc is absent)."""
    out: dict[str, int] = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                parts = rest.split()
                if parts:
                    out[key] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    except OSError:
        return {}
    return out


def available_ram() -> tuple[int, int] | None:
    """(available, total) bytes: psutil where installed, else /proc/meminfo MemAvailable."""
    try:
        import psutil
        vm = psutil.virtual_memory()
        return int(vm.available), int(vm.total)
    except ImportError:
        info = meminfo()
        if "MemAvailable" in info and "MemTotal" in info:
            return info["MemAvailable"], info["MemTotal"]
    return None


def auto_host_budget(already_held: int = 0, margin: int | None = None) -> int | None:
    """Available RAM (plus what this process already holds in host copies, reusable) minus the
    margin; None where the OS does not say (no limit then)."""
    found = available_ram()
    if found is None:
        return None
    available, total = found
    if margin is None:
        margin = max(HOST_MARGIN, total // 10)
    return max(0, available + already_held - margin)


def auto_margin_text() -> str:
    found = available_ram()
    if found is None:
        return "auto: the OS reports no available RAM, so host RAM is not limited"
    available, total = found
    margin = max(HOST_MARGIN, total // 10)
    return (f"auto = available {fmt_bytes(available)} - margin {fmt_bytes(margin)} "
            f"(max of {fmt_bytes(HOST_MARGIN)} and 10 % of {fmt_bytes(total)})")


@dataclass(frozen=True)
class HostModel:
    """What one model asks of host RAM. ``extra_bytes``: host tensors beside its blocks while it
    runs (e.g. Gemma's embedding table); ``streamed_bytes_per_step``: block bytes copied to the
    GPU per sampling step (or per encode), which are read from disk unless the model is pinned."""
    name: str
    total_bytes: int
    largest_block: int
    streamed_bytes_per_step: int = 0
    extra_bytes: int = 0
    key: str = ""        # which host copy this is (its files); a cached copy with this key is replaced

    @property
    def copy_id(self) -> str:
        return self.key or self.name

    @property
    def minimum_budget(self) -> int:
        """The least RAM budget this model runs under (disk-streamed, one block buffer), less the baseline."""
        return self.extra_bytes + self.largest_block


@dataclass(frozen=True)
class HostRow:
    name: str
    mode: HostMode
    host_bytes: int
    pinned_bytes: int
    disk_bytes_per_step: int
    evicted: tuple[str, ...]
    streamed_bytes_per_step: int = 0     # copied host -> GPU per step, whatever the host mode

    def roofline_s(self, link_bps: float, disk_bps: float | None = None) -> float:
        """Seconds per step the copies need at least: the link, or the disk where blocks are
        read from it every use (the two overlap, so the slower one bounds)."""
        link = self.streamed_bytes_per_step / link_bps
        disk = self.disk_bytes_per_step / disk_bps if disk_bps else 0.0
        return max(link, disk)


@dataclass(frozen=True)
class HostPlan:
    budget: int | None
    baseline: int
    rows: tuple[HostRow, ...]
    predicted_peak: int
    budget_text: str = ""
    peak_cached: int = 0      # the most host-copy bytes the cache holds at once (its own accounting)

    def render(self, link_bps: float | None = None, disk_bps: float | None = None, link_given: bool = False) -> str:
        """The table; with bandwidths, each row's copy roofline in s/step too. ``link_given``: the
        link figure is the user's, not this machine's measurement (the heading says which)."""
        head = ("model", "host mode", "host bytes", "pinned", "disk read / step", "evicts")
        if link_bps:
            head += ("copy roofline s/step",)
        rows = [head] + [(r.name, r.mode.value, fmt_bytes(r.host_bytes), fmt_bytes(r.pinned_bytes),
                          fmt_bytes(r.disk_bytes_per_step), ", ".join(r.evicted) or "-")
                         + ((f"{r.roofline_s(link_bps, disk_bps):.3f}",) if link_bps else ())
                         for r in self.rows]
        widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        budget = fmt_bytes(self.budget) if self.budget is not None else "none"
        top = [f"host RAM budget  {budget}" + (f" ({self.budget_text})" if self.budget_text else ""),
               *([("given" if link_given else "measured") + f" link {link_bps / 1e9:.1f} GB/s"
                  + (f", {'measured ' if link_given else ''}disk {disk_bps / 1e9:.2f} GB/s" if disk_bps else "")]
                 if link_bps else []),
               f"predicted host peak  {fmt_bytes(self.predicted_peak)} (process baseline {fmt_bytes(self.baseline)})"]
        return "\n".join(top + lines)


def gb(n: int) -> str:
    """Bytes in the units of --ram-budget and the node's ram_budget_gb widget (GB = 2**30 bytes)."""
    return f"{n / GiB:.2f} GB" if n >= GiB // 10 else f"{n / MiB:.1f} MB"


def gb_up(n: int) -> str:
    """A budget to type in: ``n`` rounded up to 0.1 GB, so the figure given really fits."""
    return f"{-(-n * 10 // GiB) / 10:.1f} GB"


def plan_host(models: Sequence[HostModel], budget: int | None, *, baseline: int = PROCESS_BASELINE,
              cached: Sequence[tuple[str, int]] = (), staging_buffers: int = 2, pin: bool = True,
              budget_text: str = "") -> HostPlan:
    """Host mode per model, in stage order, as the host cache will choose them (module docstring).
    ``cached``: host copies already held (copy id, bytes), oldest first. Raises
    :class:`HostBudgetTooSmallError` before anything is read when some model cannot fit at all."""
    if budget is not None and models:
        need = baseline + max(m.minimum_budget for m in models)
        short = [m for m in models if budget - baseline < m.minimum_budget]
        if short:
            m = max(short, key=lambda x: x.minimum_budget)
            raise HostBudgetTooSmallError(
                f"RAM budget {gb(budget)} is too small for {m.name}: it needs at least {gb(need)} "
                f"(the process ~{gb(baseline)}, its other host tensors {gb(m.extra_bytes)} and one block "
                f"buffer {gb(m.largest_block)}, streamed from disk). Set --ram-budget (CLI) or ram_budget_gb "
                f"on the NewBie Memory Settings node to {gb_up(need)} or more (0 = auto), or use smaller "
                f"(fp8 or GGUF-quantised) files.")
    live: list[tuple[str, str, int]] = [(c, c, b) for c, b in cached]      # (copy id, label, bytes)
    rows, peak = [], baseline + sum(b for _, _, b in live)
    peak_cached = sum(b for _, _, b in live)
    for m in models:
        # This model's own copy replaces any older one of the same model (another layout).
        live = [x for x in live if x[0] != m.copy_id]
        store_budget = None if budget is None else budget - baseline - m.extra_bytes
        evicted = []
        if store_budget is not None:
            while live and sum(b for _, _, b in live) + m.total_bytes > store_budget:
                evicted.append(live.pop(0)[1])
        room = None if store_budget is None else store_budget - sum(b for _, _, b in live)
        mode = choose_host_mode(m.total_bytes, m.largest_block, room, staging_buffers)
        if mode is HostMode.PINNED:
            host = m.total_bytes
        elif mode is HostMode.STAGING:
            host = staging_buffers * m.largest_block
        else:
            host = m.largest_block
        pinned = host if pin and mode is not HostMode.DISK else 0
        disk = 0 if mode is HostMode.PINNED else m.streamed_bytes_per_step
        rows.append(HostRow(m.name, mode, host, pinned, disk, tuple(evicted), m.streamed_bytes_per_step))
        if host:
            live.append((m.copy_id, m.name, host))
        held = sum(b for _, _, b in live)
        peak_cached = max(peak_cached, held)
        peak = max(peak, baseline + held + m.extra_bytes)
    return HostPlan(budget, baseline, tuple(rows), peak, budget_text, peak_cached)


# -- what the process really did -------------------------------------------------------------

def bytes_read() -> int | None:
    """Bytes this process caused to be read from storage (/proc/self/io read_bytes); page-cache
    hits do not count, so a warm run reads ~0."""
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def pinned_bytes() -> int:
    """Host bytes this process holds page-locked through the host store."""
    from .host_store import _REGISTERED
    return sum(_REGISTERED.values())


def rss_bytes() -> int | None:
    try:
        with open(f"/proc/{os.getpid()}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
