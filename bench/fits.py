"""'What fits your PC': VRAM x RAM x PCIe link -> settings and expected s/image, as Markdown.

A roofline projection from the GPU machine's rows of bench/results.json (an H100 or H200), not a
measurement on those PCs. Per row, the DiT's s/step is bounded below by its own s/step measured
there at that budget (streaming and decode overheads included; that machine's 55 GB/s link hides
its copies) and by the bytes
streamed per step over the user's link (and, where its host copy cannot
stay pinned in RAM, over the disk): s/step = max(compute, streamed / link[, streamed / disk]).
s/image = 28 steps plus the encode/decode time measured in the same row. GGUF files come from
bench/gguf.json (sampling s/step, bytes per step and peak per budget, 1024² CFG) with their
host-RAM peak from the whole generations of bench/host_ram.json.

    python bench/fits.py                       # the table, from bench/results.json (+ gguf, host RAM)
    python bench/fits.py --smoke               # a built-in two-row sample, for CI
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

RESULTS = Path(__file__).with_name("results.json")
GGUF = Path(__file__).with_name("gguf.json")
HOST_RAM = Path(__file__).with_name("host_ram.json")
THROTTLE = Path(__file__).with_name("throttle.json")
VRAM_GB = (4, 8, 16)
RAM_GB = (8, 12, 16, 32)
STORAGES = ("bf16", "fp8", "gguf-q8_0", "gguf-q4_k")     # ties go to the earlier (more exact) one
GGUF_FILES = {"gguf-q8_0": "Q8_0", "gguf-q4_k": "Q4_K"}
LINKS_GBPS = (12, 25, 50)
STEPS = 28
GIB = 2**30
HOST_MARGIN_GB = 2.0          # what 'auto' leaves to the OS (placement.host_budget.HOST_MARGIN)
PROCESS_BASELINE_GB = 3.25    # a CUDA process beside its host copies (placement.host_budget.CUDA_PROCESS_BASELINE)
VRAM_HEADROOM_GB = 0.75       # a card's CUDA context and the desktop: a row must peak below size - this
# A storage later in STORAGES (less exact) is picked only when this much faster per image: whole
# generations of one row differ by 2-3 % between visits (bf16 resident 4.19 / 4.27 s, H100 2026-12-07)
TIE_BAND = 0.05


@dataclass(frozen=True)
class Row:
    dtype: str
    budget_gb: float | None
    peak_vram_gb: float
    s_per_step: float
    streamed_bytes_per_step: int
    whole_s: float
    host_ram_peak_gb: float
    resident_blocks: int = 0      # of n_blocks: the streamed bytes cover the others only
    n_blocks: int = 0

    @property
    def dit_bytes(self) -> int:
        """The whole DiT's block bytes, scaled up from the blocks this row streamed."""
        streamed = self.n_blocks - self.resident_blocks
        if self.n_blocks == 0 or streamed <= 0:
            return self.streamed_bytes_per_step
        return self.streamed_bytes_per_step * self.n_blocks // streamed


@dataclass(frozen=True)
class Fit:
    vram_gb: int
    ram_gb: int
    link_gbps: int
    dtype: str
    budget_gb: float | None
    s_per_step: float
    s_per_image: float
    bound: str
    host_note: str
    s_per_step_checked: float | None = None    # with the throttled check's overlap loss (overlap_loss)


def overlap_loss(throttle: Path = THROTTLE) -> float | None:
    """How much of the smaller of compute and copy time the throttled runs lost on top of the
    larger one (bench/link_throttle_bench.py): max over its rows of (measured - max(c, t)) / min(c, t),
    c the row's unthrottled step and t its bytes over the link. None when there is no such file.
    Copies and compute overlap worse than max() assumes when the two are close (H200, 2026-12-02:
    up to 0.49 at 25 GB/s)."""
    if not throttle.exists():
        return None
    rows = json.loads(throttle.read_text())["rows"]
    losses = []
    for r in rows:
        c, t = r["s_per_step_unthrottled"], r["bytes_h2d_per_step"] / (r["link_gbps"] * 1e9)
        losses.append(max(0.0, (r["s_per_step"] - max(c, t)) / min(c, t)))
    return max(losses) if losses else None


def load_rows(path: Path) -> list[Row]:
    """The steady 1024² CFG pipeline rows (not the first-run compile row, not the seed recipes)."""
    rows = []
    for r in json.loads(Path(path).read_text()):
        if r.get("size") != "1024x1024" or not r.get("cfg") or r.get("row") not in ("resident", "ours"):
            continue
        if r.get("dtype") not in ("bf16", "fp8") or r.get("storage", r["dtype"]).startswith("gguf"):
            continue
        rows.append(Row(r["dtype"], r["budget_gb"], r["peak_vram_gb"], r["s_per_step"],
                        int(r["streamed_bytes_per_step"]), r["whole_s"], r.get("host_ram_peak_gb") or 0.0,
                        r.get("resident_blocks", 0), r.get("n_blocks", 0)))
    return rows


