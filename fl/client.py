"""The Client API: an ordinary training script becomes a federated client in a few lines.

    from fl import client as flare

    flare.init()
    while flare.is_running():
        model.load_state_dict(flare.receive().params)
        ...train...
        flare.send(flare.FLModel(params=model.state_dict(), meta={"sample_count": n}))

`init()` reads where the server is from the environment (TENSORWIRE_SERVER, TENSORWIRE_SITE and
the optional TENSORWIRE_TOKEN, TENSORWIRE_PKI_DIR, TENSORWIRE_IDLE_TIMEOUT, TENSORWIRE_HEARTBEAT,
TENSORWIRE_CONNECT_TIMEOUT, and TENSORWIRE_PROGRESS=1 for progress bars on a terminal), which
`tensorwire client` sets for the script it runs; a runner that runs scripts in-process binds an
FLClient to the script's thread instead (`bound_to`). The transport runs on an event loop in a
background thread; async code can use FLClient's `*_async` methods on its own loop instead.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import random
import signal
import sys
import threading
from collections.abc import Awaitable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import torch

from fl.model import FLModel, ParamsType, params_nbytes
from fl.protocol import (
    ERROR,
    HEARTBEAT,
    HELLO,
    STOP,
    ProtocolViolation,
    TaskInfo,
    kind_of,
    parse_task,
    result_meta,
)
from transport import (
    Endpoint,
    EndpointConfig,
    IncomingTransfer,
    Peer,
    RemoteError,
    Sink,
    StateDictSink,
    StreamResetError,
    TensorwireError,
    TransferResult,
    client_tls,
    progress,
)

__all__ = [
    "EXIT_NOT_ADMITTED",
    "ClientSettings",
    "FLClient",
    "FLModel",
    "JobStopped",
    "JobStoppedExit",
    "NotAdmitted",
    "ParamsType",
    "bound_to",
    "init",
    "is_running",
    "receive",
    "report_error",
    "send",
]

log = logging.getLogger(__name__)
_T = TypeVar("_T")
_Pending = tuple[TaskInfo, IncomingTransfer]


class JobStopped(Exception):
    """The server ended the job while this client was receiving or sending (async API)."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"the server ended the job: {reason}")
        self.reason = reason


# EX_NOPERM: the script's exit status when the server refused this site's credentials, which
# `tensorwire client` does not restart (a restart would be refused the same way).
EXIT_NOT_ADMITTED = 77


class NotAdmitted(PermissionError):
    """The server refused this site: its token, or the identity in its certificate."""


class JobStoppedExit(SystemExit):
    """JobStopped, as the sync API raises it: a SystemExit with status 0, so that uncaught it
    ends the script cleanly and a runner does not restart it."""

    def __init__(self, stopped: JobStopped) -> None:
        super().__init__(0)
        self.reason = stopped.reason


@dataclass
class ClientSettings:
    """Where the server is and how to reach it."""

    server_url: str
    site: str
    token: str | None = None
    pki_dir: str | None = None
    heartbeat_interval: float = 5.0
    connect_timeout: float = 60.0
    idle_timeout: float = 120.0
    progress: bool = False  # bars for the model in and the result out, on a terminal only
    endpoint_overrides: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ClientSettings:
        env = os.environ if environ is None else environ
        missing = [name for name in ("TENSORWIRE_SERVER", "TENSORWIRE_SITE") if not env.get(name)]
        if missing:
            raise RuntimeError(
                f"fl.client.init(): set {' and '.join(missing)} (tensorwire client does this "
                "for the scripts it runs)"
            )
        return cls(
            server_url=env["TENSORWIRE_SERVER"],
            site=env["TENSORWIRE_SITE"],
            token=env.get("TENSORWIRE_TOKEN") or None,
            pki_dir=env.get("TENSORWIRE_PKI_DIR") or None,
            heartbeat_interval=float(env.get("TENSORWIRE_HEARTBEAT", 5.0)),
            connect_timeout=float(env.get("TENSORWIRE_CONNECT_TIMEOUT", 60.0)),
            idle_timeout=float(env.get("TENSORWIRE_IDLE_TIMEOUT", 120.0)),
            progress=env.get("TENSORWIRE_PROGRESS") == "1",
        )

    def environment(self) -> dict[str, str]:
        """These settings as the environment variables from_env() reads."""
        env = {
            "TENSORWIRE_SERVER": self.server_url,
            "TENSORWIRE_SITE": self.site,
            "TENSORWIRE_HEARTBEAT": str(self.heartbeat_interval),
            "TENSORWIRE_CONNECT_TIMEOUT": str(self.connect_timeout),
            "TENSORWIRE_IDLE_TIMEOUT": str(self.idle_timeout),
            "TENSORWIRE_PROGRESS": "1" if self.progress else "0",
        }
        if self.token:
            env["TENSORWIRE_TOKEN"] = self.token
        if self.pki_dir:
            env["TENSORWIRE_PKI_DIR"] = self.pki_dir
        return env

    def endpoint_config(self) -> EndpointConfig:
        # The site name is the node id: a restarted client is the same client to the server.
        tls = client_tls(Path(self.pki_dir), self.site) if self.pki_dir else None
        return EndpointConfig(
            node_id=self.site, token=self.token, tls=tls, idle_timeout=self.idle_timeout
        ).replace(**self.endpoint_overrides)


