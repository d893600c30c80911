"""Two Connections back to back: streams, flow control, digests, resets, requests, pings, goaway."""

from __future__ import annotations

import random

import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from sfm_helpers import (
    acceptor_after_hello,
    connected_pair,
    of_type,
    payload_parts,
    pump,
    raw,
    sent_frames,
    settle,
)

from transport.exceptions import (
    DigestMismatchError,
    FlowControlError,
    IntegrityError,
    LocalError,
    ProtocolError,
    StreamStateError,
)
from transport.sfm import (
    Connection,
    ConnectionConfig,
    CreditGranted,
    DataReceived,
    GoAwayReceived,
    HelloReceived,
    PongReceived,
    RequestReceived,
    ResponseReceived,
    ResumeReceived,
    StreamCompleted,
    StreamEnded,
    StreamFailed,
    StreamOpened,
    StreamReset,
    StreamState,
)
from transport.wire import FrameFlags, FrameType


def tensor_chunks(seed: int, count: int) -> list[bytes]:
    """Real safetensors blobs of real tensors, a few KiB each."""
    gen = torch.Generator().manual_seed(seed)
    return [
        save_safetensors({f"layer{i}.weight": torch.randn(16, 32, generator=gen)})
        for i in range(count)
    ]


def test_hello_exchange_announces_settings() -> None:
    a = Connection(ConnectionConfig(is_initiator=True, stream_window=5000))
    b = Connection(ConnectionConfig(is_initiator=False))
    a.send_hello({"node": "site-a", "token": "t"})
    b.send_hello({"node": "server"})
    settle(a, b)
    hello = of_type(b.events_received(), HelloReceived)[0]
    assert hello.header["node"] == "site-a"
    assert hello.header["protocol"] == 1
    assert b.peer_settings is not None
    assert b.peer_settings.stream_window == 5000
    assert of_type(a.events_received(), HelloReceived)[0].header["node"] == "server"


def test_stream_round_trip_with_real_safetensors_chunks() -> None:
    rng = random.Random(1)
    a, b = connected_pair(rng)
    chunks = tensor_chunks(0, 5)
    sid = a.open_stream({"kind": "state_dict", "manifest": {"tensors": 5}})
    for index, chunk in enumerate(chunks):
        a.send_data(sid, index, payload_parts(chunk, 3), header={"n": index})
    a.end_stream(sid, {"transfer": "t1"})
    pump(a, b, rng)
    events = b.events_received()
    assert of_type(events, StreamOpened) == [
        StreamOpened(sid, {"kind": "state_dict", "manifest": {"tensors": 5}})
    ]
    received = of_type(events, DataReceived)
    assert [e.index for e in received] == list(range(5))
    for event, chunk in zip(received, chunks, strict=True):
        assert bytes(event.payload) == chunk
        assert event.header == {"n": event.index}
        restored = load_safetensors(bytes(event.payload))
        torch.testing.assert_close(restored, load_safetensors(chunk))
        b.consumed(sid, len(event.payload))
    ended = of_type(events, StreamEnded)[0]
    assert ended.header["transfer"] == "t1"
    assert ended.header["chunks"] == 5
    assert ended.header["bytes"] == sum(map(len, chunks))
    assert b.stream_state(sid) is StreamState.CLOSED
    settle(a, b, rng)
    assert of_type(a.events_received(), StreamCompleted) == [StreamCompleted(sid, 5)]
    assert a.stream_state(sid) is StreamState.CLOSED


