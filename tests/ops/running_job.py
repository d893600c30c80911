"""A real job to watch and steer: `tensorwire server` and one `tensorwire client` (in-process
script, tests/ops/scripts/paced_site.py) as operators start them, the server's status read from
its /status.json. And the real tools the ops tests drive, installed when missing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).parents[2]
HERE = Path(__file__).parent
CLI = [str(Path(sys.executable).with_name("tensorwire"))]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def require_tool(name: str) -> str:
    """The path of `name` (promtool or chromium), installed by tests/ops/install_tools.sh when
    missing; skips, saying why, only when it cannot be installed here."""
    found = shutil.which(name)
    if found is None:
        installer = ["sh", str(HERE / "install_tools.sh"), name]
        done = subprocess.run(installer, capture_output=True, text=True, timeout=600)
        found = shutil.which(name)
        if found is None:
            pytest.skip(f"{name} is missing and could not be installed: {done.stderr.strip()}")
    return found


def wait_for(check: Callable[[], Any], what: str, within: float = 60.0) -> Any:
    """Poll `check` until it returns something truthy (bounded); that value."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"not within {within:g} s: {what}")


@dataclass
class RunningJob:
    server: subprocess.Popen[str]
    client: subprocess.Popen[str]
    url: str  # where the server listens for sites
    ops_url: str  # its /metrics, / and /status.json
    server_lines: list[str] = field(default_factory=list)

    def status(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.ops_url}/status.json", timeout=10) as answer:
            return dict(json.loads(answer.read()))

    def until(self, check: Callable[[dict[str, Any]], bool], what: str) -> dict[str, Any]:
        """Poll the status until `check` holds; that status."""
        return dict(wait_for(lambda: (lambda s: s if check(s) else None)(self.status()), what))

    def finish(self, timeout: float = 60.0) -> tuple[int, str, int]:
        """Wait for both daemons to end: (server status, server output, client status)."""
        server, client = self.server.wait(timeout), self.client.wait(timeout)
        return server, "".join(self.server_lines), client


def _drain(process: subprocess.Popen[str], lines: list[str], marker: str) -> str:
    """Keep reading the server's output into `lines` (a full pipe would stall it); the first
    line holding `marker`."""
    assert process.stdout is not None
    stdout = process.stdout

    def read() -> None:
        for line in stdout:
            lines.append(line)

    threading.Thread(target=read, daemon=True).start()
    return _line_with(lines, marker, process)


def _line_with(lines: list[str], marker: str, process: subprocess.Popen[str]) -> str:
    def seen() -> str | None:
        if process.poll() is not None and not any(marker in line for line in lines):
            raise AssertionError(f"the server exited ({process.returncode}): {''.join(lines)}")
        return next((line for line in lines if marker in line), None)

    return str(wait_for(seen, f"the server printing {marker!r}"))


@contextmanager
def running_job(
    directory: Path,
    *,
    scheme: str = "tcp",
    server_toml: str = "",
    site_toml: str = "",
    pace: float = 0.2,
    rounds: int = 1000,
) -> Iterator[RunningJob]:
    """A server daemon (ops server on a free port) and one site running `rounds` rounds of a
    small model, each site round taking `pace` s; both stopped at the end if still running."""
    server_config = directory / "server.toml"
    server_config.write_text(
        f'listen = ["{scheme}://127.0.0.1:0"]\njob = "watched"\nstate_dir = "{directory}/state"\n'
        f"{server_toml}\n[fedavg]\nrounds = {rounds}\nmin_clients = 1\nnum_clients = 1\n"
        'model_size = "4MB"\n'
    )
    command = [*CLI, "server", "--config", str(server_config), "--metrics-port", "0", "--quiet"]
    server = subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, text=True)
    processes = [server]
    try:
        lines: list[str] = []
        ops = _drain(server, lines, "metrics and health on ").split(" on ")[1].strip()
        url = _line_with(lines, "listening on", server).split("listening on ")[1].split()[0]
        site_config = directory / "site.toml"
        site_config.write_text(
            f'server = "{url}"\nsite = "site-1"\nmode = "in-process"\nheartbeat_interval = 0.5\n'
            f'script = "{HERE / "scripts" / "paced_site.py"}"\nargs = ["{pace}"]\n{site_toml}\n'
        )
        client_command = [*CLI, "client", "--config", str(site_config), "--quiet"]
        client = subprocess.Popen(
            client_command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        processes.append(client)
        yield RunningJob(server, client, url, ops.removesuffix("/metrics"), lines)
    finally:
        for process in processes:
            if process.poll() is None:
                process.terminate()
                process.wait(timeout=60)
