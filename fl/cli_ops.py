"""Operations glue for the `tensorwire` daemons and commands: /metrics and health, structured logs,
FL round metrics, a progress bar per round, and `tensorwire health` (the probe deploy/ uses).

    tensorwire server --config server.toml --metrics-port 9108 --log-format json
    tensorwire health --port 9108            # liveness: exit 0 while the daemon's loop turns
    tensorwire health --port 9108 --ready    # readiness: exit 0 once the server listens

`run_server_daemon` / `run_client_daemon` are what `tensorwire server` / `client` run once their
flags are parsed: they set up logging and the ops server around the FL daemons of fl/daemons.py.
"""

from __future__ import annotations

import asyncio
import io
import logging
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Coroutine
from contextlib import ExitStack
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

# This module is on the path of `tensorwire health`, a probe that must answer in well under a
# second and a few tens of MB: nothing here imports torch or the transport at module level (the
# daemons' functions import them when they run).
if TYPE_CHECKING:
    from http.server import BaseHTTPRequestHandler

    from fl.config import ClientConfig, ServerConfig
    from fl.fedavg import FedAvg, RoundReport
    from transport import metrics

DEFAULT_METRICS_PORT = 9108
LOG_FORMATS = ("kv", "json")  # transport.logs.FORMATS
_T = TypeVar("_T")

MetricsPortOption = Annotated[
    int | None,
    typer.Option(
        min=0,
        max=65535,
        envvar="TENSORWIRE_METRICS_PORT",
        help="serve /metrics, /healthz and /readyz on this port (0: any free)",
    ),
]
MetricsHostOption = Annotated[
    str, typer.Option(help="address the metrics server binds (0.0.0.0 in a container)")
]
LogFormatOption = Annotated[
    str,
    typer.Option(
        envvar="TENSORWIRE_LOG_FORMAT", help=f"log line format: {' or '.join(LOG_FORMATS)}"
    ),
]
LogLevelOption = Annotated[str, typer.Option(help="DEBUG, INFO, WARNING or ERROR")]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars")]
DebugOption = Annotated[
    bool, typer.Option("--debug", help="a fatal error's traceback, not only its one line")
]

# --- the daemons' own lines ----------------------------------------------------------------------
#
# Everything a daemon says goes through logging, on this logger: with --log-format json it is one
# JSON object per line on stderr like every other record (the sentence under "msg", its fields
# beside it), so journald or a log shipper parses the whole output; with kv (a person at a
# terminal) the sentence alone goes to stdout (errors to stderr), as it reads best there.

DAEMON_LOG = logging.getLogger("tensorwire.daemon")