def load_gguf_rows(pipeline: list[Row], gguf: Path = GGUF, host_ram: Path = HOST_RAM) -> list[Row]:
    """GGUF rows: sampling figures per budget (gguf.json), the host peak of the same storage's
    whole generations (host_ram.json), and the encode/decode seconds of the bf16 ``pipeline``
    row of the same budget: host_ram.json's generations run in fresh processes, model loading
    included, so their seconds are not comparable. A storage without a host-RAM row is left out."""
    if not (Path(gguf).exists() and Path(host_ram).exists()):
        return []
    encode_decode = {r.budget_gb: r.whole_s - STEPS * r.s_per_step for r in pipeline if r.dtype == "bf16"}
    host = json.loads(Path(host_ram).read_text())
    host = host["rows"] if isinstance(host, dict) else host
    rows = []
    for r in json.loads(Path(gguf).read_text()):
        storage = r.get("storage", "")
        whole = [h for h in host if h.get("storage") == storage and h.get("temperature") == "warm"
                 and "host_ram_peak_gb" in h]          # not failed rows, nor rows standing for a same plan
        if storage not in GGUF_FILES or not whole or r.get("size") != "1024x1024" or not r.get("cfg"):
            continue
        budget = r["budget_gb"] if r["budget_gb"] in encode_decode else None
        other_s = encode_decode.get(budget, 0.0)
        rows.append(Row(storage, r["budget_gb"], r["peak_reserved_gb"], r["s_per_step"],
                        int(r["bytes_h2d_per_step"]) if r["budget_gb"] is not None else 0,
                        STEPS * r["s_per_step"] + other_s, max(h["host_ram_peak_gb"] for h in whole),
                        r.get("resident_blocks", 0), r.get("n_blocks", 0)))
    return rows


def _ram_budget(ram_gb: int) -> float:
    return ram_gb - max(HOST_MARGIN_GB, ram_gb / 10)


def fit(rows: list[Row], vram_gb: int, ram_gb: int, link_gbps: float, disk_gbps: float,
        loss: float | None = None) -> Fit | None:
    """The fastest storage whose row fits ``vram_gb``, projected to the link (module docstring);
    with ``loss`` (:func:`overlap_loss`) also the step as the throttled check saw such steps."""
    best = None
    for dtype in STORAGES:
        mine = [r for r in rows if r.dtype == dtype]
        fitting = [r for r in mine if r.peak_vram_gb <= vram_gb - VRAM_HEADROOM_GB]
        if not fitting:
            continue
        row = min(fitting, key=lambda r: r.streamed_bytes_per_step)     # the most resident that fits
        compute = row.s_per_step       # measured at that budget: its streaming and decode overheads too
        dit_bytes = max(r.dit_bytes for r in mine)       # all blocks, scaled from the rows that stream
        ram_budget = _ram_budget(ram_gb)
        link_s = row.streamed_bytes_per_step / (link_gbps * 1e9)
        terms = {"compute": compute, "link": link_s}
        if row.host_ram_peak_gb <= ram_budget:
            note = "all models stay in RAM"
        elif PROCESS_BASELINE_GB + dit_bytes / GIB <= ram_budget:
            note = "encoders evicted before the DiT loads"
        else:
            note = f"DiT streamed from disk ({disk_gbps:g} GB/s assumed)"
            terms["disk"] = row.streamed_bytes_per_step / (disk_gbps * 1e9)
        bound = max(terms, key=terms.get)
        s_step = terms[bound]
        other_s = max(0.0, row.whole_s - STEPS * row.s_per_step)     # encode + decode, as measured
        checked = None
        if loss is not None:
            copies = max(v for k, v in terms.items() if k != "compute")
            checked = max(compute, copies) + loss * min(compute, copies) if copies else compute
        candidate = Fit(vram_gb, ram_gb, link_gbps, dtype, row.budget_gb, s_step, STEPS * s_step + other_s,
                        bound, note, checked)
        if best is None or candidate.s_per_image < best.s_per_image * (1 - TIE_BAND):
            best = candidate
    return best


