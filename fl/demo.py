"""`tensorwire demo`: a server and clients on loopback run FedAvg rounds of a real small task.

The server runs in this process; each client is its own process running fl/demo_client.py through
the Client API. The model is the task's MLP padded to `model_size` bytes, so each round streams
that much to and from every client. The summary has one row per round: bytes moved, throughput,
peak RSS above baseline of the server and of each client, the server's peak anonymous memory
(RssAnon: what it holds besides the page cache of its mmap'd model files) above baseline, and
the global model's accuracy.

Units: sizes and memory in MiB (2**20 bytes), throughput in MiB/s, in the table, the bars and the
JSON summary alike. On a terminal the server draws a bar per site: the model going out to it (the
site's receive) and its result coming back (the site's send). The clients' stderr is relayed
above those bars, as are this process's log lines, so no line splits a bar.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Any

from fl.client import ClientSettings
from fl.fedavg import FedAvg, RoundReport
from fl.model import FLModel, params_nbytes
from fl.rss import RssSampler, return_freed_memory
from fl.server import FLServer
from fl.sizes import parse_size
from fl.task import MLP, evaluate, held_out_data
from transport import progress
from transport.progress import mib

TABLE_WIDTH = 60  # the table fits here whatever the terminal; the per-site lines wrap to it
_POLL_SECONDS = 0.25


@dataclass
class DemoOptions:
    rounds: int = 3
    model_size: str = "1GiB"
    clients: int = 2
    driver: str = "tcp"
    progress: bool = True


def global_accuracy(model: FLModel) -> dict[str, float]:
    """The global model's accuracy on the held-out set (only the trained layers are loaded)."""
    network = MLP()
    assert isinstance(model.params, dict)
    layers = {name: t for name, t in model.params.items() if name.startswith("layers.")}
    network.load_state_dict(layers, strict=False)
    return {"accuracy": evaluate(network, *held_out_data())}


def run_demo(options: DemoOptions) -> dict[str, Any]:
    """Run the demo; returns the JSON-able summary."""
    padding = max(0, parse_size(options.model_size) - params_nbytes(MLP().state_dict()))
    return asyncio.run(_run(options, padding))


async def _run(options: DemoOptions, padding: int) -> dict[str, Any]:
    return_freed_memory()  # as the server daemon does: RSS follows what the server holds
    state_dict = MLP(padding_bytes=padding).state_dict()
    model_bytes = params_nbytes(state_dict)
    first_accuracy = global_accuracy(FLModel(params=state_dict))["accuracy"]
    memory = _Memory()
    bars = _SiteBars(options, model_bytes)
    fedavg = FedAvg(
        FLModel(params=state_dict),
        rounds=options.rounds,
        num_clients=options.clients,
        min_clients=options.clients,
        evaluate=global_accuracy,
        on_round=memory.round_done,
        on_round_start=bars.round_started,
    )
    async with FLServer(job="demo") as server:
        (url,) = await server.start([_listen_url(options.driver)])
        fedavg.attach(server)
        del state_dict  # the job's model is its file from here on (FedAvg lets go of it too)
        fedavg.open_state()  # written to the state directory before the baseline is taken
        children = _start_clients(url, options.clients, padding)
        try:
            memory.start()
            with bars.drawing(server):
                await fedavg.run()
        finally:
            memory.stop()
            await server.stop_clients("demo finished")
            await asyncio.to_thread(_reap, children)
    return _summary(options, model_bytes, first_accuracy, fedavg.history, memory)


def _listen_url(driver: str) -> str:
    if driver not in ("tcp", "grpc", "http"):
        raise ValueError(
            f"the demo runs over tcp, grpc or http (clients are processes), not {driver}"
        )
    return f"{driver}://127.0.0.1:0"


@dataclass
class _Child:
    process: subprocess.Popen[str]
    relay: threading.Thread


def _start_clients(url: str, count: int, padding: int) -> list[_Child]:
    children = []
    for site in range(count):
        settings = ClientSettings(server_url=url, site=f"site-{site}", heartbeat_interval=2.0)
        command = [sys.executable, "-m", "fl.demo_client", "--site", str(site)]
        command += ["--sites", str(count), "--padding-bytes", str(padding)]
        env = {**os.environ, **settings.environment()}
        process = subprocess.Popen(
            command, env=env, stderr=subprocess.PIPE, text=True, errors="replace"
        )
        assert process.stderr is not None
        relay = threading.Thread(target=relay_lines, args=(process.stderr,), daemon=True)
        relay.start()
        children.append(_Child(process, relay))
    return children


def relay_lines(source: IO[str]) -> None:
    """A client's stderr, line by line, onto ours above any bar drawn there (tqdm.write)."""
    from tqdm import tqdm

    for line in source:
        tqdm.write(line.rstrip("\n"), file=sys.stderr)


def _reap(children: list[_Child]) -> None:
    for child in children:
        try:
            child.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            child.process.kill()
            child.process.wait()
        child.relay.join(timeout=10)


class _SiteBars:
    """One bar per site on the server's terminal, following the transfers the server reports for
    it (fl/status.py's TransferProgress): the model out to the site, then its result back."""

    def __init__(self, options: DemoOptions, model_bytes: int) -> None:
        self.options = options
        self.model_bytes = model_bytes
        self.round = 0

    def round_started(self, number: int, clients: list[str]) -> None:
        self.round = number + 1

    def describe(self, site: str, direction: str) -> str:
        what = "model" if direction == "sent" else "result"
        return f"r{self.round}/{self.options.rounds} {site} {what}"

    def poll(self, server: FLServer, board: progress.BarBoard) -> None:
        for site in sorted(server.clients):
            transfer = server.clients[site].transfer
            if transfer is None:
                continue
            total = transfer.total or self.model_bytes
            done = total if transfer.finished else transfer.done
            board.show(site, self.describe(site, transfer.direction), done, total)

    @contextmanager
    def drawing(self, server: FLServer) -> Iterator[None]:
        """The bars while the block runs: a task polls the server's transfers."""
        board = progress.BarBoard(enabled=self.options.progress)

        async def follow() -> None:
            while True:
                self.poll(server, board)
                await asyncio.sleep(_POLL_SECONDS)

        task = asyncio.ensure_future(follow()) if board.enabled else None
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
            board.close()


