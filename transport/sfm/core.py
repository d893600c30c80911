"""Bookkeeping under `Connection`: stream records, frame queueing, ids, credit release.

Kept apart from connection.py (the verbs and the frame handlers) only to keep both modules short;
nothing here is public.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Final

from transport.exceptions import (
    DigestMismatchError,
    IntegrityError,
    ProtocolError,
    StreamStateError,
    UnexpectedFrameError,
)
from transport.sfm.config import (
    HELLO_LIMITS,
    HELLO_SCRATCH,
    ConnectionConfig,
    PeerSettings,
)
from transport.sfm.digest import StreamDigest
from transport.sfm.events import Event
from transport.sfm.flow import ReceiveWindow, SendWindow
from transport.sfm.states import TERMINAL_STATES, Role, StreamInput, StreamState, next_state
from transport.wire import Buffer, EncodedFrame, Frame, FrameParser, FrameType, encode_frame

MAX_ID: Final = 2**32 - 1
MAX_INDEX: Final = 2**64 - 1
# Finished streams remembered to tell a late (tolerated) frame from a protocol error; an older
# finished stream is treated as reset: its late frames are dropped.
RETIRED_MEMORY: Final = 1024
CONNECTION_WINDOW_ID: Final = 0


class StreamRecord:
    """Everything one side tracks about one stream."""

    __slots__ = ("digest", "recv_window", "role", "send_window", "state", "stream_id")

    def __init__(self, stream_id: int, role: Role, state: StreamState = StreamState.IDLE) -> None:
        self.stream_id = stream_id
        self.role = role
        self.state = state
        self.digest = StreamDigest()  # of the DATA frames sent (SENDER) or received (RECEIVER)
        self.send_window: SendWindow | None = None
        self.recv_window: ReceiveWindow | None = None


def data_credit(nbytes: int, minimum: int) -> int:
    """The credit a DATA frame with `nbytes` of payload takes (and gives back when consumed):
    at least the receiver's `min_data_credit` (see ConnectionConfig)."""
    return max(nbytes, minimum)


def payload_size(parts: Sequence[Buffer]) -> int:
    return sum(memoryview(part).nbytes for part in parts)


