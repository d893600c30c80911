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
import urllib.error
import urllib.request
from collections.abc import Callable, Coroutine
from contextlib import ExitStack
from typing import Annotated, Any, TypeVar

import typer
from prometheus_client import Counter, Gauge, Histogram

from fl.config import ClientConfig, ServerConfig
from fl.fedavg import FedAvg, RoundReport
from transport import logs, metrics, progress

DEFAULT_METRICS_PORT = 9108
_T = TypeVar("_T")

MetricsPortOption = Annotated[
    int | None,
    typer.Option(
        min=0, max=65535, help="serve /metrics, /healthz and /readyz on this port (0: any free)"
    ),
]
MetricsHostOption = Annotated[
    str, typer.Option(help="address the metrics server binds (0.0.0.0 in a container)")
]
LogFormatOption = Annotated[str, typer.Option(help=f"log line format: {' or '.join(logs.FORMATS)}")]
LogLevelOption = Annotated[str, typer.Option(help="DEBUG, INFO, WARNING or ERROR")]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars")]

# --- FL metrics ----------------------------------------------------------------------------------

ROUNDS = Counter("tensorwire_fl_rounds", "FL rounds completed.")
ROUND_SECONDS = Histogram(
    "tensorwire_fl_round_duration_seconds",
    "Durations of FL rounds.",
    buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1200, 3600, 7200, 14400, float("inf")),
)
ROUND_CLIENTS = Gauge(
    "tensorwire_fl_round_clients",
    "Clients of the last round: sampled, succeeded, failed.",
    ("state",),
)
ROUND_BYTES = Counter(
    "tensorwire_fl_round_bytes", "Model bytes moved by FL rounds.", ("direction",)
)


def record_round(report: RoundReport) -> None:
    """Count one finished FL round (a FedAvg `on_round` hook)."""
    ROUNDS.inc()
    ROUND_SECONDS.observe(report.seconds)
    ROUND_CLIENTS.labels("sampled").set(len(report.clients))
    ROUND_CLIENTS.labels("succeeded").set(len(report.succeeded))
    ROUND_CLIENTS.labels("failed").set(len(report.failed))
    ROUND_BYTES.labels("sent").inc(report.bytes_sent)
    ROUND_BYTES.labels("received").inc(report.bytes_received)


# --- daemons -------------------------------------------------------------------------------------


def setup_ops(
    metrics_port: int | None,
    metrics_host: str = "127.0.0.1",
    log_format: str = "kv",
    log_level: str = "INFO",
    ready: Callable[[], bool] | None = None,
) -> metrics.OpsServer | None:
    """Structured logs on stderr, and the ops server when a port is given."""
    if log_format not in logs.FORMATS:
        raise typer.BadParameter(f"use one of {', '.join(logs.FORMATS)}", param_hint="--log-format")
    format: logs.LogFormat = "json" if log_format == "json" else "kv"
    try:
        logs.configure_logging(format, log_level)
    except ValueError as error:  # an unknown level name
        raise typer.BadParameter(str(error), param_hint="--log-level") from None
    if metrics_port is None:
        return None
    ops = metrics.start_ops_server(metrics_port, metrics_host, ready=ready)
    print(f"tensorwire: metrics and health on {ops.url}/metrics", flush=True)
    return ops


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

    controller = build_fedavg(settings.fedavg, settings.state_dir)
    bars = RoundProgress(controller, enabled=progress.progress_wanted(quiet))
    controller.on_round_start = bars.started
    controller.on_round = _both(_both(bars.ended, controller.on_round), record_round)
    if ops is not None:
        ops.ready = metrics.is_listening
    try:
        return asyncio.run(watched(serve(settings, controller), ops))
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
