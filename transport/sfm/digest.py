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
    """Chunk count, payload byte count and per-index checksums of one stream's DATA frames."""

    __slots__ = ("_checksums", "payload_bytes")

    def __init__(self) -> None:
        self._checksums: dict[int, int] = {}
        self.payload_bytes = 0

    @property
    def chunks(self) -> int:
        """Number of distinct chunk indices seen."""
        return len(self._checksums)

    def __contains__(self, index: int) -> bool:
        return index in self._checksums

    def add(self, index: int, checksum: int, payload_bytes: int) -> None:
        """Record one DATA frame; the caller has refused duplicate indices already."""
        self._checksums[index] = checksum
        self.payload_bytes += payload_bytes

    def hexdigest(self) -> str:
        """The digest over every recorded (index, checksum), in ascending index order."""
        hasher = xxhash.xxh3_128()
        for index in sorted(self._checksums):
            hasher.update(_INDEX_AND_CHECKSUM.pack(index, self._checksums[index]))
        return str(hasher.hexdigest())
