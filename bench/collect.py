"""Bring one GPU visit's outputs into bench/, the inputs of bench/report.py.

    python bench/collect.py --final OUT/rb --peers OUT/p/peers.json --gguf OUT/gguf.json \
        --host-ram OUT/host_ram.json --lora OUT/lora.json --soak OUT/soak.log --parts OUT/parts.log

``results.json`` gets our rows (run_benchmarks.py --final) and the peer rows (forward_only) of
the same visit, ``extra.json`` the visit's profiles and drift; keys of the old extra.json that
this visit did not measure (official parity, attention parts) are kept, with their own dates.
The other files are copied as they are (the soak from its log, which outlives a time-out).

A visit that re-measured only the GGUF rows (with a few peers beside them) and/or host-RAM rows
leaves the other files alone:

    python bench/collect.py --gguf OUT/gguf.json --gguf-peers OUT/p/peers.json --gguf-note "..." \
        --host-ram OUT/host_ram.json --activation OUT/act_*.json
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from datetime import datetime, timezone
from pathlib import Path

BENCH = Path(__file__).resolve().parent


def _size(value) -> str:
    return value if isinstance(value, str) else f"{value}x{value}"


def peer_rows(path: Path, stamp: dict) -> list[dict]:
    """peers.json rows in results.json's schema: sizes as 'WxH', every row forward_only."""
    rows = json.loads(path.read_text())["rows"]
    return [{**r, "size": _size(r["size"]), "forward_only": True, **{k: r.get(k, v) for k, v in stamp.items()}}
            for r in rows]


def fused_parts(log: Path) -> list[dict]:
    """The ``fused {...}`` lines of forward_bench.py --parts."""
    out = []
    for line in log.read_text().splitlines():
        if line.startswith("fused "):
            out.append(json.loads(line[len("fused "):].replace("'", '"')))
    return out


def fp8_quant_from_log(log: Path) -> dict:
    """fp8_quant_bench.py's table: per variant, µs and GB/s per operand, and µs per block."""
    text = log.read_text().splitlines()
    header = next(l for l in text if l.startswith("operand")).split()[1:]
    operands = {}
    for line in text:
        cells = re.findall(r"([\d.]+)us/\s*(\d+)GB/s", line)
        if cells:
            name = line[: line.index(cells[0][0])].strip()
            operands[name] = {v: {"us": float(us), "gbps": float(gbps)} for v, (us, gbps) in zip(header, cells)}
    block = re.findall(r"([\d.]+)us", next(l for l in text if l.startswith("per block")))
    return {"variants": header, "operands": operands, "per_block_us": {v: float(x) for v, x in zip(header, block)}}


def decode_from_log(log: Path) -> list[dict]:
    """gguf_decode_bench.py's lines: type, variant, µs per joint layer, GB/s, × a copy, and whether
    the variant differed from the torch decode."""
    out = []
    for line in log.read_text().splitlines():
        m = re.match(r"(\S+)\s+(\S+)\s+([\d.]+) us\s+(\d+) GB/s\s+([\d.]+)x copy(.*)", line)
        if m:
            host = re.search(r"host ([\d.]+) us", m[6])
            out.append({"qtype": m[1], "variant": m[2], "us": float(m[3]), "gbps": float(m[4]),
                        "x_copy": float(m[5]), "differs": "DIFFERS" in m[6],
                        **({"host_us": float(host[1])} if host else {})})
    return out


def soak_from_log(log: Path) -> dict:
    """soak.py's summary rebuilt from its log, which outlives a time-out that cut the run short."""
    sys.path.insert(0, str(BENCH))
    from soak import summarize
    runs = [json.loads(line) for line in log.read_text().splitlines() if line.startswith('{"run"')]
    return {**summarize(runs), "note": "bench/soak.py; a run cut short by its time-out keeps the runs it finished"}


def row_key(row: dict) -> tuple:
    return row["row"], row["size"], row.get("dtype"), row.get("budget_gb"), bool(row.get("fp8_compute"))


def earlier_rows(old_rows: list[dict], new_rows: list[dict], visit: str) -> list[dict]:
    """Our rows of the earlier results.json that this visit did not measure again (a group it
    skipped: the cold first run, the seed recipes, ...), each marked with the visit that did."""
    measured = {row_key(r) for r in new_rows}
    return [{**r, "earlier_visit": r.get("earlier_visit", visit)} for r in old_rows
            if not r.get("forward_only") and row_key(r) not in measured]


