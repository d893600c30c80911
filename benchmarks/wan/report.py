"""Results of a WAN run on disk: the JSON (with timelines), a markdown table row, PNG plots.

    benchmarks/results/wan-<time>-<profile>-<driver>-s<streams>.json      result + timelines
    benchmarks/results/wan.md                                            one row per run
    benchmarks/results/wan-<...>-throughput.png, wan-<...>-rss.png       with matplotlib

Plots need matplotlib; without it the run still writes the JSON and the table and says so.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from benchmarks.probes import MIB

__all__ = ["TABLE_COLUMNS", "link_throughput_series", "table_row", "write_results"]

TABLE_COLUMNS = (
    "profile",
    "driver",
    "streams",
    "bytes",
    "seconds",
    "throughput_mb_s",
    "link_mb_s",
    "link_utilization",
    "raw_tcp_mb_s",
    "rtt_ms",
    "congestion_control",
    "sender_peak_rss_mib",
    "receiver_peak_rss_mib",
    "digest_ok",
    "emulation_validated",
)


def table_row(result: dict[str, Any]) -> str:
    """The result as one markdown table row (missing figures as an em dash)."""
    cells = [str(result.get(column, "—")) for column in TABLE_COLUMNS]
    return "| " + " | ".join(cells) + " |"


def _table_header() -> str:
    return "| " + " | ".join(TABLE_COLUMNS) + " |\n|" + "---|" * len(TABLE_COLUMNS) + "\n"


def link_throughput_series(
    timeline: list[tuple[float, int]], offset_s: float, bin_s: float
) -> list[tuple[float, float]]:
    """(seconds since `offset_s`, MB/s) from the forwarder's (seconds, bytes per bin) timeline."""
    return [
        (round(t - offset_s, 3), nbytes / bin_s / 1e6) for t, nbytes in timeline if t >= offset_s
    ]


def write_results(
    result: dict[str, Any], timelines: dict[str, Any], directory: Path
) -> dict[str, str]:
    """Write the run's files under `directory`; their paths by kind."""
    directory.mkdir(parents=True, exist_ok=True)
    stem = "wan-{}-{}-{}-s{}".format(
        time.strftime("%Y%m%d-%H%M%S"), result["profile"], result["driver"], result["streams"]
    )
    paths = {"json": str(directory / f"{stem}.json"), "table": str(directory / "wan.md")}
    Path(paths["json"]).write_text(json.dumps({**result, "timelines": timelines}, indent=1))
    table = Path(paths["table"])
    with table.open("a") as rows:
        if table.stat().st_size == 0:
            rows.write(_table_header())
        rows.write(table_row(result) + "\n")
    paths |= _plot(stem, result, timelines, directory)
    return paths


def _plot(
    stem: str, result: dict[str, Any], timelines: dict[str, Any], directory: Path
) -> dict[str, str]:
    try:
        import matplotlib  # type: ignore[import-not-found, unused-ignore]

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        return {"plots": "skipped: matplotlib is not installed"}
    title = f"{result['profile']} / {result['driver']} / {result['streams']} stream(s)"
    paths = {}
    for kind, series, label in (
        ("throughput", {"link a->b": timelines.get("link_mb_s", [])}, "MB/s on the link"),
        ("rss", _rss_series(timelines), "RSS above baseline (MiB)"),
    ):
        figure, axes = plt.subplots(figsize=(8, 4))
        for name, points in series.items():
            axes.plot([p[0] for p in points], [p[1] for p in points], label=name)
        if kind == "throughput" and result.get("link_mb_s"):
            axes.axhline(result["link_mb_s"], linestyle="--", color="grey", label="link rate")
        if kind == "throughput":
            _shade_probe_rtt(axes, result.get("bbr_probe_rtt", []))
        axes.set(xlabel="seconds since the transfer started", ylabel=label, title=title)
        axes.legend()
        path = directory / f"{stem}-{kind}.png"
        figure.savefig(path, dpi=100)
        plt.close(figure)
        paths[kind] = str(path)
    return paths


def _shade_probe_rtt(axes: Any, spans: list[tuple[float, float]]) -> None:
    """Shade the times the sender's bbr held cwnd at 4 packets (PROBE_RTT, see tcpstate.py)."""
    for index, (start, end) in enumerate(spans):
        label = "sender in bbr PROBE_RTT (cwnd 4)" if index == 0 else None
        axes.axvspan(start, end, color="tab:orange", alpha=0.3, linewidth=0, label=label)


def _rss_series(timelines: dict[str, Any]) -> dict[str, list[tuple[float, float]]]:
    return {
        side: [(t, nbytes / MIB) for t, nbytes in timelines.get(f"{side}_rss", [])]
        for side in ("sender", "receiver")
    }
