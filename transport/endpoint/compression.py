"""Compression on the data path: chunks are compressed in a small thread pool ahead of the socket
and decompressed in a worker thread on arrival, when the policy says it shortens the transfer.

zstd releases the GIL, so the pool really runs beside the event loop. The sender keeps a few
chunks in preparation (one per thread, plus one), so the link never waits for the codec and
memory stays bounded by the window plus those few chunks. In "auto" mode the policy compares the
link's measured rate with the codec's measured speed and ratio and keeps deciding as they change;
while it sends raw, every `_RESAMPLE_EVERY`th chunk is also compressed in the background (the
result thrown away) so the codec estimates never go stale, without ever delaying the link.

Every chunk also gets a checksum of its *uncompressed* blob (the frame checksum when it travels
raw, the codec header's xxh3 when compressed), so the digest over a whole transfer is the same
whether or not, and however differently, its chunks were compressed across resumed attempts.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from transport import sfm
from transport.codecs import (
    ChunkCompressor,
    ChunkDecompressor,
    CompressionPolicy,
    segments_for_chunk,
)
from transport.exceptions import ChunkError
from transport.payload import Chunk, Manifest, Source, encode_chunk
from transport.wire import Buffer, FrameFlags

_RESAMPLE_EVERY = 256


@dataclass(frozen=True, slots=True)
class PreparedChunk:
    """A chunk ready for the wire: its parts, and how it was encoded."""

    chunk: Chunk
    parts: Sequence[Buffer]
    nbytes: int  # payload bytes on the wire
    header: Mapping[str, Any] | None  # frame header ({"codec": ...}) when compressed
    flags: int
    blob_checksum: int | None  # xxh3 of the uncompressed blob, when already known


def _parts_size(parts: Sequence[Buffer]) -> int:
    return sum(memoryview(part).nbytes for part in parts)


class ChunkPipeline:
    """Prepares the chunks of one attempt in order, compressing ahead in threads when it pays."""

    def __init__(
        self,
        manifest: Manifest,
        source: Source,
        policy: CompressionPolicy,
        pool: ThreadPoolExecutor | None,
    ) -> None:
        self._manifest = manifest
        self._source = source
        self._policy = policy
        self._pool = pool
        self._compressors: dict[int, ChunkCompressor] = {}
        self._counter = 0
        self._samples: set[Future[PreparedChunk]] = set()

    def _should_compress(self) -> bool:
        self._counter += 1
        if self._pool is None or self._policy.mode == "off":
            return False
        return self._policy.decide()

    def _resample(self, chunk: Chunk, parts: Sequence[Buffer]) -> None:
        """Sending raw in auto mode: now and then measure the codec in the background."""
        if self._pool is None or self._policy.mode != "auto":
            return
        if self._counter % _RESAMPLE_EVERY == 0:
            self._samples.add(self._pool.submit(self._compress, chunk, parts))
            self._samples = {sample for sample in self._samples if not sample.done()}

    def _compress(self, chunk: Chunk, parts: Sequence[Buffer]) -> PreparedChunk:
        """Runs in a pool thread: compress one chunk with this thread's compressor."""
        compressor = self._compressors.setdefault(
            threading.get_ident(), ChunkCompressor(self._policy.level)
        )
        started = time.perf_counter()
        codec, payload = compressor.compress(segments_for_chunk(self._manifest, chunk), parts)
        seconds = time.perf_counter() - started
        raw, stored = _parts_size(parts), _parts_size(payload)
        self._policy.observe_codec(raw, stored, seconds)
        checksum = int(str(codec["xxh3"]), 16)
        return PreparedChunk(
            chunk, payload, stored, {"codec": codec}, FrameFlags.COMPRESSED, checksum
        )

    def _raw(self, chunk: Chunk, parts: Sequence[Buffer]) -> PreparedChunk:
        return PreparedChunk(chunk, parts, _parts_size(parts), None, 0, None)

    async def iterate(self, chunks: Sequence[Chunk]) -> AsyncIterator[PreparedChunk]:
        """Yield PreparedChunk in plan order, keeping up to threads + 1 in preparation."""
        loop = asyncio.get_running_loop()
        depth = (self._policy.threads + 1) if self._pool is not None else 1
        pending: deque[asyncio.Future[PreparedChunk]] = deque()
        position = 0
        try:
            while position < len(chunks) or pending:
                while position < len(chunks) and len(pending) < depth:
                    chunk = chunks[position]
                    if not self._source.is_ready(chunk):
                        if pending:  # send what is prepared while this one is not there yet
                            break
                        await wait_ready(self._source, chunk)
                    position += 1
                    parts = encode_chunk(self._manifest, chunk, self._source.chunk_views(chunk))
                    if self._should_compress():
                        pending.append(
                            asyncio.ensure_future(
                                loop.run_in_executor(self._pool, self._compress, chunk, parts)
                            )
                        )
                    else:
                        self._resample(chunk, parts)
                        done: asyncio.Future[PreparedChunk] = loop.create_future()
                        done.set_result(self._raw(chunk, parts))
                        pending.append(done)
                yield await pending.popleft()
        finally:
            for future in pending:
                future.cancel()

    def observe_link(self, nbytes: int, seconds: float) -> None:
        """How long the link took to take `nbytes` (credit wait + write): its rate."""
        if seconds > 0 and nbytes > 0:
            self._policy.observe_link_rate(nbytes, seconds)


async def wait_ready(source: Source, chunk: Chunk) -> None:
    """Until `source` can serve `chunk` (a relay's source while the chunk is still upstream);
    the source's callbacks may come from any thread. Raises what the source raises when the
    chunk will never come."""
    loop = asyncio.get_running_loop()
    more = asyncio.Event()

    def wake() -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed: nobody is waiting any more
            loop.call_soon_threadsafe(more.set)

    stop = source.when_ready(wake)
    try:
        while True:
            more.clear()  # before asking: a chunk that lands in between still wakes us
            if source.is_ready(chunk):
                return
            await more.wait()
    finally:
        stop()


def blob_checksum(event: sfm.DataReceived) -> int:
    """The checksum of the chunk's uncompressed blob, as the sender recorded it."""
    if not event.flags & FrameFlags.COMPRESSED:
        return event.checksum
    codec = event.header.get("codec")
    digest = codec.get("xxh3") if isinstance(codec, Mapping) else None
    try:
        return int(str(digest), 16)
    except ValueError:
        raise ChunkError(f"compressed chunk {event.index} has no valid codec xxh3") from None


def decompress(
    decompressor: ChunkDecompressor, event: sfm.DataReceived, out: bytearray
) -> memoryview:
    """The uncompressed blob of a compressed DATA event, in `out` (runs in a worker thread)."""
    codec = event.header.get("codec")
    if not isinstance(codec, Mapping):
        raise ChunkError(f"compressed chunk {event.index} has no codec header")
    size = decompressor.decompress_into(codec, event.payload, out)
    return memoryview(out)[:size]
