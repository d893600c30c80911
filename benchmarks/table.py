"""The headline tables of benchmarks/README.md, each row measured beside its baselines in the
same run.

    python -m benchmarks table --size 2GiB              # the user's work, both loops
    python -m benchmarks table --synthetic --size 4GiB  # the core at its best, TLS off and on

Default: a real float32 state dict sent into a new dict (`--sink into`: into existing tensors)
for tcp, grpc and http on the stock asyncio loop and on uvloop; every row runs the bare socket
doing the same work, and for grpc and http the bare library too (benchmarks.bare). Lands
between `<!-- samework:start -->` and `<!-- samework:end -->`.
`--synthetic`: the synthetic stream into a digest sink, TLS off and on, against the bare
transport resending one block; lands between `<!-- table:start -->` and `<!-- table:end -->`.
Each table carries its command, date and machine, so the README shows how its figures were made.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
from pathlib import Path
from typing import Any

from benchmarks import stream
from benchmarks.probes import format_size, parse_size

README = Path(__file__).with_name("README.md")
START, END = "<!-- table:start -->", "<!-- table:end -->"
SAME_START, SAME_END = "<!-- samework:start -->", "<!-- samework:end -->"
COMBINATIONS = [(d, tls) for d in ("tcp", "grpc", "http") for tls in (False, True)]
SAME_WORK = [(d, loop) for d in ("tcp", "grpc", "http") for loop in ("asyncio", "uvloop")]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", type=parse_size, default=parse_size("2GiB"))
    parser.add_argument("--synthetic", action="store_true", help="the synthetic-stream table")
    parser.add_argument("--sink", choices=("dict", "into"), default="dict")
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs per row: the median run is shown, and the range"
    )
    parser.add_argument("--no-write", action="store_true", help="print only; leave README alone")


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.synthetic:
        rows = [_measure(driver, tls, args.size) for driver, tls in COMBINATIONS]
        table, markers = _markdown(rows, args.size), (START, END)
    else:
        rows = [_median_run(d, loop, args) for d, loop in SAME_WORK]
        table = _same_work_markdown(rows, args.size, args.sink, args.repeat)
        markers = (SAME_START, SAME_END)
    if not args.no_write:
        _write(table, *markers)
    return {"benchmark": "table", "rows": rows, "markdown": table}


def format_human(result: dict[str, Any]) -> str:
    """Without --json: the table itself (with --json, one parseable JSON object)."""
    return str(result["markdown"])


def _median_run(driver: str, loop: str, args: argparse.Namespace) -> dict[str, Any]:
    """The run with the median ratio of `repeat` (this machine is shared: one run is noise), with
    the range of every run's ratio."""
    runs = [_measure_same_work(driver, loop, args.size, args.sink) for _ in range(args.repeat)]
    runs.sort(key=lambda run: run["ratio"])
    median = dict(runs[len(runs) // 2])
    median["ratio_range"] = (runs[0]["ratio"], runs[-1]["ratio"])
    return median


def _measure_same_work(driver: str, loop: str, size: int, sink: str) -> dict[str, Any]:
    options = argparse.Namespace(
        driver=driver, size=size, tensor_size=256 * 2**20, seed=0, baseline=True, tls=False,
        timeout=600.0, cut_every=None, streams=1, source="dict", sink=sink, loop=loop,
    )  # fmt: skip
    return stream.run(options)


def _same_work_markdown(rows: list[dict[str, Any]], size: int, sink: str, repeat: int) -> str:
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    machine = f"{os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}"
    shown = format_size(size).replace(" ", "")
    target = "existing tensors" if sink == "into" else "a new dict"
    lines = [
        f"`python -m benchmarks table --size {shown}{' --sink into' if sink == 'into' else ''}"
        f" --repeat {repeat}` ({format_size(size)} float32 dict of 256 MiB tensors into {target},"
        f" two processes, loopback, {when}, {machine}, load {os.getloadavg()[0]:.1f}; each row the"
        f" median of {repeat} runs, every figure of a row from that one run, and the range of"
        " the ratio over all runs):",
        "",
        "| driver | loop | tensorwire MB/s | bare socket MB/s | ratio (range) | bare library MB/s"
        " | ratio to library | sender RSS MiB (above dict) | receiver RSS MiB (above dict) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        library = row.get("grpc_mb_s") or row.get("aiohttp_mb_s")
        low, high = row.get("ratio_range", (row["ratio"], row["ratio"]))
        library_ratio = row.get("ratio_to_grpc") or row.get("ratio_to_aiohttp")
        lines.append(
            f"| {row['driver']} | {row['loop']} | {row['throughput_mb_s']:,.0f}"
            f" | {row['socket_mb_s']:,.0f} | {row['ratio']:.2f} ({low:.2f}-{high:.2f})"
            f" | {f'{library:,.0f}' if library else '-'}"
            f" | {f'{library_ratio:.2f}' if library_ratio else '-'}"
            f" | {row['sender_peak_rss_mib']:,.0f} ({row['sender_above_dict_mib']:.0f})"
            f" | {row['receiver_peak_rss_mib']:,.0f} ({row['receiver_above_dict_mib']:.0f}) |"
        )
    return "\n".join(lines)


def _measure(driver: str, tls: bool, size: int) -> dict[str, Any]:
    options = argparse.Namespace(
        driver=driver, size=size, chunk_size=None, window=None, dtype="BF16", seed=0,
        baseline=True, tls=tls, timeout=600.0, cut_every=None, compression="auto",
        values="bytes", source="synthetic", sink=None, loop=None,
    )  # fmt: skip
    return stream.run(options)


def _markdown(rows: list[dict[str, Any]], size: int) -> str:
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    machine = f"{os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}"
    lines = [
        f"`python -m benchmarks table --size {format_size(size).replace(' ', '')}` "
        f"({format_size(size)} of synthetic bf16 per run, loopback, {when}, {machine}):",
        "",
        "| driver | TLS | tensorwire MB/s | bare transport MB/s | ratio | sender RSS MiB | "
        "receiver RSS MiB | digest |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['driver']} | {'mTLS' if row['tls'] else 'off'} | {row['throughput_mb_s']:,.0f}"
            f" | {row.get('raw_throughput_mb_s') or 0:,.0f} | {row.get('ratio') or 0:.2f}"
            f" | {row['sender_peak_rss_mib']:.0f} | {row['receiver_peak_rss_mib']:.0f}"
            f" | {'ok' if row['digest_ok'] else 'MISMATCH'} |"
        )
    return "\n".join(lines)


def _write(table: str, start: str, end: str) -> None:
    text = README.read_text()
    if start not in text:
        raise SystemExit(f"{README} has no {start} marker to write the table at")
    head, _, rest = text.partition(start)
    _, _, tail = rest.partition(end)
    README.write_text(f"{head}{start}\n{table}\n{end}{tail}")
