"""Flower 1.42 as it is deployed: a SuperLink and a SuperNode (each an OS process started from
the Flower venv), and the Flower App in flower_app/ submitted with `flwr run`. The SuperLink
starts the ServerApp and the SuperNode the ClientApp, each in a subprocess of its own
(`--isolation subprocess`, the default).

The ServerApp builds the dict, converts it to an ArrayRecord and sends it in one Message to the
one SuperNode with grid.send_and_receive; the ClientApp turns the ArrayRecord back into torch
tensors (ArrayRecord.to_torch_state_dict()). Timed: the ServerApp's clock reading before the
ArrayRecord conversion to the ClientApp's after to_torch_state_dict() returned. The path the bytes
take: ServerApp -> SuperLink (ServerAppIo) -> SuperNode (Fleet API) -> ClientApp (ClientAppIo);
in 1.42 these are HTTP APIs, and Flower splits each Array into 5 MB ArrayChunk objects that are
pushed and pulled one object at a time.

Memory: the "sender" side is the SuperLink's process tree (SuperLink, its ServerApp subprocess and
anything else it starts), the "receiver" side the SuperNode's; the app process comes first in
each side's list.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


def _wait_file(path: Path, deadline: float, procs: list[subprocess.Popen[bytes]]) -> dict[str, Any]:
    while time.monotonic() < deadline:
        if path.exists():
            return dict(json.loads(path.read_text()))
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{proc.args[0]} exited with {proc.returncode} before {path.name}"
                )
        time.sleep(0.05)
    raise TimeoutError(f"no {path.name} in time")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def run_flower_deployment(
    *,
    python: Path,
    count: int,
    logdir: Path,
    timeout: float,
    app_dir: Path,
    watch_factory: Callable[[], Any],
    hwm: Callable[[int], float | None],
    compare: Callable[[dict[str, Any], dict[str, Any]], str | None],
    tensor_bytes: int,
) -> dict[str, Any]:
    bindir = python.parent
    work = logdir / f"flower-{count}-{time.time_ns()}"
    home = work / "flwr-home"
    out = work / "out"
    app = work / "app"
    for d in (home, out):
        d.mkdir(parents=True)
    shutil.copytree(app_dir, app, ignore=shutil.ignore_patterns("__pycache__"))
    link_port, node_port = _free_port(), _free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "bench"\n\n[superlink.bench]\n'
        f'address = "127.0.0.1:{link_port}"\ninsecure = true\n'
    )
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env["FLWR_HOME"] = str(home)
    env["PATH"] = f"{bindir}:{env.get('PATH', '')}"
    deadline = time.monotonic() + timeout
    result: dict[str, Any] = {}
    procs: list[subprocess.Popen[bytes]] = []
    logs = []
    watch = watch_factory()

    def start(name: str, args: list[str]) -> subprocess.Popen[bytes]:
        log = open(logdir / f"flower-{count}-{name}.log", "ab")  # noqa: SIM115
        logs.append(log)
        proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=env,
            cwd=work,
            start_new_session=True,
        )
        procs.append(proc)
        return proc

    try:
        link = start(
            "superlink",
            [
                str(bindir / "flower-superlink"),
                "--insecure",
                "--host",
                "127.0.0.1",
                "--port",
                str(link_port),
                "--disable-runtime-dependency-installation",
            ],
        )
        watch.add("sender", link.pid)
        watch.start()
        _wait_port(link_port, deadline)
        node = start(
            "supernode",
            [
                str(bindir / "flower-supernode"),
                "--insecure",
                "--superlink",
                f"127.0.0.1:{link_port}",
                "--host",
                "127.0.0.1",
                "--port",
                str(node_port),
            ],
        )
        watch.add("receiver", node.pid)
        submit = subprocess.run(
            [
                str(bindir / "flwr"),
                "run",
                str(app),
                "bench",
                "--run-config",
                f"count={count} out-dir='{out}'",
            ],
            env=env,
            cwd=work,
            capture_output=True,
            text=True,
            timeout=300,
        )
        (logdir / f"flower-{count}-flwr-run.log").write_text(submit.stdout + submit.stderr)
        if submit.returncode != 0:
            raise RuntimeError(f"flwr run failed: {(submit.stdout + submit.stderr)[-800:]}")
        ready = _wait_file(out / "sender-ready.json", deadline, procs)
        start_ev = _wait_file(out / "sender-start.json", deadline, procs)
        done = _wait_file(out / "receiver-done.json", deadline, procs)
        marks = {pid: v for pid in list(watch.owner) if (v := hwm(pid)) is not None}
        (out / "release").write_text("")
        sent = _wait_file(out / "sender-sent.json", time.monotonic() + 300, procs)
        seconds = done["t1"] - start_ev["t0"]
        mismatch = compare(ready["tensors"], done["tensors"])
        result.update(
            ok=bool(sent.get("ok")) and not mismatch,
            seconds=round(seconds, 3),
            mbps=round(count * tensor_bytes / seconds / 1e6, 1),
            sender_call_returned_s=round(sent["t_sent"] - start_ev["t0"], 3),
            clientapp_loaded_s=round(done["t_app_loaded"] - start_ev["t0"], 3),
            message_in_clientapp_s=round(done["t_message"] - start_ev["t0"], 3),
            received_types=done.get("types"),
            mismatch=mismatch,
        )
        if sent.get("error"):
            result["error"] = sent["error"]
        for role, app_pid in (("sender", ready["pid"]), ("receiver", done["pid"])):
            side = watch.side(role, marks)
            side["processes"].sort(key=lambda p: p["pid"] != app_pid)
            result[role] = side
    except Exception as exc:  # reported, not raised: the other systems still run
        watch.record_failure(result, exc)
    finally:
        (out / "release").write_text("")
        for proc in reversed(procs):
            _stop(proc)
        if watch._thread.is_alive():
            watch.stop()
        for log in logs:
            log.close()
    return result
