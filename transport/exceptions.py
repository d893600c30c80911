"""Every error tensorwire raises, in one tree.

Errors are split by *who* is at fault, because the reaction differs: a local error is a bug or a
misconfiguration on this side (fix the call), a protocol error means the peer sent something that
breaks the rules (disconnect it, keep serving others), a remote error is the peer telling us that it
failed (report it), and a transport error is the network between us (retry or resume).

    TensorwireError
    ├── LocalError                      this side: bad argument, bad configuration, bad source/sink
    │   ├── ConfigError                 invalid configuration or URL
    │   ├── PayloadError                a source or sink cannot do what was asked
    │   │   └── SinkMismatchError       the sink's tensors do not match the manifest
    │   ├── StreamStateError            an API call that the stream's state does not allow
    │   └── WrongEventLoopError         an Endpoint used from an event loop it does not run on
    ├── ProtocolError                   the peer broke the protocol (we disconnect it)
    │   ├── FrameError                  a frame that cannot be parsed
    │   │   ├── BadMagicError           not a tensorwire frame
    │   │   ├── UnsupportedVersionError a version of the wire format we do not speak
    │   │   ├── UnknownFrameTypeError   a frame type (or flag) we do not know
    │   │   ├── FrameTooLargeError      a length field beyond the configured limits
    │   │   ├── PrefixChecksumError     the fixed header was corrupted
    │   │   ├── ChecksumMismatchError   header or payload bytes were corrupted
    │   │   ├── HeaderDecodeError       the frame header is not a JSON object
    │   │   └── TruncatedFrameError     the byte stream ended inside a frame
    │   ├── ManifestError               a manifest with absurd sizes, shapes or unknown dtypes
    │   ├── ChunkError                  a chunk that does not decode or does not match the plan
    │   ├── FlowControlError            data beyond the granted credit
    │   └── UnexpectedFrameError        a frame the stream's state does not allow (unknown or
    │                                   duplicate stream id, data after end, ...)
    ├── IntegrityError                  bytes arrived but are not the bytes that were sent
    │   └── DigestMismatchError         the end-of-stream digest does not match
    ├── RemoteError                     the peer reported a failure
    │   ├── StreamResetError            the peer reset the stream, with its reason
    │   │   ├── TransferRejectedError   the receiver rejected the transfer or its sink failed
    │   │   └── TransferCancelledError  the sender cancelled the transfer
    │   └── RemoteRequestError          the peer's request handler failed
    └── TransportError                  the connection itself
        ├── ConnectError                could not connect
        ├── ConnectionClosedError       the connection closed while we needed it
        └── IdleTimeoutError            nothing moved for idle_timeout seconds

Every class takes a message that names what was wrong; the wire and protocol errors also carry the
numbers that made them wrong so a log line is enough to diagnose.
"""

from __future__ import annotations

__all__ = [
    "BadMagicError",
    "ChecksumMismatchError",
    "ChunkError",
    "ConfigError",
    "ConnectError",
    "ConnectionClosedError",
    "DigestMismatchError",
    "FlowControlError",
    "FrameError",
    "FrameTooLargeError",
    "HeaderDecodeError",
    "IdleTimeoutError",
    "IntegrityError",
    "LocalError",
    "ManifestError",
    "PayloadError",
    "PrefixChecksumError",
    "ProtocolError",
    "RemoteError",
    "RemoteRequestError",
    "SinkMismatchError",
    "StreamResetError",
    "StreamStateError",
    "TensorwireError",
    "TransferCancelledError",
    "TransferRejectedError",
    "TransportError",
    "TruncatedFrameError",
    "UnexpectedFrameError",
    "UnknownFrameTypeError",
    "UnsupportedVersionError",
    "WrongEventLoopError",
]


class TensorwireError(Exception):
    """Root of every error raised by tensorwire."""


# --- this side ---------------------------------------------------------------------------------


class LocalError(TensorwireError):
    """This side is at fault: a bad argument, configuration, source or sink."""


class ConfigError(LocalError, ValueError):
    """Invalid configuration value or URL."""


class PayloadError(LocalError):
    """A source or sink cannot do what was asked (missing file, unsupported dtype, ...)."""


class SinkMismatchError(PayloadError):
    """The sink's existing tensors do not match the incoming manifest (name, dtype or shape)."""


class StreamStateError(LocalError):
    """The application called something the stream's current state does not allow."""


class WrongEventLoopError(LocalError, RuntimeError):
    """An Endpoint (or its peers and transfers) used from an event loop other than the one it
    was created on, e.g. from a script that calls asyncio.run() per call: use one loop, or
    transport.sync."""


# --- the peer broke the rules ------------------------------------------------------------------


class ProtocolError(TensorwireError):
    """The peer sent something that breaks the protocol; the connection is closed."""


class FrameError(ProtocolError):
    """Bytes that do not form a valid frame."""


class BadMagicError(FrameError):
    """The bytes do not start with the tensorwire magic: not our protocol, or a lost frame edge."""


class UnsupportedVersionError(FrameError):
    """The frame uses a wire-format version this side does not speak."""


class UnknownFrameTypeError(FrameError):
    """The frame type or a flag bit is unknown to this version."""


class FrameTooLargeError(FrameError):
    """A length field exceeds the configured limit; refused before anything is allocated."""


class PrefixChecksumError(FrameError):
    """The fixed-size frame prefix does not match its CRC: corrupted or garbage bytes."""


class ChecksumMismatchError(FrameError):
    """The header or payload bytes do not match the frame's checksum."""


class HeaderDecodeError(FrameError):
    """The frame header is not a UTF-8 JSON object."""


class TruncatedFrameError(FrameError):
    """The byte stream ended in the middle of a frame."""


class ManifestError(ProtocolError):
    """A manifest announcing invalid sizes, shapes, names or dtypes."""


class ChunkError(ProtocolError):
    """A chunk that is not a valid safetensors blob or does not match the stream's plan."""


class FlowControlError(ProtocolError):
    """The peer sent more data than the credit it was granted."""


class UnexpectedFrameError(ProtocolError):
    """A frame that the stream's state does not allow (unknown stream, duplicate id, ...)."""


# --- bytes arrived wrong -----------------------------------------------------------------------


class IntegrityError(TensorwireError):
    """Bytes arrived but do not match what the sender says it sent."""


class DigestMismatchError(IntegrityError):
    """The whole-stream digest computed here differs from the sender's."""


# --- the peer reported a failure ---------------------------------------------------------------


class RemoteError(TensorwireError):
    """The peer reported a failure of its own."""

    def __init__(self, message: str, *, code: str = "error") -> None:
        super().__init__(message)
        self.code = code


class StreamResetError(RemoteError):
    """The peer reset the stream; `code` and the message carry its reason."""


class TransferRejectedError(StreamResetError):
    """The receiver did not commit the transfer: its application rejected it, its sink failed or
    its checks failed; the message carries the receiver's reason."""


class TransferCancelledError(StreamResetError):
    """The sender cancelled the transfer (a final reset, not a lost connection)."""


class RemoteRequestError(RemoteError):
    """The peer's request handler failed; the message is the peer's description."""


# --- the network -------------------------------------------------------------------------------


class TransportError(TensorwireError):
    """The connection failed: retry or resume."""


class ConnectError(TransportError):
    """Could not establish a connection to the peer."""


class ConnectionClosedError(TransportError):
    """The connection closed (by the peer or the network) while it was still needed."""


class IdleTimeoutError(TransportError):
    """Nothing moved for `idle_timeout` seconds."""
