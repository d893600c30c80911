"""Sending a transfer: a state dict (or any Source) or a byte stream, resumed across connections.

Every transfer has an id that outlives connections. The sender walks the chunk plan and hands each
chunk's views (never a copy) to the link once credit allows, keeping each chunk's checksum. When
the connection drops, the peer reconnects (or waits for the other side to come back), the sender
reopens the stream with the same transfer id and the next attempt number, and waits for the
receiver's RESUME listing the chunks it already holds; only the others are sent again. END carries
a digest over every chunk's checksum, so the receiver can prove the transfer as a whole has no gap
and no duplicate, whatever the number of connections it took.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import xxhash

from transport import metrics
from transport.codecs import CompressionPolicy
from transport.endpoint.compression import ChunkPipeline
from transport.exceptions import IdleTimeoutError, ProtocolError, TransportError
from transport.payload import Chunk, Manifest, Source, encode_chunk, plan_chunks
from transport.sfm import StreamDigest

if TYPE_CHECKING:
    from transport.endpoint.link import Link

STATE_DICT = "state_dict"
BYTES = "bytes"
# Most index ranges a RESUME may list: beyond that a receiver is describing noise, not progress.
MAX_RESUME_RANGES = 1 << 20
# Most parallel connections one transfer may stripe over.
MAX_STRIPES = 64


@dataclass(frozen=True, slots=True)
class TransferResult:
    """What a finished transfer moved."""

    stream_id: int
    kind: str
    bytes: int
    chunks: int
    seconds: float
    transfer_id: str = ""
    resumes: int = 0
    bytes_sent: int = 0  # payload bytes put on the wire, re-sends after a resume included
    digest: str = ""  # the tree digest over every chunk the receiver verified (state dicts)

    @property
    def throughput_mb_s(self) -> float:
        return self.bytes / max(self.seconds, 1e-9) / 1e6


class Relinker(Protocol):
    """What a sender needs from its peer: live links, and a way back after a failure."""

    async def stripe_links(self, count: int) -> list[Link]: ...

    async def recover_stripes(self, links: list[Link], error: TransportError) -> None: ...


# --- index ranges (RESUME) -----------------------------------------------------------------------


def index_ranges(indices: Iterable[int]) -> list[list[int]]:
    """{0, 1, 2, 5} -> [[0, 3], [5, 6]]: half-open ranges, compact on the wire."""
    ranges: list[list[int]] = []
    for index in sorted(indices):
        if ranges and ranges[-1][1] == index:
            ranges[-1][1] = index + 1
        else:
            ranges.append([index, index + 1])
    return ranges


def parse_index_ranges(value: Any, limit: int) -> set[int]:
    """The indices of a RESUME's "held" ranges, each within [0, limit); ProtocolError otherwise."""
    if not isinstance(value, list) or len(value) > MAX_RESUME_RANGES:
        raise ProtocolError(f"RESUME 'held' must be a list of at most {MAX_RESUME_RANGES} ranges")
    held: set[int] = set()
    for item in value:
        valid = isinstance(item, list) and len(item) == 2 and all(type(x) is int for x in item)
        if not valid or not 0 <= item[0] < item[1] <= limit:
            raise ProtocolError(f"RESUME range {item!r} is not [start, stop) within 0..{limit}")
        held.update(range(item[0], item[1]))
    return held


def transfer_digest(checksums: Mapping[int, int]) -> str:
    """The same tree digest sfm uses per stream, over every chunk of the transfer."""
    digest = StreamDigest()
    for index, checksum in checksums.items():
        digest.add(index, checksum, 0)
    return digest.hexdigest()


# --- buffers the driver may still read --------------------------------------------------------


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


# --- state dicts ----------------------------------------------------------------------------------


@dataclass
class _Transfer:
    """A transfer's progress across attempts."""

    transfer_id: str
    header: dict[str, Any]
    chunks: list[Chunk]
    checksums: dict[int, int] = field(default_factory=dict)
    attempt: int = 0
    bytes_sent: int = 0
    digest: str = ""  # over every chunk's checksum, once all were sent
    started: float = field(default_factory=time.perf_counter)


