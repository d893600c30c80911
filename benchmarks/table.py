"""Run the stream benchmark for every driver with TLS off and on, each against its bare transport
measured in the same run, and write the results table into benchmarks/README.md.

    python -m benchmarks table --size 4GiB

The table lands between the `<!-- table:start -->` and `<!-- table:end -->` markers, with the
command, the date and the machine, so the README always shows how its figures were made.
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
COMBINATIONS = [(d, tls) for d in ("tcp", "grpc", "http") for tls in (False, True)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", type=parse_size, default=parse_size("4GiB"))
    parser.add_argument("--no-write", action="store_true", help="print only; leave README alone")


def run(args: argparse.Namespace) -> dict[str, Any]:
    rows = [_measure(driver, tls, args.size) for driver, tls in COMBINATIONS]
    table = _markdown(rows, args.size)
    if not args.no_write:
        _write(table)
    print(table)
    return {"benchmark": "table", "rows": rows}


def _measure(driver: str, tls: bool, size: int) -> dict[str, Any]:
    options = argparse.Namespace(
        driver=driver, size=size, chunk_size=None, window=None, dtype="BF16", seed=0,
        baseline=True, tls=tls, timeout=600.0, cut_every=None, compression="auto",
        values="bytes",
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


def _write(table: str) -> None:
    text = README.read_text()
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    README.write_text(f"{head}{START}\n{table}\n{END}{tail}")