class ConnectionCore:
    """The state of one connection and the helpers its verbs and frame handlers share."""

    def __init__(
        self,
        config: ConnectionConfig,
        *,
        allocate: Callable[[int], bytearray | memoryview] | None = None,
    ) -> None:
        self._config = config
        self._parser = FrameParser(
            HELLO_LIMITS, allocate=allocate, scratch_size=HELLO_SCRATCH, pause_after=1
        )
        self._outbox: list[Buffer] = []
        self._outbox_bytes = 0
        self._held: list[EncodedFrame] = []  # replies queued before our HELLO
        self._events: list[Event] = []
        self._streams: dict[int, StreamRecord] = {}
        self._retired: OrderedDict[int, StreamRecord] = OrderedDict()
        own_parity = 1 if config.is_initiator else 2
        self._next_stream_id = own_parity
        self._next_request_id = own_parity
        self._highest_peer_stream = 0
        self._highest_peer_request = 0
        self._requests_sent: set[int] = set()
        self._requests_received: set[int] = set()
        self._pings_sent: set[int] = set()
        self._nonces = itertools.count(1)
        self._conn_send = SendWindow(0, "connection")  # opened by the peer's HELLO
        self._conn_recv = ReceiveWindow(config.connection_window, "connection")
        self._peer: PeerSettings | None = None
        self._hello_sent = False
        self._goaway_sent = False
        self._goaway_received = False
        self._failure: ProtocolError | None = None
        self._pongs_unsent = 0  # PONGs queued since the outbox was last taken

    def _send(
        self,
        ftype: FrameType,
        *,
        stream_id: int = 0,
        offset: int = 0,
        flags: int = 0,
        header: Mapping[str, Any] | None = None,
        payload: Buffer | Sequence[Buffer] = b"",
    ) -> int:
        """Queue one frame; return its checksum.

        Automatic replies (PONG, CREDIT, ACK, RESET) to a peer that spoke first wait until our
        HELLO is queued, since the peer refuses anything before it.
        """
        encoded = encode_frame(
            ftype,
            stream_id=stream_id,
            offset=offset,
            flags=flags,
            header=header,
            payload=payload,
            limits=self._config.limits,
        )
        if self._hello_sent or ftype in (FrameType.HELLO, FrameType.GOAWAY):
            self._outbox.extend(encoded.parts)
            self._outbox_bytes += encoded.size
        else:
            self._held.append(encoded)
        return int(encoded.checksum)

    def _send_reset(self, stream: StreamRecord, code: str, reason: str) -> None:
        self._send(
            FrameType.RESET, stream_id=stream.stream_id, header={"code": code, "reason": reason}
        )
        self._step(stream, StreamInput.SEND_RESET)
        self._release(stream)

    def _release(self, stream: StreamRecord) -> None:
        """The stream is reset: what the application still holds of it is credit given back."""
        if stream.recv_window is not None:
            # Only the bytes the application still holds go back to the connection window:
            # what it consumed before the reset was counted there already (counting it again
            # raised "consumed N bytes but only M unconsumed" out of the read path).
            held = stream.recv_window.unconsumed
            stream.recv_window.release_all()
            self._grant_connection(self._conn_recv.consume(held) if held else 0)
        self._retire_if_done(stream)

    def _grant_connection(self, nbytes: int) -> None:
        if nbytes:
            self._send(FrameType.CREDIT, stream_id=CONNECTION_WINDOW_ID, offset=nbytes)

    def _step(self, stream: StreamRecord, event: StreamInput) -> None:
        stream.state = next_state(stream.role, stream.state, event, stream.stream_id)

    def _retire_if_done(self, stream: StreamRecord) -> None:
        """Forget a finished stream once the application holds none of its data."""
        if stream.state not in TERMINAL_STATES or stream.stream_id not in self._streams:
            return
        if stream.recv_window is not None and stream.recv_window.unconsumed:
            return
        del self._streams[stream.stream_id]
        stream.digest = StreamDigest()  # the per-chunk checksums are no longer needed
        self._retired[stream.stream_id] = stream
        if len(self._retired) > RETIRED_MEMORY:
            self._retired.popitem(last=False)

    def _peer_stream(self, frame: Frame) -> StreamRecord:
        """The stream a peer frame names; a stream never opened is a protocol error."""
        stream_id = frame.stream_id
        stream = self._streams.get(stream_id) or self._retired.get(stream_id)
        if stream is not None:
            return stream
        ours = self._is_ours(stream_id)
        used = stream_id < self._next_stream_id if ours else stream_id <= self._highest_peer_stream
        if stream_id and used:
            # finished so long ago that it was forgotten: treat it as reset, drop the frame
            return StreamRecord(
                stream_id, Role.SENDER if ours else Role.RECEIVER, StreamState.RESET
            )
        raise UnexpectedFrameError(
            f"{frame.type.name} for stream {stream_id}, which was never opened"
        )

    def _local_stream(self, stream_id: int, role: Role | None) -> StreamRecord:
        stream = self._streams.get(stream_id) or self._retired.get(stream_id)
        if stream is None:
            raise StreamStateError(f"stream {stream_id} is not open on this connection")
        if role is not None and stream.role is not role:
            raise StreamStateError(
                f"stream {stream_id} was opened by the peer: this side only receives its data"
            )
        return stream

    def _is_ours(self, any_id: int) -> bool:
        return any_id % 2 == (1 if self._config.is_initiator else 0)

    def _is_past_peer_stream(self, stream_id: int) -> bool:
        return 0 < stream_id <= self._highest_peer_stream and not self._is_ours(stream_id)

    def _check_peer_id(self, any_id: int, highest: int, what: str, frame_name: str) -> None:
        if any_id == 0 or self._is_ours(any_id):
            parity = "even" if self._config.is_initiator else "odd"
            raise UnexpectedFrameError(
                f"{frame_name} with {what} id {any_id}: the peer must use {parity} ids > 0"
            )
        if any_id <= highest:
            raise UnexpectedFrameError(
                f"{frame_name} with {what} id {any_id}, not above the peer's last id {highest} "
                "(duplicate or reused)"
            )

    def _take_id(self, counter: str) -> int:
        value: int = getattr(self, counter)
        if value > MAX_ID:
            raise StreamStateError(f"this connection has used up its ids (next {value})")
        setattr(self, counter, value + 2)
        return value

    def _live(self, role: Role) -> Iterator[StreamRecord]:
        return (
            s for s in self._streams.values() if s.role is role and s.state not in TERMINAL_STATES
        )

    def _count_live(self, role: Role) -> int:
        return sum(1 for _ in self._live(role))

    def _require_hello(self) -> None:
        if not self._hello_sent:
            raise StreamStateError("send_hello() must come first on a connection")

    def _require_can_start(self, what: str) -> None:
        self._require_hello()
        if self._goaway_sent:
            raise StreamStateError(f"cannot {what}: this side sent GOAWAY")
        if self._goaway_received:
            raise StreamStateError(f"cannot {what}: the peer sent GOAWAY")

    def _fail(self, error: ProtocolError) -> None:
        if self._failure is None:
            self._failure = error
            # reported even after a normal GOAWAY: the peer learns why it is cut off
            self._send_goaway(type(error).__name__, str(error))

    def _send_goaway(self, code: str, reason: str) -> None:
        self._send(FrameType.GOAWAY, header={"code": code, "reason": reason})
        self._goaway_sent = True

    def _raise_if_failed(self) -> None:
        if self._failure is not None:
            raise self._failure


def verify_end(stream: StreamRecord, header: Mapping[str, Any]) -> IntegrityError | None:
    """Compare END's claims with what arrived; return the integrity problem, if any."""
    chunks, nbytes, digest = header.get("chunks"), header.get("bytes"), header.get("digest")
    if not (isinstance(chunks, int) and isinstance(nbytes, int) and isinstance(digest, str)):
        raise UnexpectedFrameError(
            f"END on stream {stream.stream_id} needs integer 'chunks' and 'bytes' and a string "
            f"'digest'; got {chunks!r}, {nbytes!r}, {digest!r}"
        )
    got = stream.digest
    if (chunks, nbytes) != (got.chunks, got.payload_bytes):
        return IntegrityError(
            f"stream {stream.stream_id} ended announcing {chunks} chunks / {nbytes} bytes but "
            f"{got.chunks} chunks / {got.payload_bytes} bytes arrived"
        )
    computed = got.hexdigest()
    if digest != computed:
        return DigestMismatchError(
            f"stream {stream.stream_id} digest mismatch: END says {digest}, the "
            f"{got.chunks} chunks received hash to {computed}"
        )
    return None
