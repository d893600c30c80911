"""The Streamable Framed Message protocol (sfm), sans-I/O.

Streams of chunks with flow-control credit and end-of-stream digests, plus requests, pings and
goaway, over the frames of `transport.wire`. No I/O: `Connection` takes bytes and verbs and hands
back bytes and events; `transport.endpoint` runs it over a driver.
"""

from transport.sfm.config import ConnectionConfig, PeerSettings
from transport.sfm.connection import PROTOCOL_VERSION, RESERVED_END_KEYS, Connection
from transport.sfm.digest import DIGEST_ALGORITHM, StreamDigest
from transport.sfm.events import (
    CreditGranted,
    DataReceived,
    Event,
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
)
from transport.sfm.flow import MAX_WINDOW, ReceiveWindow, SendWindow
from transport.sfm.states import Role, StreamInput, StreamState

__all__ = [
    "DIGEST_ALGORITHM",
    "MAX_WINDOW",
    "PROTOCOL_VERSION",
    "RESERVED_END_KEYS",
    "Connection",
    "ConnectionConfig",
    "CreditGranted",
    "DataReceived",
    "Event",
    "GoAwayReceived",
    "HelloReceived",
    "PeerSettings",
    "PongReceived",
    "ReceiveWindow",
    "RequestReceived",
    "ResponseReceived",
    "ResumeReceived",
    "Role",
    "SendWindow",
    "StreamCompleted",
    "StreamDigest",
    "StreamEnded",
    "StreamFailed",
    "StreamInput",
    "StreamOpened",
    "StreamReset",
    "StreamState",
]
