"""Signals to `tensorwire server` and `tensorwire client`, over real processes and sockets.

SIGTERM to the server while models are on the wire (to the clients, or back) stops the job: every
client is told within seconds and exits 0. SIGTERM to a client (the daemon in both modes, or a bare
script) ends it with 0 once it told the server, and the round goes on with the other sites. A
server killed with SIGKILL says nothing: its clients keep dialling, carry on with a server started
again in time, and give up (status 1) only after their idle_timeout.

Nothing here waits on a timer to synchronize: the tests follow the processes' output (or a file
a script writes) and act when a line appears; the slow transfers and hanging scripts are slow so
that a signal surely lands while they are under way.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
CLI = [str(Path(sys.executable).with_name("tensorwire"))]

SITE_SCRIPT = '''
"""A test site: answers each task with the model it received (tests/fl/test_signals.py).

SITE_SLOW=receive|send: every chunk of the model in (or of the result out) takes SITE_DELAY s;
the first one prints "site: receiving" (or "site: sending").
SITE_HANG=path: in the first round, write that file once the model is in, then "train" until a
signal ends the script.
"""
import os
import time
from pathlib import Path

from fl import client as flare
from transport import StateDictSink, StateDictSource

DELAY = float(os.environ.get("SITE_DELAY", "0.25"))
SLOW = os.environ.get("SITE_SLOW", "")
HANG = os.environ.get("SITE_HANG")


class SlowSink(StateDictSink):
    def write(self, chunk, pieces):
        if chunk.index == 0:
            print("site: receiving", flush=True)
        time.sleep(DELAY)  # a slow disk (in a worker thread: the event loop goes on)
        super().write(chunk, pieces)


class SlowSource(StateDictSource):
    def chunk_views(self, chunk):
        if chunk.index == 0:
            print("site: sending", flush=True)
        time.sleep(DELAY)  # a slow uplink
        return super().chunk_views(chunk)


flare.init()
print("site: joined", flush=True)
while flare.is_running():
    received = flare.receive(sink=SlowSink() if SLOW == "receive" else None)
    if HANG and not Path(HANG).exists():
        Path(HANG).write_text("training")
        time.sleep(600)
    params = SlowSource(received.params) if SLOW == "send" else received.params
    flare.send(flare.FLModel(params, meta={"sample_count": 1}))
'''


class Process:
    """A child process whose output (stdout and stderr) is read as it comes."""

    def __init__(
        self,
        name: str,
        command: list[str],
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.popen = subprocess.Popen(
            command,
            env={**ENV, **(env or {})},
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    @property
    def output(self) -> str:
        with self._changed:
            return "\n".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = 60) -> str:
        """The first output line matching `pattern` (a regex), waiting for it to appear."""
        found = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.lines:
                    if found.search(line):
                        return line
                remaining = deadline - time.monotonic()
                ended = self.popen.poll() is not None and not self._reader.is_alive()
                if remaining <= 0 or ended:
                    raise AssertionError(f"{self.name} never printed {pattern!r}:\n{self.output}")
                self._changed.wait(remaining)

    def exit_status(self, timeout: float) -> int:
        try:
            status = self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            message = f"{self.name} still runs after {timeout:g} s:\n{self.output}"
            raise AssertionError(message) from None
        self._reader.join(timeout=10)
        return status

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()


@pytest.fixture
def processes() -> Iterator[list[Process]]:
    """Every process a test starts; whatever still runs at its end is killed."""
    started: list[Process] = []
    yield started
    for process in started:
        process.stop()


def start_server(
    processes: list[Process], tmp_path: Path, *flags: str, listen: str = "tcp://127.0.0.1:0"
) -> tuple[Process, str]:
    """A server in a directory of its own (a fresh job: no state of another server to resume)."""
    directory = tmp_path / f"server-{len(processes)}"
    directory.mkdir()
    command = [*CLI, "server", "--listen", listen, "--quiet", *flags]
    server = Process("server", command, cwd=directory)
    processes.append(server)
    url = server.wait_for(r"listening on ").split("listening on ")[1].split()[0]
    return server, url


def start_client(
    processes: list[Process],
    tmp_path: Path,
    url: str,
    site: str,
    mode: str,
    env: dict[str, str] | None = None,
    **settings: object,
) -> Process:
    """A site: `tensorwire client` in `mode` ("subprocess", "in-process"), or the bare script
    ("script", connecting through the TENSORWIRE_* environment)."""
    script = tmp_path / "site.py"
    if not script.exists():
        script.write_text(SITE_SCRIPT)
    if mode == "script":
        variables = {"TENSORWIRE_SERVER": url, "TENSORWIRE_SITE": site, **(env or {})}
        client = Process(site, [sys.executable, str(script)], variables)
    else:
        config = tmp_path / f"{site}.toml"
        fields = {"server": url, "site": site, "script": str(script), "mode": mode}
        lines = [f'{name} = "{value}"' for name, value in fields.items()]
        lines += [f"{name} = {value}" for name, value in settings.items()]
        config.write_text("\n".join(lines) + "\n")
        client = Process(site, [*CLI, "client", "--config", str(config), "--quiet"], env)
    processes.append(client)
    return client


def until(condition: Callable[[], bool], what: str, timeout: float = 60) -> None:
    """Poll an outside condition (a file another process writes) with a generous deadline."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"never saw {what}"
        time.sleep(0.02)


