"""What a running job looks like from outside: its progress, every site, the server's memory; as
Prometheus gauges, as JSON and as a page served beside /metrics.

    GET|HEAD /             the status page (one inline HTML file, no external resources; its
                           script polls /status.json every second, so it updates in place)
    GET|HEAD /status.json  snapshot(): the job, the sites, the server's memory

FLServer keeps a JobProgress (the controller's round hooks feed it) and per site a
TransferProgress (the transport's progress callbacks feed it). In the daemon, a StatusBoard task
on the event loop takes a snapshot every REFRESH_S and sets the gauges from it; the ops server's
thread only serializes the latest snapshot, so no request reads the job's objects from another
thread, and a stalled loop shows as an old `generated_at` on the page.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import Gauge

from fl.rss import memory_of
from transport import metrics

if TYPE_CHECKING:
    from fl.server import FLServer

REFRESH_S = 0.5
JOB_STATES = ("starting", "waiting", "running", "finished", "stopped", "aborted", "failed")

# --- gauges --------------------------------------------------------------------------------------

JOB_STATE = Gauge(
    "tensorwire_fl_job_state", "1 for the server's job state now, 0 for the others.", ("state",)
)
ROUND = Gauge("tensorwire_fl_round", "The round in progress (or the last one), from 1.")
ROUNDS = Gauge("tensorwire_fl_job_rounds", "Rounds the job runs.")
ROUND_STARTED = Gauge(
    "tensorwire_fl_round_started_timestamp_seconds", "When the round in progress started."
)
CLIENTS_JOINED = Gauge("tensorwire_fl_clients_joined", "Sites connected to the server now.")
SITE_CONNECTED = Gauge("tensorwire_fl_site_connected", "1 while the site is connected.", ("site",))
SITE_LAST_SEEN = Gauge(
    "tensorwire_fl_site_last_seen_timestamp_seconds",
    "When the site was last heard from (a heartbeat or any request).",
    ("site",),
)
SITE_TRANSFER_BYTES = Gauge(
    "tensorwire_fl_site_transfer_bytes",
    "Bytes moved so far of the site's current model transfer.",
    ("site", "direction"),
)
SITE_TRANSFER_TOTAL = Gauge(
    "tensorwire_fl_site_transfer_size_bytes",
    "Size of the site's current model transfer (0: none in progress).",
    ("site", "direction"),
)
MEMORY_LIMIT = Gauge(
    "tensorwire_process_memory_limit_bytes",
    "The memory this process may use: its cgroup's limit, else the machine's memory.",
)


# --- what the server tracks ----------------------------------------------------------------------


@dataclass
class TransferProgress:
    """One model transfer to or from a site; a transport progress callback."""

    direction: str  # "sent" (the model, to the site) or "received" (its result)
    task_id: str
    done: int = 0
    total: int = 0
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None

    def __call__(self, done: int, total: int) -> None:
        self.done, self.total = done, total

    def finish(self) -> None:
        self.ended = time.monotonic()

    @property
    def finished(self) -> bool:
        return self.ended is not None

    def as_json(self, now: float) -> dict[str, Any]:
        seconds = max((self.ended or now) - self.started, 1e-6)
        rate = self.done / seconds
        left = max(self.total - self.done, 0)
        eta = 0.0 if self.finished else (left / rate if rate > 0 else None)
        return {
            "direction": self.direction,
            "task": self.task_id,
            "bytes": self.done,
            "total": self.total,
            "rate_bytes_s": round(rate, 1),
            "eta_s": None if eta is None else round(eta, 1),
            "finished": self.finished,
        }


@dataclass
class JobProgress:
    """The job's state and rounds, as the controller's hooks report them; the job gauges follow."""

    job: str
    rounds: int | None = None
    state: str = "starting"
    round: int = 0  # the round in progress or the last one, from 1; 0 before the first
    started_round_at: float | None = None  # wall-clock time
    round_seconds: deque[float] = field(default_factory=lambda: deque(maxlen=50))
    started: float = field(default_factory=time.time)
    detail: str | None = None  # why it stopped, aborted or failed

    def set_state(self, state: str, detail: str | None = None) -> None:
        self.state, self.detail = state, detail or self.detail
        for name in JOB_STATES:
            JOB_STATE.labels(name).set(1 if name == state else 0)

    def set_rounds(self, rounds: int | None, done: int = 0) -> None:
        """The job's length and, for a job continued from its state, the rounds already done."""
        self.rounds, self.round = rounds, done
        ROUNDS.set(rounds or 0)
        ROUND.set(done)

    def round_started(self, number: int, clients: list[str]) -> None:
        self.round, self.started_round_at = number + 1, time.time()
        ROUND.set(self.round)
        ROUND_STARTED.set(self.started_round_at)
        self.set_state("running")

    def round_ended(self, seconds: float) -> None:
        self.round_seconds.append(seconds)

    def as_json(self, now: float) -> dict[str, Any]:
        times = list(self.round_seconds)
        begun = self.started_round_at
        elapsed = round(now - begun, 1) if begun is not None and self.state == "running" else None
        return {
            "name": self.job,
            "state": self.state,
            "detail": self.detail,
            "round": self.round,
            "rounds": self.rounds,
            "rounds_done": len(times),
            "round_elapsed_s": elapsed,
            "last_round_s": round(times[-1], 2) if times else None,
            "mean_round_s": round(sum(times) / len(times), 2) if times else None,
            "uptime_s": round(now - self.started, 1),
        }


