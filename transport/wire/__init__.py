"""The wire layer: the frame format (frames.py), its codec (codec.py) and parser (parser.py). Pure.

encoded = encode_frame(FrameType.DATA, stream_id=3, offset=0, payload=[chunk])
sock.sendmsg(encoded.parts)                  # scatter-gather, the payload is not copied

parser = FrameParser(limits)
frames = parser.feed(received_bytes)         # or get_buffer()/buffer_updated() to read in place
"""

from transport.wire.codec import DEFAULT_LIMITS, EncodedFrame, encode_frame, serialize
from transport.wire.frames import (
    KNOWN_FLAGS,
    MAGIC,
    PREFIX,
    PREFIX_SIZE,
    VERSION,
    Buffer,
    Frame,
    FrameFlags,
    FrameType,
    Limits,
)
from transport.wire.parser import FrameParser

__all__ = [
    "DEFAULT_LIMITS",
    "KNOWN_FLAGS",
    "MAGIC",
    "PREFIX",
    "PREFIX_SIZE",
    "VERSION",
    "Buffer",
    "EncodedFrame",
    "Frame",
    "FrameFlags",
    "FrameParser",
    "FrameType",
    "Limits",
    "encode_frame",
    "serialize",
]