async def send_source(
    peer: Relinker,
    source: Source,
    meta: Mapping[str, Any] | None,
    transfer_id: str | None,
    codec: tuple[CompressionPolicy, ThreadPoolExecutor | None],
    stripes: int = 1,
) -> TransferResult:
    """Stream every chunk of `source` (over `stripes` parallel connections); resume after
    connection loss; return once the receiver verified the whole transfer."""
    manifest = source.manifest
    header = {"kind": STATE_DICT, "manifest": manifest.to_header(), "meta": dict(meta or {})}
    transfer = _Transfer(transfer_id or uuid.uuid4().hex, header, plan_chunks(manifest))
    loop = asyncio.get_running_loop()
    progressed_at, sent_before = loop.time(), 0
    while True:
        links = await peer.stripe_links(stripes)
        try:
            stream_id = await _striped_attempt(links, source, codec, transfer)
            break
        except TransportError as error:
            if transfer.bytes_sent > sent_before:
                progressed_at, sent_before = loop.time(), transfer.bytes_sent
            # Connections that open and die at once (a peer refusing our certificate after the
            # handshake, say) must not be retried forever: the one timeout applies across them.
            stalled = loop.time() - progressed_at > links[0].idle_timeout
            if isinstance(error, IdleTimeoutError) or stalled:
                raise
            await peer.recover_stripes(links, error)
            transfer.attempt += 1
    seconds = time.perf_counter() - transfer.started
    return TransferResult(
        stream_id,
        STATE_DICT,
        manifest.total_bytes,
        len(transfer.chunks),
        seconds,
        transfer.transfer_id,
        transfer.attempt,
        transfer.bytes_sent,
        transfer.digest,
    )


async def _striped_attempt(
    links: list[Link],
    source: Source,
    codec: tuple[CompressionPolicy, ThreadPoolExecutor | None],
    transfer: _Transfer,
) -> int:
    """One attempt over one stream per link: open them all, learn what the receiver holds, deal
    the remaining chunks round-robin, send, then end every stripe with the transfer's digest.

    If any stripe fails, the others are given up ("superseded") and the error goes up, so the
    next attempt starts from what the receiver holds, over fresh connections where needed."""
    header = {
        **transfer.header,
        "transfer": transfer.transfer_id,
        "attempt": transfer.attempt,
        "stripes": len(links),
    }
    streams = [(link, link.open_stream(header, len(transfer.chunks))) for link in links]
    try:
        helds = [await link.resume_point(sid, wait=transfer.attempt > 0) for link, sid in streams]
        held = _HeldUnion(helds)
        todo = [chunk for chunk in transfer.chunks if chunk.index not in held]
        deals = [todo[i :: len(streams)] for i in range(len(streams))]
        async with asyncio.TaskGroup() as group:
            for (link, sid), deal in zip(streams, deals, strict=True):
                pipeline = ChunkPipeline(source.manifest, source, *codec)
                group.create_task(_send_stripe(link, sid, source, pipeline, deal, held, transfer))
        _fill_checksums(source, source.manifest, transfer)
        transfer.digest = transfer_digest(transfer.checksums)
        end = {"transfer_digest": transfer.digest}
        async with asyncio.TaskGroup() as group:
            for link, sid in streams:
                group.create_task(link.end_stream(sid, end))
    except BaseException as error:
        for link, sid in streams:
            link.reset_stream(sid, "superseded", describe(error))
        raise _deciding_error(error) from None
    return streams[0][1]


class _HeldUnion:
    """The chunks the receiver holds, as the RESUMEs on every stripe say (they may grow)."""

    def __init__(self, sets: list[set[int]]) -> None:
        self._sets = sets

    def __contains__(self, index: object) -> bool:
        return any(index in held for held in self._sets)


