"""The two sfm settings the transfer layer relies on: credit only when the application takes a
stream (`stream_credit` + `grant_stream`), and the final ACK as the application's verdict
(`ack_on_end=False` + `complete_stream`). Plus the reset accounting that a cancel exercises."""

from __future__ import annotations

import pytest

from tests.sfm.sfm_helpers import pump, raw, raw_hello
from transport.exceptions import ConfigError, FlowControlError, StreamStateError
from transport.sfm import (
    Connection,
    ConnectionConfig,
    DataReceived,
    StreamCompleted,
    StreamEnded,
    StreamOpened,
)
from transport.wire import FrameType

KIB = 1024


def pair(**receiver: object) -> tuple[Connection, Connection]:
    sender = Connection(ConnectionConfig(is_initiator=True))
    taker = Connection(ConnectionConfig(is_initiator=False, stream_window=64 * KIB, **receiver))
    for conn in (sender, taker):
        conn.send_hello({"node": "x"})
    pump(sender, taker)
    pump(taker, sender)
    sender.events_received()
    taker.events_received()
    return sender, taker


def test_a_stream_has_no_credit_until_the_receiver_grants_it() -> None:
    sender, taker = pair(stream_credit=0)
    sid = sender.open_stream({"k": 1})
    assert sender.send_window(sid) == 0
    pump(sender, taker)
    assert isinstance(taker.events_received()[0], StreamOpened)
    taker.grant_stream(sid)
    pump(taker, sender)
    assert sender.send_window(sid) == 64 * KIB
    taker.grant_stream(sid)  # granting twice gives nothing more
    pump(taker, sender)
    assert sender.send_window(sid) == 64 * KIB


def test_data_before_the_grant_is_a_flow_control_breach() -> None:
    _, taker = pair(stream_credit=0)
    taker.receive_data(raw(FrameType.OPEN, stream_id=1, header={}))
    with pytest.raises(FlowControlError):
        taker.receive_data(raw(FrameType.DATA, stream_id=1, offset=0, payload=b"x"))


def test_stream_credit_must_fit_the_window() -> None:
    with pytest.raises(ConfigError, match="stream_credit"):
        ConnectionConfig(is_initiator=True, stream_window=10, stream_credit=11)
    conn = Connection(ConnectionConfig(is_initiator=True))
    conn.send_hello({})
    with pytest.raises(Exception, match="stream_credit"):
        conn.receive_data(raw_hello(stream_credit=(1 << 20) + 1))


def test_the_final_ack_waits_for_the_receivers_verdict() -> None:
    sender, taker = pair(ack_on_end=False)
    sid = sender.open_stream({})
    sender.send_data(sid, 0, [b"abc"])
    sender.end_stream(sid)
    pump(sender, taker)
    events = taker.events_received()
    assert isinstance(events[-1], StreamEnded)
    pump(taker, sender)
    assert not [e for e in sender.events_received() if isinstance(e, StreamCompleted)]
    taker.consumed(sid, 3)
    taker.complete_stream(sid)
    pump(taker, sender)
    assert StreamCompleted(sid, 1) in sender.events_received()
    with pytest.raises(StreamStateError):
        taker.complete_stream(sid)  # a verdict is given once


def test_a_reset_after_partial_consumption_gives_back_only_what_was_held() -> None:
    """A cancel: the receiver consumed part of the stream (credit owed but not yet granted),
    then the sender resets. The connection window must not count the consumed part twice."""
    sender, taker = pair()
    sid = sender.open_stream({})
    for index in range(3):
        sender.send_data(sid, index, [bytes(KIB)])
    pump(sender, taker)
    data = [e for e in taker.events_received() if isinstance(e, DataReceived)]
    taker.consumed(sid, KIB)  # one consumed, below the grant threshold: owed, not granted
    sender.reset_stream(sid, "cancelled", "the application cancelled")
    pump(sender, taker)  # raised LocalError "consumed N bytes but only M unconsumed" before
    for event in data[1:]:
        taker.consumed(sid, len(event.payload))  # late consumes of a reset stream: no-ops
    second = sender.open_stream({})
    sender.send_data(second, 0, [bytes(KIB)])
    pump(sender, taker)
    assert any(isinstance(e, DataReceived) for e in taker.events_received())
