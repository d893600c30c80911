"""Receiving a transfer: decode each chunk against the plan, let the sink place it, credit back.

The sink's write runs in a worker thread when it does real work, so the event loop keeps reading
the socket on the other core; credit and the receive buffer go back only once the sink took the
bytes, which is what bounds memory. The sink commits only after the whole transfer checked out.

A transfer with an id survives its connection: when the link drops, the transfer waits (up to
idle_timeout) for the sender to reopen it on a new connection, then tells the sender what it holds
(RESUME: every chunk already written or queued, plus what a persisting sink kept from an earlier
process) and carries on. Chunks that arrive twice are dropped, so the application never sees a
duplicate; END is checked against a digest over every chunk of the transfer, so it never sees a gap.
"""

from __future__ import annotations

import asyncio
import os
from collections import deque
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any, Protocol, TypeVar

from transport import metrics, sfm
from transport.codecs import ChunkDecompressor
from transport.endpoint.compression import blob_checksum, decompress
from transport.endpoint.config import CHUNK_HEADER_ROOM
from transport.endpoint.link import Link
from transport.endpoint.sending import ProgressCallback, describe
from transport.exceptions import (
    ChunkError,
    LocalError,
    PayloadError,
    ProtocolError,
    StreamStateError,
    TensorwireError,
)
from transport.logs import TransferRecord
from transport.payload import Chunk, Manifest, ManifestLimits, Sink, decode_chunk, plan_chunks
from transport.transfer import Data, IncomingState, StreamKey, TransferState
from transport.transfer.headers import BYTES, STATE_DICT
from transport.wire import FrameFlags

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


class Committing(Protocol[T_co]):
    """A Sink whose commit() returns T: `receive_into` returns what the sink makes."""

    def commit(self) -> T_co: ...


