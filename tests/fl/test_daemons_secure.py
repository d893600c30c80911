"""The daemons as operators deploy them across sites: certificates from `tensorwire certs`, mutual
TLS, an allow-list of site names and a token. Admitted sites run their rounds; a refused site
stops at once with the reason and is not restarted; a plaintext client never gets in."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fl.cli_certs import certs_app
from fl.client import EXIT_NOT_ADMITTED
from tests.fl.test_daemons import CLI, ENV, ROOT, read_url

SCRIPT = ROOT / "examples" / "federated.py"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`tensorwire certs init`, run in-process (a process of its own would import torch)."""
    directory = tmp_path_factory.mktemp("sites") / "pki"
    arguments = ["init", "--out", str(directory), "--client", "site-1", "--client", "site-2"]
    made = CliRunner().invoke(certs_app, arguments)
    assert made.exit_code == 0, made.output
    return directory


def _server(tmp_path: Path, pki: Path, scheme: str) -> subprocess.Popen[str]:
    config = tmp_path / "server.toml"
    config.write_text(
        f'listen = ["{scheme}://127.0.0.1:0"]\njob = "secure"\npki_dir = "{pki}"\n'
        'auth_tokens = ["s3cret"]\nallowed_clients = ["site-1"]\n'
        "[fedavg]\nrounds = 1\nmin_clients = 1\nnum_clients = 1\n"
    )
    command = [*CLI, "server", "--config", str(config), "--quiet"]
    return subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, text=True)


def _start_client(
    tmp_path: Path,
    url: str,
    site: str,
    *,
    pki: Path | None,
    token: str,
    label: str,
    in_process: bool = False,
) -> subprocess.Popen[str]:
    config = tmp_path / f"{label}.toml"
    lines = [
        f'server = "{url}"',
        f'site = "{site}"',
        f'script = "{SCRIPT}"',
        f'token = "{token}"',
        "connect_timeout = 2",
        "max_restarts = 1",
        "restart_backoff = 0.5",
        *([f'pki_dir = "{pki}"'] if pki else []),
    ]
    config.write_text("\n".join(lines) + "\n")
    command = [*CLI, "client", "--config", str(config), "--quiet"]
    command += ["--in-process"] if in_process else []
    return subprocess.Popen(
        [*command, "--", "--site", "0"],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(process: subprocess.Popen[str]) -> subprocess.CompletedProcess[str]:
    stdout, stderr = process.communicate(timeout=120)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


@pytest.mark.parametrize("scheme", ["grpcs", "tcps", "https"])
def test_admitted_site_runs_and_others_are_refused(tmp_path: Path, pki: Path, scheme: str) -> None:
    server = _server(tmp_path, pki, scheme)
    clients: list[subprocess.Popen[str]] = []
    try:
        url = read_url(server)
        assert url.startswith(f"{scheme}://")
        plaintext_url = url.replace(f"{scheme}://", f"{scheme[:-1]}://")
        # The three refused clients do not depend on each other: they run at the same time.
        clients = [
            # A valid certificate whose name is not on the list: refused with the reason, once.
            _start_client(tmp_path, url, "site-2", pki=pki, token="s3cret", label="outsider"),
            # The right certificate with a wrong token, in-process: refused the same way.
            _start_client(
                tmp_path, url, "site-1", pki=pki, token="guess", label="wrong", in_process=True
            ),
            # No TLS at all, with a token: refused at load, before anything is sent (the token
            # would cross the network in clear text), and never retried.
            _start_client(
                tmp_path, plaintext_url, "site-1", pki=None, token="s3cret", label="plaintext"
            ),
        ]
        outsider, wrong, plaintext = (_finish(client) for client in clients)
        assert outsider.returncode == EXIT_NOT_ADMITTED, outsider.stderr
        assert "certificate identity 'site-2' is not allowed" in outsider.stderr
        assert "not restarting" in outsider.stdout
        assert wrong.returncode == EXIT_NOT_ADMITTED, wrong.stderr
        assert "did not admit this site" in wrong.stderr
        assert "no valid auth token" in wrong.stderr
        assert plaintext.returncode == 2, plaintext.stderr  # a configuration error
        assert "token would travel in clear text" in plaintext.stderr
        # The admitted site, once the others are done: its round runs and the job ends.
        clients.append(
            _start_client(tmp_path, url, "site-1", pki=pki, token="s3cret", label="admitted")
        )
        admitted = _finish(clients[-1])
        assert admitted.returncode == 0, admitted.stderr
        stdout, _ = server.communicate(timeout=60)
        assert server.returncode == 0
        assert "round 1: 1 ok" in stdout
    finally:
        for process in [server, *clients]:
            if process.poll() is None:
                process.kill()
                process.wait()
