"""Peak memory over a long stream: RSS of sender and receiver sampled over the whole run.

    python -m benchmarks memory --size 128GiB --driver tcp --json

Streams a synthetic source (never stored) into a digest sink between two processes and writes
the RSS timelines as JSON and a PNG plot under benchmarks/results/, so one can see RSS stay flat
while 128 GiB goes by on a 24 GiB machine.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from benchmarks import stream
from benchmarks.probes import MIB, format_size, parse_size

RESULTS = Path(__file__).with_name("results")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--driver", choices=("tcp", "grpc", "http"), default="tcp")
    parser.add_argument("--size", type=parse_size, default=parse_size("32GiB"))
    parser.add_argument("--streams", type=int, default=1)
    parser.add_argument("--results-dir", type=Path, default=RESULTS)


def run(args: argparse.Namespace) -> dict[str, Any]:
    options = argparse.Namespace(
        driver=args.driver, size=args.size, chunk_size=None, window=None, dtype="BF16", seed=0,
        timeout=24 * 3600.0, cut_every=None, compression="off", values="bytes",
        streams=args.streams, quiet=getattr(args, "quiet", False),
    )  # fmt: skip
    settings = stream.settings_from(options)
    sender, receiver = stream.run_pair(settings)
    result = stream._summary(settings, sender, receiver)
    result["benchmark"] = "memory"
    timelines = {"sender": sender["rss_timeline"], "receiver": receiver["rss_timeline"]}
    result["files"] = _write(result, timelines, args.results_dir)
    return result


def _write(result: dict[str, Any], timelines: dict[str, Any], directory: Path) -> dict[str, str]:
    directory.mkdir(parents=True, exist_ok=True)
    stem = f"memory-{time.strftime('%Y%m%d-%H%M%S')}-{result['driver']}-{result['bytes'] >> 30}GiB"
    json_path = directory / f"{stem}.json"
    json_path.write_text(json.dumps({**result, "timelines": timelines}, indent=1))
    files = {"json": str(json_path)}
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return files | {"plot": "skipped: matplotlib is not installed"}
    figure, axes = plt.subplots(figsize=(8, 4))
    for side, points in timelines.items():
        axes.plot([t for t, _ in points], [rss / MIB for _, rss in points], label=side)
    title = f"{format_size(result['bytes'])} over {result['driver']}: RSS above baseline"
    axes.set(xlabel="seconds", ylabel="MiB", title=title)
    axes.set_ylim(bottom=0)
    axes.legend()
    plot = directory / f"{stem}-rss.png"
    figure.savefig(plot, dpi=100)
    plt.close(figure)
    return files | {"plot": str(plot)}
