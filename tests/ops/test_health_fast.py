"""`tensorwire health` is a probe (Docker HEALTHCHECK every 15 s with a 5 s timeout, a Kubernetes
exec probe): it must start fast and small, which means it must not import torch. Asserted on
what is imported and on the peak RSS the parent sees (wait4), never on wall-clock time, which
a busy machine makes flaky. And the ops server answers HEAD like GET, without the body."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

ROOT = Path(__file__).parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
CLI = str(Path(sys.executable).with_name("tensorwire"))
MAX_RSS_BYTES = 60 * 10**6
HEAVY = ("torch", "numpy", "transport", "prometheus_client")
# fl/cli.py (not this change's file) imports `transport`, and with it torch, before any command
# runs: `import transport` -> `importlib.metadata.version("tensorwire")` in its `version()`.


@pytest.fixture(scope="module")
def ops_url() -> Iterator[str]:
    from fl.cli_ops import start_ops

    ops = start_ops(0)
    assert ops is not None
    try:
        yield ops.url
    finally:
        ops.close()


def imported_by(code: str) -> set[str]:
    """Top-level packages a fresh interpreter has imported after running `code`."""
    probe = f"{code}\nimport sys\nprint(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    done = subprocess.run(
        [sys.executable, "-c", probe], env=ENV, capture_output=True, text=True, check=True
    )
    return set(done.stdout.split())


def test_the_modules_of_the_health_command_import_nothing_heavy() -> None:
    loaded = imported_by("import fl.cli_ops, fl.cli_certs, fl.daemons_cli, fl.config")
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))


# Run from a small launcher: a child forked from pytest itself would report pytest's resident
# pages (hundreds of MB) in its peak RSS before it even exec'd the command.
_LAUNCHER = """
import os, subprocess, sys
child = subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
output = child.stdout.read()
_, status, usage = os.wait4(child.pid, 0)
sys.stdout.buffer.write(output)
print(os.waitstatus_to_exitcode(status), usage.ru_maxrss * 1024)
"""


def run_health(url: str) -> tuple[int, int, str]:
    """(exit status, peak RSS in bytes measured by its parent, output) of the installed
    `tensorwire health` against `url`."""
    port = url.rsplit(":", 1)[1]
    done = subprocess.run(
        [sys.executable, "-c", _LAUNCHER, CLI, "health", "--port", port],
        env=ENV,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    output, _, last = done.stdout.rstrip("\n").rpartition("\n")
    status, peak = (int(value) for value in last.split())
    return status, peak, output


def test_health_says_healthy(ops_url: str) -> None:
    status, _, output = run_health(ops_url)
    assert status == 0, output
    assert output.strip().endswith("ok")


def test_health_stays_under_60_mb(ops_url: str) -> None:
    _, peak, _ = run_health(ops_url)
    assert peak < MAX_RSS_BYTES, f"{peak / 1e6:.0f} MB"


def test_health_command_imports_no_torch(ops_url: str) -> None:
    port = ops_url.rsplit(":", 1)[1]
    code = (
        "import sys\nfrom fl.cli import app\n"
        f"try:\n    app(['health', '--port', '{port}'])\nexcept SystemExit:\n    pass"
    )
    loaded = imported_by(code)
    assert "torch" not in loaded


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics"])
def test_head_is_answered_like_get(ops_url: str, path: str) -> None:
    with urllib.request.urlopen(ops_url + path, timeout=10) as got:
        length = got.headers["Content-Length"]
        assert got.status == 200
    head = urllib.request.Request(ops_url + path, method="HEAD")
    with urllib.request.urlopen(head, timeout=10) as answer:
        assert answer.status == 200
        assert answer.read() == b""
        if path != "/metrics":  # the metrics' length changes between two scrapes
            assert answer.headers["Content-Length"] == length


def test_health_in_process(ops_url: str) -> None:
    from fl.cli import app

    port = ops_url.rsplit(":", 1)[1]
    assert CliRunner().invoke(app, ["health", "--port", port, "--ready"]).exit_code == 0
