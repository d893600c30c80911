"""A blocking facade over the asyncio API, for scripts, notebooks and programs without a loop.

    from transport import StateDictSink
    from transport.sync import Endpoint

    with Endpoint() as server:                          # in one thread or process
        url = server.listen("tcp://127.0.0.1:8765")
        for transfer in server.incoming(timeout=600):   # ends after 600 s without a transfer
            state_dict = transfer.receive_into(StateDictSink())

    with Endpoint() as client:                          # in another
        peer = client.connect("tcp://127.0.0.1:8765")
        result = peer.send_state_dict(model.state_dict(), meta={"round": 1})

Each class here wraps its asyncio twin from `transport` (kept as `.aio`) and takes the same
arguments. Every call runs on one event loop in one background daemon thread, shared by all the
sync objects of the process: started by the first sync Endpoint, stopped when the last one closes
(or at interpreter exit). One long-lived loop is what a script needs: `asyncio.run()` per call
closes the loop that owns the connections, so the next call waits on a dead connection; here
connections, heartbeats and resumes carry on between calls, and `memory://` URLs connect the sync
endpoints of one process.

A call blocks its thread until the coroutine behind it is done, and raises the async API's
exceptions unchanged (the `transport.TensorwireError` tree). Calls may come from any thread but
the loop's own. Ctrl-C (KeyboardInterrupt) while a call waits cancels that coroutine first, so an
interrupted send resets its stream (the receiver sees a StreamResetError) instead of running on.

Only the public names of `transport` are used, so this module does not depend on the internals.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import enum
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Iterator, Mapping
from concurrent.futures import CancelledError, Future
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from typing_extensions import Unpack

import transport

if TYPE_CHECKING:
    import os

    import torch

    from transport import (
        EndpointConfig,
        EndpointOptions,
        Manifest,
        PeerInfo,
        Sink,
        Source,
        TransferResult,
    )

__all__ = ["Endpoint", "IncomingTransfer", "Peer", "RequestHandler"]

T = TypeVar("T")
Buffer = bytes | bytearray | memoryview
RequestHandler = Callable[["Peer", Mapping[str, Any], bytes], tuple[Mapping[str, Any], Buffer]]

# How long an interrupted call waits for its coroutine to unwind (and reset its stream) before the
# KeyboardInterrupt goes up regardless: unwinding takes a few loop turns, a hung peer must not
# make Ctrl-C hang too.
_CANCEL_GRACE_S = 5.0
# How long interpreter exit waits for each endpoint left open to close.
_EXIT_GRACE_S = 5.0


class _LoopThread:
    """The one event loop the facade runs on, alive while any sync Endpoint is open."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None

    def acquire(self) -> None:
        """Count one more user; the first starts the loop thread."""
        with self._lock:
            if self._users == 0:
                self._start()
            self._users += 1

    def release(self) -> None:
        """Count one user less; the last stops the loop thread and waits for it."""
        with self._lock:
            self._users -= 1
            if self._users == 0:
                self._stop_and_join()

    def _start(self) -> None:
        ready = threading.Event()
        thread = threading.Thread(
            target=asyncio.run, args=(self._serve(ready),), name="tensorwire-sync", daemon=True
        )
        thread.start()
        ready.wait()
        self._thread = thread

    async def _serve(self, ready: threading.Event) -> None:
        # asyncio.run around this does the teardown: cancel leftover tasks, finalize async
        # generators, join the default executor's threads.
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        ready.set()
        await self._stop.wait()

    def _stop_and_join(self) -> None:
        loop, stop, thread = self._loop, self._stop, self._thread
        self._loop = self._stop = self._thread = None
        if loop is not None and stop is not None and thread is not None:
            loop.call_soon_threadsafe(stop.set)
            if thread is not threading.current_thread():
                thread.join()

    def call(self, coroutine: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run `coroutine` on the loop and wait for its result (or exception, unchanged)."""
        loop = self._loop
        if loop is None or threading.current_thread() is self._thread:
            coroutine.close()  # never scheduled: closed, so Python does not warn it was not awaited
            if loop is None:
                raise transport.ConnectionClosedError("its transport.sync Endpoint is closed")
            raise RuntimeError(
                "transport.sync called from its own event loop thread would wait forever; "
                "use the async API (the .aio objects) there"
            )
        finished = threading.Event()
        future: Future[T] | None = None
        try:
            # Submitted inside the try: a Ctrl-C that lands right after the submission (the loop
            # thread may already be sending, and a busy machine may not run this thread again
            # for a while) must cancel the coroutine too, or the transfer runs on unseen.
            future = asyncio.run_coroutine_threadsafe(_setting(finished, coroutine), loop)
            return future.result(timeout)
        except BaseException:
            # Still running means the wait, not the coroutine, was interrupted (Ctrl-C, timeout):
            # cancel it and let it unwind so no transfer runs on unseen.
            if future is not None and future.cancel():
                finished.wait(_CANCEL_GRACE_S)
            raise

    def call_now(self, function: Callable[..., T], *args: Any) -> T:
        """Run a plain function on the loop thread (the async objects are not thread-safe)."""
        return self.call(_returning(function, *args))

    def iterate(
        self, iterator: AsyncIterator[T], timeout: float | None, waits: _Waits | None = None
    ) -> Iterator[T]:
        """The items of `iterator`, each waited for up to `timeout` seconds (None: forever);
        ends with the iterator, at the first wait that runs out, or when `waits` closes."""
        step = waits.next if waits is not None else _next_within
        ended = False
        try:
            while (item := self.call(step(iterator, timeout))) is not _End.END:
                yield item
            ended = True
        finally:
            if not ended:  # the consumer left early: run the iterator's cleanup now
                self._close_quietly(iterator)

    def _close_quietly(self, iterator: AsyncIterator[Any]) -> None:
        """Close an async iterator (credit given back, transfer finished) if it can be done from
        here; otherwise the loop's finalizer does it once the iterator is collected. It may still
        be running (an interrupt outlived the grace), or the loop may stop meanwhile."""
        if self._loop is None or threading.current_thread() is self._thread:
            return
        with contextlib.suppress(RuntimeError, CancelledError, transport.ConnectionClosedError):
            self.call(_closing(iterator), timeout=_CANCEL_GRACE_S)


class _End(enum.Enum):
    END = enum.auto()  # an iteration's end, as a value that can cross threads


async def _setting(finished: threading.Event, coroutine: Coroutine[Any, Any, T]) -> T:
    try:
        return await coroutine
    finally:
        finished.set()


async def _returning(function: Callable[..., T], *args: Any) -> T:
    return function(*args)


async def _next_within(iterator: AsyncIterator[T], wait_s: float | None) -> T | Literal[_End.END]:
    deadline = asyncio.timeout(wait_s)
    try:
        async with deadline:
            return await anext(iterator)
    except StopAsyncIteration:
        return _End.END
    except TimeoutError:
        if deadline.expired():  # our wait ran out, not a TimeoutError from inside the iterator
            return _End.END
        raise


class _Waits:
    """An endpoint's iterations waiting on the loop, so that closing it ends them: the async
    iterators (`incoming()`, `accepted()`) would wait on forever. Used on the loop thread only."""

    def __init__(self) -> None:
        self._closed = False
        self._tasks: set[asyncio.Task[Any]] = set()

    def closed(self) -> bool:  # a method: mypy would take the flag for constant within next()
        return self._closed

    async def next(self, iterator: AsyncIterator[T], wait_s: float | None) -> T | Literal[_End.END]:
        task = asyncio.current_task()
        if self.closed() or task is None:
            return _End.END
        self._tasks.add(task)
        try:
            return await _next_within(iterator, wait_s)
        except asyncio.CancelledError:
            if self.closed():
                return _End.END
            raise
        finally:
            self._tasks.discard(task)

    def close(self) -> None:
        self._closed = True
        for task in self._tasks:
            task.cancel()


async def _closing(iterator: AsyncIterator[Any]) -> None:
    close = getattr(iterator, "aclose", None)
    if close is not None:
        await close()


async def _pulled(blocks: Iterable[Buffer]) -> AsyncIterator[Buffer]:
    """The caller's blocks, each taken in a worker thread: a generator that reads a file or a
    socket must not stall the loop (heartbeats, other transfers)."""
    iterator = iter(blocks)
    while (block := await asyncio.to_thread(next, iterator, None)) is not None:
        yield block


_loop_thread = _LoopThread()
_open_endpoints: weakref.WeakSet[Endpoint] = weakref.WeakSet()


class Endpoint:
    """Listens on and connects to URLs, blocking; a `transport.Endpoint` run on the facade's loop.

    Takes the same arguments (`Endpoint(config, **overrides)`, e.g. `chunk_size=...`). Use it as
    a context manager, or call `close()`: the facade's loop thread runs while any is open."""

    def __init__(
        self, config: EndpointConfig | None = None, **overrides: Unpack[EndpointOptions]
    ) -> None:
        _loop_thread.acquire()
        try:
            # Built on the loop, so whatever it binds to the running loop binds to ours.
            self.aio: transport.Endpoint = _loop_thread.call(_new_endpoint(config, overrides))
        except BaseException:
            _loop_thread.release()
            raise
        self._closed = False
        self._waits = _Waits()
        _open_endpoints.add(self)

    @property
    def config(self) -> EndpointConfig:
        """The endpoint's settings, overrides applied."""
        return self.aio.config

    def listen(self, url: str) -> str:
        """Accept connections on `url`; returns the bound URL (port 0 becomes the real port)."""
        return _loop_thread.call(self.aio.listen(url))

    def connect(self, url: str) -> Peer:
        """Open a connection to the endpoint listening at `url` (reconnected if it drops)."""
        return Peer(_loop_thread.call(self.aio.connect(url)))

    def incoming(self, timeout: float | None = None) -> Iterator[IncomingTransfer]:
        """Every transfer peers open to this endpoint, in arrival order, as it arrives.

        The iteration ends once `timeout` seconds pass with no new transfer (None: never), or
        when this endpoint closes (from any thread)."""
        arrivals = _loop_thread.iterate(self.aio.incoming(), timeout, self._waits)
        return (IncomingTransfer(transfer) for transfer in arrivals)

    def accepted(self, timeout: float | None = None) -> Iterator[Peer]:
        """Every peer that connects to this endpoint's listeners (once, however often it
        reconnects); ends once `timeout` seconds pass with no new peer (None: never), or when
        this endpoint closes."""
        peers = _loop_thread.iterate(self.aio.accepted(), timeout, self._waits)
        return (Peer(peer) for peer in peers)

    def on_request(self, handler: RequestHandler) -> None:
        """Answer peers' requests with `handler(peer, header, body) -> (header, body)`.

        The handler runs in a worker thread, so it may block and may call this facade."""

        async def answer(
            peer: transport.Peer, header: Mapping[str, Any], body: bytes
        ) -> tuple[Mapping[str, Any], Buffer]:
            return await asyncio.to_thread(handler, Peer(peer), header, body)

        _loop_thread.call_now(self.aio.on_request, answer)

    def close(self) -> None:
        """Stop listening and close every connection (once; later calls do nothing)."""
        self._close(timeout=None)

    def _close(self, timeout: float | None) -> None:
        if self._closed:
            return
        self._closed = True
        _open_endpoints.discard(self)
        try:
            _loop_thread.call_now(self._waits.close)
            _loop_thread.call(self.aio.close(), timeout)
        finally:
            _loop_thread.release()

    def __enter__(self) -> Endpoint:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.close()


async def _new_endpoint(
    config: EndpointConfig | None, overrides: Mapping[str, Any]
) -> transport.Endpoint:
    return transport.Endpoint(config, **overrides)


class Peer:
    """The remote endpoint, blocking: send to it, ask it, close it (wraps `transport.Peer`)."""

    def __init__(self, peer: transport.Peer) -> None:
        self.aio = peer

    @property
    def node_id(self) -> str | None:
        """The node id the peer announced in its hello."""
        return self.aio.node_id

    @property
    def info(self) -> PeerInfo | None:
        """Scheme, address and (under TLS) the verified identity of the peer."""
        return self.aio.info

    @property
    def closed(self) -> bool:
        """Whether this peer was closed, or its connection failed for good."""
        return self.aio.closed

    def __eq__(self, other: object) -> bool:
        # Wrappers are made per call (accepted(), request handlers): equal when the peer is.
        return isinstance(other, Peer) and other.aio is self.aio

    def __hash__(self) -> int:
        return id(self.aio)

    def __repr__(self) -> str:
        return f"<transport.sync.Peer node_id={self.node_id!r}>"

    def send_state_dict(
        self,
        state_dict: Mapping[str, torch.Tensor] | Source,
        *,
        meta: Mapping[str, Any] | None = None,
        transfer_id: str | None = None,
        streams: int | None = None,
    ) -> TransferResult:
        """Stream a state dict (or any Source); return once the peer verified all of it.

        A dropped connection is resumed, not restarted; see `transport.Peer.send_state_dict`."""
        sending = self.aio.send_state_dict(
            state_dict, meta=meta, transfer_id=transfer_id, streams=streams
        )
        return _loop_thread.call(sending)

    def send_file(
        self, path: str | os.PathLike[str], *, meta: Mapping[str, Any] | None = None
    ) -> TransferResult:
        """Stream a plain file's bytes (checkpoints, datasets, logs) with the same guarantees."""
        return _loop_thread.call(self.aio.send_file(path, meta=meta))

    def send_bytes(
        self, blocks: Iterable[Buffer], *, meta: Mapping[str, Any] | None = None
    ) -> TransferResult:
        """Stream an iterable of byte blocks (a generator may block: it runs in worker threads).

        As with the async API, do not refill a block once it was yielded: yield fresh buffers."""
        return _loop_thread.call(self.aio.send_bytes(_pulled(blocks), meta=meta))

    def request(
        self, header: Mapping[str, Any], body: Buffer = b""
    ) -> tuple[Mapping[str, Any], bytes]:
        """A small request/response exchange beside the streams (RemoteRequestError on failure)."""
        return _loop_thread.call(self.aio.request(header, body))

    def close(self) -> None:
        """Close the connection to this peer."""
        _loop_thread.call(self.aio.close())


class IncomingTransfer:
    """A stream a peer opened to us, blocking (wraps `transport.IncomingTransfer`). Take it with
    `receive_into(sink)` (state dicts), by iterating it or `receive_to_file(path)` (byte streams),
    or refuse it with `reject()`."""

    def __init__(self, transfer: transport.IncomingTransfer) -> None:
        self.aio = transfer

    @property
    def kind(self) -> str:
        """The kind of stream: "state_dict" or "bytes"."""
        return self.aio.kind

    @property
    def meta(self) -> Mapping[str, Any]:
        """The sender's `meta`."""
        return self.aio.meta

    @property
    def transfer_id(self) -> str | None:
        """The sender's id for the transfer (stable across its resumes), if it has one."""
        return self.aio.transfer_id

    @property
    def size(self) -> int | None:
        """The announced size of a byte stream (a file's), when the sender knew it."""
        return self.aio.size

    @property
    def manifest(self) -> Manifest | None:
        """Names, dtypes and shapes of a state dict's tensors (None for a byte stream)."""
        return self.aio.manifest

    @property
    def peer_node(self) -> str | None:
        """The node id of the sender."""
        return self.aio.peer_node

    def receive_into(self, sink: Sink) -> Any:
        """Place every chunk with `sink`; return `sink.commit()` once the transfer checked out
        (a state dict for `StateDictSink()`)."""
        return _loop_thread.call(self.aio.receive_into(sink))

    def receive_to_file(self, path: str | os.PathLike[str]) -> Path:
        """Write a byte stream to `path` (through `path.partial`, renamed once verified)."""
        return _loop_thread.call(self.aio.receive_to_file(path))

    def reject(self, reason: str = "rejected by the receiver") -> None:
        """Refuse the transfer; the sender sees a StreamResetError with `reason`."""
        _loop_thread.call_now(self.aio.reject, reason)

    def __iter__(self) -> Iterator[bytes]:
        """The blocks of a byte stream, in order, each a `bytes` copy of its own.

        The async iterator's views are only valid until the next block is asked for; a copy
        is what a blocking caller can keep. Copied here, in the caller's thread, so the loop
        keeps moving bytes meanwhile."""
        return (bytes(view) for view in _loop_thread.iterate(aiter(self.aio), None))


@atexit.register
def _close_left_open() -> None:
    """At interpreter exit, close the endpoints a script left open, so their peers see a clean
    close rather than a dropped connection; each gets a bounded time."""
    for endpoint in list(_open_endpoints):
        # Exiting anyway: a close that fails or hangs must not turn a clean exit into an error.
        with contextlib.suppress(Exception):
            endpoint._close(timeout=_EXIT_GRACE_S)