def keep_earlier(extra: dict, old: dict, key: str) -> None:
    """A key this visit did not measure keeps the earlier extra.json's value, marked with its visit."""
    if key not in extra and key in old:
        extra[key] = old[key]
        extra[key + "_visit"] = old.get(key + "_visit", old.get("visit"))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--final", type=Path, help="run_benchmarks.py --final's --out folder")
    ap.add_argument("--peers", type=Path)
    ap.add_argument("--gguf", type=Path)
    ap.add_argument("--gguf-peers", type=Path,
                    help="without --final: peers.json of the visit that re-ran only the GGUF rows")
    ap.add_argument("--gguf-note", help="what changed for the GGUF rows, shown under their table")
    ap.add_argument("--host-ram", type=Path)
    ap.add_argument("--activation", type=Path, nargs="+", help="activation_memory.py's --out files")
    ap.add_argument("--lora", type=Path)
    ap.add_argument("--soak", type=Path, help="soak.log (or soak.json)")
    ap.add_argument("--parts", type=Path, help="forward_bench --parts log (fused rows)")
    ap.add_argument("--fp8-quant", type=Path, help="fp8_quant_bench.py's log")
    ap.add_argument("--throttle", type=Path, nargs="+", help="link_throttle_bench.py's --out (one per run)")
    ap.add_argument("--throttle-before", type=Path,
                    help="a throttle run of the same visit before a change, shown beside the runs (not in the fits)")
    ap.add_argument("--throttle-note", help="what changed between --throttle-before and --throttle")
    ap.add_argument("--ring-slots", type=Path, help="ring_slots.py's --out (three against two ring slots)")
    ap.add_argument("--forward", type=Path, help="forward_bench.py's forward.json (whole-forward variants)")
    ap.add_argument("--decode", type=Path, help="gguf_decode_bench.py's log")
    ap.add_argument("--earlier", nargs="*", default=[], metavar="KEY=WHEN",
                    help="extra.json keys given here that another lease measured (e.g. forward_variants='probe "
                         "lease, 13:55'): marked as such instead of as this visit")
    ap.add_argument("--commands", nargs="*", default=[], help="the visit's command lines, for BENCHMARKS.md")
    ap.add_argument("--into", type=Path, default=BENCH, help="where report.py reads them (default bench/)")
    ap.add_argument("--keep-rows", action="store_true",
                    help="keep the earlier results.json's rows of the groups this visit did not run, marked "
                         "with their visit (the peers are always this visit's)")
    args = ap.parse_args(argv)
    here = args.into
    if args.final is None:
        if not (args.gguf or args.host_ram or args.activation):
            ap.error("give --final and --peers (a whole visit), or --gguf / --host-ram / --activation alone "
                     "(a partial visit)")
        collect_partial(here, args.gguf, args.host_ram, args.gguf_peers, args.gguf_note, args.commands,
                        args.activation)
        return
    if args.peers is None:
        ap.error("--final needs --peers: every speed figure sits beside the peers of its visit")
    rows = json.loads((args.final / "results.json").read_text())
    old = json.loads((here / "extra.json").read_text()) if (here / "extra.json").exists() else {}
    if args.keep_rows and (here / "results.json").exists():
        rows += earlier_rows(json.loads((here / "results.json").read_text()), rows,
                             old.get("visit", "an earlier visit"))
    # Every file written here carries the same visit id; report.py marks a section whose file has
    # another id (one this collect did not rewrite) as measured in an earlier visit.
    stamp = {"date": rows[0]["date"], "machine": rows[0]["machine"]}
    peers = peer_rows(args.peers, stamp)              # rows of results.json: dated like ours, no visit id
    stamp["visit"] = datetime.now(timezone.utc).isoformat(timespec="minutes")
    (here / "results.json").write_text(json.dumps(rows + peers, indent=1) + "\n")
    (here / "peers.json").write_text(args.peers.read_text())
    extra = {**{k: old[k] for k in ("official_parity_cuda", "official_parity_date", "official_parity_note")
                if k in old},
             **json.loads((args.final / "extra.json").read_text()), **stamp, "commands": args.commands}
    for key in ("profiles", "drift", "forward_host"):   # a visit that skipped these keeps the earlier ones
        keep_earlier(extra, old, key)
    if "official_parity_cuda" in old and "official_parity_date" not in old:
        extra["official_parity_date"] = old.get("date", "")
    parts = {"attention": old.get("parts", {}).get("attention", []),
             "attention_date": old.get("parts", {}).get("attention_date", old.get("date", ""))}
    if args.parts:
        parts["fused"] = fused_parts(args.parts)
    elif "fused" in old.get("parts", {}):       # not measured this visit: the earlier figures stay
        parts["fused"] = old["parts"]["fused"]
        extra["parts_visit"] = old.get("parts_visit", old.get("visit"))
    extra["parts"] = parts
    if args.fp8_quant:
        extra["fp8_quant"] = fp8_quant_from_log(args.fp8_quant)
    elif "fp8_quant" in old:
        extra["fp8_quant"] = old["fp8_quant"]
    for key, path, read in (("forward_variants", args.forward, lambda p: json.loads(p.read_text())),
                            ("gguf_decode", args.decode, decode_from_log)):
        if path:
            extra[key], extra[key + "_visit"] = read(path), stamp["visit"]
        else:
            keep_earlier(extra, old, key)
    for item in args.earlier:
        key, _, when = item.partition("=")
        extra[key + "_visit"] = when or "an earlier visit"
    if not args.gguf and "gguf_note" in old:     # a note on the GGUF rows lives as long as they do
        extra["gguf_note"] = old["gguf_note"]
    (here / "extra.json").write_text(json.dumps(extra, indent=1) + "\n")
    if args.gguf:
        write_gguf(here, args.gguf, {"visit": stamp["visit"]})
    if args.host_ram:
        write_host_ram(here, args.host_ram, stamp)
    if args.activation:
        write_activation(here, args.activation, stamp)
    if args.lora:
        (here / "lora.json").write_text(json.dumps({"rows": json.loads(args.lora.read_text()), **stamp}, indent=1) + "\n")
    if args.throttle:
        write_throttle(here, args.throttle, args.throttle_before, args.throttle_note, stamp)
    if args.ring_slots:
        (here / "ring_slots.json").write_text(
            json.dumps({"rows": json.loads(args.ring_slots.read_text()), **stamp}, indent=1) + "\n")
    if args.soak:
        soak = json.loads(args.soak.read_text()) if args.soak.suffix == ".json" else soak_from_log(args.soak)
        (here / "soak.json").write_text(json.dumps({**soak, **stamp}, indent=1) + "\n")


