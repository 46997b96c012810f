"""Check the "what fits your PC" link projection at one point by throttling the copy engine (issue 13).

The fits table (bench/fits.py) projects each PCIe link's s/step as max(the row's own step measured
on the H200, bytes streamed per step / link bandwidth). Here the H200's copy stream is made as
slow as a 12 or 25 GB/s link: after every host-to-device copy the side stream spins
(``torch.cuda._sleep``) for the time the slower link would still need, so compute sees the copy
finish when that link would have finished it. Each throttled row is planned for the throttled link
(``MemorySettings.link_gbps``), as a user's machine with that link would plan it, and set beside
its projection.

    python bench/link_throttle_bench.py /tmp/full --out $OUT/throttle.json
    python bench/link_throttle_bench.py --smoke        # CPU: the projection path on tiny files, no throttle
"""

from __future__ import annotations

import datetime
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from newbie_core.pipeline import StorageDType  # noqa: E402
from newbie_core.placement import CudaCopyEngine, use_expandable_segments  # noqa: E402
from newbie_core.placement import session as placement_session  # noqa: E402

from gguf_bench import sample_row  # noqa: E402
from host_ram_bench import STORAGES  # noqa: E402
from row_timing import pinned_bandwidth, sampling_bench_parser  # noqa: E402
from tiny_files import tiny_checkpoints  # noqa: E402

LINKS_GBPS = (12, 25)
ROWS = (("fp8", 2.0), ("fp8", 4.0), ("gguf-q4_k", 2.0))      # the fits table's picks for a 4 and 8 GB card


def throttle_seconds(nbytes: int, link_bps: float, native_bps: float) -> float:
    """How much longer ``nbytes`` take over ``link_bps`` than over this machine's own link."""
    return max(0.0, nbytes / link_bps - nbytes / native_bps)


class ThrottledCopyEngine(CudaCopyEngine):
    """The real side stream, kept busy after each host-to-device copy for as long as a
    ``link_bps`` link would still be copying (device-to-device copies are not throttled)."""

    def __init__(self, device: torch.device | str, link_bps: float, native_bps: float, cycles_per_s: float):
        super().__init__(device)
        self.link_bps, self.native_bps, self.cycles_per_s = link_bps, native_bps, cycles_per_s

    def copy(self, dst: torch.Tensor, src: torch.Tensor, side_only: bool = False) -> None:
        super().copy(dst, src, side_only)
        if src.device.type == "cpu":
            extra = throttle_seconds(src.numel() * src.element_size(), self.link_bps, self.native_bps)
            if extra > 0:
                with torch.cuda.stream(self.stream):
                    torch.cuda._sleep(int(extra * self.cycles_per_s))


def spin_cycles_per_second(device: torch.device) -> float:
    """``torch.cuda._sleep`` cycles per second on this GPU, timed with events."""
    cycles = 50_000_000
    torch.cuda._sleep(cycles // 10)                    # warm-up
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(cycles)
    end.record()
    end.synchronize()
    return cycles / (start.elapsed_time(end) / 1e3)


def throttle_rates(device: torch.device) -> tuple[float, float]:
    """This machine's pinned link (bytes/s) and spin cycles per second, what a
    :class:`ThrottledCopyEngine` needs; on the CPU nothing is throttled."""
    if device.type != "cuda":
        return float("inf"), 0.0
    return pinned_bandwidth(device), spin_cycles_per_second(device)


@contextmanager
def throttled_copies(device: torch.device, link_gbps: float | None, native_bps: float,
                     cycles_per_s: float) -> Iterator[None]:
    """Within it, placement's copy engines copy as slowly as a ``link_gbps`` link (nothing changes
    on the CPU or without a link figure)."""
    make = placement_session.make_engine
    if link_gbps is not None and device.type == "cuda":
        placement_session.make_engine = lambda d: ThrottledCopyEngine(d, link_gbps * 1e9, native_bps, cycles_per_s)
    try:
        yield
    finally:
        placement_session.make_engine = make


def projection(unthrottled: dict, link_bps: float) -> float:
    """fits.py's s/step for a link: the row's own measured step, or its copies over the link."""
    return max(unthrottled["s_per_step"], unthrottled["bytes_h2d_per_step"] / link_bps)


def file_for(root: Path, storage: str) -> tuple[Path, StorageDType]:
    """The DiT file and storage of a host_ram_bench storage name (one table for both benches)."""
    dit, _, dtype = STORAGES[storage]
    return root / "diffusion_models" / dit, StorageDType(dtype)


def main(argv: list[str] | None = None) -> int:
    args = sampling_bench_parser(__doc__, steps=10).parse_args(argv)
    use_expandable_segments()            # as the CLI runs: before the first CUDA allocation
    if args.smoke:
        root, device, size, steps, rows, links = tiny_checkpoints("throttle_").root, torch.device("cpu"), 64, 3, (("fp8", None),), (12,)
    else:
        root, device, size, steps, rows, links = Path(args.root), torch.device("cuda"), 1024, args.steps, ROWS, LINKS_GBPS
    native, cycles = throttle_rates(device)
    out = []
    for storage, budget in rows:
        path, dtype = file_for(root, storage)
        base = sample_row(path, device, budget, size, steps, storage=dtype)
        for link in links:
            link_bps = link * 1e9
            with throttled_copies(device, link, native, cycles):
                row = sample_row(path, device, budget, size, steps, storage=dtype, link_gbps=link)
            projected = projection(base, link_bps)
            out.append({"storage": storage, "budget_gb": budget, "link_gbps": link, "size": f"{size}x{size}",
                        "cfg": True, "steps": steps, "s_per_step": row["s_per_step"],
                        "chunks": row["chunks"], "resident_blocks": row["resident_blocks"],
                        "chunks_unthrottled": base["chunks"], "resident_blocks_unthrottled": base["resident_blocks"],
                        "s_per_step_unthrottled": base["s_per_step"], "bytes_h2d_per_step": base["bytes_h2d_per_step"],
                        "projected_s_per_step": projected, "x_projection": row["s_per_step"] / projected,
                        "throttled": device.type == "cuda", "native_link_gbps": native / 1e9,
                        "machine": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                        "date": datetime.date.today().isoformat()})
            print(json.dumps(out[-1]), flush=True)
    if args.out:
        args.out.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