class FLClient:
    """One site's connection to the server: receive tasks, send results."""

    def __init__(self, settings: ClientSettings) -> None:
        self.settings = settings
        self.endpoint: Endpoint | None = None
        self.peer: Peer | None = None
        self.current: TaskInfo | None = None
        self.stop_reason: str | None = None
        self._queue: asyncio.Queue[_Pending | None] | None = None
        self._next: _Pending | None = None
        self._stopped = False
        self._background: list[asyncio.Task[None]] = []
        self._inflight: asyncio.Future[Any] | None = None
        self._inflight_is_send = False
        self._loop_thread: _LoopThread | None = None

    # --- async API -------------------------------------------------------------------------------

    async def start_async(self) -> None:
        """Connect (retrying with backoff up to connect_timeout) and say hello."""
        self._queue = asyncio.Queue()
        self.endpoint = Endpoint(self.settings.endpoint_config())
        self.endpoint.on_request(self._serve_request)
        self.peer = await self._connect_with_retry()
        try:
            answer, _ = await self.peer.request({"fl": HELLO})
        except RemoteError as refusal:
            if refusal.code != "unauthorized":
                raise
            raise NotAdmitted(
                f"{self.settings.site}: the server at {self.settings.server_url} did not admit "
                f"this site ({refusal}); check its token and certificate"
            ) from None
        self._background = [
            asyncio.ensure_future(self._take_tasks()),
            asyncio.ensure_future(self._heartbeat()),
        ]
        if kind_of(answer) == STOP:  # joined a job that is already over
            self._end(str(answer.get("reason", "the server ended the job")))

    async def is_running_async(self) -> bool:
        """Wait until the server sends the next task (True) or ends the job (False)."""
        return await self._peek() is not None

    async def receive_async(
        self, into: Mapping[str, torch.Tensor] | None = None, sink: Sink | None = None
    ) -> FLModel:
        """The next task's model, received into a new dict, in place into `into`, or into any
        transport `sink` (params is then what the sink's commit() returned)."""
        return await self._stoppable(self._receive(into, sink))

    async def _receive(self, into: Mapping[str, torch.Tensor] | None, sink: Sink | None) -> FLModel:
        pending = await self._peek()
        if pending is None:
            raise JobStopped(self.stop_reason or "the job is over")
        self._next = None
        info, transfer = pending
        if sink is None:
            sink = StateDictSink(into=dict(into)) if into is not None else StateDictSink()
        nbytes = transfer.manifest.total_bytes if transfer.manifest else 0
        with self._progress(nbytes, f"round {info.round + 1} model", "received"):
            params = await transfer.receive_into(sink)
        self.current = info
        return FLModel(
            params=params,
            params_type=info.params_type,
            current_round=info.round,
            total_rounds=info.total_rounds,
            meta=dict(info.meta),
        )

    async def send_async(self, model: FLModel) -> TransferResult | None:
        """Send the result of the current task (the one the last receive() returned); None when
        the server no longer wanted it (e.g. it closed the round without this site)."""
        task, peer = self._require_task(), self._require_peer()
        if model.params is None:
            raise ValueError("send() needs a model with params")
        meta = result_meta(task.task_id, model)
        transfer_id = f"{task.task_id}/{self.settings.site}/result"
        self.current = None
        sending = peer.send_state_dict(model.params, meta=meta, transfer_id=transfer_id)
        nbytes = params_nbytes(model.params)
        try:
            with self._progress(nbytes, f"round {task.round + 1} result", "sent"):
                return await self._stoppable(sending, sending=True)
        except StreamResetError as refusal:
            log.warning("the server did not take this result: %s", refusal)
            return None

    def _progress(
        self, nbytes: int, description: str, direction: str
    ) -> AbstractContextManager[object]:
        wanted = None if self.settings.progress else False  # None: on a terminal only
        return progress.transfer_progress(nbytes, description, direction, enabled=wanted)

    async def _stoppable(self, operation: Awaitable[_T], *, sending: bool = False) -> _T:
        """Run a receive or send that a stop from the server cancels (raising JobStopped)."""
        if self.stop_reason is not None:
            raise JobStopped(self.stop_reason)
        running = asyncio.ensure_future(operation)
        self._inflight = running
        self._inflight_is_send = sending
        try:
            return await running
        except asyncio.CancelledError:
            if self._stopping() and running.cancelled():
                raise JobStopped(self.stop_reason or "the job ended") from None
            raise
        finally:
            self._inflight = None

    async def report_error_async(self, message: str) -> None:
        """Tell the server this task failed (the round goes on without this site)."""
        task, peer = self._require_task(), self._require_peer()
        self.current = None
        await peer.request({"fl": ERROR, "task_id": task.task_id, "message": message[:4000]})

    async def close_async(self) -> None:
        for background in self._background:
            background.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        if self.endpoint is not None:
            await self.endpoint.close()

    # --- sync API (for training scripts) ---------------------------------------------------------

    def init(self) -> FLClient:
        """Start the background loop and connect; returns self."""
        if self._loop_thread is None:
            self._loop_thread = _LoopThread()
            self._loop_thread.call(self.start_async())
        return self

    def is_running(self) -> bool:
        return self._sync().call(self.is_running_async())

    def receive(
        self, into: Mapping[str, torch.Tensor] | None = None, sink: Sink | None = None
    ) -> FLModel:
        return self._sync().call(self.receive_async(into, sink))

    def send(self, model: FLModel) -> TransferResult | None:
        return self._sync().call(self.send_async(model))

    def report_error(self, message: str) -> None:
        self._sync().call(self.report_error_async(message))

    def close(self) -> None:
        if self._loop_thread is not None:
            self._loop_thread.call(self.close_async())
            self._loop_thread.stop()
            self._loop_thread = None

    def __enter__(self) -> FLClient:
        return self.init()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if error is not None and self.current is not None:
            with contextlib.suppress(Exception):
                self.report_error(f"{type(error).__name__}: {error}")
        self.close()

    # --- internals -------------------------------------------------------------------------------

    def _sync(self) -> _LoopThread:
        if self._loop_thread is None:
            raise RuntimeError("call init() first")
        return self._loop_thread

    def _stopping(self) -> bool:
        """Whether the server ended the job (set from the loop while an operation waits)."""
        return self.stop_reason is not None

    def _require_task(self) -> TaskInfo:
        if self.current is None:
            raise RuntimeError("no task is open: call receive() before send()")
        return self.current

    def _require_peer(self) -> Peer:
        if self.peer is None:
            raise RuntimeError("not connected: call init() first")
        return self.peer

    async def _peek(self) -> _Pending | None:
        assert self._queue is not None, "start_async() first"
        if self._next is None and not self._stopped:
            self._next = await self._queue.get()
            self._stopped = self._next is None
        return self._next

    async def _connect_with_retry(self) -> Peer:
        assert self.endpoint is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.connect_timeout
        delay = 0.1
        while True:
            try:
                return await self.endpoint.connect(self.settings.server_url)
            except (TensorwireError, OSError) as error:
                if loop.time() + delay > deadline:
                    raise TimeoutError(
                        f"{self.settings.site}: could not reach {self.settings.server_url} "
                        f"within {self.settings.connect_timeout:g} s: {error}"
                    ) from error
                log.info("server not reachable yet (%s); retrying in %.1f s", error, delay)
            await asyncio.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(delay * 2, 5.0)

    async def _take_tasks(self) -> None:
        assert self.endpoint is not None
        assert self._queue is not None
        async for transfer in self.endpoint.incoming():
            try:
                info = parse_task(transfer.meta)
            except ProtocolViolation as violation:
                transfer.reject(str(violation))
                continue
            self._queue.put_nowait((info, transfer))

    async def _serve_request(
        self, peer: Peer, header: Mapping[str, Any], body: bytes
    ) -> tuple[Mapping[str, Any], bytes]:
        if kind_of(header) != STOP:
            raise ProtocolViolation(f"unexpected FL request {kind_of(header)!r} from the server")
        self._end(str(header.get("reason", "the server ended the job")))
        return {"fl": STOP}, b""

    def _end(self, reason: str) -> None:
        if self.stop_reason is None and self._queue is not None:
            self.stop_reason = reason
            self._queue.put_nowait(None)
            # A receive is cancelled; a send is not: its verdict may already be on the wire
            # ahead of this STOP (the server took the result), and if the server did not take
            # it, closing its endpoint fails the send at once anyway.
            if self._inflight is not None and not self._inflight_is_send:
                self._inflight.cancel()

    async def _heartbeat(self) -> None:
        """Tell the server this site is alive (and on which task); the request also makes the
        transport reconnect when the connection dropped. Ends the job when the server is gone,
        or when its answer says the job is over (a STOP this site missed)."""
        peer = self._require_peer()
        while True:
            await asyncio.sleep(self.settings.heartbeat_interval)
            task_id = self.current.task_id if self.current else None
            try:
                answer, _ = await peer.request({"fl": HEARTBEAT, "task_id": task_id})
            except TensorwireError as error:
                if peer.closed:
                    self._end(f"lost the server: {error}")
                    return
                log.info("heartbeat failed: %s", error)
                continue
            if kind_of(answer) == STOP:
                self._end(str(answer.get("reason", "the server ended the job")))
                return


