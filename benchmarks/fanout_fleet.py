"""The fan-out benchmark's processes: spawned children (server, sites), relay daemons, their RSS
sampled from outside, and one wait on all of them that ends at the first failure.

- Children are spawned (a clean interpreter each, so each baseline is its own) with
  benchmarks/outside.py's `spawn`; each reports once on its queue (`child_main`).
- Relays are the real daemon, `python -m fl.cli relay --config relay.toml`, started through
  `ip netns exec` (which execs: the pid is the relay's) in their region's namespace; stdout and
  stderr go to files in the run's directory and the failure report quotes their tails.
- `Fleet.collect` polls every child's queue and every relay's exit status: a child that reports
  an error, dies without a report, or a relay that exits non-zero ends the run at once with that
  error; `Fleet.end` then kills what is left. Nothing waits out a timeout because one side failed.
- `RssWatch` reads /proc/<pid>/statm of every process it is given, every 10 ms, from the parent
  (processes join as they are started): the resident set, and its anonymous part (resident less
  shared: what is not page cache of mapped files, e.g. a relay's model file and sums file).
  Every 0.5 s it also reads each process's CPU time (/proc/<pid>/stat) and the machine's
  (/proc/stat), so a run can tell how much of the two cores its own processes used, how much
  the kernel's packet work (softirq) did, and how much was left to everything else.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.outside import ChildFailed, end, poll_child, spawn

__all__ = ["Fleet", "RelayDaemon", "RssWatch", "listening"]

REPO = Path(__file__).resolve().parent.parent
_PAGE = os.sysconf("SC_PAGE_SIZE")
_TICK = os.sysconf("SC_CLK_TCK")
_CPU_EVERY_S = 0.5
_MIB = 2**20


class RssWatch:
    """Resident set of a growing set of processes, from outside, every `interval` seconds."""

    def __init__(self, interval: float = 0.01) -> None:
        self.interval = interval
        self._timelines: dict[int, list[tuple[float, int, int]]] = {}  # (time, rss, anon)
        self._cpu: dict[int, list[tuple[float, float]]] = {}  # (time, CPU seconds)
        self.machine_cpu: list[tuple[float, dict[str, float]]] = []  # (time, /proc/stat)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fanout-rss", daemon=True)
        self._thread.start()

    def add(self, pid: int) -> None:
        with self._lock:
            self._timelines.setdefault(pid, [])
            self._cpu.setdefault(pid, [])

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        cpu_read_at = 0.0
        while not self._stop.is_set():
            with self._lock:
                watched = list(self._timelines.items())
            now = time.time()
            if now - cpu_read_at >= _CPU_EVERY_S:
                cpu_read_at = now
                self._read_cpu(now, [pid for pid, _ in watched])
            for pid, timeline in watched:
                sample = _resident_bytes(pid)
                if sample is not None and (
                    not timeline or timeline[-1][1:] != sample or now - timeline[-1][0] >= 1.0
                ):
                    timeline.append((now, *sample))
            self._stop.wait(self.interval)

    def _read_cpu(self, now: float, pids: list[int]) -> None:
        for pid in pids:
            seconds = _cpu_seconds(pid)
            if seconds is not None:
                self._cpu[pid].append((now, seconds))
        machine = _machine_cpu()
        if machine is not None:
            self.machine_cpu.append((now, machine))

    def cpu_seconds(self, pid: int, start: float, finish: float) -> float:
        """CPU seconds process `pid` used between the samples nearest inside [start, finish]
        (its last sample, if it ended before `finish`)."""
        timeline = self._cpu.get(pid, [])
        inside = [seconds for at, seconds in timeline if start <= at <= finish]
        before = [seconds for at, seconds in timeline if at < start]
        if not inside:
            return 0.0
        return inside[-1] - (before[-1] if before else inside[0])

    def machine_seconds(self, start: float, finish: float) -> dict[str, float]:
        """The machine's CPU seconds by kind (busy, of which softirq; idle) over [start, finish]."""
        inside = [(at, cpu) for at, cpu in self.machine_cpu if start <= at <= finish]
        before = [cpu for at, cpu in self.machine_cpu if at < start]
        if not inside:
            return {}
        first = before[-1] if before else inside[0][1]
        last = inside[-1][1]
        return {kind: round(last[kind] - first[kind], 2) for kind in last}

    def window(self, pid: int, baseline_at: float, start: float, finish: float) -> dict[str, float]:
        """MiB: the RSS at `baseline_at` (the last sample before it), the peak within
        [start, finish] and the peak above the baseline; the same for the anonymous part."""
        figures = {}
        timeline = self._timelines.get(pid, [])
        for column, prefix in ((1, ""), (2, "anon_")):
            before = [sample[column] for sample in timeline if sample[0] <= baseline_at]
            inside = [sample[column] for sample in timeline if start <= sample[0] <= finish]
            baseline = before[-1] if before else (timeline[0][column] if timeline else 0)
            peak = max([baseline, *inside])
            figures |= {
                f"{prefix}baseline_rss_mib": round(baseline / _MIB, 1),
                f"{prefix}peak_rss_mib": round(peak / _MIB, 1),
                f"{prefix}peak_above_baseline_mib": round((peak - baseline) / _MIB, 1),
            }
        return figures


