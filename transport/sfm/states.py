"""The stream state machine: every legal transition, in one table.

Rules (read these before the table):

1. A stream carries data one way. The side that opens it is its SENDER: it sends OPEN, DATA, END
   and may RESET. The other side is its RECEIVER: it sends CREDIT, ACK and may RESET. Each side
   tracks the stream under its own role, so the same stream is SENDER here and RECEIVER there.
2. An input is a frame type plus a direction: SEND_* is this side's application asking to send
   it, RECV_* is the peer's frame arriving. The table maps (role, state, input) -> new state.
3. Anything not in the table is an error: `StreamStateError` when this side asked for it (fix
   the calling code), `UnexpectedFrameError` when the peer sent it (the peer broke the protocol and
   the connection is closed).
4. Lifecycle. SENDER: IDLE -open-> OPEN -end-> HALF_CLOSED_LOCAL -ack of every chunk-> CLOSED.
   RECEIVER: IDLE -open-> OPEN -end-> HALF_CLOSED_REMOTE, then the receiver checks counts and
   digest and either sends the final ACK (-> CLOSED) or a RESET (-> RESET).
   Either side may reset from any live state.
   The RECEIVER of an open stream may send RESUME (the chunks it already holds from an earlier
   connection of the same transfer); the SENDER takes it while it still sends, and ignores a late
   one after END or RESET.
5. Races are tolerated, not errors: after a RESET the peer may still have DATA/END (or CREDIT/ACK)
   in flight, so those arrive in RESET and are dropped; CREDIT may arrive after CLOSED because the
   receiver grants credit as its application consumes, which can be after the end.
   A peer frame accepted in a terminal state (CLOSED, RESET) is dropped by the connection with no
   event (but its bytes still count against, and are given back to, the connection window).
6. Every input this side sends in a terminal state is an error: the application must learn that
   the stream is over.
"""

from __future__ import annotations

import enum
from typing import Final

from transport.exceptions import StreamStateError, UnexpectedFrameError

__all__ = [
    "TERMINAL_STATES",
    "TRANSITIONS",
    "Role",
    "StreamInput",
    "StreamState",
    "next_state",
]


class Role(enum.Enum):
    """This side's role in one stream."""

    SENDER = "sender"  # this side opened it and sends its data
    RECEIVER = "receiver"  # the peer opened it; this side receives its data


class StreamState(enum.Enum):
    """Where one stream is, as seen by one side."""

    IDLE = "idle"
    OPEN = "open"
    HALF_CLOSED_LOCAL = "half_closed_local"  # SENDER sent END, waits for the receiver's verdict
    HALF_CLOSED_REMOTE = "half_closed_remote"  # RECEIVER got END, is verifying it
    CLOSED = "closed"  # ended and verified
    RESET = "reset"  # abandoned by either side


TERMINAL_STATES: Final = frozenset({StreamState.CLOSED, StreamState.RESET})


class StreamInput(enum.Enum):
    """A frame sent by this side (SEND_*) or received from the peer (RECV_*)."""

    SEND_OPEN = "send_open"
    SEND_DATA = "send_data"
    SEND_END = "send_end"
    SEND_CREDIT = "send_credit"
    SEND_ACK = "send_ack"
    SEND_RESET = "send_reset"
    SEND_RESUME = "send_resume"
    RECV_OPEN = "recv_open"
    RECV_DATA = "recv_data"
    RECV_END = "recv_end"
    RECV_CREDIT = "recv_credit"
    RECV_ACK = "recv_ack"  # progress: the receiver holds some chunks
    RECV_ACK_ALL = "recv_ack_all"  # after END: the receiver verified and holds every chunk
    RECV_RESET = "recv_reset"
    RECV_RESUME = "recv_resume"

    @property
    def is_local(self) -> bool:
        """True when this side's application asked for it, False when the peer sent it."""
        return self.name.startswith("SEND_")


S, In = StreamState, StreamInput

# (role, state) -> {input: new state}. The whole protocol of one stream.
TRANSITIONS: Final[dict[tuple[Role, StreamState], dict[StreamInput, StreamState]]] = {
    (Role.SENDER, S.IDLE): {In.SEND_OPEN: S.OPEN},
    (Role.SENDER, S.OPEN): {
        In.SEND_DATA: S.OPEN,
        In.SEND_END: S.HALF_CLOSED_LOCAL,
        In.SEND_RESET: S.RESET,
        In.RECV_CREDIT: S.OPEN,
        In.RECV_ACK: S.OPEN,
        In.RECV_RESET: S.RESET,
        In.RECV_RESUME: S.OPEN,
    },
    (Role.SENDER, S.HALF_CLOSED_LOCAL): {
        In.RECV_RESUME: S.HALF_CLOSED_LOCAL,
        In.SEND_RESET: S.RESET,
        In.RECV_CREDIT: S.HALF_CLOSED_LOCAL,
        In.RECV_ACK: S.HALF_CLOSED_LOCAL,
        In.RECV_ACK_ALL: S.CLOSED,
        In.RECV_RESET: S.RESET,
    },
    (Role.SENDER, S.CLOSED): {In.RECV_CREDIT: S.CLOSED},
    (Role.SENDER, S.RESET): {
        In.RECV_CREDIT: S.RESET,
        In.RECV_ACK: S.RESET,
        In.RECV_ACK_ALL: S.RESET,
        In.RECV_RESET: S.RESET,
        In.RECV_RESUME: S.RESET,
    },
    (Role.SENDER, S.HALF_CLOSED_REMOTE): {},  # a receiver's state: never a sender's
    (Role.RECEIVER, S.IDLE): {In.RECV_OPEN: S.OPEN},
    (Role.RECEIVER, S.OPEN): {
        In.RECV_DATA: S.OPEN,
        In.RECV_END: S.HALF_CLOSED_REMOTE,
        In.RECV_RESET: S.RESET,
        In.SEND_CREDIT: S.OPEN,
        In.SEND_ACK: S.OPEN,
        In.SEND_RESET: S.RESET,
        In.SEND_RESUME: S.OPEN,
    },
    (Role.RECEIVER, S.HALF_CLOSED_LOCAL): {},  # a sender's state: never a receiver's
    (Role.RECEIVER, S.HALF_CLOSED_REMOTE): {
        In.SEND_ACK: S.CLOSED,
        In.SEND_RESET: S.RESET,
        In.RECV_RESET: S.RESET,
    },
    # the sender may give up (RESET) while our final ACK is on its way to it
    (Role.RECEIVER, S.CLOSED): {In.RECV_RESET: S.CLOSED},
    (Role.RECEIVER, S.RESET): {
        In.RECV_DATA: S.RESET,
        In.RECV_END: S.RESET,
        In.RECV_RESET: S.RESET,
    },
}

del S, In


def next_state(
    role: Role, state: StreamState, event: StreamInput, stream_id: int = 0
) -> StreamState:
    """Return the state after `event`, or raise if the table does not allow it.

    Raises StreamStateError for a local input and UnexpectedFrameError for a peer frame.
    """
    allowed = TRANSITIONS[(role, state)]
    try:
        return allowed[event]
    except KeyError:
        pass
    what = f"{event.name} on stream {stream_id} ({role.value}, state {state.name})"
    choices = ", ".join(sorted(e.name for e in allowed)) or "nothing"
    if event.is_local:
        raise StreamStateError(f"cannot {what}: this state allows {choices}") from None
    raise UnexpectedFrameError(f"peer sent {what}: this state allows {choices}") from None
