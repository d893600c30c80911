"""Transfers: a state dict or a byte stream moving over one stream of a link.

Sending walks the chunk plan and hands each chunk's views (never a copy) to the link once credit
allows. Receiving decodes each DATA payload against the same plan, lets the sink place the bytes
(in a worker thread when the sink does real work, so the event loop keeps reading the socket on the
other core), then returns the credit and the buffer. The sink commits only after the stream's
digest was verified, so a failed transfer never looks complete.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transport import sfm
from transport.exceptions import (
    ConfigError,
    ManifestError,
    PayloadError,
    StreamStateError,
    TensorwireError,
)
from transport.payload import Manifest, Sink, Source, decode_chunk, encode_chunk, plan_chunks

if TYPE_CHECKING:
    from transport.endpoint.link import Link

STATE_DICT = "state_dict"
BYTES = "bytes"


@dataclass(frozen=True, slots=True)
class TransferResult:
    """What a finished transfer moved."""

    stream_id: int
    kind: str
    bytes: int
    chunks: int
    seconds: float
    digest: str

    @property
    def throughput_mb_s(self) -> float:
        return self.bytes / max(self.seconds, 1e-9) / 1e6


# --- sending ---------------------------------------------------------------------------------


class _InFlight:
    """Chunks handed to the driver whose buffers may still be referenced by it.

    A driver may keep views of what it was given until the kernel took them (uvloop does), so a
    source may reuse a chunk's buffer only once the chunk is certainly delivered. The peer's credit
    proves it: once a window's worth of later bytes was sent, the receiver must have consumed the
    chunk, so the socket had written it.
    """

    def __init__(self, window: int) -> None:
        self._window = window
        self._sent = 0
        self._pending: deque[tuple[int, Any]] = deque()

    def sent(self, item: Any, nbytes: int) -> list[Any]:
        """Record `item` as sent; return the earlier items that are now safe to reuse."""
        self._sent += nbytes
        self._pending.append((self._sent, item))
        safe = []
        while self._pending and self._sent - self._pending[0][0] > self._window:
            safe.append(self._pending.popleft()[1])
        return safe

    def drain(self) -> list[Any]:
        items = [item for _, item in self._pending]
        self._pending.clear()
        return items


async def send_source(link: Link, source: Source, meta: Mapping[str, Any] | None) -> TransferResult:
    """Stream every chunk of `source` over a new stream; return once the peer verified it."""
    manifest = source.manifest
    header = {"kind": STATE_DICT, "manifest": manifest.to_header(), "meta": dict(meta or {})}
    started = time.perf_counter()
    stream_id = link.open_stream(header)
    in_flight = _InFlight(link.stream_window)
    chunks = plan_chunks(manifest)
    try:
        for chunk in chunks:
            parts = encode_chunk(manifest, chunk, source.chunk_views(chunk))
            nbytes = sum(memoryview(part).nbytes for part in parts)
            await link.send_chunk(stream_id, chunk.index, parts, nbytes)
            for delivered in in_flight.sent(chunk, nbytes):
                source.release(delivered)
        await link.end_stream(stream_id)
    except BaseException as error:
        link.reset_stream(stream_id, "sender_failed", _describe(error))
        raise
    finally:
        for delivered in in_flight.drain():
            source.release(delivered)
    seconds = time.perf_counter() - started
    return TransferResult(stream_id, STATE_DICT, manifest.total_bytes, len(chunks), seconds, "")


async def send_blocks(
    link: Link,
    blocks: AsyncIterable[Any] | Iterable[Any],
    meta: Mapping[str, Any] | None,
    size: int | None = None,
) -> TransferResult:
    """Stream raw byte blocks (a file, a log, any iterable of buffers) over a new stream."""
    header: dict[str, Any] = {"kind": BYTES, "meta": dict(meta or {})}
    if size is not None:
        header["size"] = size
    started = time.perf_counter()
    stream_id = link.open_stream(header)
    sent = index = 0
    try:
        async for block in _aiter(blocks):
            view = memoryview(block).cast("B")
            if view.nbytes == 0:
                continue
            await link.send_chunk(stream_id, index, [view], view.nbytes)
            sent += view.nbytes
            index += 1
        await link.end_stream(stream_id)
    except BaseException as error:
        link.reset_stream(stream_id, "sender_failed", _describe(error))
        raise
    return TransferResult(stream_id, BYTES, sent, index, time.perf_counter() - started, "")


async def _aiter(blocks: AsyncIterable[Any] | Iterable[Any]) -> AsyncIterator[Any]:
    if isinstance(blocks, AsyncIterable):
        async for block in blocks:
            yield block
    else:
        for block in blocks:
            yield block


def file_blocks(path: Path, block_size: int, window: int) -> Iterable[memoryview]:
    """Read a file in blocks into a ring of reused buffers (no fresh memory per block).

    The ring holds one window of blocks plus two, so a buffer is refilled only after the peer's
    credit proved its previous contents were delivered (see _InFlight).
    """
    ring = [bytearray(block_size) for _ in range(window // block_size + 2)]
    with open(path, "rb", buffering=0) as handle:
        for turn in range(1 << 62):
            buffer = ring[turn % len(ring)]
            count = handle.readinto(buffer)
            if not count:
                return
            yield memoryview(buffer)[:count]


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


# --- receiving -------------------------------------------------------------------------------


class IncomingTransfer:
    """A stream the peer opened to us. Take it with `receive_into(sink)` (state dicts) or by
    iterating it / `receive_to_file(path)` (byte streams), or refuse it with `reject()`."""

    def __init__(self, link: Link, stream_id: int, header: Mapping[str, Any]) -> None:
        self._link = link
        self.stream_id = stream_id
        self.kind = str(header.get("kind", ""))
        meta = header.get("meta", {})
        self.meta: Mapping[str, Any] = meta if isinstance(meta, Mapping) else {}
        self.size: int | None = header.get("size") if isinstance(header.get("size"), int) else None
        self.manifest: Manifest | None = None
        self._manifest_error: TensorwireError | None = None
        if self.kind == STATE_DICT:
            try:
                self.manifest = Manifest.from_header(header.get("manifest"))
            except ManifestError as error:
                self._manifest_error = error
                link.reset_stream(stream_id, "bad_manifest", str(error))
        elif self.kind != BYTES:
            self._manifest_error = ManifestError(f"unknown stream kind {self.kind!r}")
            link.reset_stream(stream_id, "bad_kind", str(self._manifest_error))
        self._events: deque[sfm.Event | TensorwireError] = deque()
        self._arrived = asyncio.Event()
        self._taken = False

    @property
    def peer_node(self) -> str | None:
        return self._link.remote_node

    # --- called by the link ---

    def on_event(self, event: sfm.Event) -> None:
        self._events.append(event)
        self._arrived.set()

    def on_failed(self, error: TensorwireError) -> None:
        self._events.append(error)
        self._arrived.set()

    # --- application side ---

    def reject(self, reason: str = "rejected by the receiver") -> None:
        """Refuse the transfer; the sender sees a StreamResetError with `reason`."""
        self._take()
        self._link.reset_stream(self.stream_id, "rejected", reason)

    async def receive_into(self, sink: Sink) -> Any:
        """Place every chunk with `sink`; return `sink.commit()` once the digest checked out."""
        manifest = self._require_state_dict()
        self._take()
        chunks = plan_chunks(manifest)
        inline = getattr(sink, "inline_writes", False)
        try:
            sink.open(manifest)
            async for event in self._data_events():
                if event.index >= len(chunks):
                    raise PayloadError(
                        f"chunk index {event.index} beyond the plan's {len(chunks)} chunks"
                    )
                chunk = chunks[event.index]
                pieces = decode_chunk(manifest, chunk, event.payload)
                if inline:
                    sink.write(chunk, pieces)
                else:
                    await asyncio.to_thread(sink.write, chunk, pieces)
                self._consumed(event)
        except BaseException as error:
            sink.abort(error)
            self._link.reset_stream(self.stream_id, "receiver_failed", _describe(error))
            raise
        return sink.commit()

    async def __aiter__(self) -> AsyncIterator[memoryview]:
        """Blocks of a byte stream, in order; each view is valid until the next one is asked for."""
        if self.kind != BYTES:
            raise StreamStateError(f"stream {self.stream_id} carries a {self.kind}, not bytes")
        self._take()
        async for event in self._data_events():
            try:
                yield memoryview(event.payload)
            finally:
                self._consumed(event)

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

    async def _data_events(self) -> AsyncIterator[sfm.DataReceived]:
        """DATA events in arrival order until END (verified by sfm) or an error."""
        while True:
            while not self._events:
                self._arrived.clear()
                await self._link.wait_progress(self._arrived, f"data on stream {self.stream_id}")
            event = self._events.popleft()
            if isinstance(event, TensorwireError):
                raise event
            if isinstance(event, sfm.DataReceived):
                yield event
            elif isinstance(event, sfm.StreamEnded):
                self._link.finished_incoming(self.stream_id)
                return
            elif isinstance(event, sfm.StreamFailed):
                raise event.error

    def _consumed(self, event: sfm.DataReceived) -> None:
        payload = memoryview(event.payload)
        self._link.consumed(self.stream_id, payload.nbytes)
        self._link.pool.release(payload.obj)

    def _require_state_dict(self) -> Manifest:
        if self._manifest_error is not None:
            raise self._manifest_error
        if self.manifest is None:
            raise StreamStateError(f"stream {self.stream_id} carries {self.kind}, not a state dict")
        return self.manifest

    def _take(self) -> None:
        if self._taken:
            raise StreamStateError(f"stream {self.stream_id} is already being received")
        self._taken = True


def require_positive(name: str, value: int) -> int:
    if value <= 0:
        raise ConfigError(f"{name} must be positive, got {value}")
    return value