class IncomingTransfer:
    """A transfer the peer opened to us. Take it with `receive_into(sink)` (state dicts) or by
    iterating it / `receive_to_file(path)` (byte streams), or refuse it with `reject()`.

    Until it is taken it holds no credit, so it never blocks other transfers on the connection;
    the sender's send returns only once this side committed (or raises this side's reason)."""

    def __init__(
        self,
        hub: _Hub,
        state: IncomingState,
        link: Link,
        stream_id: int,
        peer_node: str | None = None,
    ) -> None:
        self._hub = hub
        self._peer_node = peer_node if peer_node is not None else link.remote_node
        self._state = state
        self._link = link  # the link of the latest stream of the current attempt
        opened = state.opened
        self.kind: str = opened.kind
        self.meta: Mapping[str, Any] = opened.meta
        self.size: int | None = opened.size
        self.transfer_id: str | None = opened.transfer_id
        self.manifest: Manifest | None = (
            Manifest.from_header(opened.manifest, hub.manifest_limits)
            if opened.kind == STATE_DICT
            else None
        )
        state.release_manifest()
        self._plan: list[Chunk] = []  # planned when taken: an untaken transfer costs nothing
        self._queue: deque[tuple[Link, sfm.DataReceived]] = deque()
        self._arrived = asyncio.Event()
        self._taken = False
        self._problem: tuple[Link, ProtocolError] | None = None

    @property
    def peer_node(self) -> str | None:
        """Who sends this transfer, as verified: its certificate's name (a node id that claims
        another is refused), else the node id it announced. Every later stream of the transfer
        comes from the same identity (the transfer layer's owner rule)."""
        return self._peer_node

    @property
    def attempt(self) -> int:
        """How many times the sender resumed it (0: never interrupted)."""
        return self._state.attempt

    # --- the application's side ------------------------------------------------------------

    def reject(self, reason: str = "rejected by the receiver") -> None:
        """Refuse the transfer; the sender's send raises TransferRejectedError with `reason`."""
        self._take()
        self._verdict(self._state.reject(reason))

    async def receive_into(
        self, sink: Committing[T], *, progress: ProgressCallback | None = None
    ) -> T:
        """Place every chunk with `sink`; return `sink.commit()` once the whole transfer checked
        out. The sender's send returns only after that commit (or raises why it failed).
        `progress(bytes_placed, total_bytes)` is called as chunks are placed."""
        manifest = self._require_state_dict()
        if not isinstance(sink, Sink):
            raise PayloadError(f"receive_into needs a transport Sink, got {type(sink).__name__}")
        self._take()
        chunks = self._plan = plan_chunks(manifest)
        record = TransferRecord(
            "received", self.transfer_id, manifest.total_bytes, len(chunks), self.peer_node
        )
        record.begin()
        try:
            self._start(sink.resume(self.transfer_id, manifest) if self.transfer_id else {})
            sink.open(manifest)
            await self._write_all(sink, manifest, chunks, progress)
            digest = self._state.verify(len(chunks))
            result: T = sink.commit()
        except BaseException as error:
            sink.abort(error)
            self._failed(error)
            record.end(error)
            raise
        self._committed()
        record.resumes, record.digest = self._state.attempt, digest
        record.end()
        return result

    async def __aiter__(self) -> AsyncIterator[memoryview]:
        """Blocks of a byte stream, in order; each view is valid until the next one is asked for.
        The sender's send returns once the last block was taken (leaving the loop early fails
        the transfer)."""
        self._take_bytes()
        try:
            async for block in self._blocks():
                yield block
        except BaseException as error:
            self._failed(error)
            raise
        self._committed()

    async def receive_to_file(self, path: str | os.PathLike[str]) -> Path:
        """Write a byte stream to `path` (through `path.partial`, renamed once complete); the
        sender's send returns once the file is in place."""
        self._take_bytes()
        target = Path(path)
        partial = target.with_name(target.name + ".partial")
        try:
            handle = await asyncio.to_thread(open, partial, "wb")
            with handle:
                async for block in self._blocks():
                    await asyncio.to_thread(handle.write, block)
                await asyncio.to_thread(os.fsync, handle.fileno())
            partial.replace(target)
        except BaseException as error:
            partial.unlink(missing_ok=True)
            self._failed(error)
            raise
        self._committed()
        return target

    # --- fed by the endpoint (the transfer layer decided what each event means) -------------

    def _joined(self, link: Link, stream_id: int) -> None:
        """Another stream of this transfer (a stripe, or a new attempt) opened on `link`."""
        self._link = link
        if self._state.resumable and (self._state.attempt > 0 or self._state.received):
            link.send_resume(stream_id, self._state.resume_point())
        if self._state.holds_credit:
            link.grant_stream(stream_id)
        self._wake()

    def _on_data(self, link: Link, event: sfm.DataReceived) -> None:
        try:
            if self.manifest is not None and not 0 <= event.index < len(self._plan):
                raise ChunkError(f"chunk index {event.index} beyond the plan's {len(self._plan)}")
            checksum = blob_checksum(event)
        except ProtocolError as error:
            _give_back(link, event)
            self._problem = (link, error)  # the link it arrived on is refused
            link.refuse(type(error).__name__, str(error))
            self._wake()
            return
        if self._state.on_data((link, event.stream_id), event.index, checksum) is Data.DUPLICATE:
            _give_back(link, event)  # a re-sent chunk we already hold
            return
        self._queue.append((link, event))
        self._wake()

    def _on_end(self, link: Link, event: sfm.StreamEnded) -> None:
        self._state.on_end((link, event.stream_id), event.header)
        self._wake()

    def _on_stream_failed(self, link: Link, event: sfm.StreamFailed) -> None:
        self._verdict(self._state.fail(event.error))

    def _on_reset(self, link: Link, event: sfm.StreamReset) -> None:
        self._state.on_reset((link, event.stream_id), event.code, event.reason, link.clock.now())
        self._wake()

    def _wake(self) -> None:
        self._arrived.set()
        self._hub.settle(self)

    # --- internals ---------------------------------------------------------------------------

    def _start(self, held: Mapping[int, int]) -> None:
        """Taken: merge what a persisting sink kept, say what we hold, open the streams' credit."""
        state = self._state
        state.received.update(held)
        state.take()
        for link, stream_id in list(state.current):
            assert isinstance(link, Link)
            if state.resumable and (state.attempt > 0 or state.received):
                link.send_resume(stream_id, state.resume_point())
            link.grant_stream(stream_id)

    async def _write_all(
        self,
        sink: Sink,
        manifest: Manifest,
        chunks: list[Chunk],
        progress: ProgressCallback | None,
    ) -> None:
        inline = getattr(sink, "inline_writes", False)
        decompressor = ChunkDecompressor()
        placed = sum(chunks[index].nbytes for index in self._state.received)
        async for link, event in self._data_events():
            chunk = chunks[event.index]
            if event.flags & FrameFlags.COMPRESSED:
                blob = link.pool.allocate(chunk.nbytes + CHUNK_HEADER_ROOM)
                await _place_compressed(link, blob, sink, decompressor, manifest, chunk, event)
            elif inline:
                sink.write(chunk, decode_chunk(manifest, chunk, event.payload))
            else:
                await asyncio.to_thread(_place, sink, None, manifest, chunk, event, None)
            sink.record(chunk.index, self._state.received[event.index])
            metrics.tensor_bytes_moved("received", chunk.nbytes)
            _give_back(link, event)
            placed += chunk.nbytes
            if progress is not None:
                progress(placed, manifest.total_bytes)

    async def _data_events(self) -> AsyncIterator[tuple[Link, sfm.DataReceived]]:
        """DATA events in arrival order (from every stripe) until every stripe of the current
        attempt ended, or the transfer failed."""
        state = self._state
        while True:
            if self._problem is not None:
                raise self._problem[1]
            if self._queue:
                yield self._queue.popleft()
            elif state.state is TransferState.VERIFYING:
                return
            elif state.error is not None:
                raise state.error
            else:
                await self._wait()

    async def _wait(self) -> None:
        self._arrived.clear()
        clock, idle_timeout = self._link.clock, self._link.idle_timeout
        deadline = self._state.deadline(idle_timeout)
        if deadline is None:
            what = f"data of transfer {self.transfer_id}"
            await self._link.wait_progress(self._arrived, what)
            return
        if not await clock.wait(self._arrived, deadline - clock.now()):
            self._verdict(self._state.give_up(idle_timeout))
            self._wake()

    def _committed(self) -> None:
        for link, stream_id in self._state.commit():
            assert isinstance(link, Link)
            link.complete_stream(stream_id)
        self._hub.settle(self)

    def _failed(self, error: BaseException) -> None:
        """This side gave up (a sink error, a failed check, the application cancelled or left
        the loop): tell the sender why; a protocol breach also refuses the link it came on."""
        if isinstance(error, ProtocolError) and self._problem is None:
            self._link.refuse(type(error).__name__, str(error))
        if isinstance(error, asyncio.CancelledError | GeneratorExit):
            reason: TensorwireError = LocalError("the receiving application stopped receiving")
        else:
            reason = error if isinstance(error, TensorwireError) else LocalError(describe(error))
        self._verdict(self._state.fail(reason))

    def _verdict(self, resets: list[tuple[StreamKey, str, str]]) -> None:
        for (link, stream_id), code, reason in resets:
            assert isinstance(link, Link)
            link.reset_stream(stream_id, code, reason)
        self._hub.settle(self)

    def _take_bytes(self) -> None:
        if self.kind != BYTES:
            raise StreamStateError(f"transfer {self.transfer_id} carries a {self.kind}, not bytes")
        self._take()
        self._start({})

    async def _blocks(self) -> AsyncIterator[memoryview]:
        async for link, event in self._data_events():
            try:
                yield memoryview(event.payload)
            finally:
                _give_back(link, event)

    def _require_state_dict(self) -> Manifest:
        if self.manifest is None:
            raise StreamStateError(
                f"transfer {self.transfer_id} carries {self.kind}, not a state dict"
            )
        return self.manifest

    def _take(self) -> None:
        self._hub.check_loop()
        if self._taken:
            raise StreamStateError(f"transfer {self.transfer_id} is already being received")
        self._taken = True
        self._hub.taken(self)


