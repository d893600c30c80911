"""Server memory over a whole FL job, measured from outside the server process (issue 14).

    python -m benchmarks fl-memory --model-size 2GiB --rounds 3 --clients 2 --json

For each configuration (model dtype and where the sums live) this writes a server config in a
temporary directory, starts `tensorwire server` as a real process and `--clients` client processes
(benchmarks/fl_site.py: receive, add a constant, send back FULL), and samples the server's RSS and
anonymous RSS (RssAnon) from outside every 5 ms with fl.rss.RssSampler(pid=...).

The baseline is taken when the server prints "listening on": the server builds the built-in
model (the task's MLP padded to the size) and writes it to its state file before it listens, so
what is measured is the job, not the start-up. The absolute figures (and the baseline itself) are
reported too, and the start-up's own peak. With `--initial-model file` the benchmark writes that
model to a safetensors file first and the server starts from the file (`fedavg.initial_model`),
as a deployment would: then the baseline is the server's imports and nothing else.

The bound is the issue's: anonymous memory above baseline at most one model of sums (numel * 4
bytes, float32 sums) with the sums in memory, at most 256 MiB with the sums in a file. The RSS
also counts the page cache of the mmap'd model files, which the kernel can drop at will.

`--model-size` is the model's size on the wire in its dtype (a bf16 model of 2 GiB has 1 Gi
elements, so its float32 sums are 4 GiB). Results (with RSS/anon timelines and, with matplotlib,
a plot) are written under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.probes import MIB, RssSampler, format_size, parse_size
from fl.rss import memory_of

RESULTS = Path(__file__).with_name("results")
REPO = Path(__file__).resolve().parent.parent
DTYPES = ("float32", "bfloat16", "float16")
SUMS = ("memory", "file")
ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}
SUM_ITEMSIZE = 4  # the server accumulates in float32
FILE_SUMS_BOUND = 256 * MIB
# The built-in MLP's trained layers (32-64-64-10, float32): the padding makes up the rest.
_MLP_LAYER_NUMEL = 32 * 64 + 64 + 64 * 64 + 64 + 64 * 10 + 10
_LISTENING = re.compile(r"listening on (\S+)")
_ROUND = re.compile(r"^round (\d+): .* in ([0-9.]+) s")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model-size",
        type=parse_size,
        default=parse_size("2GiB"),
        help="model bytes on the wire, in its dtype (default 2GiB)",
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--dtype", nargs="+", choices=DTYPES, default=["float32", "bfloat16"])
    parser.add_argument(
        "--sums",
        nargs="+",
        choices=SUMS,
        default=list(SUMS),
        help="where the server keeps the round's sums: memory or a file",
    )
    parser.add_argument(
        "--initial-model",
        choices=("built-in", "file"),
        default="built-in",
        help="built-in: the server builds the padded MLP itself (fedavg.model_size); file: this "
        "benchmark writes the same model to a safetensors file first (fedavg.initial_model)",
    )
    parser.add_argument("--driver", choices=("tcp", "grpc", "http"), default="tcp")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per configuration")
    parser.add_argument(
        "--smaps",
        action="store_true",
        help="also keep the server's /proc/PID/smaps at its anonymous peak "
        "(where the anonymous memory is: heap, arenas, large mappings)",
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="where the state and sums files go (default: a temporary directory)",
    )
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    parser.add_argument("--no-write", action="store_true", help="write no results file")


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.rounds < 1 or args.clients < 1:
        raise SystemExit("fl-memory: --rounds and --clients must be at least 1")
    configs = []
    for dtype in args.dtype:
        for sums in args.sums:
            config = Configuration(
                dtype=dtype,
                sums=sums,
                model_size=args.model_size,
                rounds=args.rounds,
                clients=args.clients,
                driver=args.driver,
                initial_model=args.initial_model,
                timeout=args.timeout,
                smaps=args.smaps,
            )
            configs.append(measure(config, args.work_dir))
    result: dict[str, Any] = {
        "benchmark": "fl-memory",
        "model_size": args.model_size,
        "rounds": args.rounds,
        "clients": args.clients,
        "driver": args.driver,
        "initial_model": args.initial_model,
        "machine": {"cpus": os.cpu_count(), "memory_bytes": _total_memory()},
        "configs": configs,
        "all_bounds_hold": all(config["bound_holds"] for config in configs),
    }
    if not args.no_write:
        result["files"] = _write(result, args.results_dir)
    for config in configs:  # the timelines and smaps went to the file; the summary stays short
        config.pop("timeline", None)
    return result


@dataclass
class Configuration:
    dtype: str
    sums: str
    model_size: int
    rounds: int
    clients: int
    driver: str = "tcp"
    initial_model: str = "built-in"  # or "file"
    timeout: float = 1800.0
    smaps: bool = False

    @property
    def name(self) -> str:
        return f"{self.dtype}/{self.sums}"

    def padding_bytes(self) -> int:
        """The built-in MLP's `model_size` (its padding, in bytes of this dtype) for a model of
        `model_size` bytes in this dtype."""
        numel = max(0, self.model_size // ITEMSIZE[self.dtype] - _MLP_LAYER_NUMEL)
        return numel * ITEMSIZE[self.dtype]


def measure(config: Configuration, work_dir: Path | None = None) -> dict[str, Any]:
    """Run one job (server and clients as processes); its memory and round figures."""
    if work_dir is not None:
        work_dir.mkdir(parents=True, exist_ok=True)
    directory = Path(tempfile.mkdtemp(prefix="fl-memory-", dir=work_dir))
    try:
        return _measure(config, directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _measure(config: Configuration, directory: Path) -> dict[str, Any]:
    state_dir = directory / "state"
    server_toml = directory / "server.toml"
    initial = None
    if config.initial_model == "file":
        initial = _write_initial_model(config, directory / "initial.safetensors")
    server_toml.write_text(_server_toml(config, state_dir, directory / "sums", initial))
    started = time.perf_counter()
    server = _Process.start(
        "server", [*_tensorwire(), "server", "--config", str(server_toml), "--quiet"], directory
    )
    clients: list[_Process] = []
    watch: _Watch | None = None
    startup = RssSampler(pid=server.pid).start()  # building and storing the initial model
    try:
        url = server.wait_for(_LISTENING, config.timeout).group(1)
        listening_after = time.perf_counter() - started
        startup.stop()
        watch = _Watch(server.pid, want_smaps=config.smaps).start()
        for site in range(config.clients):
            env = {
                "TENSORWIRE_SERVER": url,
                "TENSORWIRE_SITE": f"site-{site}",
                "TENSORWIRE_HEARTBEAT": "2.0",
            }
            command = [sys.executable, "-m", "benchmarks.fl_site", str(site)]
            clients.append(_Process.start(f"site-{site}", command, directory, env))
        last_round = re.compile(rf"^round {config.rounds}: ")
        server.wait_for(last_round, config.timeout - (time.perf_counter() - started))
        job_seconds = time.perf_counter() - started - listening_after
        watch.stop()  # the job is done: its R rounds are what is measured
        status = server.wait(60)
        client_reports = [client.report(60) for client in clients]
    except BaseException:
        for process in [server, *clients]:
            process.kill()
        raise
    finally:
        startup.stop()
        if watch is not None:
            watch.stop()
    if status != 0:
        raise RuntimeError(f"{config.name}: the server exited with {status}:\n{server.tail()}")
    model = _model_of(state_dir, config.rounds)
    return _figures(
        config, startup, model, watch, server.rounds(), client_reports, job_seconds, listening_after
    )


def _figures(
    config: Configuration,
    startup: RssSampler,
    model: dict[str, int],
    watch: _Watch,
    round_seconds: list[float],
    client_reports: list[dict[str, Any]],
    job_seconds: float,
    listening_after: float,
) -> dict[str, Any]:
    sampler = watch.sampler
    bound = model["numel"] * SUM_ITEMSIZE if config.sums == "memory" else FILE_SUMS_BOUND
    anon_above = sampler.anon_peak - sampler.anon_baseline
    figures: dict[str, Any] = {
        "dtype": config.dtype,
        "sums": config.sums,
        "model_bytes": model["nbytes"],
        "model_numel": model["numel"],
        "bound_bytes": bound,
        "bound_mib": round(bound / MIB, 1),
        "bound": "one model of float32 sums" if config.sums == "memory" else "256 MiB",
        "peak_rss_above_baseline_mib": round(sampler.peak_above_baseline_mib, 1),
        "peak_anon_above_baseline_mib": round(sampler.anon_peak_above_baseline_mib, 1),
        "bound_holds": anon_above <= bound,
        "baseline_rss_mib": round(sampler.baseline / MIB, 1),
        "baseline_anon_mib": round(sampler.anon_baseline / MIB, 1),
        "peak_rss_mib": round(sampler.peak / MIB, 1),
        "peak_anon_mib": round(sampler.anon_peak / MIB, 1),
        "round_seconds": round_seconds,
        "job_seconds": round(job_seconds, 2),
        "startup_seconds": round(listening_after, 2),
        # from the server's exec to "listening on": imports, building the model, storing it
        "startup_peak_rss_mib": round(startup.peak / MIB, 1),
        "startup_peak_anon_mib": round(startup.anon_peak / MIB, 1),
        "clients": client_reports,
        "timeline": watch.timeline,
    }
    if watch.smaps is not None:
        figures["smaps_at_anon_peak"] = watch.smaps
    return figures


def _server_toml(
    config: Configuration, state_dir: Path, sums_dir: Path, initial: Path | None
) -> str:
    lines = [
        f'listen = ["{config.driver}://127.0.0.1:0"]',
        'job = "fl-memory"',
        f"state_dir = {json.dumps(str(state_dir))}",
        "idle_timeout = 600.0",
        "[fedavg]",
        f"rounds = {config.rounds}",
        f"num_clients = {config.clients}",
        f"min_clients = {config.clients}",
        f"join_timeout = {config.timeout}",
        f"model_size = {config.padding_bytes()}",
        f'model_dtype = "{config.dtype}"',
    ]
    if initial is not None:
        lines.append(f"initial_model = {json.dumps(str(initial))}")
    if config.sums == "file":
        lines.append(f"accumulator_dir = {json.dumps(str(sums_dir))}")
    return "\n".join(lines) + "\n"


def _write_initial_model(config: Configuration, path: Path) -> Path:
    """The model the server would build (the task's padded MLP in the dtype), as a file."""
    import torch
    from safetensors.torch import save_file

    from fl.task import MLP

    dtype = getattr(torch, config.dtype)
    state_dict = MLP(padding_bytes=config.padding_bytes()).state_dict()
    save_file({name: tensor.to(dtype) for name, tensor in state_dict.items()}, str(path))
    return path


def _tensorwire() -> list[str]:
    """The venv's `tensorwire` console script beside this Python, else `python -m fl.cli`."""
    script = Path(sys.executable).with_name("tensorwire")
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "fl.cli"]