def render(rows: list[Row], disk_gbps: float = 3.0, source: str = "bench/results.json",
           loss: float | None = None, machine: str = "NVIDIA H200") -> str:
    checked = "" if loss is None else (
        f" *checked s/step* adds {loss:.2f} x the smaller of the two, the worst the throttled-link check "
        "below lost on top of max() when copy and compute were close: read the two as a range.")
    out = ["## What fits your PC (roofline projection)", "",
           f"**A projection, not a measurement.** Compute s/step is measured on an {machine} ({source}); "
           f"each link's s/step is max(that compute, bytes streamed per step / link bandwidth). s/image = "
           f"{STEPS} steps + encode/decode as measured there (a slower GPU computes slower too, so "
           f"these are lower bounds for it). GGUF rows: sampling from bench/gguf.json, host RAM from "
           f"bench/host_ram.json, encode/decode from the bf16 row of the same budget; their latents drift from bf16 (Q8_0 little, Q4_K much: "
           f"see the GGUF section). 1024x1024, CFG; a row fits a card when its measured peak is "
           f"{VRAM_HEADROOM_GB} GB below the card's size.{checked}", "",
           "| VRAM | RAM | PCIe link | settings | s/step | " + ("checked s/step | " if loss is not None else "")
           + "s/image | bound by | host RAM |",
           "|---|---|---|---|---|---|---|---|" + ("---|" if loss is not None else "")]
    for vram in VRAM_GB:
        for ram in RAM_GB:
            for link in LINKS_GBPS:
                f = fit(rows, vram, ram, link, disk_gbps, loss)
                if f is None:
                    out.append(f"| {vram} GB | {ram} GB | {link} GB/s | no measured row fits | - | - | - | - |"
                               + (" - |" if loss is not None else ""))
                    continue
                out.append(f"| {vram} GB | {ram} GB | {link} GB/s | `{_settings(f, ram)}` | {f.s_per_step:.3f} | "
                           + (f"{f.s_per_step_checked:.3f} | " if loss is not None else "")
                           + f"{f.s_per_image:.1f} | {f.bound} | {f.host_note} |")
    return "\n".join(out)


def _settings(f: Fit, ram: int) -> str:
    budget = "(auto: all resident)" if f.budget_gb is None else f"--vram-budget {f.budget_gb:g}"
    files = (f"--dit ...-{GGUF_FILES[f.dtype]}.gguf --gemma ...-{GGUF_FILES[f.dtype]}.gguf"
             if f.dtype in GGUF_FILES else f"--dtype {f.dtype}")
    return f"{files} {budget} --ram-budget {_ram_budget(ram):.1f}"


def render_summary(rows: list[Row], disk_gbps: float = 3.0, link_gbps: int = 25) -> str:
    """The README's short form: one line per card and PC, the settings for a ``link_gbps`` link
    and the projected s/image over each link (the storage picked there when it differs)."""
    out = [f"| VRAM | RAM | settings (for a {link_gbps} GB/s link) | s/image at "
           + " / ".join(f"{k}" for k in LINKS_GBPS) + " GB/s |", "|---|---|---|---|"]
    for vram in VRAM_GB:
        for ram in RAM_GB:
            main = fit(rows, vram, ram, link_gbps, disk_gbps)
            if main is None:
                out.append(f"| {vram} GB | {ram} GB | no measured row fits | - |")
                continue
            times = []
            for link in LINKS_GBPS:
                f = fit(rows, vram, ram, link, disk_gbps)
                times.append(f"{f.s_per_image:.1f}" + ("" if f.dtype == main.dtype else f" ({f.dtype})"))
            out.append(f"| {vram} GB | {ram} GB | `{_settings(main, ram)}` | {' / '.join(times)} |")
    return "\n".join(out)


SMOKE_ROWS = [Row("bf16", None, 7.8, 0.129, 0, 4.44, 16.0), Row("bf16", 4, 3.8, 0.131, 4_851_722_240, 4.56, 16.0),
              Row("bf16", 2, 1.9, 0.133, 6_947_225_600, 5.11, 16.0),
              Row("fp8", None, 7.7, 0.127, 0, 4.19, 10.4), Row("fp8", 2, 1.9, 0.135, 3_832_965_120, 4.64, 10.4)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--disk-gbps", type=float, default=3.0, help="sequential read of the DiT's disk (NVMe ~3)")
    ap.add_argument("--smoke", action="store_true", help="render the built-in sample rows (CI)")
    ap.add_argument("--summary", action="store_true", help="the README's short table (one line per card and PC)")
    args = ap.parse_args(argv)
    if args.smoke:
        rows = SMOKE_ROWS
    else:
        rows = load_rows(args.results)
        rows += load_gguf_rows(rows)
    if not rows:
        print(f"no 1024x1024 CFG rows in {args.results}", file=sys.stderr)
        return 1
    if args.summary:
        print(render_summary(rows, args.disk_gbps))
        return 0
    machine = "example GPU" if args.smoke else json.loads(args.results.read_text())[0]["machine"]
    print(render(rows, args.disk_gbps, "built-in sample rows" if args.smoke else args.results.name,
                 None if args.smoke else overlap_loss(), machine))
    return 0


if __name__ == "__main__":
    sys.exit(main())