def test_many_concurrent_streams_both_directions() -> None:
    rng = random.Random(7)
    a, b = connected_pair(rng, max_streams=16)
    plan: dict[tuple[str, int], list[bytes]] = {}
    for name, conn in (("a", a), ("b", b)):
        for k in range(12):
            sid = conn.open_stream({"kind": "blob", "k": k})
            plan[(name, sid)] = [rng.randbytes(rng.randint(0, 3000)) for _ in range(4)]
    turns = [key for key, blobs in plan.items() for _ in blobs]
    rng.shuffle(turns)  # streams interleave at random; each one's indices increase (the rule)
    sent: dict[tuple[str, int], int] = dict.fromkeys(plan, 0)
    sends = []
    for key in turns:
        sends.append((*key, sent[key]))
        sent[key] += 1
    got: dict[tuple[str, int], dict[int, bytes]] = {key: {} for key in plan}
    ended: set[tuple[str, int]] = set()
    completed: list[int] = []
    for name, sid, index in sends:
        sender = a if name == "a" else b
        sender.send_data(sid, index, [plan[(name, sid)][index]])
        if rng.random() < 0.3:
            settle(a, b, rng)
    for name, sid in plan:
        (a if name == "a" else b).end_stream(sid)
    settle(a, b, rng)
    for receiver, sender_name in ((b, "a"), (a, "b")):
        for event in receiver.events_received():
            if isinstance(event, DataReceived):
                got[(sender_name, event.stream_id)][event.index] = bytes(event.payload)
                receiver.consumed(event.stream_id, len(event.payload))
            elif isinstance(event, StreamEnded):
                ended.add((sender_name, event.stream_id))
            elif isinstance(event, StreamCompleted):
                completed.append(event.stream_id)
    assert ended == set(plan)
    for key, blobs in plan.items():
        assert [got[key][i] for i in range(len(blobs))] == blobs
    assert sorted(completed) == sorted(sid for _, sid in plan)


def test_sender_cannot_exceed_stream_window_and_credit_returns_only_on_consume() -> None:
    a, b = connected_pair(None, stream_window=1000, connection_window=10_000, min_data_credit=0)
    sid = a.open_stream({"kind": "blob"})
    assert a.send_window(sid) == 1000
    a.send_data(sid, 0, [b"x" * 600])
    assert a.send_window(sid) == 400
    with pytest.raises(StreamStateError, match=r"500 bytes exceeds the credit.*400 stream"):
        a.send_data(sid, 1, [b"y" * 500])
    pump(a, b)
    # received but not consumed: no credit goes back
    assert pump(b, a) == 0
    assert a.send_window(sid) == 400
    b.consumed(sid, 100)  # under a quarter of the window and data still held: batched
    assert pump(b, a) == 0
    b.consumed(sid, 500)
    pump(b, a)
    assert CreditGranted(sid) in a.events_received()
    assert a.send_window(sid) == 1000
    a.send_data(sid, 1, [b"y" * 1000])


def test_connection_window_limits_all_streams_together() -> None:
    a, b = connected_pair(None, stream_window=1000, connection_window=1500)
    s1, s2 = a.open_stream({}), a.open_stream({})
    a.send_data(s1, 0, [b"a" * 1000])
    assert a.send_window(s2) == 500
    with pytest.raises(StreamStateError, match="500 connection"):
        a.send_data(s2, 0, [b"b" * 501])
    a.send_data(s2, 0, [b"b" * 500])
    assert a.send_window(s1) == 0
    pump(a, b)
    b.consumed(s1, 1000)
    pump(b, a)
    events = a.events_received()
    assert CreditGranted(0) in events
    assert CreditGranted(s1) in events
    assert a.send_window(s1) == 1000


def test_tampered_digest_in_end_fails_the_stream_and_resets_it() -> None:
    a, b = connected_pair()
    sid = a.open_stream({"kind": "blob"})
    a.send_data(sid, 0, [b"chunk zero"])
    a.send_data(sid, 1, [b"chunk one"])
    frames = sent_frames(a)  # OPEN and two DATA, delivered as they are
    for frame in frames:
        b.receive_data(
            raw(
                frame.type,
                stream_id=frame.stream_id,
                offset=frame.offset,
                header=frame.header,
                payload=frame.payload,
            )
        )
    forged = {"chunks": 2, "bytes": 19, "digest": "0" * 32}
    b.receive_data(raw(FrameType.END, stream_id=sid, header=forged))
    failed = of_type(b.events_received(), StreamFailed)
    assert len(failed) == 1
    assert isinstance(failed[0].error, DigestMismatchError)
    assert "0" * 32 in str(failed[0].error)
    assert b.stream_state(sid) is StreamState.RESET
    pump(b, a)
    reset = of_type(a.events_received(), StreamReset)[0]
    assert (reset.stream_id, reset.code) == (sid, "DigestMismatchError")


