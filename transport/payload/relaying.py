"""A transfer received into a safetensors file and sent on while it arrives: what a relay forwards.

    relay = RelayFile("models/round-3.safetensors")
    receiving = incoming.receive_into(relay.sink)          # upstream, into the file
    for peer in sites:                                     # downstream, at once
        peer.send_state_dict(relay.source(incoming.manifest), ...)

The sink is a SafetensorsFileSink (chunks pwritten in place, a journal for resume); each chunk it
has written (checksum verified, bytes on their place in the file) becomes ready, and every source
serves ready chunks from an mmap of the same file. A sender asks `is_ready(chunk)` before it reads
a chunk and waits for `when_ready` callbacks otherwise, so each site gets each chunk as soon as it
is verified here, and memory holds only what the senders have in flight: the file's pages are let
go (madvise) once a chunk was sent. A relay restarted mid-transfer resumes into the same file and
serves at once what the journal says it already holds.

Sources plan chunks from the upstream manifest (its chunk size), so chunk i downstream is chunk i
upstream. If the upstream transfer fails for good, `is_ready` raises PayloadError naming why, and
the onward sends fail instead of waiting for bytes that will not come.
"""

from __future__ import annotations

import contextlib
import mmap
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from transport.exceptions import PayloadError
from transport.payload.manifest import Manifest
from transport.payload.plan import Chunk, Piece
from transport.payload.sinks import SafetensorsFileSink, safetensors_file_header
from transport.payload.sources import Source, drop_pages

__all__ = ["RelayFile"]


class RelayFile:
    """One forwarded transfer: `sink` receives it into `path`, `source()` sends it on."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.sink = _RelaySink(self.path, self)
        self._lock = threading.Lock()
        self._ready: set[int] = set()
        self._listeners: dict[int, Callable[[], None]] = {}
        self._next_listener = 0
        self._error: str | None = None
        self._complete = False
        self.manifest: Manifest | None = None  # known once the sink opened

    @property
    def failed(self) -> str | None:
        """Why the upstream transfer failed, or None."""
        with self._lock:
            return self._error

    def when_changed(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call `callback` (from any thread) when the sink opens, a chunk lands or the transfer
        fails; returns what stops it."""
        return self._subscribe(callback)

    def source(self, manifest: Manifest) -> Source:
        """A Source of the transfer with this `manifest` (the incoming transfer's): one per onward
        send, each with its own map of the file."""
        return RelaySource(self, manifest)

    @property
    def ready_chunks(self) -> int:
        with self._lock:
            return len(self._ready)

    def fail(self, reason: str) -> None:
        """The upstream transfer will not complete: waiting senders fail with `reason`."""
        with self._lock:
            if self._complete:
                return
            self._error = reason
        self._notify()

    # --- called by the sink (any thread) ---------------------------------------------------------

    def _mark(self, indices: Sequence[int] | set[int]) -> None:
        with self._lock:
            self._ready.update(indices)
        self._notify()

    def _committed(self) -> None:
        with self._lock:
            self._complete = True

    # --- asked by the sources ----------------------------------------------------------------

    def _is_ready(self, index: int) -> bool:
        with self._lock:
            if index in self._ready:
                return True
            if self._error is not None:
                raise PayloadError(f"{self.path}: the relayed transfer failed: {self._error}")
            return False

    def _subscribe(self, callback: Callable[[], None]) -> Callable[[], None]:
        with self._lock:
            key = self._next_listener
            self._next_listener += 1
            self._listeners[key] = callback

        def unsubscribe() -> None:
            with self._lock:
                self._listeners.pop(key, None)

        return unsubscribe

    def _notify(self) -> None:
        with self._lock:
            listeners = list(self._listeners.values())
        for listener in listeners:
            listener()

    def _file(self) -> Path:
        """The file as it is now: `<path>.partial` while arriving, `<path>` once committed."""
        return self.sink.partial if self.sink.partial.exists() else self.path


class _RelaySink(SafetensorsFileSink):
    """A SafetensorsFileSink that tells its RelayFile which chunks are on disk."""

    def __init__(self, path: Path, relay: RelayFile) -> None:
        super().__init__(path)
        self._relay = relay

    def open(self, manifest: Manifest) -> None:
        super().open(manifest)
        self._relay.manifest = manifest
        # Resumed: these chunks are already in the file (none: still tells who waits for open).
        self._relay._mark(set(self._held))

    def write(self, chunk: Chunk, pieces: Sequence[tuple[Piece, memoryview]]) -> None:
        super().write(chunk, pieces)
        self._relay._mark((chunk.index,))

    def commit(self) -> Path:
        path = super().commit()
        self._relay._committed()
        return path

    def abort(self, error: BaseException) -> None:
        super().abort(error)
        self._relay.fail(f"{type(error).__name__}: {error}")


class RelaySource(Source):
    """Serves the chunks of a RelayFile once they are on disk, from an mmap of the file."""

    def __init__(self, relay: RelayFile, manifest: Manifest) -> None:
        self.manifest = manifest
        self._relay = relay
        header, offsets = safetensors_file_header(manifest)
        self._starts = [len(header) + offset for offset in offsets]
        self._map: mmap.mmap | None = None
        self._view: memoryview | None = None

    def is_ready(self, chunk: Chunk) -> bool:
        return self._relay._is_ready(chunk.index)

    def when_ready(self, callback: Callable[[], None]) -> Callable[[], None]:
        return self._relay._subscribe(callback)

    def chunk_views(self, chunk: Chunk) -> list[memoryview]:
        if not self._relay._is_ready(chunk.index):
            raise PayloadError(f"chunk {chunk.index} of {self._relay.path} is not there yet")
        view = self._mapped()
        return [
            view[self._starts[p.tensor] + p.start : self._starts[p.tensor] + p.stop]
            for p in chunk.pieces
        ]

    def release(self, chunk: Chunk) -> None:
        """Drop the chunk's pages from this process (the page cache keeps them for the others)."""
        if self._map is None:
            return
        for piece in chunk.pieces:  # the file orders tensors its own way: piece by piece
            start = self._starts[piece.tensor]
            drop_pages(self._map, start + piece.start, start + piece.stop)

    def close(self) -> None:
        if self._view is not None:
            self._view.release()
        if self._map is not None:
            with contextlib.suppress(BufferError):  # a view still out keeps it mapped
                self._map.close()
        self._view, self._map = None, None

    def _mapped(self) -> memoryview:
        if self._view is None:
            file = self._relay._file()
            with file.open("rb") as handle:
                self._map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
            self._view = memoryview(self._map)
        return self._view
