"""The fan-out results as a markdown table and a plot of round time against the number of sites.

    python -m benchmarks.fanout_report benchmarks/results/fanout-*.json \\
        --plot benchmarks/results/fanout-round-time.png

Reads the JSON files `python -m benchmarks fanout` wrote, prints one table row per run (sorted by
mode, then sites) and, with matplotlib, plots the round time (send and gather stacked) against N
for direct and relayed runs, with each design's send floor (N or R models through the server's
uplink at its goodput, 1448 of every 1514 bytes) as a line. (No such floor is drawn for the whole
round: the results come back on the other direction of the link while the model still goes out.)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

__all__ = ["load", "main", "plot", "table"]

_COLUMNS = (
    "started (UTC)",
    "mode",
    "sites",
    "relays",
    "send s",
    "gather s",
    "round s",
    "server egress (models, transport)",
    "egress (interface)",
    "ingress (interface)",
    "uplink max / rate (1 s)",
    "server RSS +MiB",
    "relay RSS +MiB (max)",
    "site RSS +MiB (max)",
    "FedAvg match (max abs err)",
    "load before / after",
)


def load(paths: list[Path]) -> list[dict[str, Any]]:
    """The runs, direct first, then by sites."""
    runs = [json.loads(path.read_text()) for path in paths]
    runs = [run for run in runs if "round_seconds" in run]
    return sorted(
        runs,
        key=lambda run: (run["mode"] != "direct", run["clients"], run["relays"], run["started_at"]),
    )


def table(runs: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(_COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
    for run in runs:
        rss = run["rss"]
        fedavg = run["fedavg"]
        cells = [
            run["started_at"][11:16],
            run["mode"],
            str(run["clients"]),
            str(run["relays"]),
            f"{run['send_seconds']:.1f}",
            f"{run['gather_seconds']:.1f}",
            f"**{run['round_seconds']:.1f}**",
            f"{run['server_model_sends']:.2f}",
            f"{run['server_egress_models']:.2f}",
            f"{run['server_ingress_models']:.2f}",
            f"{run['uplink_check']['max_egress_over_rate']:.3f}",
            f"{rss['server']['peak_above_baseline_mib']:,.0f}",
            f"{rss['relay_max_above_baseline_mib']:,.0f}"
            if "relay_max_above_baseline_mib" in rss
            else "-",
            f"{rss['sites']['max_peak_above_baseline_mib']:,.0f}",
            f"{'yes' if fedavg['matches'] else 'NO'} ({fedavg.get('max_abs_error', 0):.1e})",
            f"{run['load_before'].split()[0]} / {run['load_after'].split()[0]}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(runs: list[dict[str, Any]], path: Path) -> str:
    """Round time (send and gather stacked, means over the runs) against sites, one bar group
    per mode; a whisker spans the round times of the runs when there are several."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "skipped: matplotlib is not installed"
    sites = sorted({run["clients"] for run in runs})
    modes = [mode for mode in ("direct", "relayed") if any(run["mode"] == mode for run in runs)]
    width = 0.8 / max(1, len(modes))
    figure, axes = plt.subplots(figsize=(9, 5))
    colours = {"direct": ("tab:blue", "lightsteelblue"), "relayed": ("tab:green", "lightgreen")}
    for offset, mode in enumerate(modes):
        by_sites: dict[int, list[dict[str, Any]]] = {}
        for run in runs:
            if run["mode"] == mode:
                by_sites.setdefault(run["clients"], []).append(run)
        xs = [index + (offset - (len(modes) - 1) / 2) * width for index, n in enumerate(sites)]
        send = [_mean(by_sites.get(n, []), "send_seconds") for n in sites]
        gather = [_mean(by_sites.get(n, []), "gather_seconds") for n in sites]
        dark, light = colours[mode]
        axes.bar(xs, send, width, color=dark, label=f"{mode}: send (mean)")
        axes.bar(xs, gather, width, bottom=send, color=light, label=f"{mode}: gather (mean)")
        for x, n in zip(xs, sites, strict=True):
            if n not in by_sites:
                continue
            rounds = [run["round_seconds"] for run in by_sites[n]]
            if len(rounds) > 1:  # the range of the round time over the runs
                axes.vlines(x, min(rounds), max(rounds), color="black", linewidth=1)
            label = f"{min(rounds):.0f}" + (f"-{max(rounds):.0f}" if len(rounds) > 1 else "")
            label += " s"
            if mode == "relayed":
                label += f"\n{by_sites[n][0]['relays']} relays"
            axes.annotate(label, (x, max(rounds)), ha="center", va="bottom", fontsize="small")
    first = runs[0]
    # TCP/IP headers: 1448 payload bytes per 1514 on the wire.
    goodput = first["uplink"]["rate_bps"] / 8 * 1448 / 1514
    model = first["model_bytes"]
    for mode in modes:
        peers = [n if mode == "direct" else _relays_for(runs, n) for n in sites]
        axes.plot(
            range(len(sites)),
            [count * model / goodput for count in peers],
            linestyle="--" if mode == "direct" else ":",
            color=colours[mode][0],
            label=f"{mode}: send floor, {'N' if mode == 'direct' else 'R'} models through the "
            "server's uplink",
        )
    axes.set_xticks(range(len(sites)), [str(n) for n in sites])
    axes.set(
        xlabel="sites (N)",
        ylabel="seconds",
        title=f"One FedAvg round, {first['model_size']} float32 model, server uplink "
        f"{first['uplink']['rate']}",
    )
    axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return str(path)


def _mean(runs: list[dict[str, Any]], key: str) -> float:
    return sum(run[key] for run in runs) / len(runs) if runs else 0.0


def _relays_for(runs: list[dict[str, Any]], sites: int) -> int:
    relayed = [
        run["relays"] for run in runs if run["mode"] == "relayed" and run["clients"] == sites
    ]
    return relayed[0] if relayed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--plot", type=Path, default=None, help="write the plot here (PNG)")
    args = parser.parse_args(argv)
    runs = load(args.files)
    if not runs:
        raise SystemExit("fanout_report: no completed runs in those files")
    print(table(runs))
    if args.plot is not None:
        print(f"\nplot: {plot(runs, args.plot)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