def say(event: str, message: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log one of the daemon's events: `message` for people, `event` and `fields` for machines."""
    from transport.logs import EVENT_ATTRIBUTE, FIELDS_ATTRIBUTE

    trace = fields.pop("exc_info", None)  # a traceback, with --debug only
    extra = {FIELDS_ATTRIBUTE: {"msg": message, **fields}, EVENT_ATTRIBUTE: event}
    DAEMON_LOG.log(level, message, extra=extra, exc_info=trace)


class _ConsoleHandler(logging.Handler):
    """The daemon's sentences as they are: stdout, and stderr from ERROR up."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        stream = sys.stderr if record.levelno >= logging.ERROR else sys.stdout
        try:
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:
            self.handleError(record)


def _default_console() -> None:
    # Before (or without) setup_logging, e.g. fl.daemons embedded in a program or a test: the
    # sentences still reach stdout, not logging's last resort (which drops INFO).
    if not DAEMON_LOG.handlers:
        DAEMON_LOG.addHandler(_ConsoleHandler())
        DAEMON_LOG.propagate = False
        DAEMON_LOG.setLevel(logging.INFO)


_default_console()


_tracebacks: list[bool] = [False]
_json_logs: list[bool] = [False]


def json_logs() -> bool:
    """Whether the daemon logs JSON: then a training script's own output is relayed as log
    records too (`script_output`), so that every line of the daemon's output parses."""
    return _json_logs[0]


class ScriptOutput(io.TextIOBase):
    """A stream whose every line becomes a `script_output` record (an in-process script's
    stdout under --log-format json)."""

    def __init__(self, script: str) -> None:
        self.script = script
        self._partial = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        *lines, self._partial = (self._partial + text).split("\n")
        for line in lines:
            relay_line(self.script, line)
        return len(text)

    def flush(self) -> None:
        pass


def relay_line(script: str, line: str) -> None:
    if line.strip():
        say("script_output", line.rstrip(), script=script)


def show_tracebacks(on: bool) -> None:
    """--debug: errors logged with their traceback (a JSON log keeps it in one line's "error")."""
    _tracebacks[0] = on


def tracebacks() -> bool:
    return _tracebacks[0]


def setup_logging(log_format: str = "kv", log_level: str = "INFO") -> None:
    """Structured logs on stderr; the daemon's own lines as `say` describes."""
    if log_format not in LOG_FORMATS:
        raise typer.BadParameter(f"use one of {', '.join(LOG_FORMATS)}", param_hint="--log-format")
    from transport import logs

    try:
        logs.configure_logging("json" if log_format == "json" else "kv", log_level)
    except ValueError as error:  # an unknown level name
        raise typer.BadParameter(str(error), param_hint="--log-level") from None
    _json_logs[0] = log_format == "json"
    DAEMON_LOG.handlers[:] = [] if log_format == "json" else [_ConsoleHandler()]
    DAEMON_LOG.propagate = log_format == "json"
    DAEMON_LOG.setLevel(logging.INFO)  # its lines are the job's story: never below --log-level


# --- FL metrics ----------------------------------------------------------------------------------


class _RoundMetrics:
    """The FL round metrics, registered on first use (prometheus_client is not needed by
    `tensorwire health`)."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.rounds = Counter("tensorwire_fl_rounds", "FL rounds completed.")
        self.seconds = Histogram(
            "tensorwire_fl_round_duration_seconds",
            "Durations of FL rounds.",
            buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1200, 3600, 7200, 14400, float("inf")),
        )
        self.clients = Gauge(
            "tensorwire_fl_round_clients",
            "Clients of the last round: sampled, succeeded, failed.",
            ("state",),
        )
        self.bytes = Counter(
            "tensorwire_fl_round_bytes", "Model bytes moved by FL rounds.", ("direction",)
        )


_round_metrics: list[_RoundMetrics] = []


def record_round(report: RoundReport) -> None:
    """Count one finished FL round (a FedAvg `on_round` hook)."""
    if not _round_metrics:
        _round_metrics.append(_RoundMetrics())
    m = _round_metrics[0]
    m.rounds.inc()
    m.seconds.observe(report.seconds)
    m.clients.labels("sampled").set(len(report.clients))
    m.clients.labels("succeeded").set(len(report.succeeded))
    m.clients.labels("failed").set(len(report.failed))
    m.bytes.labels("sent").inc(report.bytes_sent)
    m.bytes.labels("received").inc(report.bytes_received)


# --- daemons -------------------------------------------------------------------------------------


def setup_ops(
    metrics_port: int | None,
    metrics_host: str = "127.0.0.1",
    log_format: str = "kv",
    log_level: str = "INFO",
    ready: Callable[[], bool] | None = None,
) -> metrics.OpsServer | None:
    """Structured logs on stderr, and the ops server when a port is given."""
    setup_logging(log_format, log_level)
    return start_ops(metrics_port, metrics_host, ready)


def start_ops(
    metrics_port: int | None,
    metrics_host: str = "127.0.0.1",
    ready: Callable[[], bool] | None = None,
) -> metrics.OpsServer | None:
    """The ops server (/metrics, /healthz, /readyz) when a port is given."""
    if metrics_port is None:
        return None
    from transport import metrics

    ops = metrics.start_ops_server(metrics_port, metrics_host, ready=ready)
    answer_head(ops)
    say("ops_listening", f"tensorwire: metrics and health on {ops.url}/metrics", url=ops.url)
    return ops


def answer_head(ops: metrics.OpsServer) -> None:
    """HEAD on /metrics, /healthz and /readyz: the GET's status and headers without its body
    (load balancers and uptime checkers probe with HEAD; the ops server answered 501).

    transport's OpsServer has no public way to change its handler (fl/status.py swaps it the
    same way to add the status page, and its HEAD falls through to this one)."""
    httpd = ops._httpd
    base: type[BaseHTTPRequestHandler] = httpd.RequestHandlerClass  # type: ignore[assignment]

    class HeadHandler(base):  # type: ignore[valid-type, misc]
        _heading = False

        def do_HEAD(self) -> None:
            socket_writer = self.wfile
            self._heading = True
            try:
                self.do_GET()
            finally:
                self.wfile = socket_writer

        def end_headers(self) -> None:
            super().end_headers()
            if self._heading:
                self.wfile = io.BytesIO()  # the body GET writes next is dropped

    httpd.RequestHandlerClass = HeadHandler


async def watched(job: Coroutine[Any, Any, _T], ops: metrics.OpsServer | None) -> _T:
    """Run `job` while the ops server watches this event loop (its /healthz goes 503 if the
    loop stops turning)."""
    if ops is None:
        return await job
    watcher = asyncio.ensure_future(ops.watch_loop())
    try:
        return await job
    finally:
        watcher.cancel()


def run_server_daemon(
    settings: ServerConfig, ops: metrics.OpsServer | None, *, quiet: bool = False
) -> bool:
    """`tensorwire server`: the FedAvg job with round metrics and, on a terminal, a progress
    bar per round; True if it ran to its end."""
    from fl.daemons import build_fedavg, serve
    from transport import metrics, progress

    controller = build_fedavg(settings.fedavg, settings.state_dir)
    bars = RoundProgress(controller, enabled=progress.progress_wanted(quiet))
    controller.on_round_start = bars.started
    controller.on_round = _both(_both(bars.ended, controller.on_round), record_round)
    if ops is not None:
        ops.ready = metrics.is_listening
    try:
        return asyncio.run(watched(serve(settings, controller, ops), ops))
    finally:
        bars.close()


class RoundProgress:
    """One bar per FL round on the server: the model out to every sampled site and every
    result back, following the transport's byte counters (so concurrent transfers add up)."""

    def __init__(self, fedavg: FedAvg, *, enabled: bool) -> None:
        self.fedavg = fedavg
        self.enabled = enabled
        self._bar = ExitStack()

    def started(self, number: int, clients: list[str]) -> None:
        self.close()
        total = 2 * self.fedavg.model_bytes() * len(clients)
        description = f"round {number + 1}/{self.fedavg.rounds}, {len(clients)} sites"
        from transport import progress

        self._bar.enter_context(
            progress.transfer_progress(
                total, description, ("sent", "received"), enabled=self.enabled
            )
        )

    def ended(self, report: RoundReport) -> None:
        self.close()

    def close(self) -> None:
        self._bar.close()