# --- the snapshot --------------------------------------------------------------------------------


def snapshot(server: FLServer) -> dict[str, Any]:
    """The job, every site and the server's memory, as plain JSON-able data (on the loop)."""
    now, wall = time.monotonic(), time.time()
    sites = [_site(record, now, wall) for record in server.clients.values()]
    return {
        "generated_at": round(wall, 3),
        "job": server.progress.as_json(wall),
        "listening": list(server.urls),
        "clients_joined": sum(site["joined"] for site in sites),
        "sites": sorted(sites, key=lambda site: site["name"]),
        "server": server_memory(),
    }


def _site(record: Any, now: float, wall: float) -> dict[str, Any]:
    info = record.peer.info
    heartbeat_age = now - record.last_seen
    return {
        "name": record.name,
        "joined": record.connected,
        "address": info.address if info else None,
        "joined_at": round(record.joined_at, 3),
        "last_seen_at": round(wall - heartbeat_age, 3),
        "heartbeat_age_s": round(heartbeat_age, 1),
        "transfer": record.transfer.as_json(now) if record.transfer else None,
        "last_error": record.last_error,
    }


def server_memory() -> dict[str, int | None]:
    rss, anon = memory_of(os.getpid())
    return {
        "rss_bytes": rss,
        "anon_bytes": anon,
        "peak_rss_bytes": metrics.peak_rss_bytes(),
        "limit_bytes": memory_limit(),
    }


