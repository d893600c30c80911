"""A server killed with SIGKILL and started again continues its job, over real processes.

The job is killed three times (while sending round 1's model, while gathering round 2's results,
between rounds 2 and 3), restarted each time with the same config, and must end with exit 0 and a
final model equal bit for bit to an uninterrupted run's (the clients are deterministic). A
finished job started again stays finished.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from safetensors.torch import load_file

ROOT = Path(__file__).parents[2]
SITE = Path(__file__).parent / "scripts" / "deterministic_site.py"
CLI = [str(Path(sys.executable).with_name("tensorwire"))]
PADDING = 96 * 2**20  # big enough that a kill lands while a model is on the wire
ROUNDS = 3


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def write_config(directory: Path, port: int, accumulator: bool) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "server.toml"
    lines = [
        f'listen = ["tcp://127.0.0.1:{port}"]',
        'job = "resume"',
        f'state_dir = "{directory / "state"}"',
        "heartbeat_timeout = 30",
        "reconnect_grace = 30",
        "[fedavg]",
        f"rounds = {ROUNDS}",
        "num_clients = 2",
        "min_clients = 2",
        "join_timeout = 60",
        f"model_size = {PADDING}",
        f'save_path = "{directory / "final.safetensors"}"',
    ]
    if accumulator:
        lines.append(f'accumulator_dir = "{directory / "sums"}"')
    config.write_text("\n".join(lines) + "\n")
    return config


class Job:
    """A server (restartable) and two deterministic client processes."""

    def __init__(self, directory: Path, accumulator: bool = False) -> None:
        self.port = free_port()
        self.config = write_config(directory, self.port, accumulator)
        self.directory = directory
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), "SITE_PADDING_BYTES": str(PADDING)}
        self.server: subprocess.Popen[str] | None = None
        self.clients: list[subprocess.Popen[str]] = []
        self.logs: list[Path] = []

    def start_server(self) -> subprocess.Popen[str]:
        log = self.directory / f"server-{len(self.logs)}.log"
        self.logs.append(log)
        command = [*CLI, "server", "--config", str(self.config)]
        self.server = subprocess.Popen(
            command,
            env=self.env,
            cwd=self.directory,
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
        )
        return self.server

    def start_clients(self) -> None:
        for site in range(2):
            command = [*CLI, "client", "--server", f"tcp://127.0.0.1:{self.port}"]
            command += ["--site", f"site-{site}", "--script", str(SITE), "--", str(site)]
            log = (self.directory / f"site-{site}.log").open("w")
            self.clients.append(
                subprocess.Popen(
                    command, env=self.env, cwd=self.directory, stdout=log, stderr=subprocess.STDOUT
                )
            )

    def state(self) -> dict[str, object]:
        try:
            loaded: dict[str, object] = json.loads(
                (self.directory / "state" / "job.json").read_text()
            )
            return loaded
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def logged(self, text: str) -> bool:
        """Whether the running server's log has a line containing `text` (its transfer log
        lines say when a model starts going out and a result starts coming in)."""
        return text in self.logs[-1].read_text()

    def kill_when(self, condition: Callable[[], bool], what: str, timeout: float = 120) -> None:
        assert self.server is not None
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.server.poll() is None, f"the server exited before {what}: {self.tail()}"
            assert time.monotonic() < deadline, f"never saw {what}: {self.tail()}"
            time.sleep(0.01)  # polling an outside process; nothing to wait on instead
        self.server.send_signal(signal.SIGKILL)
        self.server.wait(timeout=30)

    def wait_all(self, timeout: float = 240) -> list[int]:
        assert self.server is not None
        codes = [self.server.wait(timeout=timeout)]
        codes += [client.wait(timeout=60) for client in self.clients]
        return codes

    def tail(self) -> str:
        texts = [path.read_text()[-3000:] for path in self.logs]
        texts += [(self.directory / f"site-{i}.log").read_text()[-2000:] for i in range(2)]
        return "\n----\n".join(texts)

    def final_model(self) -> dict[str, object]:
        return dict(load_file(str(self.directory / "final.safetensors")))

    def stop(self) -> None:
        for process in [self.server, *self.clients]:
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()


@contextmanager
def job(directory: Path, accumulator: bool = False) -> Iterator[Job]:
    running = Job(directory, accumulator)
    try:
        yield running
    finally:
        running.stop()


def uninterrupted(directory: Path, accumulator: bool) -> dict[str, object]:
    with job(directory, accumulator) as plain:
        plain.start_server()
        plain.start_clients()
        assert plain.wait_all() == [0, 0, 0], plain.tail()
        return plain.final_model()


@pytest.mark.parametrize("accumulator", [False, True], ids=["memory-sums", "file-sums"])
def test_a_killed_server_continues_its_job_and_ends_bit_for_bit_equal(
    tmp_path: Path, accumulator: bool
) -> None:
    expected = uninterrupted(tmp_path / "plain", accumulator)
    with job(tmp_path / "killed", accumulator) as killed:
        killed.start_server()
        killed.start_clients()

        sending = "transfer_start direction=sent transfer=resume/round-1/"
        killed.kill_when(lambda: killed.logged(sending), "round 2's model going out")
        assert killed.state()["round"] == 1
        killed.start_server()
        gathering = "transfer_start direction=received transfer=resume/round-1/"
        killed.kill_when(lambda: killed.logged(gathering), "round 2's results coming in")
        assert killed.state()["round"] == 1
        killed.start_server()
        killed.kill_when(lambda: killed.state().get("round") == 2, "round 2's end")
        killed.start_server()
        assert killed.wait_all() == [0, 0, 0], killed.tail()
        state = killed.state()
        assert state["finished"] is True
        assert state["round"] == ROUNDS
        history = state["history"]
        assert isinstance(history, list)
        assert [entry["succeeded"] for entry in history] == [["site-0", "site-1"]] * ROUNDS
        final = killed.final_model()
    assert final.keys() == expected.keys()
    different = [name for name in final if not final[name].equal(expected[name])]  # type: ignore[attr-defined]
    assert not different, f"tensors differ from the uninterrupted run: {different[:5]}"


def test_a_finished_job_stays_finished(tmp_path: Path) -> None:
    with job(tmp_path) as finished:
        config = finished.config
        config.write_text(config.read_text().replace(f"model_size = {PADDING}", "model_size = 0"))
        finished.env["SITE_PADDING_BYTES"] = "0"
        finished.start_server()
        finished.start_clients()
        assert finished.wait_all() == [0, 0, 0], finished.tail()
        saved = (tmp_path / "final.safetensors").read_bytes()
        (tmp_path / "final.safetensors").unlink()
        again = finished.start_server()
        assert again.wait(timeout=60) == 0
        assert "already finished" in finished.logs[-1].read_text()
        assert (tmp_path / "final.safetensors").read_bytes() == saved  # saved again, the same
