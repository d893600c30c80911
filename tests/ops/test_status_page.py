"""The status page of a running job, beside /metrics: served by `tensorwire server`, rendered by a
real headless browser (Debian's chromium, installed by tests/ops/install_tools.sh when missing)
whose numbers change while the job runs; its data as /status.json, HEAD on both, and the job
gauges on /metrics following the job as it goes."""

from __future__ import annotations

import asyncio
import re
import subprocess
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

from prometheus_client import REGISTRY

from fl.client import FLClient
from fl.server import FLServer
from fl.status import StatusBoard
from tests.fl.helpers import client_settings, server_config
from tests.ops.helpers import scrape, total
from tests.ops.running_job import RunningJob, require_tool, running_job


class _Texts(HTMLParser):
    """The text of every element with an id, and the sites' rows, of a dumped DOM."""

    def __init__(self) -> None:
        super().__init__()
        self.texts: dict[str, str] = {}
        self.sites: list[str] = []
        self._open: list[str | None] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        names = dict(attrs)
        if names.get("data-site"):
            self.sites.append(str(names["data-site"]))
        if tag not in ("br", "meta", "input", "img", "link"):
            self._open.append(names.get("id"))

    def handle_endtag(self, tag: str) -> None:
        if self._open:
            self._open.pop()

    def handle_data(self, data: str) -> None:
        for element in self._open:
            if element is not None:
                self.texts[element] = self.texts.get(element, "") + data


def browse(chromium: str, url: str, profile: Path, *arguments: str) -> str:
    """What chromium prints for `url` once the page's script ran (its polls included)."""
    command = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
    command += [f"--user-data-dir={profile}", "--virtual-time-budget=3000", *arguments, url]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def rendered(chromium: str, job: RunningJob, profile: Path) -> _Texts:
    page = _Texts()
    page.feed(browse(chromium, f"{job.ops_url}/", profile, "--dump-dom"))
    return page


def round_shown(page: _Texts) -> int:
    match = re.fullmatch(r"(\d+) / (\d+)", page.texts["round"].strip())
    assert match, page.texts
    return int(match.group(1))


def test_the_page_follows_the_job_in_a_headless_browser(tmp_path: Path) -> None:
    chromium = require_tool("chromium")
    with running_job(tmp_path) as job:
        job.until(lambda s: s["job"]["round"] >= 2, "the job in its second round")
        first = rendered(chromium, job, tmp_path / "profile")
        assert first.texts["job-name"] == "watched"
        assert first.texts["job-state"].startswith("running"), first.texts
        assert first.sites == ["site-1"]
        assert first.texts["joined"] == "1"
        assert first.texts["rss"].endswith(" MiB")
        shown = round_shown(first)
        job.until(lambda s: s["job"]["round"] > shown + 1, "two more rounds")
        second = rendered(chromium, job, tmp_path / "profile")
        assert round_shown(second) > shown, (first.texts, second.texts)
        assert second.texts["uptime"] != first.texts["uptime"]
        shot = tmp_path / "status-page.png"
        browse(
            chromium,
            f"{job.ops_url}/",
            tmp_path / "profile",
            "--window-size=1100,420",
            f"--screenshot={shot}",
        )
        assert shot.read_bytes().startswith(b"\x89PNG")
        assert shot.stat().st_size > 10_000


def test_status_json_head_and_gauges_follow_the_job(tmp_path: Path) -> None:
    with running_job(tmp_path) as job:
        status = job.until(lambda s: s["job"]["round"] >= 2, "the second round")
        assert status["job"]["state"] == "running"
        assert status["job"]["rounds"] == 1000
        assert status["clients_joined"] == 1
        (site,) = status["sites"]
        assert site["name"] == "site-1"
        assert site["joined"]
        assert site["last_error"] is None
        assert site["heartbeat_age_s"] < 5
        transfer = job.until(lambda s: s["sites"][0]["transfer"], "a transfer")["sites"][0]
        assert transfer["transfer"]["total"] > 4_000_000
        assert status["server"]["rss_bytes"] > 0
        assert status["server"]["limit_bytes"] > 0
        for path, kind in (("/", "text/html"), ("/status.json", "application/json")):
            head = urllib.request.Request(f"{job.ops_url}{path}", method="HEAD")
            with urllib.request.urlopen(head, timeout=10) as answer:
                assert answer.status == 200
                assert answer.headers["Content-Type"].startswith(kind)
                assert int(answer.headers["Content-Length"]) > 0
                assert answer.read() == b""
        samples = scrape(job.ops_url)
        assert total(samples, "tensorwire_fl_job_state", state="running") == 1
        assert total(samples, "tensorwire_fl_job_state", state="waiting") == 0
        assert total(samples, "tensorwire_fl_clients_joined") == 1
        assert total(samples, "tensorwire_fl_site_connected", site="site-1") == 1
        assert total(samples, "tensorwire_fl_job_rounds") == 1000
        assert total(samples, "tensorwire_fl_round") >= 2
        assert total(samples, "tensorwire_process_memory_limit_bytes") > 0


async def test_the_joined_gauges_follow_a_site_that_leaves_between_rounds() -> None:
    """No round has to end for the gauges to change: a site that joins and leaves shows."""
    server = FLServer(server_config(), job="gauges")
    (url,) = await server.start(["tcp://127.0.0.1:0"])
    board = StatusBoard(server)
    client = FLClient(client_settings(url, "site-g"))
    try:
        await client.start_async()
        await server.wait_for_clients(1, 10)
        board.refresh()
        assert REGISTRY.get_sample_value("tensorwire_fl_clients_joined") == 1
        assert REGISTRY.get_sample_value("tensorwire_fl_site_connected", {"site": "site-g"}) == 1
        await client.close_async()
        deadline = asyncio.get_running_loop().time() + 10
        while board.latest["clients_joined"] and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)  # poll: the connection's end reaches the server
            board.refresh()
        assert REGISTRY.get_sample_value("tensorwire_fl_clients_joined") == 0
        assert REGISTRY.get_sample_value("tensorwire_fl_site_connected", {"site": "site-g"}) == 0
    finally:
        await server.close()
