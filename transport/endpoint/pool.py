"""Reusable receive buffers.

Fresh memory costs about 1 s per GiB of page faults on our machines, several times the cost of the
copy that fills it, so the receiver reads DATA payloads into a small pool of chunk-sized buffers and
returns each one once the sink has taken its bytes. The pool is capped: at most the flow-control
window's worth of buffers can be in use at once, because the peer cannot send beyond it.
"""

from __future__ import annotations

import threading


class BufferPool:
    """Hands out writable buffers of at least the asked size and takes them back."""

    def __init__(self, buffer_size: int, max_idle: int) -> None:
        self.buffer_size = buffer_size
        self._max_idle = max_idle
        self._idle: list[bytearray] = []
        # release() runs in sink worker threads, allocate() on the event loop.
        self._lock = threading.Lock()
        self.allocated = 0

    def allocate(self, nbytes: int) -> bytearray:
        """A buffer of at least `nbytes`; a pooled one when `nbytes` fits the pool's size."""
        if nbytes > self.buffer_size:
            self.allocated += 1
            return bytearray(nbytes)
        with self._lock:
            if self._idle:
                return self._idle.pop()
        self.allocated += 1
        return bytearray(self.buffer_size)

    def release(self, buffer: object) -> None:
        """Give a buffer back; anything not from this pool (or over the cap) is left to the GC."""
        if not isinstance(buffer, bytearray) or len(buffer) != self.buffer_size:
            return
        with self._lock:
            if len(self._idle) < self._max_idle:
                self._idle.append(buffer)
