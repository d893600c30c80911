"""Prometheus metrics of the transport, and the small HTTP server that exposes them.

Importing this module registers the metrics on prometheus_client's default registry (so a host
application's own metrics and the process collector's `process_resident_memory_bytes` come out of
the same scrape) but starts nothing: an embedding application that wants /metrics calls
`start_ops_server(port)` itself, as the daemons do.

    tensorwire_wire_bytes_total{direction,driver,peer}    every byte on a connection, framing too
    tensorwire_chunks_total{direction,driver,peer}        DATA frames (one chunk each)
    tensorwire_chunk_bytes_total{direction,driver,peer}   their payload, as sent (compressed or not)
    tensorwire_credit_stall_seconds_total{driver,peer}    time a sender waited for the peer's credit
    tensorwire_credit_stalls_total{driver,peer}           how often it had to wait
    tensorwire_connections_active{driver}                 live connections
    tensorwire_streams_active{direction}                  open streams on them
    tensorwire_listeners_active                           URLs this process listens on
    tensorwire_transfers_total{direction,outcome}         transfers finished (ok) or failed
    tensorwire_transfer_bytes_total{direction}            tensor bytes of completed transfers
    tensorwire_transfer_duration_seconds{direction}       histogram of their durations
    tensorwire_transfer_throughput_bytes_per_second{direction}   the last one's rate
    tensorwire_transfer_resumes_total{direction}          attempts after a lost connection
    tensorwire_tensor_bytes_total{direction}              tensor bytes of chunks sent or placed so
                                                          far (uncompressed): progress, live
    tensorwire_reconnects_total                           connections re-established to a peer
    tensorwire_errors_total{kind}                         connections ended by an error, by class
    tensorwire_process_peak_resident_memory_bytes         the process's peak RSS (for sizing)

`peer` is the node id the peer announced (FL site names), "unknown" before its hello: keep node ids
few and stable, each one is a time series. direction is "in"/"out" on connections and
"received"/"sent" for transfers.

The server (`start_ops_server`) answers, in a daemon thread so a busy event loop cannot starve it:
/metrics (Prometheus text), /healthz (liveness: 200 while the watched event loop still turns) and
/readyz (readiness: 200 once the process is ready, e.g. listening).
"""

from __future__ import annotations

import asyncio
import resource
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

UNKNOWN_PEER = "unknown"
OTHER_PEERS = "other"
# Distinct `peer` label values kept per process: a labelled series lives for ever, so a server
# open to anyone must not grow one per node id that ever connected. Beyond this, "other".
MAX_PEER_LABELS = 256
_PEER_LABELS: set[str] = set()


def _peer_label(peer: str | None) -> str:
    if not peer:
        return UNKNOWN_PEER
    if peer in _PEER_LABELS:
        return peer
    if len(_PEER_LABELS) >= MAX_PEER_LABELS:
        return OTHER_PEERS
    _PEER_LABELS.add(peer)
    return peer


_LINK_LABELS = ("direction", "driver", "peer")

WIRE_BYTES = Counter("tensorwire_wire_bytes", "Bytes on connections.", _LINK_LABELS)
CHUNKS = Counter("tensorwire_chunks", "DATA frames (chunks) on connections.", _LINK_LABELS)
CHUNK_BYTES = Counter("tensorwire_chunk_bytes", "Payload bytes of DATA frames.", _LINK_LABELS)
CREDIT_STALL_SECONDS = Counter(
    "tensorwire_credit_stall_seconds",
    "Seconds senders waited for the peer's flow-control credit.",
    ("driver", "peer"),
)
CREDIT_STALLS = Counter(
    "tensorwire_credit_stalls", "Times a sender had to wait for credit.", ("driver", "peer")
)
TRANSFERS = Counter(
    "tensorwire_transfers", "Transfers finished, by outcome.", ("direction", "outcome")
)
TRANSFER_BYTES = Counter(
    "tensorwire_transfer_bytes", "Tensor bytes of completed transfers.", ("direction",)
)
TRANSFER_SECONDS = Histogram(
    "tensorwire_transfer_duration_seconds",
    "Durations of completed transfers.",
    ("direction",),
    buckets=(0.1, 0.5, 1, 5, 15, 30, 60, 120, 300, 600, 1200, 3600, 7200, float("inf")),
)
RESUMES = Counter(
    "tensorwire_transfer_resumes", "Transfer attempts after a lost connection.", ("direction",)
)
TENSOR_BYTES = Counter(
    "tensorwire_tensor_bytes",
    "Tensor bytes of state-dict chunks sent or placed, uncompressed, as they move.",
    ("direction",),
)
RECONNECTS = Counter("tensorwire_reconnects", "Connections re-established to a peer.")
ERRORS = Counter("tensorwire_errors", "Connections ended by an error, by error class.", ("kind",))