def _resident_bytes(pid: int) -> tuple[int, int] | None:
    """(resident, resident less shared) in bytes: statm's fields 2 and 2 - 3."""
    try:
        with open(f"/proc/{pid}/statm") as statm:
            fields = statm.read().split()
        return int(fields[1]) * _PAGE, (int(fields[1]) - int(fields[2])) * _PAGE
    except (OSError, IndexError, ValueError):
        return None


def sockets(pid: int, port: int, state: str) -> int:
    """TCP sockets with local port `port` in `state` ("0A" listening, "01" established) in the
    network namespace of process `pid`."""
    count = 0
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == state and int(fields[1].rsplit(":", 1)[1], 16) == port:
                count += 1
    return count


def _cpu_seconds(pid: int) -> float | None:
    """utime + stime of process `pid` (and of its waited-for children: none here), seconds."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICK
    except (OSError, IndexError, ValueError):
        return None


def _machine_cpu() -> dict[str, float] | None:
    """All CPUs' seconds from /proc/stat: busy (all but idle and iowait), softirq, idle."""
    try:
        with open("/proc/stat") as stat:
            values = [int(value) for value in stat.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = values
    busy = user + nice + system + irq + softirq + steal
    return {"busy": busy / _TICK, "softirq": softirq / _TICK, "idle": (idle + iowait) / _TICK}


def listening(pid: int, port: int) -> bool:
    """Whether the network namespace of process `pid` has a TCP socket listening on `port`."""
    return sockets(pid, port, "0A") > 0


@dataclass
class RelayDaemon:
    """One `tensorwire relay` in a region's namespace."""

    name: str
    netns_name: str
    config: dict[str, Any]
    directory: Path
    popen: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    listening_at: float | None = None
    _files: list[Any] = field(default_factory=list)

    @property
    def url(self) -> str:
        return str(self.config["listen"][0])

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        config_path = self.directory / "relay.toml"
        config_path.write_text(_toml(self.config))
        stdout = (self.directory / "stdout").open("wb")
        stderr = (self.directory / "stderr").open("wb")
        self._files = [stdout, stderr]
        command = ["ip", "netns", "exec", self.netns_name]
        command += [sys.executable, "-m", "fl.cli", "relay", "--config", str(config_path)]
        self.started_at = time.time()
        self.popen = subprocess.Popen(
            command,
            cwd=REPO,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
        )

    def tail(self, lines: int = 40) -> str:
        parts = []
        for stream in ("stdout", "stderr"):
            path = self.directory / stream
            if path.exists():
                text = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {self.name} {stream} ---\n" + "\n".join(text))
        return "\n".join(parts)

    def stop(self, grace: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after `grace` seconds; the exit status."""
        status = None
        if self.popen is not None:
            if self.popen.poll() is None:
                self.popen.send_signal(signal.SIGTERM if grace > 0 else signal.SIGKILL)
                try:
                    self.popen.wait(max(grace, 1.0))
                except subprocess.TimeoutExpired:
                    self.popen.kill()
                    self.popen.wait()
            status = self.popen.returncode
        for handle in self._files:
            handle.close()
        self._files = []
        return status


def _toml(config: dict[str, Any]) -> str:
    lines = []
    for key, value in config.items():
        if isinstance(value, bool):
            lines.append(f"{key} = {'true' if value else 'false'}")
        elif isinstance(value, int | float):
            lines.append(f"{key} = {value}")
        elif isinstance(value, list):
            lines.append(f"{key} = [{', '.join(_quoted(item) for item in value)}]")
        else:
            lines.append(f"{key} = {_quoted(value)}")
    return "\n".join(lines) + "\n"


def _quoted(value: object) -> str:
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


class Fleet:
    """Every process of one run; `collect` waits on all of them at once."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.processes: list[Any] = []
        self.queues: list[Any] = []
        self.relays: list[RelayDaemon] = []
        self.results: dict[str, Any] = {}
        self.rss = RssWatch()

    def spawn(self, name: str, target: Callable[..., None], *args: Any) -> int:
        """Start target(queue, *args) in a spawned child; its pid."""
        (process,), (queue,) = spawn([(target, args)])
        process.name = name
        self.names.append(name)
        self.processes.append(process)
        self.queues.append(queue)
        assert process.pid is not None
        self.rss.add(process.pid)
        return int(process.pid)

    def start_relay(self, relay: RelayDaemon) -> None:
        relay.start()
        self.relays.append(relay)
        self.rss.add(relay.pid)

    def check(self) -> None:
        """Take the reports that arrived; ChildFailed if a child reported an error or died
        without a report, or a relay exited with an error."""
        for process, queue, name in zip(self.processes, self.queues, self.names, strict=True):
            if name not in self.results:
                report = poll_child(process, queue, name)
                if report is not None:
                    self.results[name] = report
        for relay in self.relays:
            if relay.popen is not None and relay.popen.poll() not in (None, 0):
                raise ChildFailed(
                    f"{relay.name} exited with {relay.popen.returncode}:\n{relay.tail()}"
                )

    def wait_listening(self, pid: int, port: int, name: str, timeout: float) -> float:
        """Wait until process `pid` listens on `port` (failing fast); the time it did."""
        deadline = time.monotonic() + timeout
        while not listening(pid, port):
            self.check()
            if time.monotonic() > deadline:
                raise ChildFailed(f"{name} did not listen on port {port} within {timeout:.0f} s")
            time.sleep(0.05)
        return time.time()

    def wait_connected(self, pid: int, port: int, count: int, name: str, timeout: float) -> None:
        """Wait until `count` connections to `port` are established in the namespace of process
        `pid` (failing fast)."""
        deadline = time.monotonic() + timeout
        while sockets(pid, port, "01") < count:
            self.check()
            if time.monotonic() > deadline:
                raise ChildFailed(f"{count} sites did not connect to {name} within {timeout:.0f} s")
            time.sleep(0.1)

    def collect(self, timeout: float) -> dict[str, Any]:
        """Every child's report by name, or ChildFailed as soon as anything fails."""
        deadline = time.monotonic() + timeout
        while True:
            self.check()
            if len(self.results) == len(self.processes):
                return dict(self.results)
            if time.monotonic() > deadline:
                waiting = [name for name in self.names if name not in self.results]
                raise ChildFailed(f"no result within {timeout:.0f} s from {', '.join(waiting)}")
            time.sleep(0.02)

    def end(self, graceful: bool = True) -> dict[str, int | None]:
        """Stop every process; the relays' exit statuses. Graceful (every child reported): the
        children are joined (they are exiting), the relays get SIGTERM. Otherwise (a failure, a
        signal) everything is killed at once."""
        statuses: dict[str, int | None] = {}
        try:
            if not graceful:
                for process in self.processes:
                    if process.is_alive():
                        process.kill()
            end(self.processes)
        finally:
            for relay in self.relays:
                statuses[relay.name] = relay.stop(grace=10.0 if graceful else 0.0)
            self.rss.stop()
        return statuses
