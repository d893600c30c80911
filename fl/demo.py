"""`tensorwire demo`: a server and clients on loopback run FedAvg rounds of a real small task.

The server runs in this process; each client is its own process running fl/demo_client.py through
the Client API. The model is the task's MLP padded to `model_size` bytes, so each round streams
that much to and from every client. The summary has one row per round: bytes moved, throughput,
peak RSS above baseline of the server and of each client, the server's peak anonymous memory
(RssAnon: what it holds besides the page cache of its mmap'd model files) above baseline, and
the global model's accuracy.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm

from fl.client import ClientSettings
from fl.fedavg import FedAvg, RoundReport
from fl.model import FLModel, params_nbytes
from fl.rss import RssSampler, return_freed_memory
from fl.server import FLServer
from fl.sizes import format_size, parse_size
from fl.task import MLP, evaluate, held_out_data
from transport import progress


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
    progress = _Progress(options, model_bytes)
    fedavg = FedAvg(
        FLModel(params=state_dict),
        rounds=options.rounds,
        num_clients=options.clients,
        min_clients=options.clients,
        evaluate=global_accuracy,
        on_round=progress.round_done,
        on_tensor=progress.tensor_arrived,
    )
    async with FLServer(job="demo") as server:
        (url,) = await server.start([_listen_url(options.driver)])
        fedavg.attach(server)
        del state_dict  # the job's model is its file from here on (FedAvg lets go of it too)
        fedavg.open_state()  # written to the state directory before the baseline is taken
        children = _start_clients(url, options.clients, padding)
        try:
            progress.start()
            await fedavg.run()
        finally:
            progress.stop()
            await server.stop_clients("demo finished")
            await asyncio.to_thread(_reap, children)
    return _summary(options, model_bytes, first_accuracy, fedavg.history, progress)


def _listen_url(driver: str) -> str:
    if driver not in ("tcp", "grpc", "http"):
        raise ValueError(
            f"the demo runs over tcp, grpc or http (clients are processes), not {driver}"
        )
    return f"{driver}://127.0.0.1:0"


def _start_clients(url: str, count: int, padding: int) -> list[subprocess.Popen[bytes]]:
    children = []
    for site in range(count):
        settings = ClientSettings(server_url=url, site=f"site-{site}", heartbeat_interval=2.0)
        command = [sys.executable, "-m", "fl.demo_client", "--site", str(site)]
        command += ["--sites", str(count), "--padding-bytes", str(padding)]
        env = {**os.environ, **settings.environment()}
        children.append(subprocess.Popen(command, env=env))
    return children


def _reap(children: list[subprocess.Popen[bytes]]) -> None:
    for child in children:
        try:
            child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


class _Progress:
    """Progress bars (results arriving, per round) and the server's peak RSS and anonymous RSS
    per round, each above the same baseline (taken when the job starts)."""

    def __init__(self, options: DemoOptions, model_bytes: int) -> None:
        self.options = options
        self.model_bytes = model_bytes
        self.bar: tqdm[Any] | None = None
        self.sampler: RssSampler | None = None
        self.server_peaks: list[float] = []
        self.server_anon_peaks: list[float] = []
        self.rounds_started = 0

    def start(self) -> None:
        self.sampler = RssSampler().start()
        self._new_bar()

    def _new_bar(self) -> None:
        self.bar = progress.byte_bar(
            self.model_bytes * self.options.clients,
            f"round {self.rounds_started + 1}/{self.options.rounds} results",
            enabled=self.options.progress,
        )
        self.rounds_started += 1

    def tensor_arrived(self, client: str, name: str, tensor: torch.Tensor) -> None:
        if self.bar is not None:
            self.bar.update(tensor.nbytes)

    def round_done(self, report: RoundReport) -> None:
        if self.sampler is not None:
            self.sampler.stop()
            self.server_peaks.append(self.sampler.peak_above_baseline_mib)
            self.server_anon_peaks.append(self.sampler.anon_peak_above_baseline_mib)
            baseline, anon_baseline = self.sampler.baseline, self.sampler.anon_baseline
            self.sampler = RssSampler()
            self.sampler.start()
            # every round against the same pre-job baselines
            self.sampler.baseline, self.sampler.anon_baseline = baseline, anon_baseline
        if self.bar is not None:
            self.bar.close()
        if report.round + 1 < self.options.rounds:
            self._new_bar()

    def stop(self) -> None:
        if self.sampler is not None:
            self.sampler.stop()
        if self.bar is not None:
            self.bar.close()


def _summary(
    options: DemoOptions,
    model_bytes: int,
    first_accuracy: float,
    history: list[RoundReport],
    progress: _Progress,
) -> dict[str, Any]:
    rounds = [
        {
            "round": report.round + 1,
            "clients": report.succeeded,
            "failed": report.failed,
            "bytes_moved": report.bytes_sent + report.bytes_received,
            "seconds": round(report.seconds, 3),
            "throughput_mb_s": round(report.throughput_mb_s, 1),
            "server_peak_rss_mib": round(progress.server_peaks[index], 1),
            "server_peak_anon_mib": round(progress.server_anon_peaks[index], 1),
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
        for index, report in enumerate(history)
    ]
    return {
        "driver": options.driver,
        "clients": options.clients,
        "model_bytes": model_bytes,
        "initial_accuracy": round(first_accuracy, 4),
        "rounds": rounds,
    }


def format_table(summary: dict[str, Any]) -> str:
    """The summary as a table, one row per round."""
    sites = sorted(summary["rounds"][0]["client_peak_rss_mib"]) if summary["rounds"] else []
    head = ["round", "moved", "seconds", "MB/s", "server MiB", "anon MiB"]
    head += [f"{s} MiB" for s in sites] + ["accuracy"]
    rows = [
        head,
        ["0"] + ["-"] * (len(head) - 2) + [f"{summary['initial_accuracy']:.3f}"],
    ]
    for entry in summary["rounds"]:
        rows.append(
            [
                str(entry["round"]),
                format_size(entry["bytes_moved"]),
                f"{entry['seconds']:.1f}",
                f"{entry['throughput_mb_s']:,.0f}",
                f"{entry['server_peak_rss_mib']:.0f}",
                f"{entry['server_peak_anon_mib']:.0f}",
                *(f"{entry['client_peak_rss_mib'].get(s, 0.0):.0f}" for s in sites),
                f"{entry['accuracy']:.3f}",
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = [
        "  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True))
        for row in rows
    ]
    title = (
        f"FedAvg, {summary['clients']} clients over {summary['driver']}, model "
        f"{summary['model_bytes'] / 2**20:,.0f} MiB; peak RSS above baseline, anon: server RssAnon"
    )
    return "\n".join([title, *lines])
