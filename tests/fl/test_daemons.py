"""`tensorwire server` / `client` / `demo` as real processes; configuration errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from typer.testing import CliRunner

from fl.cli import app
from fl.config import ClientConfig, ConfigFileError, ServerConfig, load_config

ROOT = Path(__file__).parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
# The installed command, as operators run it (the venv's script beside its python).
CLI = [str(Path(sys.executable).with_name("tensorwire"))]


def test_config_files_are_validated_with_clear_errors(tmp_path: Path) -> None:
    toml = tmp_path / "server.toml"
    toml.write_text('listen = ["tcp://127.0.0.1:0"]\n[fedavg]\nrounds = 0\nmin_clientz = 2\n')
    with pytest.raises(ConfigFileError) as caught:
        load_config(ServerConfig, toml)
    assert "fedavg.rounds: Input should be greater than or equal to 1 (got 0)" in str(caught.value)
    assert "fedavg.min_clientz: Extra inputs are not permitted" in str(caught.value)
    yaml_file = tmp_path / "site.yaml"
    yaml_file.write_text("server: tcp://127.0.0.1:1\nscript: x.py\n")
    with pytest.raises(ConfigFileError, match="site: Field required"):
        load_config(ClientConfig, yaml_file)
    config = load_config(ClientConfig, yaml_file, {"site": "a", "server": None})
    assert (config.site, config.server) == ("a", "tcp://127.0.0.1:1")
    broken = tmp_path / "broken.toml"
    broken.write_text("listen = [")
    with pytest.raises(ConfigFileError, match="is not valid TOML"):
        load_config(ServerConfig, broken)
    with pytest.raises(ConfigFileError, match="cannot read config file"):
        load_config(ServerConfig, tmp_path / "absent.toml")


def read_url(server: subprocess.Popen[str]) -> str:
    assert server.stdout is not None
    for line in server.stdout:
        if "listening on" in line:
            return line.split("listening on ")[1].split()[0]
    raise AssertionError("the server printed no URL")


def test_sigterm_stops_server_and_clients_gracefully(tmp_path: Path) -> None:
    config = tmp_path / "server.toml"
    config.write_text(
        'listen = ["tcp://127.0.0.1:0"]\nheartbeat_timeout = 10\n'
        "[fedavg]\nrounds = 1000\nnum_clients = 2\nmin_clients = 2\n"
    )
    server = subprocess.Popen(
        [*CLI, "server", "--config", str(config)], env=ENV, stdout=subprocess.PIPE, text=True
    )
    clients: list[subprocess.Popen[str]] = []
    try:
        url = read_url(server)
        clients = [
            subprocess.Popen(
                [
                    *CLI,
                    "client",
                    "--server",
                    url,
                    "--site",
                    f"s{i}",
                    "--script",
                    str(ROOT / "examples" / "federated.py"),
                    *(["--in-process"] if i else []),
                    "--",
                    "--site",
                    str(i),
                ],
                env=ENV,
                stdout=subprocess.PIPE,
                text=True,
            )
            for i in range(2)
        ]
        assert server.stdout is not None
        for line in server.stdout:  # let two rounds run before stopping it
            if line.startswith("round 2"):
                break
        assert line.startswith("round 2: 2 ok")
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0
        assert [client.wait(timeout=30) for client in clients] == [0, 0]
    finally:
        for process in [server, *clients]:
            if process.poll() is None:
                process.kill()
                process.wait()


def test_sigterm_to_a_client_daemon_stops_it(tmp_path: Path) -> None:
    client = subprocess.Popen(
        [
            *CLI,
            "client",
            "--server",
            "tcp://127.0.0.1:9",
            "--site",
            "lonely",
            "--script",
            str(ROOT / "examples" / "federated.py"),
        ],
        env=ENV,
    )
    try:
        wait_for_child(client.pid)  # the script runs (retrying to connect to a closed port)
        client.send_signal(signal.SIGTERM)
        assert client.wait(timeout=30) == 0
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()


def wait_for_child(pid: int, timeout: float = 60) -> None:
    """Return once process `pid` has started a child (the client daemon, its script)."""
    process = psutil.Process(pid)
    deadline = time.monotonic() + timeout
    while not process.children():
        assert time.monotonic() < deadline, f"process {pid} started no child in {timeout:g} s"
        time.sleep(0.05)


def test_bad_flags_exit_2_with_the_reason() -> None:
    # In-process, on the installed command's typer app: a process would import torch (2-3 s).
    done = CliRunner().invoke(app, ["server", "--rounds", "0"])
    assert done.exit_code == 2
    assert "fedavg.rounds: Input should be greater than or equal to 1" in done.stderr


def test_demo_json_summary() -> None:
    done = subprocess.run(
        [*CLI, "demo", "--rounds", "2", "--model-size", "256MiB", "--json"],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert [entry["round"] for entry in summary["rounds"]] == [1, 2]
    assert summary["model_bytes"] >= 256 * 2**20 - 2**20
    for entry in summary["rounds"]:
        assert entry["bytes_moved"] == 4 * summary["model_bytes"]
        assert set(entry["client_peak_rss_mib"]) == {"site-0", "site-1"}
    assert summary["rounds"][-1]["accuracy"] > summary["initial_accuracy"]


def test_a_daemon_on_the_network_requires_mutual_tls() -> None:
    from fl.config import ConfigFileError, ServerConfig, load_config

    with pytest.raises(ConfigFileError, match="needs mutual TLS"):
        load_config(ServerConfig, None, {"listen": ["tcp://0.0.0.0:8765"]})
    assert load_config(ServerConfig, None, {"listen": ["tcp://127.0.0.1:8765"]}).pki_dir is None
    relaxed = load_config(ServerConfig, None, {"listen": ["tcp://0.0.0.0:8765"], "insecure": True})
    assert relaxed.insecure
    tls = {"listen": ["grpcs://0.0.0.0:8765"], "pki_dir": "pki"}
    secured = load_config(ServerConfig, None, tls)
    assert secured.pki_dir == "pki"
