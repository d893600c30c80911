"""One test per protocol violation: raw frames from a misbehaving peer, fed to a real Connection.

Each must raise the right ProtocolError subclass with a message naming what was wrong, after
queueing a GOAWAY whose code is that class's name.
"""

from __future__ import annotations

from typing import Any

import pytest
from sfm_helpers import acceptor_after_hello, goaway_code, raw, raw_hello

from transport.exceptions import (
    BadMagicError,
    FlowControlError,
    ProtocolError,
    UnexpectedFrameError,
    UnsupportedVersionError,
)
from transport.sfm import Connection, ConnectionConfig, StreamDigest, StreamOpened
from transport.wire import FrameType

T = FrameType
EMPTY_END = {"chunks": 0, "bytes": 0, "digest": StreamDigest().hexdigest()}

# (id, acceptor config, raw frames after both HELLOs, error class, message pattern)
VIOLATIONS: list[tuple[str, dict[str, Any], list[bytes], type[ProtocolError], str]] = [
    (
        "data_unknown_stream",
        {},
        [raw(T.DATA, stream_id=1, payload=b"x")],
        UnexpectedFrameError,
        "DATA for stream 1, which was never opened",
    ),
    (
        "end_unknown_stream",
        {},
        [raw(T.END, stream_id=5, header=EMPTY_END)],
        UnexpectedFrameError,
        "END for stream 5, which was never opened",
    ),
    (
        "credit_unknown_stream",
        {},
        [raw(T.CREDIT, stream_id=2, offset=10)],
        UnexpectedFrameError,
        "CREDIT for stream 2, which was never opened",
    ),
    (
        "data_on_stream_zero",
        {},
        [raw(T.DATA, stream_id=0, payload=b"x")],
        UnexpectedFrameError,
        "stream 0, which was never opened",
    ),
    (
        "open_duplicate_id",
        {},
        [raw(T.OPEN, stream_id=3), raw(T.OPEN, stream_id=3)],
        UnexpectedFrameError,
        "stream id 3, not above the peer's last id 3",
    ),
    (
        "open_lower_id",
        {},
        [raw(T.OPEN, stream_id=5), raw(T.OPEN, stream_id=3)],
        UnexpectedFrameError,
        "stream id 3, not above the peer's last id 5",
    ),
    (
        "open_wrong_parity",
        {},
        [raw(T.OPEN, stream_id=2)],
        UnexpectedFrameError,
        "OPEN with stream id 2: the peer must use odd ids",
    ),
    ("open_id_zero", {}, [raw(T.OPEN, stream_id=0)], UnexpectedFrameError, "OPEN with stream id 0"),
    (
        "too_many_streams",
        {"max_streams": 2},
        [raw(T.OPEN, stream_id=1), raw(T.OPEN, stream_id=3), raw(T.OPEN, stream_id=5)],
        UnexpectedFrameError,
        "stream 5 while 2 streams are open: the limit is 2",
    ),
    (
        "data_beyond_stream_credit",
        {"stream_window": 100, "min_data_credit": 0},
        [raw(T.OPEN, stream_id=1), raw(T.DATA, stream_id=1, payload=b"x" * 101)],
        FlowControlError,
        "101 bytes of DATA with only 100 bytes of credit on the stream window",
    ),
    (
        "data_beyond_connection_credit",
        {"stream_window": 100, "connection_window": 150, "min_data_credit": 0},
        [
            raw(T.OPEN, stream_id=1),
            raw(T.OPEN, stream_id=3),
            raw(T.DATA, stream_id=1, payload=b"x" * 100),
            raw(T.DATA, stream_id=3, payload=b"y" * 60),
        ],
        FlowControlError,
        "60 bytes of DATA with only 50 bytes of credit on the connection window",
    ),
    (
        "duplicate_data_index",
        {},
        [
            raw(T.OPEN, stream_id=1),
            raw(T.DATA, stream_id=1, offset=4, payload=b"a"),
            raw(T.DATA, stream_id=1, offset=4, payload=b"b"),
        ],
        UnexpectedFrameError,
        "DATA index 4 on stream 1 after index 4: a stream.s indices must increase",
    ),
    (
        "data_after_end",
        {},
        [
            raw(T.OPEN, stream_id=1),
            raw(T.END, stream_id=1, header=EMPTY_END),
            raw(T.DATA, stream_id=1, payload=b"late"),
        ],
        UnexpectedFrameError,
        "RECV_DATA on stream 1 .*state CLOSED",
    ),
    (
        "end_twice",
        {},
        [
            raw(T.OPEN, stream_id=1),
            raw(T.END, stream_id=1, header=EMPTY_END),
            raw(T.END, stream_id=1, header=EMPTY_END),
        ],
        UnexpectedFrameError,
        "RECV_END on stream 1",
    ),
    (
        "credit_on_peer_stream",
        {},
        [raw(T.OPEN, stream_id=1), raw(T.CREDIT, stream_id=1, offset=5)],
        UnexpectedFrameError,
        "RECV_CREDIT on stream 1 \\(receiver, state OPEN\\)",
    ),
    (
        "ack_on_peer_stream",
        {},
        [raw(T.OPEN, stream_id=1), raw(T.ACK, stream_id=1, offset=0)],
        UnexpectedFrameError,
        "RECV_ACK on stream 1",
    ),
    (
        "end_without_counts",
        {},
        [raw(T.OPEN, stream_id=1), raw(T.END, stream_id=1, header={"chunks": "2"})],
        UnexpectedFrameError,
        "END on stream 1 needs integer 'chunks'",
    ),
    (
        "response_to_unknown_request",
        {},
        [raw(T.RESPONSE, stream_id=8)],
        UnexpectedFrameError,
        "RESPONSE to request 8, which is not pending",
    ),
    (
        "request_wrong_parity",
        {},
        [raw(T.REQUEST, stream_id=4)],
        UnexpectedFrameError,
        "REQUEST with request id 4",
    ),
    (
        "request_duplicate_id",
        {},
        [raw(T.REQUEST, stream_id=7), raw(T.REQUEST, stream_id=7)],
        UnexpectedFrameError,
        "request id 7, not above",
    ),
    (
        "too_many_requests",
        {"max_pending_requests": 1},
        [raw(T.REQUEST, stream_id=1), raw(T.REQUEST, stream_id=3)],
        UnexpectedFrameError,
        "REQUEST 3 while 1 requests are unanswered: the limit is 1",
    ),
    (
        "connection_credit_overflow",
        {},
        [raw(T.CREDIT, stream_id=0, offset=2**62)],
        FlowControlError,
        "connection window .* would leave 0..4611686018427387904",
    ),
    (
        "open_after_goaway",
        {},
        [raw(T.GOAWAY, header={"code": "normal", "reason": ""}), raw(T.OPEN, stream_id=1)],
        UnexpectedFrameError,
        "OPEN of stream 1 after the peer's GOAWAY",
    ),
    (
        "request_after_goaway",
        {},
        [raw(T.GOAWAY, header={"code": "normal", "reason": ""}), raw(T.REQUEST, stream_id=1)],
        UnexpectedFrameError,
        "REQUEST 1 after the peer's GOAWAY",
    ),
    ("second_hello", {}, [raw_hello()], UnexpectedFrameError, "second HELLO"),
    (
        "resume_for_unknown_stream",
        {},
        [raw(T.RESUME, stream_id=1)],
        UnexpectedFrameError,
        "RESUME for stream 1, which was never opened",
    ),
    (
        "pong_without_ping",
        {},
        [raw(T.PONG, offset=99)],
        UnexpectedFrameError,
        "PONG with nonce 99, which no PING carried",
    ),
    (
        "garbage_bytes",
        {},
        [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"\0" * 40],
        BadMagicError,
        "magic",
    ),
]