def assert_clean(process: Process) -> None:
    assert "Traceback" not in process.output, process.output
    assert "Task was destroyed" not in process.output, process.output
    assert "was never awaited" not in process.output, process.output


@pytest.mark.parametrize("phase", ["download", "upload"])
def test_sigterm_to_the_server_mid_transfer_stops_every_client(
    phase: str, tmp_path: Path, processes: list[Process]
) -> None:
    server, url = start_server(
        processes, tmp_path, "--rounds", "3", "--num-clients", "2", "--min-clients", "2",
        "--model-size", "64MiB",
    )  # fmt: skip
    slow = {"SITE_SLOW": "receive" if phase == "download" else "send"}
    clients = [
        start_client(processes, tmp_path, url, "s0", "subprocess", slow),
        start_client(processes, tmp_path, url, "s1", "in-process", slow),
    ]
    direction = "sent" if phase == "download" else "received"
    for site, client in zip(("s0", "s1"), clients, strict=True):  # both transfers are under way
        server.wait_for(rf"event=transfer_start direction={direction} .*peer={site}\b")
        client.wait_for("site: receiving" if phase == "download" else "site: sending")
    signalled = time.monotonic()
    server.popen.send_signal(signal.SIGTERM)

    assert server.exit_status(timeout=20) == 0, server.output
    statuses = {client.name: client.exit_status(timeout=20) for client in clients}
    seconds = time.monotonic() - signalled
    assert statuses == {"s0": 0, "s1": 0}, "\n\n".join(c.output for c in clients)
    assert seconds < 20
    for client in clients:  # told, not left to find the server gone
        assert "lost the server" not in client.output, client.output
        assert_clean(client)
    for site in ("s0", "s1"):  # the signal did land mid-transfer
        ended = server.wait_for(rf"event=transfer_end direction={direction} .*peer={site}\b")
        assert "outcome=failed" in ended, ended


@pytest.mark.parametrize("mode", ["subprocess", "in-process", "script"])
def test_sigterm_to_a_client_mid_task_reports_it_and_the_round_goes_on(
    mode: str, tmp_path: Path, processes: list[Process]
) -> None:
    server, url = start_server(
        processes, tmp_path, "--rounds", "1", "--num-clients", "3", "--min-clients", "2"
    )
    others = [
        start_client(processes, tmp_path, url, "s0", "subprocess"),
        start_client(processes, tmp_path, url, "s1", "in-process"),
    ]
    marker = tmp_path / "s2-training"
    leaving = start_client(processes, tmp_path, url, "s2", mode, {"SITE_HANG": str(marker)})
    until(marker.exists, "s2 training")  # it has its task, and works on it
    signalled = time.monotonic()
    leaving.popen.send_signal(signal.SIGTERM)

    assert leaving.exit_status(timeout=15) == 0, leaving.output
    assert time.monotonic() - signalled < 15
    assert_clean(leaving)
    failed = server.wait_for(r"client s2 failed task")
    assert "stopped by SIGTERM" in failed, failed
    finished = server.wait_for(r"^round 1: ")
    assert finished.startswith("round 1: 2 ok ['s2']"), finished
    assert server.exit_status(timeout=30) == 0, server.output
    assert [client.exit_status(timeout=20) for client in others] == [0, 0]
    for client in others:  # the job's normal end, in both modes
        assert_clean(client)


@pytest.mark.parametrize("mode", ["subprocess", "in-process"])
def test_a_client_waits_for_a_killed_server_then_gives_up_after_idle_timeout(
    mode: str, tmp_path: Path, processes: list[Process]
) -> None:
    server, url = start_server(processes, tmp_path, "--num-clients", "2", "--min-clients", "2")
    client = start_client(
        processes, tmp_path, url, "s0", mode,
        heartbeat_interval=0.5, idle_timeout=4, connect_timeout=4, max_restarts=3,
    )  # fmt: skip
    client.wait_for(r"site: joined")  # the server answered its hello
    server.popen.send_signal(signal.SIGKILL)
    killed = time.monotonic()

    assert client.exit_status(timeout=30) == 1, client.output
    assert time.monotonic() - killed >= 4  # it kept dialling for its idle_timeout
    assert "lost the server" in client.output, client.output
    assert "restart" not in client.output, client.output  # it already waited: no restart
    assert "Task was destroyed" not in client.output, client.output


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_a_client_outlives_a_killed_server_and_finishes_the_job_with_the_next(
    tmp_path: Path, processes: list[Process]
) -> None:
    listen = f"tcp://127.0.0.1:{free_port()}"
    waiting = ("--num-clients", "2", "--min-clients", "2")  # for a second site: no round starts
    first, url = start_server(processes, tmp_path, *waiting, listen=listen)
    client = start_client(
        processes, tmp_path, url, "s0", "in-process", heartbeat_interval=0.5, idle_timeout=30
    )
    client.wait_for(r"site: joined")
    first.popen.send_signal(signal.SIGKILL)
    assert first.exit_status(timeout=10) == -signal.SIGKILL

    one_round = ("--rounds", "1", "--num-clients", "1")
    second, _ = start_server(processes, tmp_path, *one_round, listen=listen)
    second.wait_for(r"client s0 joined")  # it came back by itself
    assert second.wait_for(r"^round 1: ").startswith("round 1: 1 ok")
    assert second.exit_status(timeout=30) == 0, second.output
    assert client.exit_status(timeout=20) == 0, client.output
    assert "lost the server" not in client.output, client.output
    assert_clean(client)