def run_client_daemon(
    settings: ClientConfig, ops: metrics.OpsServer | None, *, quiet: bool = False
) -> int:
    """`tensorwire client`: the site's script (its transport metrics are this process's only
    with --in-process; a subprocess script has its own) with progress bars on a terminal."""
    from fl.daemons import run_client
    from transport import progress

    return run_client(settings, progress=progress.progress_wanted(quiet))


def _both(
    first: Callable[[RoundReport], None] | None, second: Callable[[RoundReport], None] | None
) -> Callable[[RoundReport], None]:
    def call(report: RoundReport) -> None:
        if first is not None:
            first(report)
        if second is not None:
            second(report)

    return call


# --- `tensorwire health` -------------------------------------------------------------------------


def health(
    port: Annotated[int, typer.Option(help="the daemon's --metrics-port")] = DEFAULT_METRICS_PORT,
    host: Annotated[str, typer.Option(help="where the daemon's metrics server listens")] = (
        "127.0.0.1"
    ),
    ready: Annotated[
        bool, typer.Option("--ready", help="check readiness (/readyz) instead of liveness")
    ] = False,
    timeout: Annotated[float, typer.Option(min=0.1, help="seconds to wait for an answer")] = 5.0,
) -> None:
    """Probe a running daemon's health endpoint: exit 0 when healthy (or ready), 1 if not."""
    path = "/readyz" if ready else "/healthz"
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}{path}"
    healthy, answer = probe(url, timeout)
    typer.echo(f"{url}: {answer}", err=not healthy)
    raise typer.Exit(0 if healthy else 1)


def probe(url: str, timeout: float) -> tuple[bool, str]:
    """(healthy, what the endpoint said) for an http:// health URL."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status == 200, response.read().decode(errors="replace").strip()
    except urllib.error.HTTPError as error:
        return False, f"{error.code} {error.read().decode(errors='replace').strip()}"
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        return False, f"unreachable: {reason}"


def register_ops_commands(app: typer.Typer) -> None:
    """Add `health` to the `tensorwire` command."""
    app.command()(health)
