"""tensorwire side by side with NVFlare 2.9 and Flower 1.42 on the same work, on loopback.

    .venv/bin/python -m benchmarks.peers.run --size 2GiB --runs 3 --json
    .venv/bin/python -m benchmarks.peers.run --size 2GiB,4GiB --only bare,nvflare

The work: a sender process builds a dict of N x 256 MiB float32 tensors (torch.randn, every page
written before timing) and sends it; a receiver process receives it into a new dict of torch
tensors. Each system's two ends are separate OS processes started with that system's own
interpreter (NVFlare and Flower each in a virtual environment of its own, made here from the
package index; bare and tensorwire from this repo's .venv). Not part of CI.

Timed: from the sender's clock reading just before its send call to the receiver's clock reading
as soon as it holds the whole dict (time.time() on one machine in both processes). Checked after
timing: crc32, dtype and shape of every received tensor against the sender's.

Memory is read from outside: this process polls /proc/<pid>/status (VmRSS) of each end, and of
every process they start, every 10 ms, and reads VmHWM before it lets an end exit.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
CHILD = HERE / "peer_child.py"
FLOWER_APP = HERE / "flower_app"
MIB = 1024 * 1024
TENSOR_BYTES = 256 * MIB
TORCH_PIN = "torch==2.13.0"
PEER_REQUIREMENTS = {
    "nvflare": ["nvflare==2.9.*", TORCH_PIN],
    "flower": ["flwr==1.42.*", TORCH_PIN],
}
MARKER = ".tensorwire-peers-installed"


@dataclass(frozen=True)
class Spec:
    label: str
    system: str
    driver: str
    venv: str | None  # None: this repo's interpreter


SPECS = [
    Spec("bare", "bare", "tcp", None),
    Spec("tensorwire-tcp", "tensorwire", "tcp", None),
    Spec("tensorwire-grpc", "tensorwire", "grpc", None),
    Spec("tensorwire-http", "tensorwire", "http", None),
    Spec("nvflare-tcp", "nvflare", "tcp", "nvflare"),
    Spec("nvflare-grpc", "nvflare", "grpc", "nvflare"),
    Spec("nvflare-http", "nvflare", "http", "nvflare"),
    Spec("flower", "flower", "http", "flower"),
]


# ---------------------------------------------------------------------------------------------
# virtual environments


def ensure_venv(cache: Path, name: str, log: Path) -> Path:
    """The venv's python, made and installed on first use; reused while its marker matches."""
    requirements = PEER_REQUIREMENTS[name]
    root = cache / name
    python = root / "bin" / "python"
    marker = root / MARKER
    wanted = "\n".join(requirements) + "\n"
    if python.exists() and marker.exists() and marker.read_text() == wanted:
        return python
    print(f"[peers] installing {' '.join(requirements)} into {root} (log {log})", file=sys.stderr)
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        if not python.exists():
            subprocess.run(["python3", "-m", "venv", str(root)], check=True, stdout=out, stderr=out)
        subprocess.run(
            [str(python), "-m", "pip", "install", *requirements],
            check=True,
            stdout=out,
            stderr=out,
        )
        freeze = subprocess.run(
            [str(python), "-m", "pip", "freeze"], check=True, capture_output=True, text=True
        )
    (root / "pip-freeze.txt").write_text(freeze.stdout)
    marker.write_text(wanted)
    return python


def installed_version(python: Path, dist: str) -> str:
    code = f"import importlib.metadata as m; print(m.version({dist!r}))"
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True)
    return out.stdout.strip() or "?"


# ---------------------------------------------------------------------------------------------
# memory, read from outside


