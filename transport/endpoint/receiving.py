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
import contextlib
import os
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transport import metrics, sfm
from transport.codecs import ChunkDecompressor
from transport.endpoint.compression import blob_checksum, decompress
from transport.endpoint.config import CHUNK_HEADER_ROOM
from transport.endpoint.sending import (
    BYTES,
    MAX_STRIPES,
    STATE_DICT,
    describe,
    index_ranges,
    transfer_digest,
)
from transport.exceptions import (
    ChunkError,
    DigestMismatchError,
    IdleTimeoutError,
    IntegrityError,
    ManifestError,
    PayloadError,
    ProtocolError,
    StreamResetError,
    StreamStateError,
    TensorwireError,
    TransportError,
)
from transport.logs import TransferRecord
from transport.payload import Chunk, Manifest, Sink, decode_chunk, plan_chunks
from transport.wire import FrameFlags

if TYPE_CHECKING:
    from transport.endpoint.link import Link

_Item = sfm.Event | TensorwireError


class IncomingTransfer:
    """A stream the peer opened to us. Take it with `receive_into(sink)` (state dicts) or by
    iterating it / `receive_to_file(path)` (byte streams), or refuse it with `reject()`."""

    def __init__(self, link: Link, stream_id: int, header: Mapping[str, Any]) -> None:
        self._link = link
        self.stream_id = stream_id
        self.kind = str(header.get("kind", ""))
        meta = header.get("meta", {})
        self.meta: Mapping[str, Any] = meta if isinstance(meta, Mapping) else {}
        size = header.get("size")
        self.size: int | None = size if isinstance(size, int) else None
        transfer = header.get("transfer")
        self.transfer_id: str | None = transfer if isinstance(transfer, str) and transfer else None
        attempt = header.get("attempt", 0)
        self.attempt = attempt if isinstance(attempt, int) else 0
        self.manifest: Manifest | None = None
        self._manifest_header = header.get("manifest")
        self._check_header(header)
        # The streams of the current attempt (one per stripe) and those that ended.
        self.stripes = _stripes(header)
        self._sources: set[tuple[Link, int]] = {(link, stream_id)}
        self._ended: set[tuple[Link, int]] = set()
        self._lost: tuple[int, float, TensorwireError] | None = None  # attempt, when, why
        self._events: deque[tuple[Link, _Item]] = deque()
        self._arrived = asyncio.Event()
        self._received: dict[int, int] = {}  # chunk index -> checksum, written or queued
        self._end_header: Mapping[str, Any] = {}
        self._taken = False
        self.on_done: Callable[[IncomingTransfer, bool], None] | None = None

    def _check_header(self, header: Mapping[str, Any]) -> None:
        """Validate what the peer announced before anything is allocated; a ManifestError here
        is the peer's protocol breach (the link disconnects it)."""
        if self.kind == STATE_DICT:
            self.manifest = Manifest.from_header(header.get("manifest"))
        elif self.kind != BYTES:
            raise ManifestError(f"unknown stream kind {self.kind!r}")

    @property
    def peer_node(self) -> str | None:
        return self._link.remote_node

    @property
    def resumable(self) -> bool:
        return self.transfer_id is not None and self.kind == STATE_DICT

    # --- called by the link and the endpoint ---

    def on_event(self, link: Link, event: sfm.Event) -> None:
        if isinstance(event, sfm.DataReceived) and event.index in self._received:
            _give_back(link, event)  # a re-sent chunk we already hold: drop it
            return
        if isinstance(event, sfm.DataReceived):
            try:
                self._received[event.index] = blob_checksum(event)
            except ChunkError as error:
                self._link.refuse(type(error).__name__, str(error))
                return
        self._events.append((link, event))
        self._arrived.set()

    def on_failed(self, link: Link, error: TensorwireError) -> None:
        self._events.append((link, error))
        self._arrived.set()

    def reattach(self, link: Link, stream_id: int, header: Mapping[str, Any]) -> bool:
        """Another stream of this transfer: one more stripe of the current attempt, or the first
        of a new attempt after a lost connection. False if it does not match."""
        if header.get("manifest") != self._manifest_header or header.get("kind") != self.kind:
            link.reset_stream(stream_id, "bad_manifest", "resumed with a different manifest")
            return False
        attempt = header.get("attempt", 0)
        attempt = attempt if isinstance(attempt, int) else -1
        if attempt < self.attempt:
            link.reset_stream(stream_id, "superseded", f"attempt {attempt} < {self.attempt}")
            return False
        if attempt > self.attempt:
            metrics.resumed("received")
            self.attempt, self.stripes = attempt, _stripes(header)
            self._sources, self._ended = set(), set()
        self._sources.add((link, stream_id))
        self._link, self.stream_id = link, stream_id
        self._send_resume(link, stream_id)
        self._arrived.set()
        return True

    def _send_resume(self, link: Link | None = None, stream_id: int | None = None) -> None:
        target, sid = (link, stream_id) if link and stream_id else (self._link, self.stream_id)
        target.send_resume(sid, {"held": index_ranges(self._received)})

    # --- application side ---

    def reject(self, reason: str = "rejected by the receiver") -> None:
        """Refuse the transfer; the sender sees a StreamResetError with `reason`."""
        self._take()
        self._link.reset_stream(self.stream_id, "rejected", reason)
        self._finish(ok=False)

    async def receive_into(self, sink: Sink) -> Any:
        """Place every chunk with `sink`; return `sink.commit()` once the transfer checked out."""
        manifest = self._require_state_dict()
        self._take()
        chunks = plan_chunks(manifest)
        record = TransferRecord(
            "received", self.transfer_id, manifest.total_bytes, len(chunks), self.peer_node
        )
        record.begin()
        try:
            self._resume_from(sink, manifest)
            sink.open(manifest)
            await self._write_all(sink, manifest, chunks)
            digest = self._verify_whole(len(chunks))
        except BaseException as error:
            sink.abort(error)
            if isinstance(error, ProtocolError):  # e.g. a chunk that does not match the plan
                self._link.refuse(type(error).__name__, str(error))
            else:
                self._link.reset_stream(self.stream_id, "receiver_failed", describe(error))
            self._finish(ok=False)
            record.end(error)
            raise
        result = sink.commit()
        self._finish(ok=True)
        record.resumes, record.digest = self.attempt, digest
        record.end()
        return result

    async def settle_duplicate(self, chunks: int) -> None:
        """The sender reopened a transfer that already completed here (it lost our final ACK):
        say we hold every chunk and take its END, without announcing the transfer again."""
        self._take()
        self._link.send_resume(self.stream_id, {"held": [[0, chunks]] if chunks else []})
        with contextlib.suppress(TensorwireError):
            async for link, event in self._data_events():
                _give_back(link, event)
        self._link.finished_incoming(self.stream_id)

    @property
    def held_count(self) -> int:
        """How many chunks this side holds."""
        return len(self._received)

    def _resume_from(self, sink: Sink, manifest: Manifest) -> None:
        """Merge what a persisting sink kept from an earlier process; tell the sender if needed."""
        held = (
            sink.resume(self.transfer_id, manifest) if self.resumable and self.transfer_id else {}
        )
        self._received.update(held)
        if self.resumable and (self.attempt > 0 or held):
            self._send_resume()

    async def _write_all(self, sink: Sink, manifest: Manifest, chunks: list[Chunk]) -> None:
        inline = getattr(sink, "inline_writes", False)
        decompressor = ChunkDecompressor()
        async for link, event in self._data_events():
            if event.index >= len(chunks):
                raise PayloadError(f"chunk index {event.index} beyond the plan's {len(chunks)}")
            chunk = chunks[event.index]
            if event.flags & FrameFlags.COMPRESSED:
                blob = link.pool.allocate(chunk.nbytes + CHUNK_HEADER_ROOM)
                try:
                    await asyncio.to_thread(
                        _place, sink, decompressor, manifest, chunk, event, blob
                    )
                finally:
                    link.pool.release(blob)
            elif inline:
                sink.write(chunk, decode_chunk(manifest, chunk, event.payload))
            else:
                await asyncio.to_thread(_place, sink, None, manifest, chunk, event, None)
            sink.record(chunk.index, self._received[event.index])
            metrics.tensor_bytes_moved("received", chunk.nbytes)
            _give_back(link, event)

    def _verify_whole(self, expected_chunks: int) -> str:
        """Every planned chunk arrived once, and the digest over all of them is the sender's;
        returns that digest."""
        if len(self._received) != expected_chunks:
            raise IntegrityError(
                f"transfer {self.transfer_id}: {len(self._received)} of {expected_chunks} chunks "
                "arrived before END"
            )
        expected = self._end_header.get("transfer_digest")
        computed = transfer_digest(self._received)
        if expected is not None and expected != computed:
            raise DigestMismatchError(
                f"transfer {self.transfer_id}: digest over all chunks {computed} != the "
                f"sender's {expected}"
            )
        return computed

    async def __aiter__(self) -> AsyncIterator[memoryview]:
        """Blocks of a byte stream, in order; each view is valid until the next one is asked for."""
        if self.kind != BYTES:
            raise StreamStateError(f"stream {self.stream_id} carries a {self.kind}, not bytes")
        self._take()
        ok = False
        try:
            async for link, event in self._data_events():
                try:
                    yield memoryview(event.payload)
                finally:
                    _give_back(link, event)
            ok = True
        finally:
            self._finish(ok=ok)

    async def receive_to_file(self, path: str | os.PathLike[str]) -> Path:
        """Write a byte stream to `path` (through `path.partial`, renamed once verified)."""
        target = Path(path)
        partial = target.with_name(target.name + ".partial")
        try:
            handle = await asyncio.to_thread(open, partial, "wb")
            with handle:
                async for block in self:
                    await asyncio.to_thread(handle.write, block)
                await asyncio.to_thread(os.fsync, handle.fileno())
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        partial.replace(target)
        return target

    # --- the event queue ---

    async def _data_events(self) -> AsyncIterator[tuple[Link, sfm.DataReceived]]:
        """DATA events in arrival order (from every stripe) until every stripe of the current
        attempt ended (each END verified by sfm), or an error."""
        while True:
            link, item = await self._next_item()
            if isinstance(item, sfm.DataReceived):
                yield link, item
            elif isinstance(item, sfm.StreamEnded):
                if self._stripe_ended(link, item):
                    return
            elif isinstance(item, sfm.StreamFailed):
                if (link, item.stream_id) in self._sources:
                    raise item.error
            elif isinstance(item, sfm.StreamReset):
                if (link, item.stream_id) in self._sources:
                    self._stripe_reset(item)
            elif isinstance(item, TensorwireError) and self._is_current(link):
                if not (self.resumable and _recoverable(item)):
                    raise item
                # Keep taking what the other stripes deliver (their credit must flow) while the
                # sender reconnects; only the end of the transfer needs its next attempt.
                if self._lost is None or self._lost[0] != self.attempt:
                    self._lost = (self.attempt, asyncio.get_running_loop().time(), item)

    def _stripe_reset(self, event: sfm.StreamReset) -> None:
        """The sender reset a stream of the current attempt: it gave the attempt up to start
        another ("superseded"), or the transfer is over."""
        error = StreamResetError(
            f"peer reset stream {event.stream_id}: {event.reason}", code=event.code
        )
        if not (self.resumable and _recoverable(error)):
            raise error
        if self._lost is None or self._lost[0] != self.attempt:
            self._lost = (self.attempt, asyncio.get_running_loop().time(), error)

    def _stripe_ended(self, link: Link, event: sfm.StreamEnded) -> bool:
        """Note one stripe's END; True once every stripe of the current attempt has ended."""
        source = (link, event.stream_id)
        if source not in self._sources:
            return False  # a stream of an attempt that was given up
        self._ended.add(source)
        self._end_header = event.header
        return len(self._ended) >= self.stripes

    def _is_current(self, link: Link) -> bool:
        return any(source_link is link for source_link, _ in self._sources)

    async def _next_item(self) -> tuple[Link, _Item]:
        while not self._events:
            self._arrived.clear()
            if self._lost is not None and self._lost[0] == self.attempt:
                await self._await_next_attempt(*self._lost)
            else:
                await self._link.wait_progress(self._arrived, f"data on stream {self.stream_id}")
        return self._events.popleft()

    async def _await_next_attempt(self, attempt: int, since: float, error: TensorwireError) -> None:
        """A stripe of the current attempt was lost and nothing is queued: wait for more events
        or the sender's next attempt, until idle_timeout after the loss."""
        idle_timeout = self._link.idle_timeout
        remaining = since + idle_timeout - asyncio.get_running_loop().time()
        if remaining <= 0:
            raise IdleTimeoutError(
                f"transfer {self.transfer_id}: the sender did not come back within "
                f"{idle_timeout:g} s after {error}"
            ) from error
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._arrived.wait(), remaining)

    def _require_state_dict(self) -> Manifest:
        if self.manifest is None:
            raise StreamStateError(f"stream {self.stream_id} carries {self.kind}, not a state dict")
        return self.manifest

    def _take(self) -> None:
        if self._taken:
            raise StreamStateError(f"stream {self.stream_id} is already being received")
        self._taken = True

    def _finish(self, *, ok: bool) -> None:
        self._link.finished_incoming(self.stream_id)
        if self.on_done is not None:
            self.on_done(self, ok)


def _stripes(header: Mapping[str, Any]) -> int:
    """How many streams carry this attempt (1 unless the sender stripes)."""
    stripes = header.get("stripes", 1)
    if not isinstance(stripes, int) or not 1 <= stripes <= MAX_STRIPES:
        raise ManifestError(f"stripes must be an int in 1..{MAX_STRIPES}, got {stripes!r}")
    return stripes


def _recoverable(error: TensorwireError) -> bool:
    """A lost connection, or a stripe the sender gave up to start a new attempt."""
    superseded = isinstance(error, StreamResetError) and error.code == "superseded"
    return isinstance(error, TransportError) or superseded


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


def _give_back(link: Link, event: sfm.DataReceived) -> None:
    """The chunk's bytes are placed (or dropped): return its credit and its receive buffer."""
    payload = memoryview(event.payload)
    link.consumed(event.stream_id, payload.nbytes)
    link.pool.release(payload.obj)