class _LoopThread:
    """An event loop in a daemon thread; call() runs a coroutine there and waits for it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="fl-client", daemon=True)
        self._thread.start()

    def call(self, coroutine: Awaitable[_T]) -> _T:
        async def wrapped() -> _T:
            return await coroutine

        try:
            return asyncio.run_coroutine_threadsafe(wrapped(), self.loop).result()
        except JobStopped as stopped:
            print(f"fl.client: {stopped}", file=sys.stderr)
            raise JobStoppedExit(stopped) from None

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self.loop.close()


# --- module-level API: one client per script ----------------------------------------------------

_bound = threading.local()
_process_client: FLClient | None = None


@contextlib.contextmanager
def bound_to(client: FLClient) -> Iterator[FLClient]:
    """Make the module-level calls in this thread use `client` (in-process script runners)."""
    previous = getattr(_bound, "client", None)
    _bound.client = client
    try:
        yield client
    finally:
        _bound.client = previous


def _client() -> FLClient:
    bound: FLClient | None = getattr(_bound, "client", None)
    if bound is not None:
        return bound
    if _process_client is None:
        raise RuntimeError("call fl.client.init() first")
    return _process_client


def init() -> FLClient:
    """Connect this script to its server (from the environment, or the runner's binding)."""
    global _process_client
    bound: FLClient | None = getattr(_bound, "client", None)
    if bound is not None:
        return bound.init()
    if _process_client is None:
        _process_client = FLClient(ClientSettings.from_env())
        try:
            _process_client.init()
        except NotAdmitted as refusal:
            print(f"fl.client.init(): {refusal}", file=sys.stderr, flush=True)
            raise SystemExit(EXIT_NOT_ADMITTED) from None
        _install_exit_hooks(_process_client)
    return _process_client


def is_running() -> bool:
    """True while the server has another task for this site (waits for it)."""
    return _client().is_running()


def receive(into: Mapping[str, torch.Tensor] | None = None, sink: Sink | None = None) -> FLModel:
    """The next task's model (in place into `into`, or into a transport `sink`)."""
    return _client().receive(into, sink)


def send(model: FLModel) -> TransferResult | None:
    """Send this task's result (None: the server closed the round without it)."""
    return _client().send(model)


def report_error(message: str) -> None:
    """Report that this task failed."""
    _client().report_error(message)


def _install_exit_hooks(client: FLClient) -> None:
    """A script that dies mid-task reports why (the server records the error and goes on);
    SIGTERM ends the script through the same path."""
    last_error: list[str] = []
    previous_hook = sys.excepthook

    def remember(kind: type[BaseException], error: BaseException, tb: TracebackType | None) -> None:
        last_error.append(f"{kind.__name__}: {error}")
        previous_hook(kind, error, tb)

    def at_exit() -> None:
        if client.current is not None:
            with contextlib.suppress(Exception):
                client.report_error(last_error[-1] if last_error else "the script exited mid-task")
        with contextlib.suppress(Exception):
            client.close()

    sys.excepthook = remember
    atexit.register(at_exit)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda number, frame: sys.exit(128 + number))
