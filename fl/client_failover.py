"""The upstreams a site's client may be served from, for fl/client_core.py: `server_url` first,
then `fallback_urls` in order, in a cycle (a relay in front of the server, then the server, or
another relay). Upstreams dials them (connect and say hello, with backoff); `unless_switched`
runs an operation on the current upstream that a failover cancels.

How FLClient fails over (with fallbacks only; with none, a client is what it always was):
- the upstream is given up once it has not answered for `failover_delay()` (heartbeats fail, or
  are not answered); the next URL is dialled, each URL for up to failover_delay before the one
  after it, until one answers the hello; ServerLost once none has for idle_timeout since the
  last answer (connect_timeout at the start).
- a task being received from the old upstream is dropped (the script's receive waits for the
  next task, which the new upstream sends; a receive into the script's own `sink` raises
  ConnectionClosedError instead: the sink was aborted); a task queued and not taken is refused.
- a result being sent is sent again to the new upstream, same transfer id and meta.
- a receive or send that fails on the connection before the failover waits for it (and is
  then dropped or sent again); it fails as before if the upstream answers a heartbeat meanwhile.
- the last delivered result is kept: the heartbeats' `sent` tells the new upstream, which asks
  RESEND for it if it needs it.
- a task the client already holds (open, its result being sent, or delivered) that an upstream
  sends again is refused: the script must not train twice. An upstream learns what the client
  holds from the `task_id` and `sent` of its hello and heartbeats.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from fl.client_settings import ClientSettings, JobStopped, NotAdmitted, ServerLost
from fl.model import Params
from fl.protocol import HELLO, STOP, TaskInfo, heartbeat, kind_of
from transport import (
    ConnectionClosedError,
    Endpoint,
    IncomingTransfer,
    Peer,
    RemoteError,
    Sink,
    TensorwireError,
    TransferResult,
    TransportError,
)

log = logging.getLogger("fl.client")
_T = TypeVar("_T")
Hello = Callable[[], Mapping[str, Any]]
_Pending = tuple[TaskInfo, IncomingTransfer]
# Leaving an upstream: how long closing its connection may take (it is gone: nothing to flush).
CLOSE_TIMEOUT_S = 5.0


class Switched(Exception):
    """The client failed over while an operation on the old upstream was under way; it was
    cancelled."""


class Unreachable(Exception):
    """No upstream answered in time; `errors` says why, per URL."""

    def __init__(self, errors: Mapping[str, BaseException]) -> None:
        super().__init__("; ".join(f"{url}: {error}" for url, error in errors.items()))
        self.errors = dict(errors)


async def unless_switched(operation: Awaitable[_T], switched: asyncio.Future[None]) -> _T:
    """Await `operation`, unless `switched` resolves first (the client failed over): then cancel
    it and raise Switched. An operation that failed by the time of a failover counts as cut off
    by it (Switched, so that it is done again); one that succeeded stands."""
    running = asyncio.ensure_future(operation)
    try:
        either: set[asyncio.Future[Any]] = {running, switched}
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        await _cancelled(running)
        raise
    succeeded = running.done() and not running.cancelled() and running.exception() is None
    if succeeded or (running.done() and not switched.done()):
        return running.result()
    await _cancelled(running)
    raise Switched


async def _cancelled(running: asyncio.Future[Any]) -> None:
    """Cancel `running` and wait until it has finished (a sink aborted, a stream reset)."""
    running.cancel()
    await asyncio.gather(running, return_exceptions=True)


class Upstreams:
    """The URLs a client may be served from, and the one it is served from now (`index`)."""

    def __init__(self, settings: ClientSettings, endpoint: Endpoint) -> None:
        self.settings = settings
        self.endpoint = endpoint
        self.urls = [settings.server_url, *settings.fallback_urls]
        self.index = 0

    @property
    def url(self) -> str:
        return self.urls[self.index]

    @property
    def fails_over(self) -> bool:
        return len(self.urls) > 1

    async def join(self, hello: Hello) -> tuple[Peer, Mapping[str, Any]]:
        """The first upstream that answers the hello; ServerLost once none has within
        connect_timeout, NotAdmitted as soon as one refuses this site."""
        settings = self.settings
        deadline = asyncio.get_running_loop().time() + settings.connect_timeout
        try:
            return await self.reach(hello, deadline, start=0, refusal_ends=True)
        except Unreachable as failure:
            urls, why = self._described(failure)
            raise ServerLost(
                f"{settings.site}: could not reach {urls} within {settings.connect_timeout:g} s "
                f"(connect_timeout): {why}"
            ) from failure

    async def fail_over(self, hello: Hello, last_contact: float) -> tuple[Peer, Mapping[str, Any]]:
        """The next upstream after the current one that answers the hello (the current one
        last of all); ServerLost once none has answered for idle_timeout since `last_contact`
        (a loop time). One that refuses this site is passed over."""
        deadline = last_contact + self.settings.idle_timeout
        try:
            return await self.reach(hello, deadline, start=self.index + 1, refusal_ends=False)
        except Unreachable as failure:
            silent = asyncio.get_running_loop().time() - last_contact
            urls, why = self._described(failure)
            raise ServerLost(f"no answer from {urls} for {silent:.0f} s: {why}") from failure

    def _described(self, failure: Unreachable) -> tuple[str, str]:
        """The URLs tried and why they failed, for a message."""
        if not self.fails_over:
            return self.url, "; ".join(str(error) for error in failure.errors.values())
        return f"any of {', '.join(self.urls)}", str(failure)

    async def reach(
        self, hello: Hello, deadline: float, *, start: int, refusal_ends: bool
    ) -> tuple[Peer, Mapping[str, Any]]:
        """Dial the URLs from `start` on, in a cycle, each for up to failover_delay (the one URL
        of a client without fallbacks: until `deadline`); the first that answers the hello is
        the upstream. Unreachable once `deadline` passed and every URL was tried. A URL that
        refuses this site is NotAdmitted with `refusal_ends`, else one more that failed."""
        loop = asyncio.get_running_loop()
        errors: dict[str, BaseException] = {}
        index = start % len(self.urls)
        while True:
            url = self.urls[index]
            until = deadline
            if self.fails_over:
                until = min(deadline, loop.time() + self.settings.failover_delay())
            try:
                peer, answer = await self._reach_one(url, hello, until)
            except NotAdmitted as refusal:
                if refusal_ends:
                    raise
                log.error("%s", refusal)
                errors[url] = refusal
            except Unreachable as failure:
                errors.update(failure.errors)
            else:
                self.index = index
                return peer, answer
            if loop.time() >= deadline and len(errors) >= len(set(self.urls)):
                raise Unreachable(errors)
            index = (index + 1) % len(self.urls)

    async def _reach_one(
        self, url: str, hello: Hello, until: float
    ) -> tuple[Peer, Mapping[str, Any]]:
        """Connect to `url` and say hello, again with backoff (a server not up yet, or one that
        went away before it answered: a restart) until `until`; Unreachable after that."""
        loop = asyncio.get_running_loop()
        peer: Peer | None = None
        delay = 0.1
        while True:
            try:
                if peer is None:
                    peer = await self.endpoint.connect(url)
                answer, _ = await asyncio.wait_for(
                    peer.request(hello()), max(0.0, until - loop.time())
                )
                return peer, answer
            except RemoteError as refusal:
                if refusal.code == "unauthorized":
                    await _close_quietly(peer)
                    raise NotAdmitted(
                        f"{self.settings.site}: the server at {url} did not admit this site "
                        f"({refusal}); check its token and certificate"
                    ) from None
                error: BaseException = refusal
            except (TensorwireError, OSError, TimeoutError) as failure:
                error = failure
            if loop.time() + delay > until:
                await _close_quietly(peer)  # the next URL is tried: this one must not redial
                raise Unreachable({url: error}) from error
            log.info("server not reachable yet (%s); retrying in %.1f s", error, delay)
            await asyncio.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(delay * 2, 5.0)


async def _close_quietly(peer: Peer | None) -> None:
    if peer is not None:
        with contextlib.suppress(Exception):
            await peer.close()


class Failover:
    """The failover half of FLClient (fl/client_core.py): what it says in hello and heartbeats,
    leaving an upstream for the next, and what that means for the transfers under way."""

    # FLClient's, used here.
    settings: ClientSettings
    peer: Peer | None
    current: TaskInfo | None
    heartbeat_extra: Callable[[], Mapping[str, Any]] | None
    _queue: asyncio.Queue[_Pending | None] | None
    _next: _Pending | None
    _resending: asyncio.Task[None] | None
    _last_contact: float
    _sending_task: str | None
    # Set up by start_async.
    _upstreams: Upstreams | None
    _switched: asyncio.Future[None] | None  # resolved (and replaced) at each failover
    _news: asyncio.Event | None  # set (and replaced) by _poke
    _beat_answered: float  # loop time at which the last answered heartbeat was sent

    if TYPE_CHECKING:

        @property
        def sent_task_id(self) -> str | None: ...

        def _lose(self, reason: str) -> None: ...

        def _end(self, reason: str) -> None: ...

        def _contact(self) -> None: ...

        def _ending(self) -> bool: ...

        def _ending_error(self) -> JobStopped | ServerLost: ...

    def _state_message(self, kind: str) -> dict[str, Any]:
        """A hello or heartbeat: the open task, the task whose result was delivered (so that an
        upstream this client fails over to knows), and the heartbeat_extra fields."""
        # Open: received and not delivered yet, its result being sent included.
        task_id = self.current.task_id if self.current else self._sending_task
        message = {**heartbeat(task_id, self.sent_task_id), "fl": kind}
        if self.heartbeat_extra is None:
            return message
        try:
            extra = dict(self.heartbeat_extra())
        except Exception as error:  # the heartbeats must go on: they keep the site alive
            log.warning("heartbeat_extra failed: %s", error)
            return message
        return {**extra, **message}  # the protocol's own fields win

    def _hello(self) -> dict[str, Any]:
        return self._state_message(HELLO)

    def _fails_over(self) -> bool:
        return self._upstreams is not None and self._upstreams.fails_over

    async def _fail_over(self, silent: float) -> bool:
        """The upstream has not answered for failover_delay: leave it (what was under way with
        it is cut off, tasks it queued are refused) and join the next one that answers; False
        when none did within idle_timeout of the last answer (the server is lost)."""
        assert self._upstreams is not None
        assert self._switched is not None
        old, gone = self.peer, self._upstreams.url
        log.warning(
            "%s: no answer from %s for %.0f s; failing over", self.settings.site, gone, silent
        )
        self.peer = None
        if self._resending is not None:
            self._resending.cancel()
        if old is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(old.close(), CLOSE_TIMEOUT_S)
        # Only now, with nothing more to come from the old upstream: what a receive takes from
        # here on is the next one's, and whatever still runs on the old one is cut off.
        self._drop_queued(f"{gone} is gone: this site failed over")
        switched, self._switched = self._switched, asyncio.get_running_loop().create_future()
        switched.set_result(None)
        try:
            self.peer, answer = await self._upstreams.fail_over(self._hello, self._last_contact)
        except ServerLost as lost:
            self._lose(lost.reason)
            return False
        log.warning("%s: failed over to %s", self.settings.site, self._upstreams.url)
        self._contact()
        if kind_of(answer) == STOP:
            self._end(str(answer.get("reason", "the server ended the job")))
            return False
        return True

    def _drop_queued(self, reason: str) -> None:
        """Refuse the tasks the old upstream queued that no receive took: their sender is gone,
        and a refused transfer is forgotten (the next upstream's same id is a new transfer)."""
        assert self._queue is not None
        pending, self._next = [self._next], None
        while not self._queue.empty():
            pending.append(self._queue.get_nowait())
        if None in pending[1:]:
            self._queue.put_nowait(None)  # the job's end, for whoever waits
        for item in pending:
            if item is not None:
                with contextlib.suppress(TensorwireError):
                    item[1].reject(reason)

    async def _on_upstream(self, operation: Awaitable[_T]) -> _T:
        """Await an operation on the upstream; with fallbacks, Switched when the client fails
        over meanwhile (it is cancelled)."""
        if not self._fails_over():
            return await operation
        assert self._switched is not None
        return await unless_switched(operation, self._switched)

    async def _upstream(self) -> Peer:
        """The upstream's peer, waiting for one while failing over; the job's end raised."""
        await self._until(lambda: self.peer is not None or self._ending())
        if self.peer is None:
            raise self._ending_error()
        return self.peer

    async def _after_failure(
        self, switched: asyncio.Future[None] | None, error: TensorwireError
    ) -> None:
        """An operation on the upstream failed with a transport error: return once the client
        failed over (`switched`: do it again with the next one). Raise the job's end, or
        `error` once the upstream answers a heartbeat sent after the failure (it is not gone),
        or when nothing happened within idle_timeout."""
        assert switched is not None
        failed_at = asyncio.get_running_loop().time()
        await self._until(
            lambda: switched.done() or self._ending() or self._beat_answered >= failed_at,
            self.settings.idle_timeout,
        )
        if self._ending():
            raise self._ending_error() from error
        if not switched.done():
            raise error

    def _dropped(self, info: TaskInfo, sink: Sink | None) -> None:
        """A task being received was cut off by a failover: the next upstream sends it again,
        except into a sink that may not be reusable (it was aborted)."""
        if sink is not None:
            raise ConnectionClosedError(
                f"the upstream that was sending task {info.task_id} is gone (the sink was "
                "aborted): receive again, into a new sink, from the next upstream"
            )
        log.warning("task %s was cut off by a failover: waiting for it again", info.task_id)

    def _poke(self) -> None:
        """Wake whoever waits in _until: something changed."""
        if self._news is not None:
            self._news.set()
            self._news = asyncio.Event()

    async def _until(self, condition: Callable[[], bool], within: float | None = None) -> bool:
        """Wait until `condition()` holds (checked whenever _poke says something changed), or
        `within` seconds passed; whether it holds."""
        loop = asyncio.get_running_loop()
        deadline = None if within is None else loop.time() + within
        while not condition():
            assert self._news is not None
            news = self._news
            left = None if deadline is None else deadline - loop.time()
            if left is not None and left <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(news.wait(), left)
        return True

    async def _deliver(
        self, params: Params, meta: dict[str, Any], transfer_id: str
    ) -> TransferResult:
        """Send a result to the upstream there is, and again (same transfer id and meta: the
        same transfer to the server) to the next one if this one is lost meanwhile."""
        while True:
            peer, switched = await self._upstream(), self._switched
            try:
                return await self._on_upstream(
                    peer.send_state_dict(params, meta=meta, transfer_id=transfer_id)
                )
            except Switched:
                pass
            except TransportError as error:
                await self._after_failure(switched, error)
            log.warning("sending %s again, to the next upstream", transfer_id)

    def _refused_again(self, info: TaskInfo, transfer: IncomingTransfer) -> bool:
        """With fallbacks, a task this site already holds (open, its result being sent, or
        delivered) is refused: an upstream it failed over to sends it again only when it did
        not look at the hello and heartbeats, and taking it would make the script train twice.
        (Without fallbacks as before: a restarted server's task resumes the same transfer.)"""
        current = self.current.task_id if self.current else None
        held = {current, self._sending_task, self.sent_task_id} - {None}
        if not self._fails_over() or info.task_id not in held:
            return False
        log.warning("refusing task %s again: this site already holds it", info.task_id)
        transfer.reject(
            f"{self.settings.site} already holds task {info.task_id!r} (open, or its result "
            "sent or being sent, as its hello and heartbeats say): wait for its result, or ask "
            "RESEND, instead of sending the task again"
        )
        return True