def _status_kib(pid: int, key: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(key.encode()):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return None


def rss_mib(pid: int) -> float | None:
    kib = _status_kib(pid, "VmRSS:")
    return None if kib is None else kib / 1024


def hwm_mib(pid: int) -> float | None:
    kib = _status_kib(pid, "VmHWM:")
    return None if kib is None else kib / 1024


def _children_of() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
        tree.setdefault(ppid, []).append(int(entry))
    return tree


class RssWatch:
    """Polls VmRSS of a process and of all its descendants every `interval` seconds; keeps the
    peak of each (a descendant's peak is only what the polls saw once it has exited)."""

    def __init__(self, interval: float = 0.01) -> None:
        self.interval = interval
        self.roots: dict[str, int] = {}
        self.peak: dict[int, float] = {}
        self.names: dict[int, str] = {}
        self.owner: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._lock = threading.Lock()

    def add(self, role: str, pid: int) -> None:
        with self._lock:
            self.roots[role] = pid
            self.owner[pid] = role
        self._sample(pid)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self, pid: int) -> None:
        value = rss_mib(pid)
        if value is not None and value > self.peak.get(pid, 0.0):
            self.peak[pid] = value
        if pid not in self.names:
            with contextlib.suppress(OSError):
                self.names[pid] = (
                    Path(f"/proc/{pid}/cmdline")
                    .read_bytes()
                    .replace(b"\0", b" ")[:160]
                    .decode(errors="replace")
                )

    def _run(self) -> None:
        last_scan = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            if now - last_scan > 0.1:
                last_scan = now
                tree = _children_of()
                with self._lock:
                    for role, root in list(self.roots.items()):
                        todo = [root]
                        while todo:
                            pid = todo.pop()
                            self.owner.setdefault(pid, role)
                            todo.extend(tree.get(pid, []))
            with self._lock:
                pids = list(self.owner)
            for pid in pids:
                self._sample(pid)
            time.sleep(self.interval)

    def record_failure(self, result: dict[str, Any], exc: Exception) -> None:
        """A run that failed: its error, and what memory each side that started reached."""
        result.update(ok=False, error=f"{type(exc).__name__}: {exc}")
        for role in ("sender", "receiver"):
            if role in self.roots:
                result[role] = self.side(role, {})

    def side(self, role: str, hwm: dict[int, float]) -> dict[str, Any]:
        """Peak per process of one side (the root first), VmHWM where it could be read."""
        procs = []
        root = self.roots[role]
        for pid, owner in sorted(self.owner.items(), key=lambda kv: (kv[0] != root, kv[0])):
            if owner != role:
                continue
            peak = max(self.peak.get(pid, 0.0), hwm.get(pid, 0.0))
            if peak < 1:
                continue
            procs.append({"pid": pid, "cmd": self.names.get(pid, "?"), "peak_mib": round(peak, 1)})
        return {"processes": procs}


# ---------------------------------------------------------------------------------------------
# one end