def write_throttle(here: Path, runs: list[Path], before: Path | None, note: str | None, stamp: dict) -> None:
    """throttle.json: every run's rows (numbered), and a run from before a change with its note."""
    rows = [{**r, "run": k} for k, path in enumerate(runs, 1) for r in json.loads(path.read_text())]
    doc = {"rows": rows, **stamp}
    if before is not None:
        doc.update(before=json.loads(before.read_text()), before_note=note or "")
    (here / "throttle.json").write_text(json.dumps(doc, indent=1) + "\n")


def write_gguf(here: Path, path: Path, stamp: dict) -> None:
    """gguf_bench.py's --out as gguf.json, every row stamped with ``stamp`` (its visit)."""
    rows = json.loads(path.read_text())
    (here / "gguf.json").write_text(json.dumps([{**r, **stamp} for r in rows], indent=1) + "\n")


def write_host_ram(here: Path, path: Path, stamp: dict) -> None:
    """host_ram_bench.py's --out as host_ram.json, each row checked against its RAM budget."""
    rows = json.loads(path.read_text())
    for r in rows:          # budgets and peaks are both GiB (host_budget.py's "GB")
        if r.get("ram_budget_gb") is not None and "host_ram_peak_gb" in r:
            r["within_ram_budget"] = r["host_ram_peak_gb"] <= r["ram_budget_gb"]
    (here / "host_ram.json").write_text(json.dumps({"rows": rows, **stamp}, indent=1) + "\n")


def write_activation(here: Path, files: list[Path], stamp: dict, top: int = 8) -> None:
    """activation_memory.json: every run of the files, with the ``top`` largest allocating sites
    at each run's peak."""
    rows = [{**r, **({"live_at_peak": r["live_at_peak"][:top]} if "live_at_peak" in r else {})}
            for path in files for r in json.loads(path.read_text())]
    (here / "activation_memory.json").write_text(json.dumps({"rows": rows, **stamp}, indent=1) + "\n")


def collect_partial(here: Path, gguf: Path | None, host_ram: Path | None, peers: Path | None, note: str | None,
                    commands: list[str], activation: list[Path] | None = None) -> None:
    """A visit that ran only the GGUF rows and/or host-RAM rows: gguf.json / host_ram.json, and in
    extra.json the peers it ran beside the GGUF rows (``gguf_peers``), its note and commands.
    Every other file stays as the last whole visit left it."""
    visit = datetime.now(timezone.utc).isoformat(timespec="minutes")
    first = next((r for r in json.loads((gguf or host_ram or activation[0]).read_text()) if "machine" in r), {})
    stamp = {"date": first.get("date", visit[:10]), "machine": first.get("machine", "GPU"), "visit": visit,
             "visit_label": f"partial visit {visit}"}
    if gguf:
        write_gguf(here, gguf, stamp)
    if host_ram:
        write_host_ram(here, host_ram, stamp)
    if activation:
        write_activation(here, activation, stamp)
    if not gguf:
        return
    extra_path = here / "extra.json"
    extra = json.loads(extra_path.read_text()) if extra_path.exists() else {}
    extra["gguf_peers"] = [] if peers is None else [
        {k: r.get(k) for k in ("row", "size", "cfg", "budget_gb", "ms_per_step", "ms_min", "ms_max", "tflops",
                               "peak_reserved_gb")} for r in json.loads(peers.read_text())["rows"]]
    extra["gguf_peers_visit"] = visit
    extra["gguf_commands"] = commands
    if note:
        extra["gguf_note"] = note
    extra_path.write_text(json.dumps(extra, indent=1) + "\n")


if __name__ == "__main__":
    main()
