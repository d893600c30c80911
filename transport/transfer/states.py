"""The transfer state machine: every legal transition of one transfer, in one table.

A transfer is one state dict (or byte stream) moved from a sender to a receiver, across however many
connections and attempts it takes. sfm (sfm/states.py) runs each *stream*; this table runs the
*transfer* those streams carry. Rules (read these before the table):

1. Each side tracks the transfer under its own role: the SENDER walks OPENING/SENDING/ENDING, the
   RECEIVER walks ANNOUNCED/RECEIVING/VERIFYING. Both may be INTERRUPTED (a connection or stripe
   of the current attempt was lost and the next attempt has not started yet) and both end in
   exactly one terminal state: COMMITTED, REJECTED, FAILED or CANCELLED.
2. Success means one thing: the receiver's sink committed. The receiver reports its verdict to the
   sender (the final ACK of every stream of the attempt means COMMITTED; a RESET with code
   "rejected" means REJECTED, any other final code FAILED), and the sender's send returns only then.
3. A dropped connection is not a verdict: it is LOSE, and both sides wait (up to idle_timeout since
   the last progress) for the sender's next attempt, which reopens the transfer by id; the receiver
   answers it with RESUME (the chunks it holds). A sender's cancel is a final RESET ("cancelled")
   that the receiver sees at once: CANCEL, never LOSE.
4. A transfer the receiving application has not taken (ANNOUNCED) holds no credit: its streams get
   their window only on TAKE, so transfers waiting to be taken can never block the ones being
   received on the same connection.
5. Inputs are local (this side's application or code decided: OPEN_ATTEMPT on the sender, SEND_END,
   TAKE, REJECT, COMMIT on the receiver, CANCEL on the sender, FAIL) or remote (the peer or the
   network said so). A local input the table does not allow is a bug in the caller
   (StreamStateError). A remote input that arrives after the transfer ended is a race, not an error:
   it is ignored (a late LOSE after COMMITTED, say).
"""

from __future__ import annotations

import enum
from typing import Final

from transport.exceptions import StreamStateError, UnexpectedFrameError

__all__ = [
    "TERMINAL",
    "TRANSITIONS",
    "Role",
    "TransferInput",
    "TransferState",
    "next_state",
]


class Role(enum.Enum):
    SENDER = "sender"
    RECEIVER = "receiver"


class TransferState(enum.Enum):
    IDLE = "idle"
    OPENING = "opening"  # sender: a resumed attempt's streams are open; waits for RESUME
    SENDING = "sending"  # sender: chunks go out
    ENDING = "ending"  # sender: END went out on every stripe; waits for the verdict
    ANNOUNCED = "announced"  # receiver: opened by the peer, not taken by the application yet
    RECEIVING = "receiving"  # receiver: the application takes chunks into its sink
    VERIFYING = "verifying"  # receiver: every stripe ended; digest checked, sink commits
    INTERRUPTED = "interrupted"  # either: the attempt was lost; the next one is awaited
    COMMITTED = "committed"
    REJECTED = "rejected"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL: Final = frozenset(
    {
        TransferState.COMMITTED,
        TransferState.REJECTED,
        TransferState.FAILED,
        TransferState.CANCELLED,
    }
)


class TransferInput(enum.Enum):
    OPEN_ATTEMPT = "open_attempt"  # sender opens an attempt / receiver sees one opened
    RESUME = "resume"  # sender: the receiver's resume point arrived
    SEND_END = "send_end"  # sender: every chunk went out; END on every stripe
    TAKE = "take"  # receiver: the application takes the transfer
    ALL_ENDED = "all_ended"  # receiver: every stripe of the current attempt ended
    COMMIT = "commit"  # receiver: the sink committed / sender: the receiver says so
    REJECT = "reject"  # receiver: the application refused / sender: the receiver says so
    FAIL = "fail"  # a final error on either side (integrity, sink, protocol, gave up)
    LOSE = "lose"  # a connection or stripe of the current attempt was lost
    CANCEL = "cancel"  # sender: the application cancelled / receiver: the sender says so


# Inputs that come from the peer or the network (rule 5): ignored once the transfer ended.
REMOTE_INPUTS: Final = frozenset(
    {
        (Role.SENDER, TransferInput.RESUME),
        (Role.SENDER, TransferInput.COMMIT),
        (Role.SENDER, TransferInput.REJECT),
        (Role.SENDER, TransferInput.LOSE),
        (Role.RECEIVER, TransferInput.OPEN_ATTEMPT),
        (Role.RECEIVER, TransferInput.ALL_ENDED),
        (Role.RECEIVER, TransferInput.LOSE),
        (Role.RECEIVER, TransferInput.CANCEL),
    }
)