class _Tally:
    """Counts in place of a labelled counter until the peer's name is known."""

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1) -> None:
        self.value += amount


_Child = Any  # a labelled prometheus counter, or a _Tally before the peer said its name


class LinkMetrics:
    """The counters of one connection. Until the peer's hello names it they count locally, so
    a connection's bytes all land under one `peer` label (hellos included)."""

    def __init__(self) -> None:
        self.driver = "?"
        self.peer = UNKNOWN_PEER
        self._count_streams: Callable[[], tuple[int, int]] = lambda: (0, 0)
        self._closing = False
        self._named = False
        self._children: list[_Child] = [_Tally() for _ in range(8)]
        self._assign()

    def _assign(self) -> None:
        (
            self._bytes_in,
            self._bytes_out,
            self._chunks_in,
            self._chunks_out,
            self._chunk_bytes_in,
            self._chunk_bytes_out,
            self._stall_seconds,
            self._stalls,
        ) = self._children

    def _bind(self) -> None:
        """Swap the tallies for the labelled counters and hand them what was counted so far."""
        labels = (self.driver, self.peer)
        children: list[_Child] = [
            family.labels(direction, *labels)
            for family in (WIRE_BYTES, CHUNKS, CHUNK_BYTES)
            for direction in ("in", "out")
        ]
        children += [CREDIT_STALL_SECONDS.labels(*labels), CREDIT_STALLS.labels(*labels)]
        for tally, child in zip(self._children, children, strict=True):
            if tally.value:
                child.inc(tally.value)
        self._children, self._named = children, True
        self._assign()

    def opened(self, driver: str, count_streams: Callable[[], tuple[int, int]]) -> None:
        """The connection is up: `count_streams()` says (sending, receiving) streams open."""
        self.driver = driver
        self._count_streams = count_streams
        _LIVE_LINKS.add(self)

    def named(self, peer: str | None) -> None:
        """The peer said who it is (its hello)."""
        if not self._named:
            self.peer = _peer_label(peer)
            self._bind()

    def received(self, nbytes: int) -> None:
        self._bytes_in.inc(nbytes)

    def sent(self, nbytes: int) -> None:
        self._bytes_out.inc(nbytes)

    def chunk_received(self, nbytes: int) -> None:
        self._chunks_in.inc()
        self._chunk_bytes_in.inc(nbytes)

    def chunk_sent(self, nbytes: int) -> None:
        self._chunks_out.inc()
        self._chunk_bytes_out.inc(nbytes)

    def stalled(self, seconds: float) -> None:
        self._stalls.inc()
        self._stall_seconds.inc(seconds)

    def closing(self) -> None:
        """This side closes the connection (or the peer said a normal goodbye): not an error."""
        self._closing = True

    def closed(self, error: BaseException) -> None:
        _LIVE_LINKS.discard(self)
        if not self._named:
            self._bind()  # a peer that never said hello: its bytes count as "unknown"
        if not self._closing:
            ERRORS.labels(type(error).__name__).inc()

    def streams(self) -> tuple[int, int]:
        return self._count_streams()


_LIVE_LINKS: weakref.WeakSet[LinkMetrics] = weakref.WeakSet()
_LISTENERS: set[str] = set()


def listening(url: str, *, active: bool = True) -> None:
    """A listener opened (or closed) on `url`; the default readiness is "listening somewhere"."""
    if active:
        _LISTENERS.add(url)
    else:
        _LISTENERS.discard(url)


def is_listening() -> bool:
    return bool(_LISTENERS)


def reconnected() -> None:
    RECONNECTS.inc()


def resumed(direction: str, attempts: int = 1) -> None:
    """`attempts` more attempts of a transfer after lost connections."""
    RESUMES.labels(direction).inc(attempts)


def tensor_bytes_moved(direction: str, nbytes: int) -> None:
    """A chunk of `nbytes` tensor bytes was sent or placed ("sent" or "received")."""
    TENSOR_BYTES.labels(direction).inc(nbytes)


def tensor_bytes_total(direction: str) -> float:
    """Tensor bytes this process has sent or placed so far (what progress bars follow)."""
    return sum(
        sample.value
        for family in TENSOR_BYTES.collect()
        for sample in family.samples
        if sample.name.endswith("_total") and sample.labels["direction"] == direction
    )


