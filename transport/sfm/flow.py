"""Flow-control credit accounting: pure arithmetic, no frames, no I/O.

Credit is counted in payload bytes of DATA frames. There is one window per stream and one for the
whole connection; a DATA frame needs room in both.

The receiver gives credit back only when its application has *consumed* the bytes (grpclib's
`Buffer` idea), never on receipt: the bytes the sender may have in flight plus the bytes the
application still holds never exceed the window. That is what bounds the receiver's memory.

Grants are batched so that a consumer taking small bites does not cause a CREDIT frame per bite:
credit is given back once at least a quarter of the window is owed, or as soon as the
application holds nothing more of it (the sender may be blocked on exactly that credit; without
this rule a chunk larger than 3/4 of the window could deadlock the stream).
"""

from __future__ import annotations

from typing import Final

from transport.exceptions import FlowControlError, LocalError, StreamStateError

__all__ = ["MAX_WINDOW", "ReceiveWindow", "SendWindow"]

# Larger windows are refused: the sum of grants must stay far from any integer wrap-around.
MAX_WINDOW: Final = 2**62


class SendWindow:
    """Credit the peer has granted us: how many payload bytes we may still send."""

    __slots__ = ("_available", "_name")

    def __init__(self, initial: int, name: str) -> None:
        _check_size(initial, f"initial {name} window")
        self._available = initial
        self._name = name

    @property
    def available(self) -> int:
        """Bytes that may be sent now."""
        return self._available

    def spend(self, nbytes: int) -> None:
        """Account for `nbytes` about to be sent; the caller checked `available` first."""
        if nbytes > self._available:
            raise StreamStateError(
                f"{nbytes} bytes exceed the {self._available} bytes of credit on the "
                f"{self._name} window; wait for CreditGranted"
            )
        self._available -= nbytes

    def grant(self, nbytes: int) -> None:
        """Add credit the peer granted; more than MAX_WINDOW in total is a protocol error."""
        if nbytes < 0 or self._available + nbytes > MAX_WINDOW:
            raise FlowControlError(
                f"peer granted {nbytes} bytes on the {self._name} window holding "
                f"{self._available}: the window would leave 0..{MAX_WINDOW}"
            )
        self._available += nbytes


class ReceiveWindow:
    """Credit we have granted the peer, and what the application still holds of its data."""

    __slots__ = ("_available", "_name", "_owed", "_size", "_unconsumed", "_withheld")

    def __init__(self, size: int, name: str, initial: int | None = None) -> None:
        _check_size(size, f"{name} window")
        self._size = size
        opening = size if initial is None else initial
        self._available = opening  # bytes the peer may still send
        self._withheld = size - opening  # not granted yet: `open_up()` grants it
        self._unconsumed = 0  # received, not yet consumed by the application
        self._owed = 0  # consumed, not yet granted back
        self._name = name

    @property
    def available(self) -> int:
        """Bytes the peer may send without further credit."""
        return self._available

    @property
    def unconsumed(self) -> int:
        """Bytes received that the application has not consumed yet."""
        return self._unconsumed

    def receive(self, nbytes: int) -> None:
        """Account for a DATA payload that arrived; beyond the granted credit is an error."""
        if nbytes > self._available:
            raise FlowControlError(
                f"peer sent {nbytes} bytes of DATA with only {self._available} bytes of credit "
                f"on the {self._name} window (size {self._size})"
            )
        self._available -= nbytes
        self._unconsumed += nbytes

    def consume(self, nbytes: int) -> int:
        """Account for `nbytes` the application has taken; return the credit to grant now (or 0)."""
        if nbytes < 0 or nbytes > self._unconsumed:
            raise LocalError(
                f"consumed {nbytes} bytes but only {self._unconsumed} unconsumed bytes were "
                f"received on the {self._name} window"
            )
        self._unconsumed -= nbytes
        self._owed += nbytes
        if self._owed >= max(1, self._size // 4) or (self._unconsumed == 0 and self._owed):
            return self._take_owed()
        return 0

    def open_up(self) -> int:
        """Grant what was withheld at the start; returns the credit to send (0 if none)."""
        grant, self._withheld = self._withheld, 0
        self._available += grant
        return grant

    def release_all(self) -> int:
        """Treat everything received as consumed (stream abandoned); return the credit to grant."""
        self._owed += self._unconsumed
        self._unconsumed = 0
        return self._take_owed()

    def _take_owed(self) -> int:
        grant, self._owed = self._owed, 0
        self._available += grant
        return grant


def _check_size(nbytes: int, what: str) -> None:
    if not 0 <= nbytes <= MAX_WINDOW:
        raise FlowControlError(f"{what} of {nbytes} bytes is outside 0..{MAX_WINDOW}")
