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

How a client's job ends (the script's exit status in brackets, see fl/exit_codes.py):

- The server says STOP (its job finished, or it was stopped with SIGTERM), in a request or in the
  answer to a heartbeat: `is_running()` is False, and a receive or send under way ends the script
  through JobStoppedExit [0]. A send the server no longer takes because it is closing counts as
  stopped too, not as an error.
- The server vanishes (killed, its machine rebooted): the client keeps dialling it, and transfers
  resume once it is back (a restarted server continues its job). Only when it has not answered for
  `idle_timeout` (or could not be reached for `connect_timeout` at the start) does the client give
  up: ServerLost, ServerLostExit [69, EX_UNAVAILABLE].
- SIGTERM or SIGINT to the script: the task under way is reported to the server as failed (the
  round goes on without this site), a transfer under way is cancelled (the server learns it at
  once), the connection is closed, and the script ends through StoppedBySignal [0].
- The server refuses the site's credentials: NotAdmitted [77, EX_NOPERM].

For a server restarted in the middle of a round, the client keeps the last result it delivered
(a reference, not a copy) until the next task arrives, reports that task in its heartbeats
(`sent`) and sends the result again, with the same transfer id, when the server asks (RESEND).
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
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, TypeVar

import torch

from fl.exit_codes import EXIT_NOT_ADMITTED, EXIT_OK, EXIT_SERVER_LOST
from fl.model import FLModel, ParamsType, params_nbytes
from fl.protocol import (
    ERROR,
    HELLO,
    RESEND,
    STOP,
    ProtocolViolation,
    TaskInfo,
    heartbeat,
    kind_of,
    parse_task,
    resend_task_id,
    result_meta,
    result_transfer_id,
)
from transport import (
    Endpoint,
    EndpointConfig,
    IncomingTransfer,
    Peer,
    RemoteError,
    RemoteRequestError,
    Sink,
    StateDictSink,
    StreamResetError,
    TensorwireError,
    TransferCancelledError,
    TransferResult,
    TransportError,
    client_tls,
    progress,
)

