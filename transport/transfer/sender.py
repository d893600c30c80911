"""The sending side of one transfer, sans-I/O: what to open, what to send, when to give up.

The endpoint asks it for the OPEN header of each attempt, tells it every chunk that went out, what
the receiver said (RESUME, the verdict, resets) and what the network did (a lost connection), with
the time of each. It answers with what to do next and, once the transfer ended, why: it never
reads a clock, opens a socket or waits.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from transport.exceptions import (
    ConnectionClosedError,
    IdleTimeoutError,
    StreamResetError,
    TensorwireError,
    TransferCancelledError,
    TransferRejectedError,
    TransportError,
)
from transport.transfer import headers
from transport.transfer.states import TERMINAL, Role, TransferInput, TransferState, next_state

In = TransferInput


class OutgoingTransfer:
    """One transfer this side sends: attempts, the receiver's resume point, checksums, verdict."""

    def __init__(
        self,
        transfer_id: str,
        kind: str,
        content: Mapping[str, Any],
        chunk_sizes: list[int],
        *,
        idle_timeout: float,
        now: float,
    ) -> None:
        self.transfer_id = transfer_id
        self.kind = kind
        self._content = dict(content)
        self._sizes = chunk_sizes
        self.chunk_count = len(chunk_sizes)
        self.total_bytes = sum(chunk_sizes)
        self.done_bytes = 0  # bytes of chunks the receiver holds or that went out (progress)
        self._done: set[int] = set()
        self.idle_timeout = idle_timeout
        self.state = TransferState.IDLE
        self.attempt = -1
        self.held: set[int] = set()  # chunks the receiver said it holds
        self.checksums: dict[int, int] = {}  # chunk index -> checksum, as sent or held
        self.bytes_sent = 0
        self.progressed_at = now
        self.error: TensorwireError | None = None
        self.digest = ""

    # --- the table -------------------------------------------------------------------------

    def _step(self, event: TransferInput) -> bool:
        new = next_state(Role.SENDER, self.state, event, self.transfer_id)
        if new is None:
            return False
        self.state = new
        return True

    @property
    def done(self) -> bool:
        return self.error is not None or self.state is TransferState.COMMITTED

    @property
    def resumes(self) -> int:
        return max(self.attempt, 0)

    # --- attempts --------------------------------------------------------------------------

    def open_attempt(self, stripes: int) -> dict[str, Any]:
        """Start the next attempt over `stripes` streams; returns their OPEN header."""
        self._step(In.OPEN_ATTEMPT)
        self.attempt += 1
        return headers.open_header(
            self.kind, self.transfer_id, self.attempt, stripes, self._content
        )

    @property
    def awaits_resume_point(self) -> bool:
        """A reopened attempt sends nothing before the receiver said what it holds."""
        return self.state is TransferState.OPENING

    def on_resume(self, held: Any, now: float) -> None:
        """The receiver's RESUME (raw "held" value; ProtocolError if it is malformed)."""
        indices = headers.parse_index_ranges(held, self.chunk_count)
        if self._step(In.RESUME):
            self.held |= indices
            self.progressed_at = now
            for index in indices:
                self._count_done(index)

    def remaining(self) -> list[int]:
        """Chunk indices the receiver still lacks, in order."""
        return [index for index in range(self.chunk_count) if index not in self.held]

    def deal(self, stripes: int) -> list[list[int]]:
        """The remaining chunks dealt round-robin over `stripes` streams."""
        todo = self.remaining()
        return [todo[i::stripes] for i in range(stripes)]

    def on_chunk_sent(self, index: int, checksum: int, nbytes: int, now: float) -> None:
        self.checksums[index] = checksum
        self.bytes_sent += nbytes
        self.progressed_at = now
        self._count_done(index)

    def _count_done(self, index: int) -> None:
        if index not in self._done:
            self._done.add(index)
            self.done_bytes += self._sizes[index]

    def missing_checksums(self) -> list[int]:
        """Chunks held by the receiver from an attempt this process never sent (a transfer id
        reused after a sender restart): their checksums must be computed before END."""
        return [index for index in range(self.chunk_count) if index not in self.checksums]

    def end_header(self) -> dict[str, Any]:
        """Every chunk went out: the END header every stripe carries (the transfer digest)."""
        missing = self.missing_checksums()
        if missing and self.kind == headers.STATE_DICT:
            raise AssertionError(f"END before chunks {missing[:5]} of {self.transfer_id} were sent")
        self._step(In.SEND_END)
        if self.kind != headers.STATE_DICT:
            return {}
        self.digest = headers.transfer_digest(self.checksums)
        return {"transfer_digest": self.digest}

    # --- verdicts and failures -------------------------------------------------------------

    def on_committed(self) -> None:
        """Every stripe's final ACK arrived: the receiver's sink committed."""
        self._step(In.COMMIT)

    def on_reset(self, code: str, reason: str, now: float) -> bool:
        """The receiver reset a stream of the current attempt. True: start another attempt;
        False: the transfer is over (see `error`)."""
        if code in (headers.SUPERSEDED, headers.STALE):
            return self.on_lost(StreamResetError(f"receiver: {reason}", code=code), now)
        if code == headers.CLOSING:
            gone = ConnectionClosedError(f"the receiver closed its endpoint: {reason}")
            self._finish(In.FAIL, gone)
            return False
        if code == headers.REJECTED:
            error: TensorwireError = TransferRejectedError(
                f"the receiver rejected transfer {self.transfer_id}: {reason}", code=code
            )
            self._finish(In.REJECT, error)
        else:
            error = TransferRejectedError(
                f"the receiver failed transfer {self.transfer_id} ({code}): {reason}", code=code
            )
            self._finish(In.FAIL, error)
        return False

    def on_lost(self, error: TensorwireError, now: float) -> bool:
        """A connection (or stripe) of the attempt was lost. True: try another attempt; False:
        nothing moved for idle_timeout, or the error is final (see `error`)."""
        if self.done:
            return False
        recoverable = isinstance(error, TransportError | StreamResetError) and not isinstance(
            error, IdleTimeoutError
        )
        stalled = now - self.progressed_at > self.idle_timeout
        if not recoverable or stalled:
            self._finish(In.FAIL, error)
            return False
        self._step(In.LOSE)
        return True

    def cancel(self, reason: str) -> tuple[str, str]:
        """The application cancelled: the final reset to send on every stream of the attempt."""
        self._finish(In.CANCEL, TransferCancelledError(reason, code=headers.CANCELLED))
        return headers.CANCELLED, reason

    def fail(self, error: TensorwireError) -> None:
        """A local, final error (the source failed, a bad argument)."""
        self._finish(In.FAIL, error)

    def _finish(self, event: TransferInput, error: TensorwireError) -> None:
        if self.state in TERMINAL:
            return  # the first verdict stands
        if self._step(event) and self.error is None:
            self.error = error
