"""The transfer protocol, sans-I/O: one transfer across connections, attempts and stripes.

ids, attempts, stripes, resume points, duplicates, the mandatory transfer digest, cancel, the
receiver's verdict and which transfers may hold credit are decided here (states.py holds the
table); endpoint/ only feeds it events and time and does what it says.
"""

from transport.transfer import headers
from transport.transfer.headers import OpenHeader, index_ranges, parse_index_ranges, transfer_digest
from transport.transfer.receiver import (
    DUPLICATE,
    JOINED,
    NEW,
    REFUSED,
    Data,
    IncomingRegistry,
    IncomingState,
    Opened,
    StreamKey,
)
from transport.transfer.sender import OutgoingTransfer
from transport.transfer.states import TERMINAL, Role, TransferInput, TransferState, next_state

__all__ = [
    "DUPLICATE",
    "JOINED",
    "NEW",
    "REFUSED",
    "TERMINAL",
    "Data",
    "IncomingRegistry",
    "IncomingState",
    "OpenHeader",
    "Opened",
    "OutgoingTransfer",
    "Role",
    "StreamKey",
    "TransferInput",
    "TransferState",
    "headers",
    "index_ranges",
    "next_state",
    "parse_index_ranges",
    "transfer_digest",
]
