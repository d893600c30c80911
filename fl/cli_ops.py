"""Operations glue for the `tensorwire` daemons and commands: /metrics and health, structured logs,
FL round metrics, progress bars, and `tensorwire health` (the probe the deploy/ files use).

    tensorwire server --config server.toml --metrics-port 9108 --log-format json
    tensorwire health --port 9108            # liveness: exit 0 while the daemon's loop turns
    tensorwire health --port 9108 --ready    # readiness: exit 0 once the server listens

`run_server_daemon` / `run_client_daemon` are what `tensorwire server` / `client` run once their
flags are parsed: they set up logging and the ops server around the FL daemons of fl/daemons.py.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from typing import Annotated, Any, TypeVar

import typer
from prometheus_client import Counter, Gauge, Histogram
from tqdm import tqdm

from fl.config import ClientConfig, ServerConfig
from fl.fedavg import RoundReport
from transport import logs, metrics

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


def run_server_daemon(settings: ServerConfig, ops: metrics.OpsServer | None) -> bool:
    """`tensorwire server`: the FedAvg job with round metrics; True if it ran to its end."""
    from fl.daemons import build_fedavg, serve

    controller = build_fedavg(settings.fedavg)
    controller.on_round = _both(controller.on_round, record_round)
    if ops is not None:
        ops.ready = metrics.is_listening
    return asyncio.run(watched(serve(settings, controller), ops))


def run_client_daemon(settings: ClientConfig, ops: metrics.OpsServer | None) -> int:
    """`tensorwire client`: the site's script (its transport metrics are this process's only
    with --in-process; a subprocess script has its own)."""
    from fl.daemons import run_client

    return run_client(settings)


def _both(
    first: Callable[[RoundReport], None] | None, second: Callable[[RoundReport], None]
) -> Callable[[RoundReport], None]:
    def call(report: RoundReport) -> None:
        if first is not None:
            first(report)
        second(report)

    return call


# --- progress ------------------------------------------------------------------------------------


def progress_wanted(quiet: bool = False) -> bool:
    """Progress bars only for a person watching: not with --quiet, not into a file or a pipe."""
    return not quiet and sys.stderr.isatty()


def chunk_bytes_moved(direction: str) -> float:
    """Payload bytes of DATA frames this process moved in `direction` ("in" or "out")."""
    return sum(
        sample.value
        for metric in metrics.CHUNK_BYTES.collect()
        for sample in metric.samples
        if sample.name.endswith("_total") and sample.labels.get("direction") == direction
    )


@contextmanager
def transfer_progress(
    total: int, description: str, direction: str = "out", *, quiet: bool = False
) -> Iterator[tqdm[Any]]:
    """A bar with bytes, rate and ETA that follows this process's transport counters (so any
    in-process transfer drives it without a callback); off unless `progress_wanted(quiet)`."""
    bar: tqdm[Any] = tqdm(
        total=total,
        desc=description,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        disable=not progress_wanted(quiet),
    )
    start = chunk_bytes_moved(direction)
    stop = threading.Event()

    def follow() -> None:
        while not stop.wait(0.25):
            bar.update(min(chunk_bytes_moved(direction) - start, total) - bar.n)

    follower = threading.Thread(target=follow, name="tensorwire-progress", daemon=True)
    if not bar.disable:
        follower.start()
    try:
        yield bar
    finally:
        stop.set()
        if follower.is_alive():
            follower.join()
        bar.close()


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
