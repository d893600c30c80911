"""What the transfer layer puts in sfm headers: the OPEN header of an attempt, RESUME's held
ranges, END's transfer digest, and the reset codes that carry verdicts. Pure; parsing checks every
field the peer sent before anything is allocated for it.

    OPEN   {"kind": "state_dict" | "bytes", "transfer": id, "attempt": n, "stripes": k,
            "manifest": {...} (state dicts), "size": n (byte streams, optional), "meta": {...}}
    RESUME {"held": [[start, stop), ...]}      chunk indices the receiver holds
    END    {"transfer_digest": hex}            the tree digest over every chunk of the transfer
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Final

import xxhash

from transport.exceptions import ManifestError, ProtocolError
from transport.sfm import StreamDigest

STATE_DICT: Final = "state_dict"
BYTES: Final = "bytes"
KINDS: Final = frozenset({STATE_DICT, BYTES})
# Most parallel connections one transfer may stripe over.
MAX_STRIPES: Final = 64
# Most index ranges a RESUME may list: beyond that a receiver is describing noise, not progress.
MAX_RESUME_RANGES: Final = 1 << 20
MAX_TRANSFER_ID: Final = 256

# Reset codes with a meaning for the transfer (any other code is a final failure).
SUPERSEDED: Final = "superseded"  # the sender gave this attempt up; another one follows
CANCELLED: Final = "cancelled"  # the sender's application cancelled: final, not a loss
REJECTED: Final = "rejected"  # the receiving application refused the transfer
RECEIVER_FAILED: Final = "receiver_failed"  # the receiver's sink or checks failed
STALE: Final = "stale"  # an attempt older than the one the receiver follows
CLOSING: Final = "closing"  # the other endpoint is shutting down: final
MISMATCH: Final = "bad_manifest"  # reopened with a different manifest or kind


@dataclass(frozen=True, slots=True)
class OpenHeader:
    """A checked OPEN header of one stream of a transfer attempt."""

    kind: str
    transfer_id: str | None
    attempt: int
    stripes: int
    manifest: Any = None  # the raw manifest header (payload.Manifest parses it), until released
    size: int | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)
    # What identifies the manifest once the raw header is released (a resumed attempt must
    # announce the same one): a digest of its canonical JSON.
    manifest_digest: str = ""

    @classmethod
    def parse(cls, header: Mapping[str, Any]) -> OpenHeader:
        kind = header.get("kind")
        if kind not in KINDS:
            raise ManifestError(f"unknown stream kind {kind!r}: expected one of {sorted(KINDS)}")
        transfer = header.get("transfer")
        if transfer is not None and not (
            isinstance(transfer, str) and 0 < len(transfer) <= MAX_TRANSFER_ID
        ):
            raise ManifestError(
                f"transfer id must be a string of 1..{MAX_TRANSFER_ID} chars, got {transfer!r}"
            )
        attempt = header.get("attempt", 0)
        if type(attempt) is not int or not 0 <= attempt < 2**31:
            raise ManifestError(f"attempt must be an int in 0..2**31, got {attempt!r}")
        stripes = header.get("stripes", 1)
        if type(stripes) is not int or not 1 <= stripes <= MAX_STRIPES:
            raise ManifestError(f"stripes must be an int in 1..{MAX_STRIPES}, got {stripes!r}")
        size = header.get("size")
        meta = header.get("meta", {})
        return cls(
            kind=str(kind),
            transfer_id=transfer,
            attempt=attempt,
            stripes=stripes,
            manifest=header.get("manifest"),
            size=size if type(size) is int and size >= 0 else None,
            meta=meta if isinstance(meta, Mapping) else {},
            manifest_digest=_canonical_digest(header.get("manifest")),
        )

    def same_transfer(self, other: OpenHeader) -> bool:
        """Another attempt of the same transfer must announce the same content."""
        return self.kind == other.kind and self.manifest_digest == other.manifest_digest

    def without_manifest(self) -> OpenHeader:
        """This header less its raw manifest (parsed by now): a queued transfer keeps one copy."""
        return replace(self, manifest=None)


def _canonical_digest(value: Any) -> str:
    if value is None:
        return ""
    canonical = json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return str(xxhash.xxh3_128_hexdigest(canonical.encode()))


def open_header(
    kind: str,
    transfer_id: str,
    attempt: int,
    stripes: int,
    content: Mapping[str, Any],
) -> dict[str, Any]:
    """The OPEN header of one stream of an attempt (`content`: manifest, meta, size)."""
    return {
        **content,
        "kind": kind,
        "transfer": transfer_id,
        "attempt": attempt,
        "stripes": stripes,
    }


def index_ranges(indices: Iterable[int]) -> list[list[int]]:
    """{0, 1, 2, 5} -> [[0, 3], [5, 6]]: half-open ranges, compact on the wire."""
    ranges: list[list[int]] = []
    for index in sorted(indices):
        if ranges and ranges[-1][1] == index:
            ranges[-1][1] = index + 1
        else:
            ranges.append([index, index + 1])
    return ranges


def parse_index_ranges(value: Any, limit: int) -> set[int]:
    """The indices of a RESUME's "held" ranges, each within [0, limit); ProtocolError otherwise."""
    if not isinstance(value, list) or len(value) > MAX_RESUME_RANGES:
        raise ProtocolError(f"RESUME 'held' must be a list of at most {MAX_RESUME_RANGES} ranges")
    held: set[int] = set()
    for item in value:
        valid = isinstance(item, list) and len(item) == 2 and all(type(x) is int for x in item)
        if not valid or not 0 <= item[0] < item[1] <= limit:
            raise ProtocolError(f"RESUME range {item!r} is not [start, stop) within 0..{limit}")
        held.update(range(item[0], item[1]))
    return held


def transfer_digest(checksums: Mapping[int, int]) -> str:
    """The same tree digest sfm uses per stream, over every chunk of the transfer."""
    digest = StreamDigest()
    for index in sorted(checksums):
        digest.add(index, checksums[index], 0)
    return digest.hexdigest()
