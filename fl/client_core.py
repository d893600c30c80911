"""FLClient: one site's connection to the server, behind fl.client's script API. Its async API
(start_async, is_running_async, receive_async, send_async, report_error_async, close_async) runs
on any event loop; its sync API (init, is_running, receive, send, report_error, close, and use as
a context manager) runs that on an event loop in a background thread (_LoopThread), turning
JobStopped and ServerLost into JobStoppedExit and ServerLostExit. It also keeps the last
delivered result (_Delivered) to send again when a restarted server asks (RESEND), and fails
over to the next of its fallback URLs when its upstream is gone (fl/client_failover.py says how).
Settings and exceptions: fl/client_settings.py; how a job ends: fl/client.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

import torch

from fl.client_failover import Failover, Switched, Upstreams
from fl.client_settings import (
    _STOP_SIGNALS,
    ClientSettings,
    JobStopped,
    JobStoppedExit,
    ServerLost,
    ServerLostExit,
    StoppedBySignal,
)
from fl.model import FLModel, params_nbytes
from fl.protocol import (
    ERROR,
    HEARTBEAT,
    RESEND,
    STOP,
    PartialSum,
    ProtocolViolation,
    TaskInfo,
    kind_of,
    parse_task,
    resend_task_id,
    result_meta,
    result_transfer_id,
)
from transport import (
    Endpoint,
    IncomingTransfer,
    Peer,
    RemoteRequestError,
    Sink,
    StateDictSink,
    StreamResetError,
    TensorwireError,
    TransferCancelledError,
    TransferResult,
    TransportError,
    progress,
)

# Named as before the split: these records are fl.client's, whoever configures logging.
log = logging.getLogger("fl.client")
_T = TypeVar("_T")
_Pending = tuple[TaskInfo, IncomingTransfer]

# A transfer that fails because the server's connection went away may do so a moment before the
# STOP that came ahead of it on the wire is handled: wait this long for it before calling it an
# error.
STOP_GRACE_S = 3.0
# Closing after a failure or a signal: how long telling the server the task failed may take.
REPORT_TIMEOUT_S = 5.0


@dataclass
class _Delivered:
    """The last result the server committed: the model itself (not a copy), as it was sent."""

    task: TaskInfo
    model: FLModel
    meta: dict[str, Any]
    transfer_id: str


class FLClient(Failover):
    """One site's connection to the server: receive tasks, send results."""

    def __init__(self, settings: ClientSettings) -> None:
        self.settings = settings
        self.endpoint: Endpoint | None = None
        self.peer: Peer | None = None  # None between two upstreams while failing over
        # Fields merged into every hello and heartbeat (a relay reports its sites: fl/relay.py).
        self.heartbeat_extra: Callable[[], Mapping[str, Any]] | None = None
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
        self._upstreams: Upstreams | None = None
        # Resolved (and replaced) when the client fails over: cuts off what the old one was doing.
        self._switched: asyncio.Future[None] | None = None
        self._news: asyncio.Event | None = None  # set (and replaced) by _poke
        self._beat_answered = 0.0  # loop time at which the last answered heartbeat was sent
        self._sending_task: str | None = None  # the task whose result is being sent
        self._closing = False
        self._loop_thread: _LoopThread | None = None

    # --- async API -------------------------------------------------------------------------------

    async def start_async(self) -> None:
        """Connect and say hello, retrying both with backoff up to connect_timeout (ServerLost
        after that); NotAdmitted if the server refuses this site."""
        self._queue = asyncio.Queue()
        self._ended = asyncio.Event()
        self._news = asyncio.Event()
        self._switched = asyncio.get_running_loop().create_future()
        self.endpoint = Endpoint(self.settings.endpoint_config())
        self.endpoint.on_request(self._serve_request)
        self._upstreams = Upstreams(self.settings, self.endpoint)
        self.peer, answer = await self._upstreams.join(self._hello)
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
        return await self.next_task_async() is not None

    async def beat_now_async(self) -> None:
        """Send a heartbeat now, not at the next interval (a relay telling its upstream which
        sites a task just went to, before it could die); a failure is only logged: the
        heartbeat loop deals with an upstream that is gone."""
        try:
            await self._require_peer().request(self._state_message(HEARTBEAT))
        except TensorwireError as error:
            log.info("an early heartbeat failed: %s", error)

    async def next_task_async(self) -> TaskInfo | None:
        """Wait for the next task and say what it is, without taking it (the next receive
        does); None once the job is over, ServerLost as is_running_async."""
        pending = await self._peek()
        if pending is not None:
            return pending[0]
        if self.lost_reason is not None:
            raise ServerLost(self.lost_reason)
        return None

    async def receive_async(
        self, into: Mapping[str, torch.Tensor] | None = None, sink: Sink | None = None
    ) -> FLModel:
        """The next task's model, received into a new dict, in place into `into`, or into any
        transport `sink` (params is then what the sink's commit() returned).

        A task the server withdraws while it is being received (it cancels the transfer, e.g.
        when the round closed without this site) is skipped for the next one, unless `sink` was
        given (a sink may not be reusable): then the TransferCancelledError is raised, unless
        the server ends the job meanwhile. So is a task whose upstream is lost while it is
        being received (the next upstream sends it again), except that with `sink` a
        ConnectionClosedError is raised."""
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
            self._under_way, switched = info, self._switched
            try:
                with self._progress(nbytes, f"{_round_name(info)} model", "received"):
                    params = await self._on_upstream(transfer.receive_into(target))
            except TransferCancelledError as withdrawn:
                if sink is not None:
                    raise
                log.warning("the server withdrew task %s: %s", info.task_id, withdrawn)
                continue
            except Switched:
                self._dropped(info, sink)
                continue
            except TransportError as error:
                if not self._fails_over():
                    raise
                await self._after_failure(switched, error)
                self._dropped(info, sink)
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

    async def send_async(
        self, model: FLModel, *, partial: PartialSum | None = None
    ) -> TransferResult | None:
        """Send the result of the current task (the one the last receive() returned); None when
        the server no longer wanted it (e.g. it closed the round without this site). Sent again
        to the next upstream when this one is lost meanwhile. `partial`: a relay's result is a
        partial sum over its sites (fl/relay.py)."""
        task = self._require_task()
        peer = None if self._fails_over() else self._require_peer()
        if model.params is None:
            raise ValueError("send() needs a model with params")
        params = model.params
        meta = result_meta(task.task_id, model, partial)
        transfer_id = result_transfer_id(task.task_id, self.settings.site)
        self.current = None
        nbytes = params_nbytes(params)
        self._under_way, self._sending_task = task, task.task_id

        async def deliver() -> TransferResult:
            if peer is None:
                return await self._deliver(params, meta, transfer_id)
            return await peer.send_state_dict(params, meta=meta, transfer_id=transfer_id)

        try:
            with self._progress(nbytes, f"{_round_name(task)} result", "sent"):
                result = await self._stoppable(deliver, sending=True)
        except StreamResetError as refusal:
            log.warning("the server did not take this result: %s", refusal)
            return None
        finally:
            self._under_way = self._sending_task = None
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
        peer = await self._upstream() if self._fails_over() else self._require_peer()
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
            if self._refused_again(info, transfer):
                continue
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
        if self.peer is None:  # failing over: the next upstream asks again if it needs it
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
        self._poke()
        return True

    def _contact(self) -> None:
        self._last_contact = asyncio.get_running_loop().time()
        self._poke()

    async def _heartbeat(self) -> None:
        """Tell the server this site is alive, on which task, and which result it last
        delivered; the request also makes the transport redial a dropped connection. Ends the
        job when the answer says it is over (a STOP this site missed), and gives the server up
        once it has not answered for idle_timeout (with fallbacks: fails over once it has not
        for failover_delay)."""
        loop = asyncio.get_running_loop()
        patience = self.settings.idle_timeout
        if self._fails_over():
            patience = min(patience, self.settings.failover_delay())
        while True:
            await asyncio.sleep(self.settings.heartbeat_interval)
            peer, sent_at = self._require_peer(), loop.time()
            beat = peer.request(self._state_message(HEARTBEAT))
            left = self._last_contact + patience - loop.time()  # redialling included
            try:
                answer, _ = await asyncio.wait_for(beat, max(left, 0.1))
            except RemoteRequestError as error:  # it answered, if with a failure
                self._contact()
                log.info("the server failed a heartbeat: %s", error)
                continue
            except (TensorwireError, TimeoutError) as error:
                silent = loop.time() - self._last_contact
                if silent < patience:
                    log.info("heartbeat failed (server silent for %.0f s): %s", silent, error)
                    continue
                if not self._fails_over():
                    self._lose(f"no answer from {self.settings.server_url} for {silent:.0f} s")
                    return
                if not await self._fail_over(silent):
                    return
                continue
            self._beat_answered = sent_at
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
            log.info("fl.client: %s", stopped)
            raise JobStoppedExit(stopped) from None
        except ServerLost as lost:
            # A warning: under a script that set up no logging, logging's last resort still
            # prints it on stderr.
            log.warning("fl.client: %s; giving up", lost)
            raise ServerLostExit(lost) from None

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=10)