def transfer_ended(
    direction: str, nbytes: int, seconds: float, error: BaseException | None
) -> None:
    """A transfer finished (error None) or failed; `direction` is "sent" or "received"."""
    TRANSFERS.labels(direction, "failed" if error is not None else "ok").inc()
    if error is None:
        TRANSFER_BYTES.labels(direction).inc(nbytes)
        TRANSFER_SECONDS.labels(direction).observe(seconds)
        _last_throughput[direction] = nbytes / max(seconds, 1e-9)


_last_throughput: dict[str, float] = {}


class _LiveCollector(Collector):
    """Gauges read at scrape time from live state, so nothing has to be decremented by hand."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        links = _snapshot(_LIVE_LINKS)
        connections = GaugeMetricFamily(
            "tensorwire_connections_active", "Live connections.", labels=["driver"]
        )
        for driver in sorted({link.driver for link in links}):
            connections.add_metric([driver], sum(link.driver == driver for link in links))
        streams = GaugeMetricFamily(
            "tensorwire_streams_active", "Open streams.", labels=["direction"]
        )
        counts = [link.streams() for link in links]
        streams.add_metric(["out"], sum(sending for sending, _ in counts))
        streams.add_metric(["in"], sum(receiving for _, receiving in counts))
        yield connections
        yield streams
        yield GaugeMetricFamily(
            "tensorwire_listeners_active", "URLs listened on.", value=len(_LISTENERS)
        )
        yield _throughput_family()
        yield GaugeMetricFamily(
            "tensorwire_process_peak_resident_memory_bytes",
            "Peak resident memory of this process.",
            value=peak_rss_bytes(),
        )


def _throughput_family() -> GaugeMetricFamily:
    family = GaugeMetricFamily(
        "tensorwire_transfer_throughput_bytes_per_second",
        "Rate of the last completed transfer.",
        labels=["direction"],
    )
    for direction, rate in sorted(dict(_last_throughput).items()):
        family.add_metric([direction], rate)
    return family


def _snapshot(links: weakref.WeakSet[LinkMetrics]) -> list[LinkMetrics]:
    # The scrape runs in another thread than the event loop that adds links: retry a copy that
    # raced with an addition rather than take a lock on the data path.
    for _ in range(10):
        try:
            return list(links)
        except RuntimeError:
            continue
    return []


def peak_rss_bytes() -> int:
    """Peak RSS of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


REGISTRY.register(_LiveCollector())


# --- the ops HTTP server ---------------------------------------------------------------------


class OpsServer:
    """/metrics, /healthz and /readyz on one port, served from a daemon thread."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        ready: Callable[[], bool] | None = None,
        registry: CollectorRegistry = REGISTRY,
        stale_after: float = 30.0,
    ) -> None:
        self.registry = registry
        self.ready = ready or (lambda: True)
        self.stale_after = stale_after
        self._last_tick: float | None = None  # None: no loop watched, liveness is the thread's
        self._httpd = ThreadingHTTPServer((host, port), _handler_for(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="tensorwire-ops", daemon=True
        )
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        host = str(self._httpd.server_address[0])
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}"

    def alive(self) -> bool:
        """True unless a watched event loop has not turned for `stale_after` seconds."""
        last = self._last_tick
        return last is None or time.monotonic() - last < self.stale_after

    async def watch_loop(self, interval: float = 1.0) -> None:
        """Run in the event loop to watch (as a task): stamps the time every `interval`."""
        while True:
            self._last_tick = time.monotonic()
            await asyncio.sleep(interval)

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


def start_ops_server(
    port: int,
    host: str = "127.0.0.1",
    *,
    ready: Callable[[], bool] | None = None,
    registry: CollectorRegistry = REGISTRY,
) -> OpsServer:
    """Serve /metrics, /healthz and /readyz on `host:port` (0: any free port) until closed.

    `ready` decides /readyz (default: always ready once the server runs). Bind 0.0.0.0 only where
    the network in front of it is trusted: the metrics name peers."""
    return OpsServer(host, port, ready=ready, registry=registry)


def _handler_for(server: OpsServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                encode, content_type = choose_encoder(self.headers.get("Accept", ""))
                self._reply(200, encode(server.registry), content_type)
            elif path == "/healthz":
                self._verdict(server.alive(), "event loop stalled")
            elif path == "/readyz":
                self._verdict(server.alive() and _safe(server.ready), "not ready")
            else:
                self._reply(404, b"not found: try /metrics, /healthz or /readyz\n")

        def _verdict(self, good: bool, problem: str) -> None:
            self._reply(200, b"ok\n") if good else self._reply(503, f"{problem}\n".encode())

        def _reply(self, status: int, body: bytes, content_type: str = "text/plain") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass  # probes every few seconds would drown the structured logs

    return Handler


def _safe(check: Callable[[], bool]) -> bool:
    try:
        return bool(check())
    except Exception:
        return False
