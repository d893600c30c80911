"""The transfer layer without sockets: a sender and a receiver registry joined by a simulated
network that cuts connections, repeats and delays RESUMEs, restarts the receiver, and whose
applications cancel or reject. Whatever happens, the receiver ends holding exactly the sender's
bytes (and both say COMMITTED), or both sides end with the same kind of clear error."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from transport.exceptions import (
    ConnectionClosedError,
    IdleTimeoutError,
    StreamStateError,
    TransferCancelledError,
    TransferRejectedError,
    TransportError,
    UnexpectedFrameError,
)
from transport.transfer import (
    DUPLICATE,
    JOINED,
    NEW,
    TERMINAL,
    Data,
    IncomingRegistry,
    IncomingState,
    OutgoingTransfer,
    Role,
    TransferInput,
    TransferState,
    headers,
    next_state,
)

IDLE = 100.0


def chunk_bytes(index: int) -> bytes:
    return f"chunk-{index}".encode() * (index + 1)


def checksum(index: int) -> int:
    return hash(chunk_bytes(index)) & 0xFFFFFFFF


@dataclass
class Receiver:
    """The receiving process: its registry, its application's sink and a journal that survives
    a restart (as SafetensorsFileSink's does)."""

    reject: bool
    registry: IncomingRegistry = field(default_factory=IncomingRegistry)
    sink: dict[int, bytes] = field(default_factory=dict)
    journal: dict[int, int] = field(default_factory=dict)
    state: IncomingState | None = None
    committed_before: bool = False

    def restart(self) -> None:
        self.registry, self.state, self.sink = IncomingRegistry(), None, {}


class World:
    def __init__(self, chunks: int, receiver: Receiver) -> None:
        self.now = 0.0
        self.chunks = chunks
        self.sender = OutgoingTransfer(
            "round-1/site-1",
            headers.STATE_DICT,
            {"manifest": {"n": chunks}},
            [len(chunk_bytes(i)) for i in range(chunks)],
            idle_timeout=IDLE,
            now=0.0,
        )
        self.receiver = receiver
        self.connection = 0
        self.streams: list[tuple[int, int]] = []
        self.resets: list[tuple[tuple[int, int], str, str]] = []  # receiver -> sender

    # --- one attempt ---------------------------------------------------------------------

    def open_attempt(self, stripes: int) -> None:
        self.connection += 1
        header = self.sender.open_attempt(stripes)
        self.streams = [(self.connection, 2 * i + 1) for i in range(stripes)]
        for key in self.streams:
            self._receiver_opens(key, header)
        if self.sender.state is TransferState.OPENING:
            self.deliver_resume()

    def _receiver_opens(self, key: tuple[int, int], header: dict[str, object]) -> None:
        receiver = self.receiver
        opened = receiver.registry.on_open(key, header, self.now)
        if opened.action == DUPLICATE:
            receiver.committed_before = True
            return
        assert opened.action in (NEW, JOINED), opened
        state = opened.transfer
        assert state is not None
        receiver.state = state
        if opened.action == NEW:
            if receiver.reject:
                self.resets += state.reject("not this model")
                return
            state.received.update(receiver.journal)  # a persisting sink kept these
            state.take()

    def resume_point(self) -> dict[str, object]:
        receiver = self.receiver
        if receiver.committed_before:
            return {"held": [[0, self.chunks]]}
        assert receiver.state is not None
        return receiver.state.resume_point()

    def deliver_resume(self) -> None:
        self.sender.on_resume(self.resume_point()["held"], self.now)

    def deliver_chunk(self, stripe: int, index: int) -> None:
        key = self.streams[stripe % len(self.streams)]
        self.sender.on_chunk_sent(index, checksum(index), 1, self.now)
        state = self.receiver.state
        if self.receiver.committed_before or state is None or state.state in TERMINAL:
            return
        if state.on_data(key, index, checksum(index)) is Data.NEW:
            self.receiver.sink[index] = chunk_bytes(index)
            self.receiver.journal[index] = checksum(index)

    def finish(self) -> None:
        end = self.sender.end_header()
        if self.receiver.committed_before:
            self.sender.on_committed()
            return
        state = self.receiver.state
        assert state is not None
        verifying = [state.on_end(key, end) for key in self.streams]
        if any(verifying):
            state.verify(self.chunks)
            state.commit()
            self.receiver.registry.finished(state)
            self.sender.on_committed()

    def cut(self) -> bool:
        """The connection drops: True if the sender tries again."""
        self.now += 1.0
        self.receiver.registry.connection_lost(
            self.connection, self.now, ConnectionClosedError("cut"), said_goodbye=False
        )
        return self.sender.on_lost(ConnectionClosedError("cut"), self.now)


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_the_receiver_ends_with_the_senders_bytes_or_both_fail_alike(data: st.DataObject) -> None:
    chunks = data.draw(st.integers(1, 12), label="chunks")
    receiver = Receiver(reject=data.draw(st.sampled_from([False] * 5 + [True]), label="reject"))
    world = World(chunks, receiver)
    cancelled = False
    for _ in range(8):  # attempts
        stripes = data.draw(st.integers(1, 3), label="stripes")
        world.open_attempt(stripes)
        if world.resets:
            for _key, code, reason in world.resets:
                world.sender.on_reset(code, reason, world.now)
            break
        if data.draw(st.booleans(), label="repeat an old RESUME"):
            world.deliver_resume()
        todo = world.sender.deal(stripes)
        flat = [(s, i) for s, deal in enumerate(todo) for i in deal]
        cut_at = data.draw(st.integers(0, len(flat) + 1), label="cut after")
        for position, (stripe, index) in enumerate(flat):
            if position == cut_at:
                break
            if index not in world.sender.held:
                world.deliver_chunk(stripe, index)
        else:
            if cut_at <= len(flat):
                world.finish()
                break
        action = data.draw(st.sampled_from(["cut", "cut", "restart", "cancel", "stall"]))
        if action == "cancel":
            code, reason = world.sender.cancel("the application cancelled")
            state = receiver.state
            if state is not None:
                for key in list(state.current):
                    state.on_reset(key, code, reason, world.now)
            cancelled = True
            break
        if action == "restart":
            receiver.restart()
        if action == "stall":
            world.now += IDLE + 1  # nothing moved for longer than idle_timeout
        if not world.cut():
            break
    if world.sender.state not in TERMINAL:  # out of drawn attempts: time runs out
        world.now += IDLE + 1
        assert not world.cut()
    _check_outcome(world, cancelled)


def _check_outcome(world: World, cancelled: bool) -> None:
    sender, receiver = world.sender, world.receiver
    state = receiver.state
    if sender.state is TransferState.COMMITTED:
        assert receiver.committed_before or (state and state.state is TransferState.COMMITTED)
        assert set(receiver.journal) == set(range(world.chunks))
        assert all(receiver.sink[i] == chunk_bytes(i) for i in receiver.sink)
        return
    assert sender.state in TERMINAL, sender.state
    if cancelled:
        assert isinstance(sender.error, TransferCancelledError)
        assert state is None or state.state in (TransferState.CANCELLED, TransferState.COMMITTED)
        if state is not None and state.state is TransferState.CANCELLED:
            assert isinstance(state.error, TransferCancelledError)
    elif receiver.reject:
        assert isinstance(sender.error, TransferRejectedError)
        assert state is not None
        assert state.state is TransferState.REJECTED
    else:
        # The network gave out: the sender says so; the receiver, waiting, gives up alike.
        assert isinstance(sender.error, TransportError)
        if state is not None and state.state not in TERMINAL:
            deadline = state.deadline(IDLE)
            assert deadline is not None
            state.give_up(IDLE)
            assert isinstance(state.error, IdleTimeoutError)


# --- the table ---------------------------------------------------------------------------------


@pytest.mark.parametrize("role", list(Role))
@pytest.mark.parametrize("state", sorted(TERMINAL, key=lambda s: s.value))
@pytest.mark.parametrize("event", list(TransferInput))
def test_an_ended_transfer_ignores_the_network_and_refuses_the_application(
    role: Role, state: TransferState, event: TransferInput
) -> None:
    from transport.transfer.states import REMOTE_INPUTS

    if (role, event) in REMOTE_INPUTS:
        assert next_state(role, state, event) is None
    else:
        with pytest.raises(StreamStateError, match="cannot take"):
            next_state(role, state, event)


def test_a_peer_input_the_state_does_not_allow_is_a_protocol_error() -> None:
    with pytest.raises(UnexpectedFrameError, match="COMMIT"):
        next_state(Role.SENDER, TransferState.SENDING, TransferInput.COMMIT)


def test_a_sender_that_leaves_out_the_transfer_digest_fails_the_receiver() -> None:
    registry = IncomingRegistry()
    header = {"kind": "state_dict", "transfer": "t", "manifest": {}, "attempt": 0}
    opened = registry.on_open(("c", 1), header, 0.0)
    assert opened.transfer is not None
    state = opened.transfer
    state.take()
    state.on_data(("c", 1), 0, 7)
    assert state.on_end(("c", 1), {})
    with pytest.raises(Exception, match="no transfer_digest"):
        state.verify(1)


def test_an_older_attempt_is_stale_and_a_reused_id_for_other_content_is_refused() -> None:
    registry = IncomingRegistry()
    base = {"kind": "state_dict", "transfer": "t", "manifest": {"a": 1}}
    registry.on_open(("c", 1), {**base, "attempt": 2}, 0.0)
    stale = registry.on_open(("d", 1), {**base, "attempt": 1}, 0.0)
    assert (stale.action, stale.code) == ("refused", headers.STALE)
    other = registry.on_open(("d", 3), {**base, "attempt": 3, "manifest": {"b": 2}}, 0.0)
    assert (other.action, other.code) == ("refused", headers.MISMATCH)


def test_finished_striped_transfers_leave_no_routes_behind() -> None:
    registry = IncomingRegistry()
    for n in range(5):
        header = {"kind": "state_dict", "transfer": f"t{n}", "manifest": {}, "stripes": 3}
        keys = [(link, n) for link in ("a", "b", "c")]
        opened = [registry.on_open(key, header, 0.0) for key in keys]
        state = opened[0].transfer
        assert state is not None
        state.take()
        assert [state.on_end(key, {"transfer_digest": "x"}) for key in keys][-1]
        state.commit()
        registry.finished(state)
    assert len(registry) == 0
    assert registry.transfers() == []