def _model_of(state_dir: Path, rounds: int) -> dict[str, int]:
    """Elements and bytes of the job's final model (read from its safetensors header)."""
    from fl.job_state import model_name

    path = state_dir / model_name(rounds)
    with path.open("rb") as handle:
        header_length = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(header_length))
    numel = nbytes = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        count = 1
        for dimension in entry["shape"]:
            count *= dimension
        numel += count
        nbytes += entry["data_offsets"][1] - entry["data_offsets"][0]
    return {"numel": numel, "nbytes": nbytes}


def _total_memory() -> int:
    import psutil

    return int(psutil.virtual_memory().total)


class _Process:
    """A child process whose stdout lines are read by a thread (kept, and matched on demand);
    stderr goes to a file in the job's directory."""

    def __init__(self, name: str, popen: subprocess.Popen[str], stderr_path: Path) -> None:
        self.name = name
        self.popen = popen
        self.stderr_path = stderr_path
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._done = False
        self._reader = threading.Thread(target=self._read, name=f"{name}-stdout", daemon=True)
        self._reader.start()

    @classmethod
    def start(
        cls, name: str, command: list[str], directory: Path, env: dict[str, str] | None = None
    ) -> _Process:
        stderr_path = directory / f"{name}.stderr"
        popen = subprocess.Popen(
            command,
            cwd=REPO,
            env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr_path.open("w"),
            text=True,
        )
        return cls(name, popen, stderr_path)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._done = True
            self._changed.notify_all()

    def wait_for(self, pattern: re.Pattern[str], timeout: float) -> re.Match[str]:
        """The first stdout line matching `pattern`; RuntimeError if the process ends first."""
        deadline = time.monotonic() + timeout
        seen = 0
        with self._changed:
            while True:
                for line in self.lines[seen:]:
                    if match := pattern.search(line):
                        return match
                seen = len(self.lines)
                if self._done:
                    raise RuntimeError(
                        f"{self.name} ended before {pattern.pattern!r}:\n{self.tail()}"
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{self.name}: no {pattern.pattern!r} in {timeout:.0f} s")
                self._changed.wait(min(left, 1.0))

    def wait(self, timeout: float) -> int:
        status = self.popen.wait(timeout)
        self._reader.join(timeout=10)
        return status

    def report(self, timeout: float) -> dict[str, Any]:
        """A client's last stdout line (its JSON report) once it has exited."""
        status = self.wait(timeout)
        if status != 0:
            raise RuntimeError(f"{self.name} exited with {status}:\n{self.tail()}")
        for line in reversed(self.lines):
            with contextlib.suppress(ValueError):
                report: dict[str, Any] = json.loads(line)
                return report
        raise RuntimeError(f"{self.name} printed no report:\n{self.tail()}")

    def rounds(self) -> list[float]:
        """The server's round times, from its "round N: ... in S s" lines."""
        return [float(m.group(2)) for line in self.lines if (m := _ROUND.search(line))]

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()

    def tail(self, lines: int = 30) -> str:
        text = self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""
        return "\n".join([*self.lines[-lines:], *text.splitlines()[-lines:]])


@dataclass
class _Watch:
    """The server's peaks (RssSampler, every 5 ms, from outside) and a timeline of RSS and
    anonymous RSS above baseline every 0.1 s; with `smaps`, the server's /proc/PID/smaps
    summarized at the highest anonymous RSS seen by the timeline."""

    pid: int
    want_smaps: bool = False
    smaps: dict[str, Any] | None = None
    sampler: RssSampler = field(init=False)
    timeline: list[tuple[float, float, float]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> _Watch:
        self.sampler = RssSampler(pid=self.pid).start()
        self._thread = threading.Thread(target=self._follow, name="fl-memory-watch", daemon=True)
        self._thread.start()
        return self

    def _follow(self) -> None:
        started = time.perf_counter()
        base_rss, base_anon = self.sampler.baseline, self.sampler.anon_baseline
        highest = 0
        while not self._stop.wait(0.1):
            try:
                rss, anon = memory_of(self.pid)
                if self.want_smaps and anon > highest + 16 * MIB:
                    self.smaps = _smaps_summary(self.pid) | {"anon_mib": round(anon / MIB, 1)}
                    highest = anon
            except (OSError, KeyError, ValueError):  # ended (a zombie has no VmRSS)
                return
            now = round(time.perf_counter() - started, 2)
            self.timeline.append(
                (now, round((rss - base_rss) / MIB, 1), round((anon - base_anon) / MIB, 1))
            )

    def stop(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self.sampler.stop()
        if self._thread is not None:
            self._thread.join()


def _smaps_summary(pid: int) -> dict[str, Any]:
    """Anonymous memory by kind of mapping: [heap] (glibc's main arena), anonymous mappings of
    at most 64 MiB (glibc's thread arenas, stacks, small mmaps), larger anonymous mappings (big
    malloc'd blocks: torch tensors, the sums), and file mappings (private pages written to)."""
    kinds: dict[str, int] = {}
    largest: list[tuple[int, str]] = []
    mapping = name = ""
    size = 0
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        fields = line.split()
        if fields and "-" in fields[0] and len(fields) >= 5 and not fields[0].endswith(":"):
            mapping, name = fields[0], " ".join(fields[5:])
            start, end = (int(part, 16) for part in mapping.split("-"))
            size = end - start
        elif fields and fields[0] == "Anonymous:":
            anon = int(fields[1]) * 1024
            if not anon:
                continue
            if name == "[heap]":
                kind = "heap"
            elif name.startswith("/"):
                kind = "file mappings (written pages)"
            elif name:
                kind = name
            elif size <= 64 * MIB:
                kind = "anonymous mappings <= 64 MiB (arenas, stacks, small mmaps)"
            else:
                kind = "anonymous mappings > 64 MiB (large blocks)"
            kinds[kind] = kinds.get(kind, 0) + anon
            largest.append((anon, f"{mapping} {size / MIB:.1f} MiB {name or '(anon)'}"))
    largest.sort(reverse=True)
    return {
        "by_kind_mib": {kind: round(total / MIB, 1) for kind, total in sorted(kinds.items())},
        "largest": [f"{anon / MIB:.1f} MiB anon in {where}" for anon, where in largest[:12]],
        "mappings_with_anon": len(largest),
    }


def format_human(result: dict[str, Any]) -> str:
    """The configurations as a table (what `python -m benchmarks fl-memory` prints)."""
    head = ["dtype", "sums", "model", "bound", "anon", "holds", "RSS"]
    head += ["base anon", "abs anon", "start-up anon", "rounds s"]
    rows = [head]
    for config in result["configs"]:
        cells = [config["dtype"], config["sums"], format_size(config["model_bytes"])]
        cells += [f"{config['bound_mib']:,.0f}", f"{config['peak_anon_above_baseline_mib']:,.0f}"]
        cells += ["yes" if config["bound_holds"] else "NO"]
        for key in ("peak_rss_above_baseline_mib", "baseline_anon_mib", "peak_anon_mib"):
            cells.append(f"{config[key]:,.0f}")
        cells.append(f"{config['startup_peak_anon_mib']:,.0f}")
        cells.append(" ".join(f"{seconds:.1f}" for seconds in config["round_seconds"]))
        rows.append(cells)
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = [
        "  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True))
        for row in rows
    ]
    title = (
        f"server memory (MiB) over {result['rounds']} rounds, {result['clients']} clients, "
        f"{result['driver']}, initial model {result['initial_model']}"
    )
    legend = (
        "anon, RSS: peaks above the baseline at 'listening on'; base anon: that baseline; "
        "abs anon: the absolute peak;\nstart-up anon: the peak before listening; bound: on anon"
    )
    files = result.get("files", {})
    lines += [legend, *(f"{kind}: {path}" for kind, path in files.items())]
    return "\n".join([title, *lines])


def _write(result: dict[str, Any], directory: Path) -> dict[str, str]:
    directory.mkdir(parents=True, exist_ok=True)
    size = format_size(result["model_size"]).replace(" ", "")
    stem = f"fl-memory-{time.strftime('%Y%m%d-%H%M%S')}-{size}"
    json_path = directory / f"{stem}.json"
    json_path.write_text(json.dumps(result) + "\n")  # one line: the timelines are long
    files = {"json": str(json_path)}
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return files | {"plot": "skipped: matplotlib is not installed"}
    figure, axes = plt.subplots(figsize=(9, 4.5))
    for config in result["configs"]:
        points = config["timeline"]
        times = [point[0] for point in points]
        label = f"{config['dtype']}, {config['sums']} sums"
        (line,) = axes.plot(times, [point[2] for point in points], label=f"{label}: anon")
        axes.plot(
            times,
            [point[1] for point in points],
            linestyle=":",
            color=line.get_color(),
            label=f"{label}: RSS",
        )
    title = f"server memory above baseline, {size} model, {result['rounds']} rounds"
    axes.set(xlabel="seconds since 'listening on'", ylabel="MiB", title=title)
    axes.set_ylim(bottom=0)
    axes.legend(fontsize="small")
    plot = directory / f"{stem}-server.png"
    figure.savefig(plot, dpi=100)
    plt.close(figure)
    return files | {"plot": str(plot)}
