"""The daemons as operators deploy them across sites: certificates from `tensorwire certs`, mutual
TLS, an allow-list of site names and a token. Admitted sites run their rounds; a refused site
stops at once with the reason and is not restarted; a plaintext client never gets in."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from fl.client import EXIT_NOT_ADMITTED
from tests.fl.test_daemons import CLI, ENV, ROOT, read_url

SCRIPT = ROOT / "examples" / "federated.py"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("sites") / "pki"
    made = subprocess.run(
        [
            *CLI,
            "certs",
            "init",
            "--out",
            str(directory),
            "--client",
            "site-1",
            "--client",
            "site-2",
        ],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert made.returncode == 0, made.stderr
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


def _client(
    tmp_path: Path, url: str, site: str, *, pki: Path | None, token: str, in_process: bool = False
) -> subprocess.CompletedProcess[str]:
    config = tmp_path / f"{site}-{token}.toml"
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
    return subprocess.run(
        [*command, "--", "--site", "0"],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("scheme", ["grpcs", "tcps", "https"])
def test_admitted_site_runs_and_others_are_refused(tmp_path: Path, pki: Path, scheme: str) -> None:
    server = _server(tmp_path, pki, scheme)
    try:
        url = read_url(server)
        assert url.startswith(f"{scheme}://")
        # A valid certificate whose name is not on the list: refused with the reason, once.
        outsider = _client(tmp_path, url, "site-2", pki=pki, token="s3cret")
        assert outsider.returncode == EXIT_NOT_ADMITTED, outsider.stderr
        assert "certificate identity 'site-2' is not allowed" in outsider.stderr
        assert "not restarting" in outsider.stdout
        # The right certificate with a wrong token, in-process: refused the same way.
        wrong = _client(tmp_path, url, "site-1", pki=pki, token="guess", in_process=True)
        assert wrong.returncode == EXIT_NOT_ADMITTED, wrong.stderr
        assert "did not admit this site" in wrong.stderr
        assert "no valid auth token" in wrong.stderr
        # No TLS at all: it never gets to say hello; its connect timeout is honoured.
        plaintext_url = url.replace(f"{scheme}://", f"{scheme[:-1]}://")
        plaintext = _client(tmp_path, plaintext_url, "site-1", pki=None, token="s3cret")
        assert plaintext.returncode != 0
        assert "could not reach" in plaintext.stderr
        assert "within 2 s" in plaintext.stderr
        # The admitted site: its round runs and the job ends.
        admitted = _client(tmp_path, url, "site-1", pki=pki, token="s3cret")
        assert admitted.returncode == 0, admitted.stderr
        stdout, _ = server.communicate(timeout=60)
        assert server.returncode == 0
        assert "round 1: 1 ok" in stdout
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
