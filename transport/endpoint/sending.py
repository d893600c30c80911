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
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import xxhash

from transport import metrics
from transport.codecs import CompressionPolicy
from transport.endpoint.clock import Clock
from transport.endpoint.compression import ChunkPipeline, wait_ready
from transport.exceptions import (
    IdleTimeoutError,
    LocalError,
    ProtocolError,
    StreamResetError,
    TensorwireError,
    TransferRejectedError,
    TransportError,
)
from transport.payload import Chunk, Manifest, Source, encode_chunk, plan_chunks
from transport.transfer import OutgoingTransfer, headers
from transport.transfer.headers import BYTES, STATE_DICT

if TYPE_CHECKING:
    from transport.endpoint.link import Link

ProgressCallback = Callable[[int, int], None]  # (bytes done, total bytes)


@dataclass(frozen=True, slots=True)
class TransferResult:
    """What a finished transfer moved. It exists only once the receiver committed it."""

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
    """What a sender needs from its peer: live links, a way back after a failure, the clock."""

    _clock: Clock
    _idle_timeout: float

    async def _stripe_links(self, count: int) -> list[Link]: ...

    async def _recover_stripes(self, links: list[Link], error: TensorwireError) -> None: ...


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


async def send_source(
    peer: Relinker,
    source: Source,
    meta: Mapping[str, Any] | None,
    transfer_id: str | None,
    codec: tuple[CompressionPolicy, ThreadPoolExecutor | None],
    stripes: int = 1,
    progress: ProgressCallback | None = None,
) -> TransferResult:
    """Stream every chunk of `source` (over `stripes` parallel connections); resume after
    connection loss; return once the receiver committed the whole transfer, raise its reason
    otherwise. Cancelling it tells the receiver at once (a final "cancelled" reset)."""
    manifest, clock = source.manifest, peer._clock
    chunks = plan_chunks(manifest)
    content = {"manifest": manifest.to_header(), "meta": dict(meta or {})}
    transfer = OutgoingTransfer(
        transfer_id or uuid.uuid4().hex,
        STATE_DICT,
        content,
        [chunk.nbytes for chunk in chunks],
        idle_timeout=peer._idle_timeout,
        now=clock.now(),
    )
    started = time.perf_counter()
    while True:
        links = await peer._stripe_links(stripes)
        streams: list[tuple[Link, int]] = []
        try:
            await _striped_attempt(links, streams, source, codec, transfer, chunks, progress)
            break
        except BaseException as raised:
            error = _deciding_error(raised)
            retry = _decide(transfer, error, clock.now())
            _reset_all(streams, transfer, error, retry)
            if not retry:
                # The receiver's reset carried its verdict: raise the transfer's reading of it.
                verdict = isinstance(error, StreamResetError)
                raise (transfer.error or error) if verdict else error from None
            lost = error
        assert isinstance(lost, TensorwireError)
        await peer._recover_stripes(links, lost)
    return TransferResult(
        streams[0][1],
        STATE_DICT,
        manifest.total_bytes,
        len(chunks),
        time.perf_counter() - started,
        transfer.transfer_id,
        transfer.resumes,
        transfer.bytes_sent,
        transfer.digest,
    )


def _decide(transfer: OutgoingTransfer, error: BaseException, now: float) -> bool:
    """Ask the transfer layer: another attempt (True), or the end (False)."""
    if isinstance(error, asyncio.CancelledError):
        transfer.cancel("the sending application cancelled the transfer")
        return False
    if isinstance(error, StreamResetError):
        return transfer.on_reset(error.code, str(error), now)
    if isinstance(error, TensorwireError):
        return transfer.on_lost(error, now)
    transfer.fail(LocalError(describe(error)))
    return False


def _reset_all(
    streams: list[tuple[Link, int]], transfer: OutgoingTransfer, error: BaseException, retry: bool
) -> None:
    """Tell the receiver how this attempt ended: superseded by the next one, cancelled, or failed
    here (its reason)."""
    if retry:
        code = headers.SUPERSEDED
    elif isinstance(error, asyncio.CancelledError):
        code = headers.CANCELLED
    else:
        code = "sender_failed"
    for link, stream_id in streams:
        link.reset_stream(stream_id, code, describe(error))


