"""The whole-stream digest ("xxh3-128 tree") both sides compute from the DATA frames.

Each DATA frame already carries an xxh3_64 checksum of its header and payload, verified by the
frame parser. The stream digest binds those checksums to their chunk indices, so a dropped,
duplicated, reordered-into-another-index or substituted chunk changes it, without hashing any
payload byte a second time:

    digest = xxh3_128( for index in ascending order: u64be(index) + u64be(checksum) ).hexdigest()
"""

from __future__ import annotations

import struct
from typing import Final

import xxhash

__all__ = ["DIGEST_ALGORITHM", "StreamDigest"]

DIGEST_ALGORITHM: Final = "xxh3-128-tree"
_INDEX_AND_CHECKSUM: Final = struct.Struct(">QQ")


class StreamDigest:
    """Chunk count, payload byte count and running digest of one stream's DATA frames.

    Indices arrive in strictly increasing order (a protocol rule), so the digest is computed as
    they come: a stream costs a few words, however many chunks it carries.
    """

    __slots__ = ("_hasher", "chunks", "last_index", "payload_bytes")

    def __init__(self) -> None:
        self._hasher = xxhash.xxh3_128()
        self.chunks = 0  # number of chunk indices seen
        self.last_index = -1  # the highest one (-1: none yet)
        self.payload_bytes = 0

    def add(self, index: int, checksum: int, payload_bytes: int) -> None:
        """Record one DATA frame; the caller has refused an index <= last_index already."""
        assert index > self.last_index, (index, self.last_index)
        self._hasher.update(_INDEX_AND_CHECKSUM.pack(index, checksum))
        self.last_index = index
        self.chunks += 1
        self.payload_bytes += payload_bytes

    def hexdigest(self) -> str:
        """The digest over every recorded (index, checksum), in ascending index order."""
        return str(self._hasher.hexdigest())