class _Memory:
    """The server's peak RSS and anonymous RSS per round, each above the same baseline (taken
    when the job starts)."""

    def __init__(self) -> None:
        self.sampler: RssSampler | None = None
        self.server_peaks: list[float] = []
        self.server_anon_peaks: list[float] = []

    def start(self) -> None:
        self.sampler = RssSampler().start()

    def round_done(self, report: RoundReport) -> None:
        if self.sampler is None:
            return
        self.sampler.stop()
        self.server_peaks.append(self.sampler.peak_above_baseline_mib)
        self.server_anon_peaks.append(self.sampler.anon_peak_above_baseline_mib)
        baseline, anon_baseline = self.sampler.baseline, self.sampler.anon_baseline
        self.sampler = RssSampler()
        self.sampler.start()
        # every round against the same pre-job baselines
        self.sampler.baseline, self.sampler.anon_baseline = baseline, anon_baseline

    def stop(self) -> None:
        if self.sampler is not None:
            self.sampler.stop()


def _summary(
    options: DemoOptions,
    model_bytes: int,
    first_accuracy: float,
    history: list[RoundReport],
    memory: _Memory,
) -> dict[str, Any]:
    rounds = [_round_entry(report, memory, index) for index, report in enumerate(history)]
    return {
        "driver": options.driver,
        "clients": options.clients,
        "model_bytes": model_bytes,
        "initial_accuracy": round(first_accuracy, 4),
        "rounds": rounds,
    }


def _round_entry(report: RoundReport, memory: _Memory, index: int) -> dict[str, Any]:
    moved = report.bytes_sent + report.bytes_received
    return {
        "round": report.round + 1,
        "clients": report.succeeded,
        "failed": report.failed,
        "bytes_moved": moved,
        "seconds": round(report.seconds, 3),
        "throughput_mib_s": round(moved / max(report.seconds, 1e-9) / 2**20, 1),
        "server_peak_rss_mib": round(memory.server_peaks[index], 1),
        "server_peak_anon_mib": round(memory.server_anon_peaks[index], 1),
        "client_peak_rss_mib": {
            client: round(metrics.get("peak_rss_mib", 0.0), 1)
            for client, metrics in report.client_metrics.items()
        },
        "accuracy": round(report.metrics["accuracy"], 4),
        "client_accuracy": {
            client: round(metrics["accuracy"], 4)
            for client, metrics in report.client_metrics.items()
        },
    }


_HEAD = ["round", "moved", "secs", "MiB/s", "server", "anon", "sites", "acc"]


def format_table(summary: dict[str, Any], width: int | None = None) -> str:
    """The summary as a table, one row per round, that fits `width` columns (the terminal's,
    at most TABLE_WIDTH when None): memory columns are peak RSS above baseline in MiB, "sites" the
    largest client's; each site's own peaks follow, one line per site."""
    width = width or min(shutil.get_terminal_size((TABLE_WIDTH, 24)).columns, TABLE_WIDTH)
    rows = [_HEAD, ["0", *["-"] * (len(_HEAD) - 2), f"{summary['initial_accuracy']:.3f}"]]
    rows += [_table_row(entry) for entry in summary["rounds"]]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_HEAD))]
    gap = " " if sum(widths) + 2 * (len(widths) - 1) > width else "  "
    lines = [gap.join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join([*_title(summary, width), *lines, *_site_lines(summary, width)])


def _title(summary: dict[str, Any], width: int) -> list[str]:
    text = (
        f"FedAvg, {summary['clients']} clients over {summary['driver']}, model "
        f"{mib(summary['model_bytes'])} MiB. Sizes in MiB (2^20 B); memory: peak RSS above "
        f"baseline (anon: the server's RssAnon; sites: the largest client's)."
    )
    return textwrap.wrap(text, width)


def _table_row(entry: dict[str, Any]) -> list[str]:
    sites = entry["client_peak_rss_mib"].values()
    return [
        str(entry["round"]),
        mib(entry["bytes_moved"]),
        f"{entry['seconds']:.1f}",
        f"{entry['throughput_mib_s']:,.0f}",
        f"{entry['server_peak_rss_mib']:,.0f}",
        f"{entry['server_peak_anon_mib']:,.0f}",
        f"{max(sites, default=0.0):,.0f}",
        f"{entry['accuracy']:.3f}",
    ]


def _site_lines(summary: dict[str, Any], width: int) -> list[str]:
    """Each site's peak RSS above baseline per round, wrapped to `width`."""
    sites = sorted({site for entry in summary["rounds"] for site in entry["client_peak_rss_mib"]})
    if not sites:
        return []
    lines = ["client peak RSS MiB, rounds 1..:"]
    for site in sites:
        peaks = [entry["client_peak_rss_mib"].get(site) for entry in summary["rounds"]]
        cells = " ".join("-" if peak is None else f"{peak:,.0f}" for peak in peaks)
        lines += textwrap.wrap(f"{site}: {cells}", width, subsequent_indent="  ")
    return lines