__all__ = [
    "EXIT_NOT_ADMITTED",
    "EXIT_SERVER_LOST",
    "ClientSettings",
    "FLClient",
    "FLModel",
    "JobStopped",
    "JobStoppedExit",
    "NotAdmitted",
    "ParamsType",
    "ServerLost",
    "ServerLostExit",
    "StoppedBySignal",
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

# A transfer that fails because the server's connection went away may do so a moment before the
# STOP that came ahead of it on the wire is handled: wait this long for it before calling it an
# error.
STOP_GRACE_S = 3.0
# Closing after a failure or a signal: how long telling the server the task failed may take.
REPORT_TIMEOUT_S = 5.0


class JobStopped(Exception):
    """The server ended the job while this client was receiving or sending (async API)."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"the server ended the job: {reason}")
        self.reason = reason


class ServerLost(ConnectionError):
    """The server could not be reached for longer than this client waits for it: connect_timeout
    at the start, idle_timeout once connected (async API)."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"lost the server: {reason}")
        self.reason = reason


class NotAdmitted(PermissionError):
    """The server refused this site: its token, or the identity in its certificate."""


class JobStoppedExit(SystemExit):
    """JobStopped, as the sync API raises it: a SystemExit with status 0, so that uncaught it
    ends the script cleanly and a runner does not restart it."""

    def __init__(self, stopped: JobStopped) -> None:
        super().__init__(EXIT_OK)
        self.reason = stopped.reason


class ServerLostExit(SystemExit):
    """ServerLost, as the sync API raises it: status 69 (EX_UNAVAILABLE), which `tensorwire
    client` reports as a failure without restarting the script (it already waited)."""

    def __init__(self, lost: ServerLost) -> None:
        super().__init__(EXIT_SERVER_LOST)
        self.reason = lost.reason


class StoppedBySignal(SystemExit):
    """SIGTERM or SIGINT ended the script: status 0 once the server was told (see
    `install_stop_signals`)."""

    def __init__(self, number: int) -> None:
        super().__init__(EXIT_OK)
        self.signal = number

    def __str__(self) -> str:
        return f"stopped by {signal.Signals(self.signal).name}"


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


@dataclass
class _Delivered:
    """The last result the server committed: the model itself (not a copy), as it was sent."""

    task: TaskInfo
    model: FLModel
    meta: dict[str, Any]
    transfer_id: str


class FLClient:
    """One site's connection to the server: receive tasks, send results."""

    def __init__(self, settings: ClientSettings) -> None:
        self.settings = settings
        self.endpoint: Endpoint | None = None
        self.peer: Peer | None = None
        self.current: TaskInfo | None = None
        self.stop_reason: str | None = None  # the server ended the job
        self.lost_reason: str | None = None  # the server was gone for longer than idle_timeout
        self._queue: asyncio.Queue[_Pending | None] | None = None  # None: wakes up a waiter
        self._ended: asyncio.Event | None = None  # stopped or lost
        self._next: _Pending | None = None
        self._background: list[asyncio.Task[None]] = []
        self._inflight: asyncio.Future[Any] | None = None
        self._inflight_is_send = False
        self._under_way: TaskInfo | None = None  # the task being received or sent back
        self._delivered: _Delivered | None = None
        self._newest_task: str | None = None  # the id of the task that arrived last
        self._resending: asyncio.Task[None] | None = None
        self._last_contact = 0.0  # loop time of the server's last answer or request
        self._closing = False
        self._loop_thread: _LoopThread | None = None

    # --- async API -------------------------------------------------------------------------------

    async def start_async(self) -> None:
        """Connect and say hello, retrying both with backoff up to connect_timeout (ServerLost
        after that); NotAdmitted if the server refuses this site."""
        self._queue = asyncio.Queue()
        self._ended = asyncio.Event()
        self.endpoint = Endpoint(self.settings.endpoint_config())
        self.endpoint.on_request(self._serve_request)
        answer = await self._join()
        self._contact()
        self._background = [
            asyncio.ensure_future(self._take_tasks()),
            asyncio.ensure_future(self._heartbeat()),
        ]
        if kind_of(answer) == STOP:  # joined a job that is already over
            self._end(str(answer.get("reason", "the server ended the job")))

    async def is_running_async(self) -> bool:
        """Wait until the server sends the next task (True) or ends the job (False); raises
        ServerLost once the server was gone for longer than idle_timeout."""
        if await self._peek() is not None:
            return True
        if self.lost_reason is not None:
            raise ServerLost(self.lost_reason)
        return False

    async def receive_async(
        self, into: Mapping[str, torch.Tensor] | None = None, sink: Sink | None = None
    ) -> FLModel:
        """The next task's model, received into a new dict, in place into `into`, or into any
        transport `sink` (params is then what the sink's commit() returned).

        A task the server withdraws while it is being received (it cancels the transfer, e.g.
        when the round closed without this site) is skipped for the next one, unless `sink` was
        given (a sink may not be reusable): then the TransferCancelledError is raised, unless
        the server ends the job meanwhile."""
        return await self._stoppable(lambda: self._receive(into, sink))

    async def _receive(self, into: Mapping[str, torch.Tensor] | None, sink: Sink | None) -> FLModel:
        while True:
            pending = await self._peek()
            if pending is None:
                raise self._ending_error()
            self._next = None
            info, transfer = pending
            target = sink
            if target is None:
                target = StateDictSink(into=dict(into)) if into is not None else StateDictSink()
            nbytes = transfer.manifest.total_bytes if transfer.manifest else 0
            self._under_way = info
            try:
                with self._progress(nbytes, f"{_round_name(info)} model", "received"):
                    params = await transfer.receive_into(target)
            except TransferCancelledError as withdrawn:
                if sink is not None:
                    raise
                log.warning("the server withdrew task %s: %s", info.task_id, withdrawn)
                continue
            finally:
                self._under_way = None
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
        params = model.params
        meta = result_meta(task.task_id, model)
        transfer_id = result_transfer_id(task.task_id, self.settings.site)
        self.current = None
        nbytes = params_nbytes(params)
        self._under_way = task
        try:
            with self._progress(nbytes, f"{_round_name(task)} result", "sent"):
                result = await self._stoppable(
                    lambda: peer.send_state_dict(params, meta=meta, transfer_id=transfer_id),
                    sending=True,
                )
        except StreamResetError as refusal:
            log.warning("the server did not take this result: %s", refusal)
            return None
        finally:
            self._under_way = None
        if self._newest_task == task.task_id:  # no newer task arrived meanwhile
            self._delivered = _Delivered(task, model, meta, transfer_id)
        return result

    def _progress(
        self, nbytes: int, description: str, direction: str
    ) -> AbstractContextManager[object]:
        wanted = None if self.settings.progress else False  # None: on a terminal only
        return progress.transfer_progress(nbytes, description, direction, enabled=wanted)

    async def _stoppable(
        self, operation: Callable[[], Awaitable[_T]], *, sending: bool = False
    ) -> _T:
        """Run a receive or send that the end of the job cancels (raising JobStopped, or
        ServerLost). A send is only cancelled when the server is lost: after a STOP it may
        still finish (its verdict may be on the wire ahead of the STOP), and it fails at once
        if the server does not take it."""
        if self._ending():
            raise self._ending_error()
        running = asyncio.ensure_future(operation())
        self._inflight = running
        self._inflight_is_send = sending
        try:
            return await running
        except asyncio.CancelledError:
            if self._ending() and running.cancelled():
                raise self._ending_error() from None
            raise
        except (TransportError, TransferCancelledError) as error:
            explained = await self._explained(error)
            if explained is error:
                raise
            raise explained from error
        finally:
            self._inflight = None

    async def _explained(self, error: TensorwireError) -> Exception:
        """A receive or send failed because the connection to the server went away (or the
        server withdrew the transfer): the job's end when the server said STOP first (or is
        lost), else the error itself."""
        assert self._ended is not None
        if not self._ended.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ended.wait(), STOP_GRACE_S)
        return self._ending_error() if self._ending() else error

    async def report_error_async(self, message: str) -> None:
        """Tell the server this task failed (the round goes on without this site)."""
        task = self._require_task()
        self.current = None
        await self._report(task, message)

    async def _report(self, task: TaskInfo, message: str) -> None:
        peer = self._require_peer()
        await peer.request({"fl": ERROR, "task_id": task.task_id, "message": message[:4000]})

    async def close_async(self) -> None:
        """Cancel what is under way (the server learns it at once), stop the heartbeats and
        close the connection."""
        self._closing = True
        running = [self._inflight, self._resending, *self._background]
        for task in running:
            if task is not None:
                task.cancel()
        await asyncio.gather(
            *(task for task in running if task is not None), return_exceptions=True
        )
        if self.endpoint is not None:
            await self.endpoint.close()

    @property
    def sent_task_id(self) -> str | None:
        """The task whose result the server last committed, until a newer task arrives."""
        return self._delivered.task.task_id if self._delivered else None

    # --- sync API (for training scripts) ---------------------------------------------------------

    def init(self) -> FLClient:
        """Start the background loop and connect; returns self."""
        if self._loop_thread is None:
            self._loop_thread = _LoopThread()
            try:
                self._loop_thread.call(self.start_async())
            except BaseException:
                self.close()
                raise
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
            loop_thread, self._loop_thread = self._loop_thread, None
            with contextlib.suppress(Exception):
                loop_thread.call(self.close_async())
            loop_thread.stop()

    def __enter__(self) -> FLClient:
        return self.init()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        _STOP_SIGNALS.disarm()  # a signal now would cut the cleanup short, not speed it up
        if error is not None:
            self.report_quietly(_failure_message(error))
        self.close()

    def report_quietly(self, message: str) -> None:
        """Report the task in hand (open, or being received or sent back) as failed, giving up
        after REPORT_TIMEOUT_S; for exit paths, which must not hang on a server that is gone.
        close() then cancels a transfer under way."""
        task = self.current or self._under_way
        if task is None or self._loop_thread is None or self._ending():
            return
        self.current = None
        reporting = asyncio.wait_for(self._report(task, message), REPORT_TIMEOUT_S)
        try:
            self._loop_thread.call(reporting)
        except Exception as error:
            log.info("could not report the failed task to the server: %s", error)

    # --- internals -------------------------------------------------------------------------------

    def _sync(self) -> _LoopThread:
        if self._loop_thread is None:
            raise RuntimeError("call init() first")
        return self._loop_thread

    def _ending(self) -> bool:
        """Whether the job is over for this client: stopped by the server, or the server lost."""
        return self._ended is not None and self._ended.is_set()

    def _ending_error(self) -> JobStopped | ServerLost:
        if self.lost_reason is not None:
            return ServerLost(self.lost_reason)
        return JobStopped(self.stop_reason or "the job is over")

    def _require_task(self) -> TaskInfo:
        if self.current is None:
            raise RuntimeError("no task is open: call receive() before send()")
        return self.current

    def _require_peer(self) -> Peer:
        if self.peer is None:
            raise RuntimeError("not connected: call init() first")
        return self.peer

    async def _peek(self) -> _Pending | None:
        """The next task (kept until a receive takes it), or None once the job is over (a task
        still queued then is dropped: its server is done with it)."""
        assert self._queue is not None, "start_async() first"
        while self._next is None and not self._ending():
            self._next = await self._queue.get()
        return None if self._ending() else self._next

    async def _join(self) -> Mapping[str, Any]:
        """Connect and say hello; the server's answer. A server that is not up yet, or that goes
        away before it answered (a restart), is tried again until connect_timeout."""
        assert self.endpoint is not None
        settings = self.settings
        loop = asyncio.get_running_loop()
        deadline = loop.time() + settings.connect_timeout
        delay = 0.1
        while True:
            try:
                if self.peer is None:
                    self.peer = await self.endpoint.connect(settings.server_url)
                hello = self.peer.request({"fl": HELLO})
                answer, _ = await asyncio.wait_for(hello, max(0.0, deadline - loop.time()))
                return answer
            except RemoteError as refusal:
                if refusal.code == "unauthorized":
                    raise NotAdmitted(
                        f"{settings.site}: the server at {settings.server_url} did not admit "
                        f"this site ({refusal}); check its token and certificate"
                    ) from None
                error: BaseException = refusal
            except (TensorwireError, OSError, TimeoutError) as failure:
                error = failure
            if loop.time() + delay > deadline:
                raise ServerLost(
                    f"{settings.site}: could not reach {settings.server_url} within "
                    f"{settings.connect_timeout:g} s (connect_timeout): {error}"
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
            self._contact()
            self._task_arrived(info)
            self._queue.put_nowait((info, transfer))

    def _task_arrived(self, info: TaskInfo) -> None:
        """A task arrived: the result delivered for an older one is no longer needed (and its
        tensors may be about to be received into), unless this is that same task again."""
        self._newest_task = info.task_id
        if self._delivered is not None and self._delivered.task.task_id != info.task_id:
            self._delivered = None
            if self._resending is not None:
                self._resending.cancel()

    async def _serve_request(
        self, peer: Peer, header: Mapping[str, Any], body: bytes
    ) -> tuple[Mapping[str, Any], bytes]:
        kind = kind_of(header)
        if kind == STOP:
            self._contact()
            self._end(str(header.get("reason", "the server ended the job")))
            return {"fl": STOP}, b""
        if kind == RESEND:
            self._contact()
            return {"fl": RESEND, "ok": self._resend(resend_task_id(header))}, b""
        raise ProtocolViolation(f"unexpected FL request {kind!r} from the server")

    def _resend(self, task_id: str) -> bool:
        """Send the delivered result for `task_id` again, in the background; False if this
        client does not hold it (any more)."""
        delivered = self._delivered
        if delivered is None or delivered.task.task_id != task_id or self._closing:
            return False
        if self._resending is None or self._resending.done():
            self._resending = asyncio.ensure_future(self._send_again(delivered))
        return True

    async def _send_again(self, delivered: _Delivered) -> None:
        peer = self._require_peer()
        assert delivered.model.params is not None
        log.info("the server asked for the result of %s again", delivered.task.task_id)
        try:
            await peer.send_state_dict(
                delivered.model.params, meta=delivered.meta, transfer_id=delivered.transfer_id
            )
        except Exception as error:  # the script is not waiting for this: log it
            log.warning("could not send the result of %s again: %s", delivered.task.task_id, error)
        else:
            log.info("sent the result of %s again", delivered.task.task_id)

    def _end(self, reason: str) -> None:
        """The server ended the job: wake waiters, cancel a receive under way (not a send)."""
        if self._finish() and self.stop_reason is None:
            self.stop_reason = reason
            if self._inflight is not None and not self._inflight_is_send:
                self._inflight.cancel()

    def _lose(self, reason: str) -> None:
        """The server is gone for good: wake waiters, cancel whatever is under way."""
        if self._finish():
            self.lost_reason = reason
            log.warning("%s: lost the server: %s", self.settings.site, reason)
            if self._inflight is not None:
                self._inflight.cancel()

    def _finish(self) -> bool:
        """Mark the job over (once); True the first time."""
        if self._ended is None or self._queue is None or self._ended.is_set():
            return False
        self._ended.set()
        self._queue.put_nowait(None)
        return True

    def _contact(self) -> None:
        self._last_contact = asyncio.get_running_loop().time()

    async def _heartbeat(self) -> None:
        """Tell the server this site is alive, on which task, and which result it last
        delivered; the request also makes the transport redial a dropped connection. Ends the
        job when the answer says it is over (a STOP this site missed), and gives the server up
        once it has not answered for idle_timeout."""
        peer = self._require_peer()
        loop = asyncio.get_running_loop()
        patience = self.settings.idle_timeout
        while True:
            await asyncio.sleep(self.settings.heartbeat_interval)
            task_id = self.current.task_id if self.current else None
            beat = peer.request(heartbeat(task_id, self.sent_task_id))
            left = self._last_contact + patience - loop.time()  # redialling included
            try:
                answer, _ = await asyncio.wait_for(beat, max(left, 0.1))
            except RemoteRequestError as error:  # it answered, if with a failure
                self._contact()
                log.info("the server failed a heartbeat: %s", error)
                continue
            except (TensorwireError, TimeoutError) as error:
                silent = loop.time() - self._last_contact
                if silent >= patience:
                    self._lose(f"no answer from {self.settings.server_url} for {silent:.0f} s")
                    return
                log.info("heartbeat failed (server silent for %.0f s): %s", silent, error)
                continue
            self._contact()
            if kind_of(answer) == STOP:
                self._end(str(answer.get("reason", "the server ended the job")))
                return


def _round_name(info: TaskInfo) -> str:
    return f"round {info.round + 1}" if info.round is not None else info.task


def _failure_message(error: BaseException) -> str:
    """What the server is told about a script that ends mid-task with `error`."""
    if isinstance(error, StoppedBySignal):
        return f"the client was {error}"
    if isinstance(error, SystemExit):
        return f"the script exited with status {error.code} mid-task"
    return f"{type(error).__name__}: {error}"


class _LoopThread:
    """An event loop in a daemon thread; call() runs a coroutine there and waits for it."""

    def __init__(self) -> None:
        ready = threading.Event()
        self._thread = threading.Thread(
            target=asyncio.run, args=(self._serve(ready),), name="fl-client", daemon=True
        )
        self._thread.start()
        ready.wait()

    async def _serve(self, ready: threading.Event) -> None:
        # asyncio.run around this does the teardown once stopped: leftover tasks (the transport's
        # heartbeats among them) are cancelled and finish before the loop closes.
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        ready.set()
        await self._stop.wait()

    def call(self, coroutine: Awaitable[_T]) -> _T:
        async def wrapped() -> _T:
            return await coroutine

        try:
            return asyncio.run_coroutine_threadsafe(wrapped(), self.loop).result()
        except JobStopped as stopped:
            print(f"fl.client: {stopped}", file=sys.stderr, flush=True)
            raise JobStoppedExit(stopped) from None
        except ServerLost as lost:
            print(f"fl.client: {lost}; giving up", file=sys.stderr, flush=True)
            raise ServerLostExit(lost) from None

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=10)