def _deciding_error(error: BaseException) -> BaseException:
    """TaskGroup wraps failures in an ExceptionGroup: surface the one that decides what happens
    next. A final error (a refusal, a bad argument, an idle timeout) wins over a connection loss,
    which only means "resume"; cancellations of sibling stripes say nothing."""
    if not isinstance(error, BaseExceptionGroup):
        return error
    leaves = _leaves(error)
    real = [leaf for leaf in leaves if not isinstance(leaf, asyncio.CancelledError)] or leaves
    final = [
        e for e in real if not isinstance(e, TransportError) or isinstance(e, IdleTimeoutError)
    ]
    return (final or real)[0]


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    found: list[BaseException] = []
    for inner in group.exceptions:
        found += _leaves(inner) if isinstance(inner, BaseExceptionGroup) else [inner]
    return found


async def _send_stripe(
    link: Link,
    stream_id: int,
    source: Source,
    pipeline: ChunkPipeline,
    chunks: list[Chunk],
    held: _HeldUnion,
    transfer: _Transfer,
) -> None:
    """Send one stripe's chunks, skipping any the receiver turns out to hold."""
    in_flight = _InFlight(link.stream_window)
    try:
        async for ready in pipeline.iterate(chunks):
            if ready.chunk.index in held:  # a RESUME arrived while it was being prepared
                source.release(ready.chunk)
                continue
            started = time.perf_counter()
            checksum = await link.send_chunk(
                stream_id, ready.chunk.index, ready.parts, ready.nbytes, ready.header, ready.flags
            )
            pipeline.observe_link(ready.nbytes, time.perf_counter() - started)
            transfer.checksums[ready.chunk.index] = ready.blob_checksum or checksum
            transfer.bytes_sent += ready.chunk.nbytes
            metrics.tensor_bytes_moved("sent", ready.chunk.nbytes)
            for delivered in in_flight.sent(ready.chunk, ready.nbytes):
                source.release(delivered)
    finally:
        for delivered in in_flight.drain():
            source.release(delivered)


def _fill_checksums(source: Source, manifest: Manifest, transfer: _Transfer) -> None:
    """Checksums of chunks the receiver held from an attempt this process never sent (a
    transfer id reused after a sender restart): hash them as they would have been framed."""
    for chunk in transfer.chunks:
        if chunk.index not in transfer.checksums:
            hasher = xxhash.xxh3_64()
            for part in encode_chunk(manifest, chunk, source.chunk_views(chunk)):
                hasher.update(part)
            transfer.checksums[chunk.index] = hasher.intdigest()
            source.release(chunk)


# --- byte streams --------------------------------------------------------------------------------


async def send_blocks(
    link: Link,
    blocks: AsyncIterable[Any] | Iterable[Any],
    meta: Mapping[str, Any] | None,
    size: int | None = None,
) -> TransferResult:
    """Stream raw byte blocks (a file, a log, any iterable of buffers) over a new stream.

    Byte streams are not resumed: their source cannot be rewound in general.
    """
    header: dict[str, Any] = {"kind": BYTES, "meta": dict(meta or {})}
    if size is not None:
        header["size"] = size
    started = time.perf_counter()
    stream_id = link.open_stream(header)
    sent = index = 0
    try:
        async for block in each_block(blocks):
            view = memoryview(block).cast("B")
            if view.nbytes == 0:
                continue
            await link.send_chunk(stream_id, index, [view], view.nbytes)
            sent += view.nbytes
            index += 1
        await link.end_stream(stream_id)
    except BaseException as error:
        link.reset_stream(stream_id, "sender_failed", describe(error))
        raise
    seconds = time.perf_counter() - started
    return TransferResult(stream_id, BYTES, sent, index, seconds, bytes_sent=sent)


async def each_block(blocks: AsyncIterable[Any] | Iterable[Any]) -> AsyncIterator[Any]:
    """Iterate sync and async iterables alike."""
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


def describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