@pytest.mark.parametrize(
    ("config", "frames", "error", "match"),
    [pytest.param(*case[1:], id=case[0]) for case in VIOLATIONS],
)
def test_peer_violation_raises_and_sends_goaway(
    config: dict[str, Any], frames: list[bytes], error: type[ProtocolError], match: str
) -> None:
    conn = acceptor_after_hello(**config)
    with pytest.raises(error, match=match) as caught:
        conn.receive_data(b"".join(frames))
    assert type(caught.value) is error
    goaway = goaway_code(conn)
    assert goaway["code"] == error.__name__
    assert goaway["reason"] == str(caught.value)
    assert conn.closed
    with pytest.raises(ProtocolError):  # the connection stays failed
        conn.receive_data(raw(T.PING, offset=1))


def test_stream_credit_overflow() -> None:
    conn = acceptor_after_hello()
    sid = conn.open_stream({})
    conn.data_to_send()
    with pytest.raises(FlowControlError, match=f"{2**62} bytes on the stream window"):
        conn.receive_data(raw(T.CREDIT, stream_id=sid, offset=2**62))


def test_ack_of_chunks_never_sent() -> None:
    conn = acceptor_after_hello()
    sid = conn.open_stream({})
    conn.send_data(sid, 0, [b"one"])
    conn.end_stream(sid)
    with pytest.raises(UnexpectedFrameError, match=f"ACK of 2 chunks on stream {sid}; 1 were"):
        conn.receive_data(raw(T.ACK, stream_id=sid, offset=2))


