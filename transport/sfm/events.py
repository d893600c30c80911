"""What `Connection.events_received()` returns: one frozen dataclass per meaning.

Payloads and bodies are views into the receive buffer where possible (no copy): an application
that keeps one beyond the next `receive_data`/`get_buffer` call must make sure that buffer is not
reused (pass an `allocate` that hands out fresh buffers, or copy).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from transport.exceptions import TensorwireError

__all__ = [
    "CreditGranted",
    "DataReceived",
    "Event",
    "GoAwayReceived",
    "HelloReceived",
    "PongReceived",
    "RequestReceived",
    "ResponseReceived",
    "ResumeReceived",
    "StreamCompleted",
    "StreamEnded",
    "StreamFailed",
    "StreamOpened",
    "StreamReset",
]


@dataclass(frozen=True, slots=True)
class HelloReceived:
    """The peer introduced itself; `header` is its HELLO header as sent."""

    header: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class StreamOpened:
    """The peer opened a stream to send us data; `header` is its OPEN header (kind, manifest)."""

    stream_id: int
    header: Mapping[str, Any]
    # Its encoded size: what its decoded form may cost is a multiple of it. Not part of what
    # the event means, so not compared.
    header_size: int = field(default=0, compare=False)


@dataclass(frozen=True, slots=True)
class DataReceived:
    """One chunk of a stream. Call `Connection.consumed()` once its payload is dealt with."""

    stream_id: int
    index: int
    payload: memoryview | bytes | bytearray
    header: Mapping[str, Any]
    flags: int
    checksum: int


@dataclass(frozen=True, slots=True)
class StreamEnded:
    """The peer ended a stream and its chunk count, byte count and digest all checked out."""

    stream_id: int
    header: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class StreamFailed:
    """This side found a stream's data wrong (digest or counts); a RESET went to the peer."""

    stream_id: int
    error: TensorwireError


@dataclass(frozen=True, slots=True)
class StreamReset:
    """The peer abandoned a stream, giving a code and a reason."""

    stream_id: int
    code: str
    reason: str


@dataclass(frozen=True, slots=True)
class StreamCompleted:
    """The peer acknowledged every chunk of a stream we ended: it verified the digest."""

    stream_id: int
    chunks: int


@dataclass(frozen=True, slots=True)
class ResumeReceived:
    """The receiver of a stream we send told us what it already holds (`header["held"]`)."""

    stream_id: int
    header: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class CreditGranted:
    """A send window grew (stream_id 0: the connection's); a blocked sender may retry."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class RequestReceived:
    """The peer asks something; answer with `Connection.send_response(request_id, ...)`."""

    request_id: int
    header: Mapping[str, Any]
    body: memoryview | bytes | bytearray


@dataclass(frozen=True, slots=True)
class ResponseReceived:
    """The answer to one of our requests; `error` is True when the peer's handler failed."""

    request_id: int
    header: Mapping[str, Any]
    body: memoryview | bytes | bytearray
    error: bool


@dataclass(frozen=True, slots=True)
class PongReceived:
    """The peer answered our PING carrying `nonce`."""

    nonce: int


@dataclass(frozen=True, slots=True)
class GoAwayReceived:
    """The peer will open no new streams or requests; existing ones may finish."""

    code: str
    reason: str


Event = (
    HelloReceived
    | StreamOpened
    | DataReceived
    | StreamEnded
    | StreamFailed
    | StreamReset
    | StreamCompleted
    | ResumeReceived
    | CreditGranted
    | RequestReceived
    | ResponseReceived
    | PongReceived
    | GoAwayReceived
)