def memory_limit() -> int | None:
    """The cgroup's memory limit (v2, then v1), else the machine's memory; None if unknown."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        # "max" (v2) or a huge number (v1) means no limit: the machine's memory is the bound.
        if text.isdigit() and int(text) < 2**60:
            return int(text)
        break
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None


# --- the daemon's board --------------------------------------------------------------------------


class StatusBoard:
    """The latest snapshot of a server, refreshed on its event loop; the site gauges follow it."""

    def __init__(self, server: FLServer) -> None:
        self.server = server
        self.latest: dict[str, Any] = snapshot(server)
        self._gauged: set[tuple[str, str]] = set()  # (site, direction) transfer gauges set
        MEMORY_LIMIT.set(memory_limit() or 0)

    async def run(self, interval: float = REFRESH_S) -> None:
        while True:
            self.refresh()
            await asyncio.sleep(interval)

    def refresh(self) -> None:
        self.latest = snapshot(self.server)
        self._set_gauges(self.latest["sites"])

    def _set_gauges(self, sites: Iterable[dict[str, Any]]) -> None:
        joined = 0
        for site in sites:
            name = site["name"]
            joined += site["joined"]
            SITE_CONNECTED.labels(name).set(1 if site["joined"] else 0)
            SITE_LAST_SEEN.labels(name).set(site["last_seen_at"])
            self._set_transfer_gauges(name, site["transfer"])
        CLIENTS_JOINED.set(joined)

    def _set_transfer_gauges(self, site: str, transfer: dict[str, Any] | None) -> None:
        """A site has one transfer at a time: size 0 for the other direction, and for both once
        it has none (finished, or failed)."""
        for direction in ("sent", "received"):
            key = (site, direction)
            if transfer is not None and transfer["direction"] == direction:
                self._gauged.add(key)
                SITE_TRANSFER_BYTES.labels(*key).set(transfer["bytes"])
                size = 0 if transfer["finished"] else transfer["total"]
                SITE_TRANSFER_TOTAL.labels(*key).set(size)
            elif key in self._gauged:
                SITE_TRANSFER_TOTAL.labels(*key).set(0)

    def json_bytes(self) -> bytes:
        return json.dumps(self.latest).encode()


def follow_job(
    server: FLServer, controller: Any, job: asyncio.Future[None], ops: metrics.OpsServer | None
) -> StatusBoard:
    """Wire a running job to its status: the controller's round hooks (kept, and chained) feed
    the server's JobProgress, `tensorwire abort` cancels `job` (the daemon's signal path: the
    sites are told why), and with an ops server the page is served and the gauges refreshed
    until the job ends."""
    progress = server.progress
    state = getattr(controller, "state", None)
    progress.set_rounds(getattr(controller, "rounds", None), getattr(state, "round", 0))
    progress.set_state("waiting")
    # FedAvg's hooks; a controller without them shows its state but no rounds.
    if hasattr(controller, "on_round_start") and hasattr(controller, "on_round"):
        controller.on_round_start = _chain(progress.round_started, controller.on_round_start)
        controller.on_round = _chain(
            lambda report: progress.round_ended(report.seconds), controller.on_round
        )
    loop = asyncio.get_running_loop()
    server.on_abort = lambda reason: loop.call_soon(job.cancel)
    board = StatusBoard(server)
    refreshing = asyncio.ensure_future(board.run()) if ops is not None else None
    if ops is not None:
        serve_status(ops, board)

    def ended(job: asyncio.Future[None]) -> None:
        if job.cancelled():
            aborted = server.abort_reason is not None
            progress.set_state("aborted" if aborted else "stopped", server.abort_reason)
        elif job.exception() is not None:
            progress.set_state("failed", f"{type(job.exception()).__name__}: {job.exception()}")
        else:
            progress.set_state("finished")
        board.refresh()  # the page keeps showing the job's end while the process lives
        if refreshing is not None:
            refreshing.cancel()

    job.add_done_callback(ended)
    return board


def _chain(first: Callable[..., None], second: Callable[..., None] | None) -> Callable[..., None]:
    def both(*args: Any) -> None:
        first(*args)
        if second is not None:
            second(*args)

    return both


def serve_status(ops: metrics.OpsServer, board: StatusBoard) -> None:
    """Add / and /status.json (GET and HEAD) to the ops server beside /metrics and health.

    transport's OpsServer has no public way to add a route, and fl may not change transport: its
    handler class is subclassed and swapped in here, the one place fl reaches inside it."""
    httpd = ops._httpd
    base: type[BaseHTTPRequestHandler] = httpd.RequestHandlerClass  # type: ignore[assignment]
    httpd.RequestHandlerClass = _status_handler(base, board)


def _status_handler(
    base: type[BaseHTTPRequestHandler], board: StatusBoard
) -> type[BaseHTTPRequestHandler]:
    class StatusHandler(base):  # type: ignore[valid-type, misc]
        def do_GET(self) -> None:
            if not self._status(with_body=True):
                super().do_GET()

        def do_HEAD(self) -> None:
            if self._status(with_body=False):
                return
            parent = getattr(super(), "do_HEAD", None)
            if parent is not None:
                parent()
            else:
                self.send_error(501, "HEAD is answered on / and /status.json only")

        def _status(self, *, with_body: bool) -> bool:
            path = self.path.split("?", 1)[0]
            if path == "/":
                body, kind = PAGE.encode(), "text/html; charset=utf-8"
            elif path == "/status.json":
                body, kind = board.json_bytes(), "application/json"
            else:
                return False
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            if with_body:
                self.wfile.write(body)
            return True

    return StatusHandler


# --- the page ------------------------------------------------------------------------------------

# One small page, no external resources (sites run offline): a table per section, filled in by
# the script from /status.json every second. Sizes in MiB (2^20 bytes), as in the CLI and the
# demo.
PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>tensorwire job</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font:14px system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.3em;margin:0 0 .3em}h2{font-size:1.05em;margin:1.2em 0 .4em}
table{border-collapse:collapse;background:#fff}td,th{border:1px solid #ddd;padding:.3em .6em;
text-align:left;white-space:nowrap}th{background:#f0f0f0}.num{text-align:right;font-variant-numeric:tabular-nums}
.state{font-weight:bold;padding:.1em .5em;border-radius:.3em;background:#ddd}
.running{background:#cfe8ff}.finished{background:#d4f5d4}.aborted,.failed{background:#f8d0d0}
.bar{width:9em;height:.8em;background:#eee;display:inline-block;vertical-align:middle}
.bar i{display:block;height:100%;background:#4a90d9}.muted{color:#888}
.err{color:#b00;white-space:normal}
</style></head><body>
<h1>tensorwire job <span id="job-name">...</span> <span id="job-state" class="state">...</span></h1>
<div class="muted">updated <span id="updated">never</span>; listening on
<span id="listening"></span></div>
<h2>Job</h2><table><tr><th>round</th><th>this round</th><th>last round</th><th>mean round</th>
<th>uptime</th><th>sites joined</th></tr><tr><td class="num" id="round">...</td>
<td class="num" id="round-elapsed"></td><td class="num" id="last-round"></td>
<td class="num" id="mean-round"></td><td class="num" id="uptime"></td>
<td class="num" id="joined"></td></tr></table>
<h2>Sites</h2><table id="sites"><thead><tr><th>site</th><th>joined</th><th>last heartbeat</th>
<th>transfer</th><th>progress</th><th>rate</th><th>ETA</th><th>last error</th></tr></thead>
<tbody></tbody></table>
<h2>Server memory</h2><table><tr><th>RSS</th><th>anonymous</th><th>peak RSS</th><th>limit</th>
</tr><tr><td class="num" id="rss"></td><td class="num" id="anon"></td><td class="num" id="peak">
</td><td class="num" id="limit"></td></tr></table>
<script>
"use strict";
const mb = b => b == null ? "-" : (b / 1048576).toFixed(b < 10485760 ? 2 : 0) + " MiB";
const secs = s => s == null ? "-" : s < 90 ? s.toFixed(1) + " s" : (s / 60).toFixed(1) + " min";
const put = (id, text) => { document.getElementById(id).textContent = text; };
function cell(row, text, cls) {
  const td = row.insertCell(); td.textContent = text; if (cls) td.className = cls; return td;
}
function site(body, s) {
  const row = body.insertRow(), t = s.transfer; row.dataset.site = s.name;
  cell(row, s.name); cell(row, s.joined ? "yes" : "no");
  cell(row, secs(s.heartbeat_age_s) + " ago", "num");
  cell(row, t ? (t.direction === "sent" ? "model out " : "result in ") + t.task : "-");
  const td = cell(row, t ? mb(t.bytes) + " / " + mb(t.total) + " " : "", "num progress");
  if (t) {
    const bar = document.createElement("span"), fill = document.createElement("i");
    bar.className = "bar"; fill.style.width = (t.total ? 100 * t.bytes / t.total : 0) + "%";
    bar.appendChild(fill); td.appendChild(bar);
  }
  cell(row, t ? mb(t.rate_bytes_s) + "/s" : "-", "num");
  cell(row, t ? (t.finished ? "done" : secs(t.eta_s)) : "-", "num");
  cell(row, s.last_error || "", "err");
}
function render(d) {
  const j = d.job;
  put("job-name", j.name); put("job-state", j.state + (j.detail ? ": " + j.detail : ""));
  document.getElementById("job-state").className = "state " + j.state;
  put("updated", new Date(d.generated_at * 1000).toLocaleTimeString());
  put("listening", d.listening.join(" "));
  put("round", j.round + " / " + (j.rounds == null ? "?" : j.rounds));
  put("round-elapsed", secs(j.round_elapsed_s)); put("last-round", secs(j.last_round_s));
  put("mean-round", secs(j.mean_round_s)); put("uptime", secs(j.uptime_s));
  put("joined", String(d.clients_joined));
  const body = document.querySelector("#sites tbody"); body.replaceChildren();
  d.sites.forEach(s => site(body, s));
  const m = d.server;
  put("rss", mb(m.rss_bytes)); put("anon", mb(m.anon_bytes));
  put("peak", mb(m.peak_rss_bytes)); put("limit", mb(m.limit_bytes));
}
async function poll() {
  try {
    const answer = await fetch("status.json", {cache: "no-store"});
    render(await answer.json());
  } catch (error) {
    put("updated", "not reachable (" + error + ")");
  }
  setTimeout(poll, 1000);
}
poll();
</script></body></html>
"""