def test_dropped_chunk_is_a_count_mismatch() -> None:
    a, b = connected_pair()
    sid = a.open_stream({"kind": "blob"})
    a.send_data(sid, 0, [b"kept"])
    pump(a, b)
    a.send_data(sid, 1, [b"lost on the way"])
    a.data_to_send()  # the frame never arrives
    a.send_data(sid, 2, [b"kept too"])
    a.end_stream(sid)
    pump(a, b)
    failed = of_type(b.events_received(), StreamFailed)[0]
    assert type(failed.error) is IntegrityError
    assert "3 chunks" in str(failed.error)
    assert "2 chunks" in str(failed.error)


def test_resume_travels_from_receiver_to_sender_and_late_ones_are_ignored() -> None:
    a, b = connected_pair()
    sid = a.open_stream({"kind": "blob", "attempt": 1})
    pump(a, b)
    b.send_resume(sid, {"held": [[0, 5]]})
    pump(b, a)
    assert of_type(a.events_received(), ResumeReceived) == [ResumeReceived(sid, {"held": [[0, 5]]})]
    a.send_data(sid, 5, [b"the first chunk the receiver lacks"])
    a.end_stream(sid)
    b.send_resume(sid, {"held": []})  # crosses the END: the sender drops it without an event
    pump(a, b)
    pump(b, a)
    assert of_type(a.events_received(), ResumeReceived) == []
    assert of_type(b.events_received(), StreamEnded)
    with pytest.raises(StreamStateError, match="only receives its data"):
        a.send_resume(sid, {"held": []})  # only the receiver of a stream may resume it


def test_reset_by_sender_and_by_receiver() -> None:
    a, b = connected_pair(None, stream_window=1000)
    s1, s2 = a.open_stream({}), a.open_stream({})
    a.send_data(s1, 0, [b"1" * 300])
    a.send_data(s2, 0, [b"2" * 300])
    a.reset_stream(s1, "cancelled", "user gave up")
    pump(a, b)
    events = b.events_received()
    assert StreamReset(s1, "cancelled", "user gave up") in events
    b.consumed(s1, 300)  # data of a reset stream: a no-op, its credit went back at the reset
    b.reset_stream(s2, "no_space", "disk full")
    a.send_data(s2, 1, [b"in flight"])  # crosses the RESET: b drops it silently
    settle(a, b)
    assert StreamReset(s2, "no_space", "disk full") in a.events_received()
    assert of_type(b.events_received(), DataReceived) == []
    with pytest.raises(StreamStateError, match="RESET"):
        a.send_data(s2, 2, [b"late"])
    assert a.send_window(s2) >= 0
    # every byte b received was given back on the connection window
    s3 = a.open_stream({})
    assert a.send_window(s3) == 1000


def test_request_response_and_error_response() -> None:
    a, b = connected_pair()
    rid = a.send_request({"op": "status"}, b"body")
    rid2 = a.send_request({"op": "explode"})
    pump(a, b)
    requests = of_type(b.events_received(), RequestReceived)
    assert [(r.request_id, r.header["op"], bytes(r.body)) for r in requests] == [
        (rid, "status", b"body"),
        (rid2, "explode", b""),
    ]
    b.send_response(rid, {"ok": True}, b"answer")
    b.send_response(rid2, {"reason": "boom"}, error=True)
    with pytest.raises(StreamStateError, match=f"no unanswered request {rid}"):
        b.send_response(rid, {})
    pump(b, a)
    responses = of_type(a.events_received(), ResponseReceived)
    assert [(r.request_id, r.error) for r in responses] == [(rid, False), (rid2, True)]
    assert bytes(responses[0].body) == b"answer"
    assert rid % 2 == 1
    assert b.send_request({}) % 2 == 0