# --- signals -------------------------------------------------------------------------------------


class _StopSignals:
    """SIGTERM and SIGINT end the script through StoppedBySignal (status 0): the exit paths tell
    the server about the task under way and close the connection. Only the first signal does
    it; later ones (a terminal's Ctrl-C reaches the script and its runner, which forwards it)
    would only cut that short, so they are ignored while the script winds down."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.armed = False

    def install(self) -> Callable[[], None]:
        """Install the handlers (main thread only); returns what restores the previous ones."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        numbers = (signal.SIGTERM, signal.SIGINT)
        previous = {number: signal.getsignal(number) for number in numbers}
        self.received, self.armed = None, True
        for number in numbers:
            signal.signal(number, self._handle)

        def restore() -> None:
            self.armed = False
            for number, handler in previous.items():
                signal.signal(number, handler)

        return restore

    def disarm(self) -> None:
        self.armed = False

    def _handle(self, number: int, frame: FrameType | None) -> None:
        if not self.armed or self.received is not None:
            return
        self.received = number
        raise StoppedBySignal(number)


_STOP_SIGNALS = _StopSignals()


def install_stop_signals() -> Callable[[], None]:
    """Make SIGTERM and SIGINT end this (main) thread with StoppedBySignal, once; returns what
    restores the previous handlers. `init()` does it for scripts; runners that run a script
    in-process (tensorwire client --in-process) do it around it."""
    return _STOP_SIGNALS.install()


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
        client = _process_client = FLClient(ClientSettings.from_env())
        _install_exit_hooks(client)  # first: a signal while connecting ends the script cleanly
        try:
            client.init()
        except NotAdmitted as refusal:
            print(f"fl.client.init(): {refusal}", file=sys.stderr, flush=True)
            raise SystemExit(EXIT_NOT_ADMITTED) from None
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
    SIGTERM and SIGINT end the script the same way, with status 0."""
    last_error: list[str] = []
    previous_hook = sys.excepthook

    def remember(kind: type[BaseException], error: BaseException, tb: TracebackType | None) -> None:
        last_error.append(f"{kind.__name__}: {error}")
        previous_hook(kind, error, tb)

    def at_exit() -> None:
        _STOP_SIGNALS.disarm()
        if _STOP_SIGNALS.received is not None:
            why = f"the client was {StoppedBySignal(_STOP_SIGNALS.received)}"
        else:
            why = last_error[-1] if last_error else "the script exited mid-task"
        client.report_quietly(why)
        client.close()

    sys.excepthook = remember
    atexit.register(at_exit)
    install_stop_signals()