async def _striped_attempt(
    links: list[Link],
    streams: list[tuple[Link, int]],
    source: Source,
    codec: tuple[CompressionPolicy, ThreadPoolExecutor | None],
    transfer: OutgoingTransfer,
    chunks: list[Chunk],
    progress: ProgressCallback | None,
) -> None:
    """One attempt over one stream per link: open them all, learn what the receiver holds, deal
    the remaining chunks round-robin, send, end every stripe with the transfer's digest and wait
    for the receiver's verdict. Any failure goes up (the caller decides: resume or stop)."""
    header = transfer.open_attempt(len(links))
    for link in links:
        streams.append((link, link.sending.open(header)))
    if transfer.awaits_resume_point:
        for link, stream_id in streams:
            await link.sending.wait_resume_point(stream_id)
        _absorb_resume_points(streams, transfer)
    deals = transfer.deal(len(streams))
    async with asyncio.TaskGroup() as group:
        for (link, stream_id), deal in zip(streams, deals, strict=True):
            pipeline = ChunkPipeline(source.manifest, source, *codec)
            stripe = [chunks[index] for index in deal]
            group.create_task(
                _send_stripe(link, stream_id, streams, source, pipeline, stripe, transfer, progress)
            )
    _absorb_resume_points(streams, transfer)
    await _fill_checksums(source, source.manifest, chunks, transfer)
    end = transfer.end_header()
    async with asyncio.TaskGroup() as group:
        for link, stream_id in streams:
            group.create_task(link.sending.end(stream_id, end))
    transfer.on_committed()


def _absorb_resume_points(streams: list[tuple[Link, int]], transfer: OutgoingTransfer) -> None:
    """Hand RESUMEs that arrived to the transfer; a malformed one refuses its link."""
    for link, stream_id in streams:
        for held in link.sending.take_resume_points(stream_id):
            try:
                transfer.on_resume(held, link.clock.now())
            except ProtocolError as error:
                link.refuse(type(error).__name__, str(error))
                raise


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
    streams: list[tuple[Link, int]],
    source: Source,
    pipeline: ChunkPipeline,
    chunks: list[Chunk],
    transfer: OutgoingTransfer,
    progress: ProgressCallback | None,
) -> None:
    """Send one stripe's chunks, skipping any the receiver turns out to hold."""
    in_flight = _InFlight(link.stream_window)
    try:
        async for ready in pipeline.iterate(chunks):
            index, nbytes = ready.chunk.index, ready.chunk.nbytes

            def still_needed(index: int = index) -> bool:
                """RESUMEs that arrived meanwhile may say the receiver holds this chunk."""
                _absorb_resume_points(streams, transfer)
                return index not in transfer.held

            started = time.perf_counter()
            checksum = await link.sending.send_chunk(
                stream_id, index, ready.parts, ready.nbytes, ready.header, ready.flags, still_needed
            )
            if checksum is None:  # the receiver holds it
                source.release(ready.chunk)
                continue
            pipeline.observe_link(ready.nbytes, time.perf_counter() - started)
            now = link.clock.now()
            transfer.on_chunk_sent(index, ready.blob_checksum or checksum, nbytes, now)
            metrics.tensor_bytes_moved("sent", nbytes)
            if progress is not None:
                progress(transfer.done_bytes, transfer.total_bytes)
            for delivered in in_flight.sent(ready.chunk, ready.nbytes):
                source.release(delivered)
    finally:
        for delivered in in_flight.drain():
            source.release(delivered)


async def _fill_checksums(
    source: Source, manifest: Manifest, chunks: list[Chunk], transfer: OutgoingTransfer
) -> None:
    """Checksums of chunks the receiver held from an attempt this process never sent (a
    transfer id reused after a sender restart): hash them as they would have been framed."""
    for index in transfer.missing_checksums():
        chunk = chunks[index]
        if not source.is_ready(chunk):
            await wait_ready(source, chunk)
        hasher = xxhash.xxh3_64()
        for part in encode_chunk(manifest, chunk, source.chunk_views(chunk)):
            hasher.update(part)
        transfer.checksums[index] = hasher.intdigest()
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
    stream_id = link.sending.open(header)
    sent = index = 0
    try:
        async for block in each_block(blocks):
            view = memoryview(block).cast("B")
            if view.nbytes == 0:
                continue
            await link.sending.send_chunk(stream_id, index, [view], view.nbytes)
            sent += view.nbytes
            index += 1
        await link.sending.end(stream_id)
    except BaseException as error:
        cancelled = isinstance(error, asyncio.CancelledError)
        code = headers.CANCELLED if cancelled else "sender_failed"
        link.reset_stream(stream_id, code, describe(error))
        if isinstance(error, StreamResetError) and not cancelled:
            raise TransferRejectedError(
                f"the receiver did not take the byte stream: {error}", code=error.code
            ) from error
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
