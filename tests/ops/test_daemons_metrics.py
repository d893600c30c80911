"""Acceptance: a server daemon and a client daemon run a round; /metrics of each counts exactly
the bytes that moved."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from fl.task import MLP
from tests.ops.helpers import Samples, scrape, status_of, total

ROOT = Path(__file__).parents[2]
HERE = Path(__file__).parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
MODEL_SIZE = 3 << 20


def start(role: str, config: Path) -> subprocess.Popen[str]:
    command = [sys.executable, str(HERE / "scripts" / "daemon.py"), role, str(config)]
    return subprocess.Popen(
        command, env=ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )


def wait_for(process: subprocess.Popen[str], marker: str) -> str:
    assert process.stdout is not None
    for line in process.stdout:
        if marker in line:
            return line
    raise AssertionError(f"the daemon exited ({process.wait()}) without printing {marker!r}")


def metrics_url(process: subprocess.Popen[str]) -> str:
    line = wait_for(process, "metrics and health on ")
    return line.split(" on ")[1].strip().removesuffix("/metrics")


def test_daemons_count_the_bytes_they_moved(tmp_path: Path) -> None:
    server_config = tmp_path / "server.toml"
    server_config.write_text(
        'listen = ["tcp://127.0.0.1:0"]\njob = "ops"\n'
        f'[fedavg]\nrounds = 1\nmin_clients = 1\nnum_clients = 1\nmodel_size = "{MODEL_SIZE}"\n'
    )
    server = start("server", server_config)
    processes = [server]
    try:
        server_metrics = metrics_url(server)
        url = wait_for(server, "listening on").split("listening on ")[1].split()[0]
        assert status_of(f"{server_metrics}/readyz") == 200  # listening
        client_config = tmp_path / "site.toml"
        client_config.write_text(
            f'server = "{url}"\nsite = "site-1"\nmode = "in-process"\n'
            f'script = "{HERE / "scripts" / "echo_site.py"}"\n'
        )
        client = start("client", client_config)
        processes.append(client)
        client_metrics = metrics_url(client)
        wait_for(server, "daemon done: True")
        wait_for(client, "daemon done: 0")
        check_counters(scrape(server_metrics), scrape(client_metrics))
    finally:
        for process in processes:
            if process.poll() is None:
                process.communicate(timeout=30)  # closing stdin lets it exit


def check_counters(server: Samples, client: Samples) -> None:
    model_bytes = sum(t.nbytes for t in MLP(padding_bytes=MODEL_SIZE).state_dict().values())
    for samples in (server, client):
        for direction in ("sent", "received"):
            moved = total(samples, "tensorwire_transfer_bytes_total", direction=direction)
            assert moved == model_bytes, (direction, moved, model_bytes)
            live = total(samples, "tensorwire_tensor_bytes_total", direction=direction)
            assert live == model_bytes, (direction, live, model_bytes)  # what progress follows
    for metric in ("tensorwire_chunks_total", "tensorwire_chunk_bytes_total"):
        for here, there in ((server, client), (client, server)):
            out = total(here, metric, direction="out")
            assert out > 0, metric
            assert out == total(there, metric, direction="in"), metric
    # Wire bytes: each side's out is the other's in, but for the goodbye frames of the two
    # closing sides that can cross (what arrives after a side gave up is not counted).
    for here, there in ((server, client), (client, server)):
        out = total(here, "tensorwire_wire_bytes_total", direction="out")
        got = total(there, "tensorwire_wire_bytes_total", direction="in")
        chunk_bytes = total(there, "tensorwire_chunk_bytes_total", direction="in")
        assert 0 <= out - got <= 1024, (out, got)
        assert got > chunk_bytes, (got, chunk_bytes)
    # The padding of the task's model is zeros: compressed on the wire, whole in the transfers.
    assert total(server, "tensorwire_wire_bytes_total", peer="site-1") > 0
    assert total(server, "tensorwire_fl_rounds_total") == 1
    assert total(server, "tensorwire_fl_round_clients", state="succeeded") == 1
    assert total(server, "tensorwire_fl_round_duration_seconds_count") == 1
    assert total(server, "tensorwire_fl_round_bytes_total", direction="sent") == model_bytes
    for samples in (server, client):
        assert total(samples, "process_resident_memory_bytes") > 0
        assert total(samples, "tensorwire_errors_total") == 0
