"""Dispatch `python -m benchmarks <name> [options]` to benchmarks/<name>.py.

Each benchmark module exposes `add_arguments(parser)` and `run(args) -> dict`; the result is printed
as one JSON object with `--json`, or as aligned key/value lines otherwise.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import Any

BENCHMARKS = {
    "codec": "frame serializer and parser throughput on 4 MiB payload frames",
    "stream": "stream a synthetic state dict between two processes over a driver",
    "wan": "stream a synthetic state dict over an emulated WAN (network namespaces; needs root)",
    "memory": "peak RSS of sender and receiver over a long stream, plotted over time",
    "table": "every driver with TLS off and on against its bare transport; writes README table",
    "compress": "per-chunk compression: ratio and MB/s, plain vs byte-grouped zstd",
    "fl-memory": "FL server peak RSS and anonymous memory over a job, sampled from outside",
    "fanout": "one FedAvg round to N sites behind a rate-limited uplink, direct or via relays",
}


def _print_human(result: dict[str, Any]) -> None:
    width = max(len(key) for key in result)
    for key, value in result.items():
        shown = f"{value:,.2f}" if isinstance(value, float) else value
        print(f"{key:<{width}}  {shown}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    commands = parser.add_subparsers(dest="benchmark", required=True)
    for name, help_text in BENCHMARKS.items():
        module = importlib.import_module(f"benchmarks.{name.replace('-', '_')}")
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--json", action="store_true", help="print one JSON object")
        sub.add_argument(
            "--quiet", "-q", action="store_true", help="no progress bar (none off a terminal)"
        )
        module.add_arguments(sub)
        sub.set_defaults(module=module)
    args = parser.parse_args(argv)
    result = args.module.run(args)
    if args.json:
        print(json.dumps(result))
    elif hasattr(args.module, "format_human"):  # a benchmark that prints its own table
        print(args.module.format_human(result))
    else:
        _print_human(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
