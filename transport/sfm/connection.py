"""The Streamable Framed Message protocol, sans-I/O: bytes and verbs in, events and bytes out.

    conn = Connection(ConnectionConfig(is_initiator=True))
    conn.send_hello({"node": "site-1"})
    sid = conn.open_stream({"kind": "state_dict", "manifest": ...})
    conn.send_data(sid, 0, [chunk])           # while conn.send_window(sid) allows
    conn.end_stream(sid)
    sock.sendmsg(conn.data_to_send())         # scatter-gather: chunks are not copied
    conn.receive_data(sock.recv(...))         # or get_buffer()/buffer_updated() to read in place
    for event in conn.events_received(): ...

Protocol rules beyond the per-stream table (states.py):

- Each side's first frame is HELLO (a GOAWAY refusing the connection may come instead); it carries
  the initial credit and concurrency limits (config.py). Local verbs other than `send_hello` and
  `close` need our HELLO sent first. The peer's first frame is parsed under HELLO_LIMITS (16 KiB
  of header, no payload); with `hold_hello` nothing after it is parsed until `accept_peer()`.
- DATA indices strictly increase within a stream (a stream's digest is computed as they come,
  in constant memory); a duplicate or reordered index is a protocol error.
- Stream and request ids are u32, odd from the initiator, even from the acceptor, and each side's
  ids strictly increase, so a reused id is detected even after the stream was forgotten.
- A peer's protocol breach raises a `ProtocolError` after a GOAWAY {"code": <error class name>,
  "reason": <message>} was queued; events parsed before it stay in `events_received()`; later
  `receive_data` calls raise the same error again.
- After our GOAWAY (`close`) the peer's new streams are refused with RESET code "refused" and its
  new requests with an error RESPONSE; after the peer's GOAWAY, a new stream or request from it is a
  protocol error, and our `open_stream`/`send_request` raise `StreamStateError`.
- RESUME travels receiver -> sender on an open stream with the chunks the receiver already holds
  (`send_resume`); the sender's application gets `ResumeReceived` and skips them. sfm does not
  interpret the header: resuming is the transfer layer's business.
- The receiver checks END (chunk count, payload bytes, digest; see digest.py). On success it reports
  `StreamEnded` and sends an ACK whose offset is the chunk count (the sender gets
  `StreamCompleted`): at once, or with `ack_on_end=False` when the application calls
  `complete_stream()` (the ACK is then its verdict); on failure it sends RESET and reports
  `StreamFailed`.
- A stream the peer opens gets `stream_credit` at once (announced in HELLO; default the whole
  stream_window) and the rest of its window when the application calls `grant_stream()`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

from transport.exceptions import (
    LocalError,
    ProtocolError,
    StreamStateError,
    UnexpectedFrameError,
    UnsupportedVersionError,
)
from transport.sfm.config import HELLO_SETTINGS_KEY, SCRATCH, PeerSettings
from transport.sfm.core import (
    CONNECTION_WINDOW_ID,
    MAX_INDEX,
    StreamRecord,
    data_credit,
    payload_size,
    verify_end,
)
from transport.sfm.events import (
    CreditGranted,
    DataReceived,
    Event,
    GoAwayReceived,
    HelloReceived,
    PongReceived,
    ResumeReceived,
    StreamCompleted,
    StreamEnded,
    StreamFailed,
    StreamOpened,
    StreamReset,
)
from transport.sfm.flow import ReceiveWindow, SendWindow
from transport.sfm.requests import Requests
from transport.sfm.states import (
    TERMINAL_STATES,
    Role,
    StreamInput,
    StreamState,
    next_state,
)
from transport.wire import (
    Buffer,
    Frame,
    FrameType,
)

__all__ = ["PROTOCOL_VERSION", "RESERVED_END_KEYS", "Connection"]

PROTOCOL_VERSION: Final = 1
RESERVED_END_KEYS: Final = frozenset({"chunks", "bytes", "digest"})
# PINGs answered while nothing was written (data_to_send not called): one a heartbeat interval
# from an honest peer, so this many means a peer that does not read.
MAX_UNSENT_PONGS: Final = 64


class Connection(Requests):
    """One SFM connection, either side, with no I/O of its own."""

    # --- bytes in ------------------------------------------------------------------------------

    def receive_data(self, data: Buffer) -> None:
        """Parse bytes from the peer (any split); raise a ProtocolError if it broke the rules."""
        self._raise_if_failed()
        self._guarded(lambda: self._parser.feed(data))

    def get_buffer(self, sizehint: int) -> memoryview:
        """A buffer to read the next bytes into (`recv_into`); then call `buffer_updated`."""
        self._raise_if_failed()
        return self._parser.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        """`nbytes` were written into the last `get_buffer()`: parse them."""
        self._raise_if_failed()
        self._guarded(lambda: self._parser.buffer_updated(nbytes))

    def receive_eof(self) -> None:
        """The peer closed its side; a frame cut short is a TruncatedFrameError."""
        self._raise_if_failed()
        self._guarded(self._parse_eof)

    def events_received(self) -> list[Event]:
        """The events parsed so far, oldest first; empties the queue."""
        events, self._events = self._events, []
        return events

    # --- bytes out -----------------------------------------------------------------------------

    def data_to_send(self) -> list[Buffer]:
        """Frame bytes to write, in order, as scatter-gather parts; empties the outbox."""
        parts, self._outbox, self._outbox_bytes = self._outbox, [], 0
        self._pongs_unsent = 0
        return parts

    @property
    def pending_send_bytes(self) -> int:
        """Bytes waiting in the outbox (back-pressure: stop producing when this is large)."""
        return self._outbox_bytes

    @property
    def closed(self) -> bool:
        """True once this side sent GOAWAY (by `close()` or because the peer broke the protocol)."""
        return self._goaway_sent

    @property
    def peer_settings(self) -> PeerSettings | None:
        """What the peer announced in its HELLO, or None before it arrived."""
        return self._peer

    @property
    def holds_hello(self) -> bool:
        """True while the peer's HELLO waits for `accept_peer()`."""
        return self._peer is not None and self._parser.paused

    @property
    def receiving_frame(self) -> bool:
        """True while the bytes received so far end inside a frame (one is partly in)."""
        return self._parser.in_frame

    def stream_state(self, stream_id: int) -> StreamState:
        """This side's view of a stream; IDLE for an id never used."""
        stream = self._streams.get(stream_id) or self._retired.get(stream_id)
        return StreamState.IDLE if stream is None else stream.state

    # --- connection verbs ----------------------------------------------------------------------

    def send_hello(self, header: Mapping[str, Any]) -> None:
        """Send our HELLO: `header` (node id, auth, ...) plus the protocol version and settings."""
        if self._hello_sent:
            raise StreamStateError("HELLO was already sent on this connection")
        if HELLO_SETTINGS_KEY in header:
            raise LocalError(f"HELLO header key {HELLO_SETTINGS_KEY!r} is reserved for sfm")
        full = {"protocol": PROTOCOL_VERSION, **header}
        full[HELLO_SETTINGS_KEY] = self._config.hello_settings()
        self._send(FrameType.HELLO, header=full)
        self._hello_sent = True
        for encoded in self._held:
            self._outbox.extend(encoded.parts)
            self._outbox_bytes += encoded.size
        self._held.clear()

    def accept_peer(self) -> None:
        """The peer that said hello may stay (`hold_hello`): parse what it sent after its HELLO,
        under the full limits, and everything it sends from now on."""
        self._raise_if_failed()
        if not self.holds_hello:
            raise StreamStateError("accept_peer() needs a peer HELLO waiting to be accepted")
        self._guarded(lambda: self._parser.resume(self._config.limits, SCRATCH))

    def send_ping(self) -> int:
        """Send a PING; the peer's PONG carrying the returned nonce becomes `PongReceived`."""
        self._require_hello()
        nonce = next(self._nonces)
        self._send(FrameType.PING, offset=nonce)
        self._pings_sent.add(nonce)
        return nonce

    def close(self, code: str = "normal", reason: str = "") -> None:
        """Send GOAWAY: no new streams or requests from either side; existing ones may finish."""
        if not self._goaway_sent:
            self._send_goaway(code, reason)

    # --- stream verbs (sender side) ------------------------------------------------------------

    def open_stream(self, header: Mapping[str, Any]) -> int:
        """Open a stream to send data; `header` (kind, manifest) reaches the peer; return its id."""
        self._require_can_start("open a stream")
        limit = self._peer.max_streams if self._peer else self._config.max_streams
        live = self._count_live(Role.SENDER)
        if live >= limit:
            raise StreamStateError(
                f"{live} streams already open, the peer accepts {limit}: wait for one to end"
            )
        stream_id = self._take_id("_next_stream_id")
        stream = StreamRecord(stream_id, Role.SENDER)
        stream.send_window = SendWindow(self._peer.stream_credit if self._peer else 0, "stream")
        self._send(FrameType.OPEN, stream_id=stream_id, header=header)
        self._streams[stream_id] = stream
        self._step(stream, StreamInput.SEND_OPEN)
        return stream_id

    def can_send(self, stream_id: int, nbytes: int) -> bool:
        """Whether a DATA frame of `nbytes` fits the credit now (see `data_credit`)."""
        return data_credit(nbytes, self._peer_min_credit) <= self.send_window(stream_id)

    @property
    def _peer_min_credit(self) -> int:
        return self._peer.min_data_credit if self._peer else 0

    def send_window(self, stream_id: int) -> int:
        """Payload bytes `send_data` may send on this stream now (stream and connection credit)."""
        stream = self._local_stream(stream_id, Role.SENDER)
        assert stream.send_window is not None
        return min(stream.send_window.available, self._conn_send.available)

    def send_data(
        self,
        stream_id: int,
        index: int,
        payload: Sequence[Buffer],
        header: Mapping[str, Any] | None = None,
        flags: int = 0,
    ) -> int:
        """Send chunk `index` (parts of one payload, not copied) on a stream we opened; return
        the frame's checksum (the transfer layer keeps it for a digest across connections).

        Local misuse raises StreamStateError: a stream not open for sending, a duplicate index,
        or a payload larger than `send_window()` (wait for `CreditGranted`, then retry).
        """
        stream = self._local_stream(stream_id, Role.SENDER)
        nbytes = payload_size(payload)
        self._check_chunk(stream, index, nbytes)
        assert stream.send_window is not None
        checksum = self._send(
            FrameType.DATA,
            stream_id=stream_id,
            offset=index,
            flags=flags,
            header=header,
            payload=list(payload),
        )
        credit = data_credit(nbytes, self._peer_min_credit)
        stream.send_window.spend(credit)
        self._conn_send.spend(credit)
        stream.digest.add(index, checksum, nbytes)
        self._step(stream, StreamInput.SEND_DATA)
        return checksum

    def _check_chunk(self, stream: StreamRecord, index: int, nbytes: int) -> None:
        """Refuse a DATA frame this side may not send now, before anything is queued."""
        stream_id = stream.stream_id
        next_state(stream.role, stream.state, StreamInput.SEND_DATA, stream_id)
        if not 0 <= index <= MAX_INDEX:
            raise LocalError(f"chunk index {index} is outside 0..{MAX_INDEX}")
        if index <= stream.digest.last_index:
            raise StreamStateError(
                f"chunk index {index} on stream {stream_id} after index "
                f"{stream.digest.last_index}: a stream's indices must increase"
            )
        assert stream.send_window is not None
        stream_credit, connection_credit = stream.send_window.available, self._conn_send.available
        if data_credit(nbytes, self._peer_min_credit) <= min(stream_credit, connection_credit):
            return
        whole = self._peer.stream_window if self._peer else 0
        hint = (
            f"; it can never fit the peer's {whole}-byte stream window: use smaller chunks"
            if self._peer and nbytes > whole
            else "; wait for CreditGranted"
        )
        raise StreamStateError(
            f"chunk {index} of {nbytes} bytes exceeds the credit on stream {stream_id} "
            f"({stream_credit} stream, {connection_credit} connection){hint}"
        )

    def end_stream(self, stream_id: int, header: Mapping[str, Any] | None = None) -> None:
        """End a stream we opened; sfm adds {"chunks", "bytes", "digest"} of what it sent."""
        stream = self._local_stream(stream_id, Role.SENDER)
        next_state(stream.role, stream.state, StreamInput.SEND_END, stream_id)
        clash = RESERVED_END_KEYS & set(header or {})
        if clash:
            raise LocalError(f"END header keys {sorted(clash)} are reserved for sfm")
        digest = stream.digest
        full = {
            **(header or {}),
            "chunks": digest.chunks,
            "bytes": digest.payload_bytes,
            "digest": digest.hexdigest(),
        }
        self._send(FrameType.END, stream_id=stream_id, header=full)
        self._step(stream, StreamInput.SEND_END)

    def reset_stream(self, stream_id: int, code: str, reason: str) -> None:
        """Abandon a live stream (either role); the peer gets `StreamReset(code, reason)`."""
        stream = self._local_stream(stream_id, None)
        next_state(stream.role, stream.state, StreamInput.SEND_RESET, stream_id)
        self._send_reset(stream, code, reason)

    # --- stream verbs (receiver side) ----------------------------------------------------------

    def send_resume(self, stream_id: int, header: Mapping[str, Any]) -> None:
        """Tell the sender of an open stream what this side already holds (opaque to sfm)."""
        stream = self._local_stream(stream_id, Role.RECEIVER)
        next_state(stream.role, stream.state, StreamInput.SEND_RESUME, stream_id)
        self._send(FrameType.RESUME, stream_id=stream_id, header=header)
        self._step(stream, StreamInput.SEND_RESUME)

    def consumed(self, stream_id: int, nbytes: int) -> None:
        """The application is done with one DATA event's payload of `nbytes`: give its credit
        back (call once per DataReceived; a frame takes at least `min_data_credit`).

        Grants are batched (see flow.py). Bytes of a stream that was reset were given back at
        the reset, so consuming them later is a no-op; so is any stream already forgotten.
        """
        stream = self._streams.get(stream_id)
        if stream is None:
            if stream_id in self._retired or self._is_past_peer_stream(stream_id):
                return
            raise StreamStateError(f"consumed() on stream {stream_id}, which the peer never opened")
        if stream.role is not Role.RECEIVER:
            raise StreamStateError(f"consumed() on stream {stream_id}, which this side sends")
        assert stream.recv_window is not None
        credit = data_credit(nbytes, self._config.min_data_credit)
        stream_grant = stream.recv_window.consume(credit)
        self._grant_connection(self._conn_recv.consume(credit))
        if stream_grant and stream.state is StreamState.OPEN:
            self._step(stream, StreamInput.SEND_CREDIT)
            self._send(FrameType.CREDIT, stream_id=stream_id, offset=stream_grant)
        self._retire_if_done(stream)

    def grant_stream(self, stream_id: int) -> None:
        """Give a stream the peer opened the rest of its window (withheld by `stream_credit`)."""
        stream = self._local_stream(stream_id, Role.RECEIVER)
        assert stream.recv_window is not None
        if stream.state is not StreamState.OPEN:
            return  # ended or reset: nothing more will be sent on it
        grant = stream.recv_window.open_up()
        if grant:
            self._step(stream, StreamInput.SEND_CREDIT)
            self._send(FrameType.CREDIT, stream_id=stream_id, offset=grant)

    def complete_stream(self, stream_id: int) -> None:
        """Send the final ACK of a stream whose END checked out: the sender's `StreamCompleted`.

        With `ack_on_end=False` this is the application's verdict that it took the whole stream."""
        stream = self._local_stream(stream_id, Role.RECEIVER)
        next_state(stream.role, stream.state, StreamInput.SEND_ACK, stream_id)
        self._send(FrameType.ACK, stream_id=stream_id, offset=stream.digest.chunks)
        self._step(stream, StreamInput.SEND_ACK)
        self._retire_if_done(stream)

    # --- frames in -----------------------------------------------------------------------------

    def _guarded(self, parse: Callable[[], list[Frame]]) -> None:
        try:
            for frame in parse():
                self._handle(frame)
        except ProtocolError as error:
            self._fail(error)
            raise

    def _parse_eof(self) -> list[Frame]:
        self._parser.eof()
        return []

    def _handle(self, frame: Frame) -> None:
        if self._peer is None and frame.type not in (FrameType.HELLO, FrameType.GOAWAY):
            raise UnexpectedFrameError(
                f"{frame.type.name} (stream {frame.stream_id}) before the peer's HELLO"
            )
        handler = self._HANDLERS.get(frame.type)
        if handler is None:
            raise UnexpectedFrameError(
                f"{frame.type.name} frames are not supported by this version (stream "
                f"{frame.stream_id})"
            )
        handler(self, frame)

    def _on_hello(self, frame: Frame) -> None:
        if self._peer is not None:
            raise UnexpectedFrameError("second HELLO on this connection")
        version = frame.header.get("protocol")
        if version != PROTOCOL_VERSION:
            raise UnsupportedVersionError(
                f"peer speaks sfm protocol {version!r}, this side speaks {PROTOCOL_VERSION}"
            )
        self._peer = peer = PeerSettings.from_hello(frame.header)
        self._conn_send.grant(peer.connection_window)
        for stream in self._live(Role.SENDER):
            assert stream.send_window is not None
            stream.send_window.grant(peer.stream_credit)
        self._events.append(HelloReceived(frame.header))
        self._events.append(CreditGranted(CONNECTION_WINDOW_ID))
        if not self._config.hold_hello:
            for later in self._parser.resume(self._config.limits, SCRATCH):
                self._handle(later)

    def _on_goaway(self, frame: Frame) -> None:
        self._goaway_received = True
        header = frame.header
        self._events.append(
            GoAwayReceived(str(header.get("code", "")), str(header.get("reason", "")))
        )

    def _on_ping(self, frame: Frame) -> None:
        # A peer that pings without reading our answers would grow the outbox for ever.
        if self._pongs_unsent >= MAX_UNSENT_PONGS:
            raise UnexpectedFrameError(
                f"{self._pongs_unsent} PONGs wait to be sent: the peer sends PINGs without "
                "reading the answers"
            )
        self._pongs_unsent += 1
        self._send(FrameType.PONG, offset=frame.offset)

    def _on_pong(self, frame: Frame) -> None:
        if frame.offset not in self._pings_sent:
            raise UnexpectedFrameError(f"PONG with nonce {frame.offset}, which no PING carried")
        self._pings_sent.discard(frame.offset)
        self._events.append(PongReceived(frame.offset))

    def _on_open(self, frame: Frame) -> None:
        stream_id = frame.stream_id
        self._check_peer_id(stream_id, self._highest_peer_stream, "stream", "OPEN")
        if self._goaway_received:
            raise UnexpectedFrameError(f"OPEN of stream {stream_id} after the peer's GOAWAY")
        live = self._count_live(Role.RECEIVER)
        if live >= self._config.max_streams:
            raise UnexpectedFrameError(
                f"OPEN of stream {stream_id} while {live} streams are open: the limit is "
                f"{self._config.max_streams}"
            )
        self._highest_peer_stream = stream_id
        stream = StreamRecord(stream_id, Role.RECEIVER)
        config = self._config
        stream.recv_window = ReceiveWindow(config.stream_window, "stream", config.open_credit)
        self._streams[stream_id] = stream
        self._step(stream, StreamInput.RECV_OPEN)
        if self._goaway_sent:
            self._send_reset(stream, "refused", "this side sent GOAWAY: no new streams")
            return
        self._events.append(StreamOpened(stream_id, frame.header, frame.header_size))

    def _on_data(self, frame: Frame) -> None:
        stream = self._peer_stream(frame)
        tolerated = stream.state in TERMINAL_STATES
        self._step(stream, StreamInput.RECV_DATA)
        nbytes = memoryview(frame.payload).nbytes
        credit = data_credit(nbytes, self._config.min_data_credit)
        self._conn_recv.receive(credit)
        if tolerated:  # crossed our RESET: count it, give it back, drop it
            self._grant_connection(self._conn_recv.consume(credit))
            return
        if frame.offset <= stream.digest.last_index:
            raise UnexpectedFrameError(
                f"DATA index {frame.offset} on stream {stream.stream_id} after index "
                f"{stream.digest.last_index}: a stream's indices must increase (a duplicate or a "
                "reordering)"
            )
        assert stream.recv_window is not None
        stream.recv_window.receive(credit)
        stream.digest.add(frame.offset, frame.checksum, nbytes)
        self._events.append(
            DataReceived(
                stream.stream_id,
                frame.offset,
                frame.payload,
                frame.header,
                frame.flags,
                frame.checksum,
            )
        )

    def _on_end(self, frame: Frame) -> None:
        stream = self._peer_stream(frame)
        tolerated = stream.state in TERMINAL_STATES
        self._step(stream, StreamInput.RECV_END)
        if tolerated:
            return
        problem = verify_end(stream, frame.header)
        if problem is None:
            self._events.append(StreamEnded(stream.stream_id, frame.header))
            if self._config.ack_on_end:
                self.complete_stream(stream.stream_id)
        else:
            self._send_reset(stream, type(problem).__name__, str(problem))
            self._events.append(StreamFailed(stream.stream_id, problem))

    def _on_credit(self, frame: Frame) -> None:
        if frame.stream_id == CONNECTION_WINDOW_ID:
            self._conn_send.grant(frame.offset)
            self._events.append(CreditGranted(CONNECTION_WINDOW_ID))
            return
        stream = self._peer_stream(frame)
        tolerated = stream.state in TERMINAL_STATES
        self._step(stream, StreamInput.RECV_CREDIT)
        if not tolerated:
            assert stream.send_window is not None
            stream.send_window.grant(frame.offset)
            self._events.append(CreditGranted(stream.stream_id))

    def _on_ack(self, frame: Frame) -> None:
        stream = self._peer_stream(frame)
        sent = stream.digest.chunks
        tolerated = stream.state in TERMINAL_STATES
        if stream.role is Role.SENDER and not tolerated and frame.offset > sent:
            raise UnexpectedFrameError(
                f"ACK of {frame.offset} chunks on stream {stream.stream_id}; {sent} were sent"
            )
        done = stream.state is StreamState.HALF_CLOSED_LOCAL and frame.offset == sent
        self._step(stream, StreamInput.RECV_ACK_ALL if done else StreamInput.RECV_ACK)
        if done:
            self._events.append(StreamCompleted(stream.stream_id, sent))
            self._retire_if_done(stream)

    def _on_reset(self, frame: Frame) -> None:
        stream = self._peer_stream(frame)
        tolerated = stream.state in TERMINAL_STATES
        self._step(stream, StreamInput.RECV_RESET)
        if tolerated:
            return
        self._release(stream)
        code, reason = str(frame.header.get("code", "")), str(frame.header.get("reason", ""))
        self._events.append(StreamReset(stream.stream_id, code, reason))

    def _on_resume(self, frame: Frame) -> None:
        stream = self._peer_stream(frame)
        if stream.role is not Role.SENDER:
            raise UnexpectedFrameError(f"RESUME on stream {stream.stream_id}, which the peer sends")
        live = stream.state is StreamState.OPEN
        self._step(stream, StreamInput.RECV_RESUME)
        if live:
            self._events.append(ResumeReceived(stream.stream_id, frame.header))

    _HANDLERS: Final[dict[FrameType, Callable[[Connection, Frame], None]]] = {
        FrameType.HELLO: _on_hello,
        FrameType.GOAWAY: _on_goaway,
        FrameType.PING: _on_ping,
        FrameType.PONG: _on_pong,
        FrameType.OPEN: _on_open,
        FrameType.DATA: _on_data,
        FrameType.CREDIT: _on_credit,
        FrameType.ACK: _on_ack,
        FrameType.END: _on_end,
        FrameType.RESET: _on_reset,
        FrameType.RESUME: _on_resume,
        FrameType.REQUEST: Requests._on_request,
        FrameType.RESPONSE: Requests._on_response,
    }