class _Hub(Protocol):
    """What a transfer needs from its endpoint."""

    manifest_limits: ManifestLimits

    def check_loop(self) -> None: ...

    def taken(self, transfer: IncomingTransfer) -> None: ...

    def settle(self, transfer: IncomingTransfer) -> None: ...


async def _until_last(blocks: AsyncIterator[memoryview]) -> AsyncIterator[memoryview]:
    """Every block of a byte stream, stopping before the verdict (the caller gives it once the
    blocks are safely on disk)."""
    while True:
        block = await anext(blocks, None)
        if block is None:
            return
        yield block


def _place(
    sink: Sink,
    decompressor: ChunkDecompressor | None,
    manifest: Manifest,
    chunk: Chunk,
    event: sfm.DataReceived,
    blob: bytearray | None,
) -> None:
    """In a worker thread: decompress (if it was), decode the chunk, let the sink write it."""
    data = event.payload
    if decompressor is not None and blob is not None:
        data = decompress(decompressor, event, blob)
    sink.write(chunk, decode_chunk(manifest, chunk, data))


async def _place_compressed(
    link: Link,
    blob: bytearray,
    sink: Sink,
    decompressor: ChunkDecompressor,
    manifest: Manifest,
    chunk: Chunk,
    event: sfm.DataReceived,
) -> None:
    """_place in a worker thread, decompressing into `blob`, then `blob` back to the pool.

    Not on cancellation: the worker thread cannot be stopped and may still be writing into
    `blob`; a pooled buffer would be handed to the link for the next frame meanwhile and its
    bytes overwritten under it. Left to the garbage collector instead."""
    try:
        await asyncio.to_thread(_place, sink, decompressor, manifest, chunk, event, blob)
    except asyncio.CancelledError:
        raise
    except BaseException:
        link.pool.release(blob)  # the worker ended (with this error): the buffer is free
        raise
    link.pool.release(blob)


def _give_back(link: Link, event: sfm.DataReceived) -> None:
    """The chunk's bytes are placed (or dropped): return its credit and its receive buffer."""
    payload = memoryview(event.payload)
    link.consumed(event.stream_id, payload.nbytes)
    link.pool.release(payload.obj)