def test_ping_is_answered_with_pong() -> None:
    a, b = connected_pair()
    nonce = a.send_ping()
    settle(a, b)
    assert a.events_received() == [PongReceived(nonce)]
    assert b.events_received() == []


def test_goaway_stops_new_streams_but_lets_existing_ones_finish() -> None:
    a, b = connected_pair()
    sid = a.open_stream({})
    a.close("shutdown", "maintenance")
    assert a.closed
    with pytest.raises(StreamStateError, match="this side sent GOAWAY"):
        a.open_stream({})
    a.send_data(sid, 0, [b"still allowed"])
    a.end_stream(sid)
    pump(a, b)
    events = b.events_received()
    assert GoAwayReceived("shutdown", "maintenance") in events
    assert len(of_type(events, StreamEnded)) == 1
    with pytest.raises(StreamStateError, match="the peer sent GOAWAY"):
        b.open_stream({})
    with pytest.raises(StreamStateError, match="the peer sent GOAWAY"):
        b.send_request({})


def test_peer_stream_racing_our_goaway_is_refused() -> None:
    a, b = connected_pair()
    b.close()
    sid = a.open_stream({})  # a has not seen b's GOAWAY yet
    rid = a.send_request({"op": "x"})
    pump(a, b)
    assert b.events_received() == []
    pump(b, a)
    events = a.events_received()
    assert StreamReset(sid, "refused", "this side sent GOAWAY: no new streams") in events
    assert of_type(events, ResponseReceived)[0].request_id == rid
    assert of_type(events, ResponseReceived)[0].error


def test_local_misuse_is_a_clear_local_error() -> None:
    conn = Connection(ConnectionConfig(is_initiator=True))
    with pytest.raises(StreamStateError, match="send_hello"):
        conn.open_stream({})
    conn.send_hello({})
    with pytest.raises(StreamStateError, match="HELLO was already sent"):
        conn.send_hello({})
    with pytest.raises(StreamStateError, match="stream 9 is not open"):
        conn.send_data(9, 0, [b""])
    sid = conn.open_stream({})
    assert conn.send_window(sid) == 0  # no credit before the peer's HELLO
    conn.send_data(sid, 0, [b""])
    increase = "chunk index 0 on stream 1 after index 0: a stream.s indices must increase"
    with pytest.raises(StreamStateError, match=increase):
        conn.send_data(sid, 0, [b""])
    with pytest.raises(LocalError, match="outside"):
        conn.send_data(sid, -1, [b""])
    with pytest.raises(LocalError, match=r"\['digest'\] are reserved"):
        conn.end_stream(sid, {"digest": "x"})
    conn.end_stream(sid)
    with pytest.raises(StreamStateError, match=r"SEND_DATA on stream 1 .*HALF_CLOSED_LOCAL"):
        conn.send_data(sid, 1, [b""])
    with pytest.raises(StreamStateError, match="never opened"):
        conn.consumed(2, 10)


def test_consuming_more_than_received_is_refused() -> None:
    a, b = connected_pair(min_data_credit=0)
    sid = a.open_stream({})
    a.send_data(sid, 0, [b"12345"])
    pump(a, b)
    with pytest.raises(LocalError, match="consumed 6 bytes but only 5"):
        b.consumed(sid, 6)


