"""Admin commands against a running server, authenticated like sites: `tensorwire status`,
`clients` and `abort` with an admin certificate over mutual TLS (real daemons) or an admin token
(in-process server); anyone else is refused with a clear error and exit status 77, and an
admin's connection is never taken for a site."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from fl.admin import ADMIN_NODE_ID, AdminError, AdminRefused, AdminSettings, ask, authorize
from fl.cli import app
from fl.cli_certs import certs_app
from fl.client import FLClient
from fl.exit_codes import EXIT_NOT_ADMITTED, EXIT_OK
from fl.server import FLServer
from tests.fl.helpers import client_settings, server_config
from tests.ops.running_job import CLI, ENV, running_job
from transport import PeerInfo, server_tls


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("admin") / "pki"
    arguments = ["init", "--out", str(directory), "--client", "site-1", "--client", "admin"]
    made = CliRunner().invoke(certs_app, arguments)
    assert made.exit_code == 0, made.output
    return directory


def admin(*arguments: str) -> Any:
    """`tensorwire ARGUMENTS` in this process (the command's own code, without a torch import
    per call); its result."""
    return CliRunner().invoke(app, list(arguments))


def test_an_admin_certificate_sees_and_aborts_the_job(tmp_path: Path, pki: Path) -> None:
    server_toml = f'pki_dir = "{pki}"\nallowed_clients = ["site-1"]\nadmins = ["admin"]'
    with running_job(
        tmp_path, scheme="tcps", server_toml=server_toml, site_toml=f'pki_dir = "{pki}"'
    ) as job:
        job.until(lambda s: s["job"]["round"] >= 2, "the second round")
        as_admin = ["--server", job.url, "--pki-dir", str(pki), "--name", "admin"]
        shown = admin("status", *as_admin)
        assert shown.exit_code == 0, shown.output
        assert "job watched: running" in shown.output
        assert "sites joined: 1 of 1 known" in shown.output
        listed = admin("clients", *as_admin, "--json")
        assert listed.exit_code == 0, listed.output
        (site,) = json.loads(listed.output)
        assert site["name"] == "site-1"
        assert site["joined"] is True
        # The installed command, as an operator runs it.
        command = [*CLI, "abort", *as_admin, "--reason", "bad data at site-1"]
        aborted = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=120)
        assert aborted.returncode == 0, aborted.stderr
        assert "the job is stopping (bad data at site-1)" in aborted.stdout
        server, output, client = job.finish()
    assert server == EXIT_OK, output
    assert client == EXIT_OK
    assert "stopping (aborted by an admin)" in output


async def test_admin_tokens_and_refusals() -> None:
    server = FLServer(server_config(), job="steered", admin_tokens=["letmein"])
    (url,) = await server.start(["tcp://127.0.0.1:0"])
    site = FLClient(client_settings(url, "site-a"))
    aborts: list[str] = []
    try:
        await site.start_async()
        await server.wait_for_clients(1, 10)
        answer = await ask(AdminSettings(url, token="letmein"), "clients")
        assert [s["name"] for s in answer["status"]["sites"]] == ["site-a"]
        assert list(server.clients) == ["site-a"]  # the admin's connection is no site
        for token in ("wrong", None):
            with pytest.raises(AdminError, match="not an admin of this server") as refused:
                await ask(AdminSettings(url, token=token), "status")
            assert refused.value.status == EXIT_NOT_ADMITTED
        with pytest.raises(AdminError, match="no job that can be aborted"):
            await ask(AdminSettings(url, token="letmein"), "abort")
        server.on_abort = aborts.append
        answer = await ask(AdminSettings(url, token="letmein"), "abort", reason="enough")
        assert answer["ok"] is True
        assert aborts == ["enough"]
        assert server.abort_reason == "enough"
        await server.close()  # the sites are told the admin's reason
        assert site.stop_reason == "aborted by an admin: enough"
    finally:
        await server.close()
        await site.close_async()


async def test_a_site_certificate_is_refused_and_an_admin_certificate_answered(pki: Path) -> None:
    tls = server_config(tls=server_tls(pki))
    server = FLServer(tls, job="secure", admins=["admin"])
    (url,) = await server.start(["tcps://127.0.0.1:0"])
    try:
        with pytest.raises(AdminError, match="certificate 'site-1' is not an admin") as refused:
            await ask(AdminSettings(url, pki_dir=str(pki), name="site-1"), "status")
        assert refused.value.status == EXIT_NOT_ADMITTED
        answer = await ask(AdminSettings(url, pki_dir=str(pki), name="admin"), "status")
        assert answer["status"]["job"]["name"] == "secure"
        assert "admin" not in server.clients  # asked, never joined as a site
    finally:
        await server.close()


def test_who_is_an_admin() -> None:
    header = {"fl": "admin", "command": "status", "token": "t"}
    tls = PeerInfo("tcps", "10.0.0.5:4000", "admin")
    assert authorize(tls, {}, ["admin"], []) == "admin"
    assert authorize(PeerInfo("tcps", "10.0.0.5:4000", "site-1"), header, [], ["t"])
    assert authorize(PeerInfo("tcp", "127.0.0.1:4000"), header, [], ["t"])
    with pytest.raises(AdminRefused, match="over TLS or loopback only"):
        authorize(PeerInfo("tcp", "10.0.0.5:4000"), header, [], ["t"])
    with pytest.raises(AdminRefused, match="certificate 'site-1' is not an admin"):
        authorize(PeerInfo("tcps", "10.0.0.5:4000", "site-1"), {}, ["admin"], ["t"])


def test_the_admin_token_is_not_sent_in_clear_off_loopback() -> None:
    with pytest.raises(AdminError, match="refusing to send the admin token in clear"):
        asyncio.run(ask(AdminSettings("tcp://192.0.2.1:8765", token="t", timeout=1), "status"))
    assert AdminSettings("tcp://127.0.0.1:1").endpoint_config().node_id == ADMIN_NODE_ID
