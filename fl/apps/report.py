"""The application demo's summary as text (a per-round table, then site x method) and as a plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fl.apps.common import UNION
from fl.sizes import format_size

METHODS = ("local", "federated", "centralized")


def _grid(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]


def round_rows(summary: dict[str, Any]) -> list[str]:
    """One row per round: bytes moved, seconds, the global model's metric per site and union."""
    federated = summary["curves"]["federated"]
    sites = [key for key in federated[0] if key != UNION] + [UNION]
    head = ["round", "moved", "seconds", *sites]
    rows = [head, ["0", "-", "-", *(f"{federated[0][s]:.3f}" for s in sites)]]
    for number, scores in enumerate(federated[1:]):
        moved = format_size(summary["bytes_per_round"][number])
        seconds = f"{summary['round_seconds'][number]:.1f}"
        rows.append([str(number + 1), moved, seconds, *(f"{scores[s]:.3f}" for s in sites)])
    return _grid(rows)


def method_rows(summary: dict[str, Any]) -> list[str]:
    """Site x method: the paper's table."""
    rows = [["held-out data", *METHODS]]
    for site, scores in summary["metrics"].items():
        rows.append([site, *(f"{scores[m]:.3f}" for m in METHODS)])
    return _grid(rows)


def format_table(summary: dict[str, Any]) -> str:
    direction = "higher" if summary["higher_is_better"] else "lower"
    share = summary["exchanged_bytes"] / summary["model_bytes"]
    title = (
        f"{summary['task']}: FedAvg, {summary['sites']} sites over {summary['driver']}, "
        f"{summary['rounds']} rounds; {summary['metric']} ({direction} is better)"
    )
    sizes = (
        f"each site receives and sends {format_size(summary['exchanged_bytes'])} per round "
        f"({share:.1%} of the model's {format_size(summary['model_bytes'])})"
    )
    note = (
        "local: each site's own model (on the union row: the mean of the sites' models); "
        f"{summary['seconds']['total']:.0f} s in all"
    )
    return "\n".join([title, *round_rows(summary), "", sizes, "", *method_rows(summary), note])


def plot(summary: dict[str, Any], path: Path) -> None:
    """The metric per round on each site's held-out data: federated, local-only, centralized."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = summary["curves"]
    sites = [key for key in curves["federated"][0] if key != UNION]
    figure, axes = plt.subplots(1, len(sites) + 1, figsize=(4 * (len(sites) + 1), 3.4))
    for axis, site in zip(axes, [*sites, UNION], strict=True):
        rounds = range(len(curves["federated"]))
        axis.plot(rounds, [c[site] for c in curves["federated"]], "o-", label="federated")
        axis.plot(rounds, [c[site] for c in curves["centralized"]], "s--", label="centralized")
        for name, curve in curves["local"].items():
            axis.plot(rounds, [c[site] for c in curve], ":", label=f"local {name}")
        axis.set_title(f"held-out: {site}")
        if not summary["higher_is_better"]:
            axis.set_yscale("log")  # a local model's perplexity off its own text is far above
        axis.set_xlabel("round")
    axes[0].set_ylabel(summary["metric"])
    axes[-1].legend(fontsize="small")
    figure.suptitle(f"{summary['task']}: {summary['metric']} per round")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def markdown_table(summary: dict[str, Any]) -> str:
    """Site x method as a Markdown table (docs/applications.md)."""
    lines = [
        f"| held-out data | {' | '.join(METHODS)} |",
        "| --- |" + " ---: |" * len(METHODS),
    ]
    for site, scores in summary["metrics"].items():
        cells = " | ".join(f"{scores[m]:.3f}" for m in METHODS)
        lines.append(f"| {site} | {cells} |")
    return "\n".join(lines)


def main() -> None:
    """`python -m fl.apps.report SUMMARY.json [--plot OUT.png]`: the tables (and the plot) of a
    saved `tensorwire demo --task ... --json` summary."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("summary", type=Path)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    summary = json.loads(args.summary.read_text().strip().splitlines()[-1])
    print(format_table(summary), "", markdown_table(summary), sep="\n")
    if args.plot is not None:
        plot(summary, args.plot)


if __name__ == "__main__":
    main()