def test_events_before_the_violation_stay_available() -> None:
    conn = acceptor_after_hello()
    frames = raw(T.OPEN, stream_id=1, header={"kind": "x"}) + raw(T.OPEN, stream_id=1)
    with pytest.raises(UnexpectedFrameError):
        conn.receive_data(frames)
    assert conn.events_received() == [StreamOpened(1, {"kind": "x"})]


@pytest.mark.parametrize(
    ("first", "match"),
    [
        pytest.param(
            raw(T.OPEN, stream_id=1), "OPEN \\(stream 1\\) before the peer's HELLO", id="open"
        ),
        pytest.param(
            raw(T.PING, offset=3), "PING \\(stream 0\\) before the peer's HELLO", id="ping"
        ),
    ],
)
def test_frames_before_hello_are_refused(first: bytes, match: str) -> None:
    conn = Connection(ConnectionConfig(is_initiator=False))
    with pytest.raises(UnexpectedFrameError, match=match):
        conn.receive_data(first)
    assert goaway_code(conn)["code"] == "UnexpectedFrameError"


def test_hello_of_another_protocol_version() -> None:
    conn = Connection(ConnectionConfig(is_initiator=False))
    hello = {"protocol": 2, "sfm": {}}
    with pytest.raises(UnsupportedVersionError, match="peer speaks sfm protocol 2"):
        conn.receive_data(raw(T.HELLO, header=hello))


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        pytest.param(None, "lacks the 'sfm' settings", id="missing"),
        pytest.param({"stream_window": -1}, "sfm.stream_window=-1 is outside", id="negative"),
        pytest.param({"max_streams": "many"}, "sfm.max_streams='many'", id="not_int"),
    ],
)
def test_hello_with_bad_settings(settings: dict[str, Any] | None, match: str) -> None:
    conn = Connection(ConnectionConfig(is_initiator=False))
    frame = raw(T.HELLO, header={"protocol": 1}) if settings is None else raw_hello(**settings)
    with pytest.raises(UnexpectedFrameError, match=match):
        conn.receive_data(frame)


def test_truncated_stream_at_eof() -> None:
    conn = acceptor_after_hello()
    frame = raw(T.OPEN, stream_id=1)
    conn.receive_data(frame[:-3])
    with pytest.raises(ProtocolError, match="ended after"):
        conn.receive_eof()
    assert goaway_code(conn)["code"] == "TruncatedFrameError"