class End:
    def __init__(self, role: str, cmd: list[str], env: dict[str, str], log: Path, cwd: Path):
        self.role = role
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.log = open(log, "ab")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace")
            if line.startswith("@@peer "):
                self.events.put(json.loads(line[7:]))
            else:
                self.log.write(raw)
        self.events.put({"ev": "eof", "rc": self.proc.wait()})

    def wait(self, wanted: str, deadline: float) -> dict[str, Any]:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.role}: no '{wanted}' in time")
            try:
                event = self.events.get(timeout=left)
            except queue.Empty:
                continue
            if event["ev"] == wanted:
                return event
            if event["ev"] in ("error", "eof"):
                raise RuntimeError(f"{self.role}: {event}")

    def tell(self, line: str) -> None:
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write((line + "\n").encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass

    def close(self, grace: float = 20.0) -> None:
        self.tell("exit")
        try:
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()
        self.log.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def compare(sent: dict[str, Any], received: dict[str, Any]) -> str | None:
    if sorted(sent) != sorted(received):
        return f"names differ: sent {sorted(sent)} received {sorted(received)}"
    for name, (crc, dtype, shape, nbytes) in sent.items():
        if received[name] != [crc, dtype, shape, nbytes]:
            return f"{name}: sent {[crc, dtype, shape, nbytes]} received {received[name]}"
    return None


def run_pair(spec: Spec, python: Path, count: int, logdir: Path, timeout: float) -> dict[str, Any]:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    cwd = logdir
    if spec.system == "tensorwire":
        env["PYTHONPATH"] = str(REPO)
    base = [str(python), str(CHILD), "--system", spec.system, "--driver", spec.driver]
    base += ["--count", str(count)]
    port = free_port()
    stem = f"{spec.label}-{count}"
    watch = RssWatch()
    ends: list[End] = []
    result: dict[str, Any] = {"label": spec.label, "system": spec.system, "driver": spec.driver}
    deadline = time.monotonic() + timeout
    try:
        receiver = End(
            "receiver",
            [*base, "--role", "recv", "--port", str(port)],
            env,
            logdir / f"{stem}-recv.log",
            cwd,
        )
        ends.append(receiver)
        watch.add("receiver", receiver.proc.pid)
        watch.start()
        ready = receiver.wait("ready", deadline)
        recv_base = rss_mib(receiver.proc.pid)
        url = ready.get("url", "")
        sender = End(
            "sender",
            [*base, "--role", "send", "--port", str(port), "--url", url],
            env,
            logdir / f"{stem}-send.log",
            cwd,
        )
        ends.append(sender)
        watch.add("sender", sender.proc.pid)
        sent_ready = sender.wait("ready", deadline)
        send_base = rss_mib(sender.proc.pid)
        sender.tell("go")
        sent = sender.wait("sent", deadline)
        done = receiver.wait("done", deadline)
        hwm = {}
        for end in ends:
            value = hwm_mib(end.proc.pid)
            if value is not None:
                hwm[end.proc.pid] = value
        seconds = done["t1"] - sent["t0"]
        nbytes = count * TENSOR_BYTES
        result.update(
            ok=True,
            seconds=round(seconds, 3),
            mbps=round(nbytes / seconds / 1e6, 1),
            sender_call_returned_s=round(sent["t_sent"] - sent["t0"], 3),
            received_types=done.get("types"),
            mismatch=compare(sent_ready["tensors"], done["tensors"]),
        )
        if result["mismatch"]:
            result["ok"] = False
        for role, base_rss in (("sender", send_base), ("receiver", recv_base)):
            side = watch.side(role, hwm)
            side["base_mib"] = None if base_rss is None else round(base_rss, 1)
            result[role] = side
    except Exception as exc:  # reported, not raised: the other systems still run
        watch.record_failure(result, exc)
    finally:
        for end in reversed(ends):
            end.close()
        if watch._thread.is_alive():
            watch.stop()
    return result


# ---------------------------------------------------------------------------------------------
# Flower: a real deployment (SuperLink, SuperNode, `flwr run`), see flower_app/


def run_flower(python: Path, count: int, logdir: Path, timeout: float) -> dict[str, Any]:
    from benchmarks.peers.flower_deploy import run_flower_deployment

    return run_flower_deployment(
        python=python,
        count=count,
        logdir=logdir,
        timeout=timeout,
        app_dir=FLOWER_APP,
        watch_factory=RssWatch,
        hwm=hwm_mib,
        compare=compare,
        tensor_bytes=TENSOR_BYTES,
    )


# ---------------------------------------------------------------------------------------------
# report


def parse_size(text: str) -> int:
    text = text.strip()
    units = {"GiB": 1024**3, "MiB": MIB}
    for unit, factor in units.items():
        if text.endswith(unit):
            value = float(text[: -len(unit)]) * factor
            break
    else:
        value = float(text)
    count = round(value / TENSOR_BYTES)
    if count < 1 or count * TENSOR_BYTES != int(value):
        raise argparse.ArgumentTypeError(f"{text}: a size must be a multiple of 256 MiB")
    return count


def pick(only: str) -> list[Spec]:
    if not only:
        return list(SPECS)
    wanted = [w.strip() for w in only.split(",") if w.strip()]
    specs = [s for s in SPECS if s.label in wanted or s.system in wanted]
    unknown = [w for w in wanted if not any(w in (s.label, s.system) for s in SPECS)]
    if unknown:
        raise SystemExit(f"unknown systems {unknown}; known: {[s.label for s in SPECS]}")
    if not any(s.system == "bare" for s in specs):
        specs.insert(0, SPECS[0])  # every ratio needs the bare figure of the same run
    return specs


def _span(values: list[float], digits: int = 0) -> str:
    if not values:
        return "-"
    lo, hi = min(values), max(values)
    fmt = f"{{:.{digits}f}}"
    return (
        fmt.format(lo) if fmt.format(lo) == fmt.format(hi) else f"{fmt.format(lo)}-{fmt.format(hi)}"
    )


def side_peak(result: dict[str, Any], role: str) -> float | None:
    """A side's peak: its root process (the end we started); descendants are listed apart."""
    procs = result.get(role, {}).get("processes", [])
    if not procs:
        return None
    return float(procs[0]["peak_mib"])


def summarize(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for size in sorted({r["size_bytes"] for r in results}):
        at_size = [r for r in results if r["size_bytes"] == size]
        bare = {r["run"]: r["mbps"] for r in at_size if r["label"] == "bare" and r.get("ok")}
        bare_median = statistics.median(bare.values()) if bare else None
        for label in dict.fromkeys(r["label"] for r in at_size):
            runs = [r for r in at_size if r["label"] == label]
            good = [r for r in runs if r.get("ok")]
            mbps = [r["mbps"] for r in good]
            dict_mib = size / MIB
            row: dict[str, Any] = {
                "label": label,
                "size_gib": size / 1024**3,
                "runs": len(runs),
                "ok_runs": len(good),
                "mbps": mbps,
                "errors": sorted({r.get("error") or r.get("mismatch") or "" for r in runs} - {""}),
            }
            if mbps and bare_median:
                # against the bare figure of the same round (run index), measured just before
                row["ratio_to_bare"] = [
                    round(r["mbps"] / bare.get(r["run"], bare_median), 3) for r in good
                ]
            for role in ("sender", "receiver"):
                peaks = [p for p in (side_peak(r, role) for r in good) if p is not None]
                row[f"{role}_peak_mib"] = peaks
                row[f"{role}_above_dict_mib"] = [round(p - dict_mib, 1) for p in peaks]
                row[f"{role}_base_mib"] = [
                    r[role]["base_mib"] for r in good if r.get(role, {}).get("base_mib")
                ]
                extra = [
                    max(
                        (p["peak_mib"] for p in r.get(role, {}).get("processes", [])[1:]),
                        default=0.0,
                    )
                    for r in good
                ]
                row[f"{role}_helper_peak_mib"] = [e for e in extra if e]
            rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| system | dict | MB/s (min-max) | x bare | sender peak MiB | sender above dict | "
        "receiver peak MiB | receiver above dict | runs ok |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        helpers = ""
        for role in ("sender", "receiver"):
            if row[f"{role}_helper_peak_mib"]:
                helpers += f" ({role} helpers {_span(row[f'{role}_helper_peak_mib'])} MiB)"
        errors = f" — {'; '.join(row['errors'])[:300]}" if row["errors"] else ""
        lines.append(
            f"| {row['label']} | {row['size_gib']:g} GiB | {_span(row['mbps'])} | "
            f"{_span(row.get('ratio_to_bare', []), 2)} | {_span(row['sender_peak_mib'])} | "
            f"{_span(row['sender_above_dict_mib'])} | {_span(row['receiver_peak_mib'])} | "
            f"{_span(row['receiver_above_dict_mib'])} | {row['ok_runs']}/{row['runs']}"
            f"{helpers}{errors} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default="2GiB", help="dict size(s), comma-separated: 2GiB,4GiB")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--only", default="", help="systems or labels, e.g. nvflare,flower,tensorwire-tcp"
    )
    parser.add_argument("--json", action="store_true", help="print the JSON result too")
    parser.add_argument(
        "--cache-dir",
        default=os.environ.get(
            "TENSORWIRE_PEERS_CACHE", str(Path.home() / ".cache" / "tensorwire-peers")
        ),
        help="where the peers' virtual environments live",
    )
    parser.add_argument(
        "--timeout", type=float, default=900.0, help="seconds per transfer, setup included"
    )
    parser.add_argument("--logs", default="", help="keep the ends' logs here (default: a temp dir)")
    parser.add_argument("--out", default="", help="write the JSON result to this file too")
    parser.add_argument(
        "--summarize",
        nargs="+",
        metavar="JSON",
        help="only print the tables of earlier --out files (their results merged)",
    )
    args = parser.parse_args()
    if args.summarize:
        merged = []
        for index, name in enumerate(args.summarize):
            for r in json.loads(Path(name).read_text())["results"]:
                r["run"] = f"{index}:{r['run']}"  # bare rounds pair up within their own file
                merged.append(r)
        if args.json:
            print(json.dumps(summarize(merged), indent=2))
        print(markdown(summarize(merged)))
        return

    counts = [parse_size(s) for s in args.size.split(",")]
    specs = pick(args.only)
    cache = Path(args.cache_dir).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    logdir = Path(args.logs) if args.logs else Path(tempfile.mkdtemp(prefix="tensorwire-peers-"))
    logdir.mkdir(parents=True, exist_ok=True)

    pythons: dict[str | None, Path] = {None: Path(sys.executable)}
    versions = {"python": sys.version.split()[0]}
    for venv in dict.fromkeys(s.venv for s in specs if s.venv):
        pythons[venv] = ensure_venv(cache, venv, cache / f"{venv}-install.log")
        dist = {"nvflare": "nvflare", "flower": "flwr"}[venv]
        versions[dist] = installed_version(pythons[venv], dist)
        versions[f"torch ({venv})"] = installed_version(pythons[venv], "torch")
    versions["torch"] = installed_version(pythons[None], "torch")

    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    load_before = os.getloadavg()
    results: list[dict[str, Any]] = []
    for count in counts:
        for run in range(args.runs):
            for spec in specs:
                print(
                    f"[peers] {spec.label} {count * 256} MiB run {run + 1}/{args.runs}",
                    file=sys.stderr,
                )
                if spec.system == "flower":
                    result = run_flower(pythons[spec.venv], count, logdir, args.timeout)
                    result.update(label=spec.label, system=spec.system, driver=spec.driver)
                else:
                    result = run_pair(spec, pythons[spec.venv], count, logdir, args.timeout)
                result.update(size_bytes=count * TENSOR_BYTES, run=run + 1, load=os.getloadavg()[0])
                print(f"[peers]   -> {json.dumps(_brief(result))}", file=sys.stderr)
                results.append(result)

    rows = summarize(results)
    report = {
        "started": started,
        "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "cpus": os.cpu_count(),
        "versions": versions,
        "logs": str(logdir),
        "results": results,
        "summary": rows,
    }
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if args.json:
        print(text)
    print()
    print(markdown(rows))
    print(f"\nload {load_before} -> {report['load_after']}; versions {versions}; logs {logdir}")
    if not args.logs and all(r.get("ok") for r in results):
        shutil.rmtree(logdir, ignore_errors=True)


def _brief(result: dict[str, Any]) -> dict[str, Any]:
    brief = {
        k: result.get(k) for k in ("ok", "seconds", "mbps", "error", "mismatch") if result.get(k)
    }
    for role in ("sender", "receiver"):
        peak = side_peak(result, role)
        if peak is not None:
            brief[f"{role}_peak_mib"] = peak
    return brief


if __name__ == "__main__":
    main()