S, In = TransferState, TransferInput
_SENDER_FINAL = {In.FAIL: S.FAILED, In.CANCEL: S.CANCELLED, In.REJECT: S.REJECTED}

# (role, state) -> {input: new state}. The whole transfer protocol.
TRANSITIONS: Final[dict[tuple[Role, TransferState], dict[TransferInput, TransferState]]] = {
    (Role.SENDER, S.IDLE): {In.OPEN_ATTEMPT: S.SENDING, **_SENDER_FINAL},
    (Role.SENDER, S.OPENING): {In.RESUME: S.SENDING, In.LOSE: S.INTERRUPTED, **_SENDER_FINAL},
    (Role.SENDER, S.SENDING): {
        In.RESUME: S.SENDING,  # the resume point may arrive (or grow) while chunks go out
        In.SEND_END: S.ENDING,
        In.LOSE: S.INTERRUPTED,
        **_SENDER_FINAL,
    },
    (Role.SENDER, S.ENDING): {
        In.RESUME: S.ENDING,
        In.COMMIT: S.COMMITTED,
        In.LOSE: S.INTERRUPTED,  # the verdict was lost with the connection: ask again
        **_SENDER_FINAL,
    },
    (Role.SENDER, S.INTERRUPTED): {
        In.OPEN_ATTEMPT: S.OPENING,
        In.LOSE: S.INTERRUPTED,  # another stripe of the lost attempt
        **_SENDER_FINAL,
    },
    (Role.RECEIVER, S.IDLE): {In.OPEN_ATTEMPT: S.ANNOUNCED},
    (Role.RECEIVER, S.ANNOUNCED): {
        In.TAKE: S.RECEIVING,
        In.REJECT: S.REJECTED,
        In.OPEN_ATTEMPT: S.ANNOUNCED,
        In.LOSE: S.ANNOUNCED,  # the application finds it interrupted when it takes it
        In.ALL_ENDED: S.ANNOUNCED,  # an empty transfer needs no credit to end
        In.CANCEL: S.CANCELLED,
        In.FAIL: S.FAILED,
    },
    (Role.RECEIVER, S.RECEIVING): {
        In.OPEN_ATTEMPT: S.RECEIVING,  # the sender noticed the loss first
        In.ALL_ENDED: S.VERIFYING,
        In.LOSE: S.INTERRUPTED,
        In.CANCEL: S.CANCELLED,
        In.FAIL: S.FAILED,
    },
    (Role.RECEIVER, S.INTERRUPTED): {
        In.OPEN_ATTEMPT: S.RECEIVING,
        In.LOSE: S.INTERRUPTED,
        In.CANCEL: S.CANCELLED,
        In.FAIL: S.FAILED,
    },
    (Role.RECEIVER, S.VERIFYING): {
        In.COMMIT: S.COMMITTED,
        In.FAIL: S.FAILED,
        In.OPEN_ATTEMPT: S.VERIFYING,  # a sender that lost our verdict asks again: it gets it
        In.LOSE: S.VERIFYING,  # lost before our verdict went out: a resumed sender is settled
        In.CANCEL: S.VERIFYING,  # too late: every byte is here, the verdict decides
    },
}

for _role in Role:
    for _state in TERMINAL:
        TRANSITIONS[(_role, _state)] = {}

del S, In, _role, _state


def next_state(
    role: Role, state: TransferState, event: TransferInput, transfer: str = ""
) -> TransferState | None:
    """The state after `event`; None for a remote input that arrived after the end (ignore it).

    Anything else the table does not allow raises: StreamStateError for a local input (fix the
    caller), UnexpectedFrameError for a remote one (the peer broke the protocol)."""
    allowed = TRANSITIONS[(role, state)]
    if event in allowed:
        return allowed[event]
    remote = (role, event) in REMOTE_INPUTS
    if state in TERMINAL and remote:
        return None
    choices = ", ".join(sorted(e.name for e in allowed)) or "nothing (it ended)"
    what = f"transfer {transfer or '?'} ({role.value}, {state.name})"
    if remote:
        raise UnexpectedFrameError(f"peer caused {event.name} on {what}: it allows {choices}")
    raise StreamStateError(f"{what} cannot take {event.name}: this state allows {choices}")
