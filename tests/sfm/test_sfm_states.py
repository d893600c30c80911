"""The stream state machine over (state, input) pairs (h2 test_state_machines.py idea).

Three levels: the pure table (every pair transitions per the table or raises the right error),
a real Connection fed every peer frame type in every reachable state, and a hypothesis stateful
test driving two Connections with random verbs and random byte splits.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from sfm_helpers import acceptor_after_hello, pump, raw

from transport.exceptions import LocalError, StreamStateError, UnexpectedFrameError
from transport.sfm import (
    Connection,
    ConnectionConfig,
    DataReceived,
    Role,
    StreamDigest,
    StreamEnded,
    StreamInput,
    StreamReset,
    StreamState,
)
from transport.sfm.states import TRANSITIONS, next_state
from transport.wire import FrameType

T = FrameType


@pytest.mark.parametrize(
    ("role", "state", "event"), list(itertools.product(Role, StreamState, StreamInput))
)
def test_every_pair_transitions_per_table_or_raises_the_right_error(
    role: Role, state: StreamState, event: StreamInput
) -> None:
    allowed = TRANSITIONS[(role, state)]
    if event in allowed:
        assert next_state(role, state, event, 7) is allowed[event]
        return
    expected = StreamStateError if event.is_local else UnexpectedFrameError
    with pytest.raises(expected, match=f"{event.name} on stream 7 .*{state.name}") as caught:
        next_state(role, state, event, 7)
    assert type(caught.value) is expected


def test_terminal_states_accept_no_local_input() -> None:
    for role, state in itertools.product(Role, (StreamState.CLOSED, StreamState.RESET)):
        assert not any(event.is_local for event in TRANSITIONS[(role, state)])


# --- a real Connection, every peer frame in every reachable state ------------------------------

EMPTY_END = {"chunks": 0, "bytes": 0, "digest": StreamDigest().hexdigest()}
PEER_FRAMES: dict[str, Callable[[int], bytes]] = {
    "DATA": lambda sid: raw(T.DATA, stream_id=sid, payload=b"x"),
    "END": lambda sid: raw(T.END, stream_id=sid, header=EMPTY_END),
    "CREDIT": lambda sid: raw(T.CREDIT, stream_id=sid, offset=1),
    "ACK": lambda sid: raw(T.ACK, stream_id=sid, offset=0),
    "RESET": lambda sid: raw(T.RESET, stream_id=sid, header={"code": "c", "reason": "r"}),
}


def _receiving(conn: Connection, then: str) -> int:
    conn.receive_data(raw(T.OPEN, stream_id=1))
    if then == "closed":
        conn.receive_data(PEER_FRAMES["END"](1))
    elif then == "reset_here":
        conn.reset_stream(1, "c", "r")
    elif then == "reset_there":
        conn.receive_data(PEER_FRAMES["RESET"](1))
    return 1


def _sending(conn: Connection, then: str) -> int:
    sid = conn.open_stream({})
    if then in ("ended", "closed"):
        conn.end_stream(sid)
    if then == "closed":
        conn.receive_data(raw(T.ACK, stream_id=sid, offset=0))
    elif then == "reset_here":
        conn.reset_stream(sid, "c", "r")
    return sid


SETUPS: dict[str, tuple[Role, Callable[[Connection], int]]] = {
    f"{role.value}-{then}": (role, lambda c, f=fn, t=then: f(c, t))  # type: ignore[misc]
    for role, fn, thens in (
        (Role.RECEIVER, _receiving, ("open", "closed", "reset_here", "reset_there")),
        (Role.SENDER, _sending, ("open", "ended", "closed", "reset_here")),
    )
    for then in thens
}


def _peer_input(frame: str, state: StreamState) -> StreamInput:
    if frame == "ACK" and state is StreamState.HALF_CLOSED_LOCAL:
        return StreamInput.RECV_ACK_ALL  # offset 0 == the 0 chunks sent
    return StreamInput[f"RECV_{frame}"]


@pytest.mark.parametrize("frame", PEER_FRAMES)
@pytest.mark.parametrize("setup", SETUPS)
def test_connection_follows_the_table_for_every_peer_frame(setup: str, frame: str) -> None:
    role, prepare = SETUPS[setup]
    conn = acceptor_after_hello()
    sid = prepare(conn)
    state = conn.stream_state(sid)
    event = _peer_input(frame, state)
    allowed = TRANSITIONS[(role, state)]
    if event not in allowed:
        with pytest.raises(UnexpectedFrameError, match=f"{event.name} on stream {sid}"):
            conn.receive_data(PEER_FRAMES[frame](sid))
        return
    conn.receive_data(PEER_FRAMES[frame](sid))
    expected = allowed[event]
    if expected is StreamState.HALF_CLOSED_REMOTE:  # the receiver verifies END at once
        expected = StreamState.CLOSED
    assert conn.stream_state(sid) is expected


# --- two Connections driven by random verbs ----------------------------------------------------


class TwoConnections(RuleBasedStateMachine):
    """Random verbs on both sides; local misuse may raise LocalError, nothing else may fail."""

    def __init__(self) -> None:
        super().__init__()
        config = {"stream_window": 3000, "connection_window": 7000, "max_streams": 4}
        self.a = Connection(ConnectionConfig(is_initiator=True, **config))
        self.b = Connection(ConnectionConfig(is_initiator=False, **config))
        self.a.send_hello({})
        self.b.send_hello({})
        self.rng = random.Random(0)
        self.sent: dict[tuple[int, int], dict[int, bytes]] = {}  # (side, sid) -> index -> bytes
        self.got: dict[tuple[int, int], dict[int, bytes]] = {}
        self.ended: set[tuple[int, int]] = set()
        self.reset: set[tuple[int, int]] = set()
        self.verified: set[tuple[int, int]] = set()

    def side(self, n: int) -> Connection:
        return self.a if n == 0 else self.b

    def attempt(self, call: Callable[[], object]) -> bool:
        try:
            call()
        except LocalError:
            return False
        return True

    @rule(n=st.integers(0, 1))
    def open_stream(self, n: int) -> None:
        conn = self.side(n)
        holder: list[int] = []
        if self.attempt(lambda: holder.append(conn.open_stream({"k": 1}))):
            self.sent[(n, holder[0])] = {}

    @precondition(lambda self: self.sent)
    @rule(data=st.data(), size=st.integers(0, 2500), index=st.integers(0, 6))
    def send_data(self, data: st.DataObject, size: int, index: int) -> None:
        n, sid = data.draw(st.sampled_from(sorted(self.sent)))
        blob = self.rng.randbytes(size)
        if self.attempt(lambda: self.side(n).send_data(sid, index, [blob])):
            self.sent[(n, sid)][index] = blob

    @precondition(lambda self: self.sent)
    @rule(data=st.data())
    def end_stream(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(self.sent)))
        if self.attempt(lambda: self.side(key[0]).end_stream(key[1])):
            self.ended.add(key)

    @precondition(lambda self: self.sent)
    @rule(data=st.data(), by_sender=st.booleans())
    def reset_stream(self, data: st.DataObject, by_sender: bool) -> None:
        n, sid = data.draw(st.sampled_from(sorted(self.sent)))
        conn = self.side(n if by_sender else 1 - n)
        if self.attempt(lambda: conn.reset_stream(sid, "test", "random reset")):
            self.reset.add((n, sid))

    @rule(n=st.integers(0, 1), split=st.booleans())
    def deliver(self, n: int, split: bool) -> None:
        src, dst = self.side(n), self.side(1 - n)
        pump(src, dst, self.rng if split else None)  # a ProtocolError here fails the test
        for event in dst.events_received():
            self.record(1 - n, event)

    def record(self, receiver: int, event: object) -> None:
        sender = 1 - receiver
        if isinstance(event, DataReceived):
            chunks = self.got.setdefault((sender, event.stream_id), {})
            assert event.index not in chunks
            chunks[event.index] = bytes(event.payload)
            self.side(receiver).consumed(event.stream_id, len(event.payload))
        elif isinstance(event, StreamEnded):
            key = (sender, event.stream_id)
            assert self.got.get(key, {}) == self.sent[key]
            self.verified.add(key)
        elif isinstance(event, StreamReset):
            assert (event.code, event.reason) == ("test", "random reset")

    @invariant()
    def windows_stay_within_bounds(self) -> None:
        for n, sid in self.sent:
            if self.side(n).stream_state(sid) is StreamState.OPEN:
                assert 0 <= self.side(n).send_window(sid) <= 7000

    @invariant()
    def only_ended_streams_are_verified(self) -> None:
        assert self.verified <= self.ended


TwoConnections.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_two_connections_never_break_the_protocol = TwoConnections.TestCase