def test_compressed_flag_and_header_reach_the_receiver() -> None:
    a, b = connected_pair()
    sid = a.open_stream({})
    a.send_data(sid, 3, [b"zz"], header={"codec": "zstd"}, flags=FrameFlags.COMPRESSED)
    pump(a, b)
    data = of_type(b.events_received(), DataReceived)[0]
    assert (data.index, data.flags, data.header) == (3, FrameFlags.COMPRESSED, {"codec": "zstd"})


def test_replies_before_our_hello_wait_for_it() -> None:
    b = Connection(ConnectionConfig(is_initiator=False))
    a = Connection(ConnectionConfig(is_initiator=True))
    a.send_hello({})
    a.send_ping()
    pump(a, b)  # b answers the PING but has not said HELLO yet
    assert b.data_to_send() == []
    b.send_hello({})
    assert [f.type for f in sent_frames(b)] == [FrameType.HELLO, FrameType.PONG]


def test_zero_copy_receive_into_allocated_buffers() -> None:
    allocated: list[int] = []

    def allocate(size: int) -> bytearray:
        allocated.append(size)
        return bytearray(size)

    a = Connection(ConnectionConfig(is_initiator=True))
    b = Connection(ConnectionConfig(is_initiator=False), allocate=allocate)
    a.send_hello({})
    b.send_hello({})
    settle(a, b)
    sid = a.open_stream({})
    big = random.Random(3).randbytes(300_000)
    a.send_data(sid, 0, payload_parts(big, 4))
    data = b"".join(bytes(p) for p in a.data_to_send())
    pos = 0
    while pos < len(data):
        buffer = b.get_buffer(65536)
        n = min(len(buffer), len(data) - pos)
        buffer[:n] = data[pos : pos + n]
        b.buffer_updated(n)
        pos += n
    event = of_type(b.events_received(), DataReceived)[0]
    assert 300_000 in allocated
    assert bytes(event.payload) == big


def test_chunk_larger_than_the_whole_window_says_so() -> None:
    a, _ = connected_pair(None, stream_window=1000)
    sid = a.open_stream({})
    with pytest.raises(StreamStateError, match="never fit the peer's 1000-byte stream window"):
        a.send_data(sid, 0, [b"x" * 1001])


def test_tiny_and_empty_frames_take_the_receivers_minimum_credit() -> None:
    # Each frame costs the receiver an event whatever its size: a flood of empty DATA frames
    # must use up the window like real data, and the credit comes back frame by frame.
    a, b = connected_pair(None, stream_window=1024, connection_window=1 << 20, min_data_credit=256)
    sid = a.open_stream({"kind": "blob"})
    for index in range(4):
        assert a.can_send(sid, 0)
        a.send_data(sid, index, [b""])
    assert a.send_window(sid) == 0
    assert not a.can_send(sid, 0)
    with pytest.raises(StreamStateError, match="exceeds the credit"):
        a.send_data(sid, 4, [b""])
    pump(a, b)
    for event in of_type(b.events_received(), DataReceived):
        b.consumed(sid, len(event.payload))
    pump(b, a)
    assert a.send_window(sid) == 1024


def test_a_peer_ignoring_the_minimum_credit_is_refused() -> None:
    conn = acceptor_after_hello(stream_window=1024, min_data_credit=256)
    frames = [raw(FrameType.OPEN, stream_id=1)]
    frames += [raw(FrameType.DATA, stream_id=1, offset=index) for index in range(5)]
    with pytest.raises(FlowControlError, match="256 bytes of DATA with only 0 bytes of credit"):
        conn.receive_data(b"".join(frames))


def test_pings_whose_pongs_are_never_read_are_refused() -> None:
    conn = acceptor_after_hello()
    pings = b"".join(raw(FrameType.PING, offset=nonce) for nonce in range(1, 65))
    conn.receive_data(pings)  # 64 answers queued, nothing written: still tolerated
    conn.data_to_send()  # written: the count starts again
    conn.receive_data(pings)
    with pytest.raises(ProtocolError, match="64 PONGs wait to be sent"):
        conn.receive_data(raw(FrameType.PING, offset=65))
