"""A progress journal beside a partial file: which chunks are already on disk, and their checksums.

A receiver process that is killed mid-transfer leaves `<file>.partial` and this journal; the next
process that receives the same transfer (same transfer id, same manifest) reads the journal,
tells the sender what it holds, and the sender continues from there.

Format: a text file, first line a JSON object {"transfer": id, "manifest": key, "format": 1},
then one line per chunk written, "<index> <checksum hex>". Lines are appended after the chunk's
bytes were written. Every `sync_every` chunks both the data file and the journal are fsynced, so
after a power loss the journal never claims more than the disk holds; after a process kill the
page cache holds everything written. A torn last line is ignored.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import xxhash

from transport.payload.manifest import Manifest

JOURNAL_FORMAT = 1


def manifest_key(manifest: Manifest) -> str:
    """A digest that changes whenever anything in the manifest changes."""
    text = json.dumps(manifest.to_header(), sort_keys=True, separators=(",", ":"))
    return str(xxhash.xxh3_128_hexdigest(text.encode()))


class ProgressJournal:
    """Append-only record of written chunks for one partial file."""

    def __init__(self, path: Path, *, sync_every: int = 64) -> None:
        self.path = path
        self._sync_every = sync_every
        self._handle: IO[str] | None = None
        self._since_sync = 0

    def load(self, transfer_id: str, manifest: Manifest) -> dict[int, int]:
        """Chunks (index -> checksum) recorded for this transfer and manifest; {} otherwise."""
        try:
            lines = self.path.read_text().splitlines()
        except (FileNotFoundError, UnicodeDecodeError):
            return {}
        if not lines or _header(lines[0]) != self._expected(transfer_id, manifest):
            return {}
        held: dict[int, int] = {}
        for line in lines[1:]:
            entry = _entry(line)
            if entry is not None:
                held[entry[0]] = entry[1]
        return held

    def start(self, transfer_id: str, manifest: Manifest) -> None:
        """Begin a new journal (replacing any old one)."""
        self.close()
        self._handle = open(self.path, "w")  # noqa: SIM115 - kept open for appends
        self._handle.write(json.dumps(self._expected(transfer_id, manifest)) + "\n")
        self._handle.flush()

    def reopen(self) -> None:
        """Continue appending to an existing journal."""
        self.close()
        self._handle = open(self.path, "a")  # noqa: SIM115 - kept open for appends

    def record(self, index: int, checksum: int, data_fd: int) -> None:
        """Note one more chunk on disk; fsync data and journal every `sync_every` chunks."""
        if self._handle is None:
            return
        self._handle.write(f"{index} {checksum:016x}\n")
        self._since_sync += 1
        if self._since_sync >= self._sync_every:
            self._since_sync = 0
            os.fsync(data_fd)
            self._handle.flush()
            os.fsync(self._handle.fileno())
        else:
            self._handle.flush()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def remove(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)

    @staticmethod
    def _expected(transfer_id: str, manifest: Manifest) -> dict[str, Any]:
        return {
            "format": JOURNAL_FORMAT,
            "transfer": transfer_id,
            "manifest": manifest_key(manifest),
        }


def _header(line: str) -> Mapping[str, Any] | None:
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _entry(line: str) -> tuple[int, int] | None:
    fields = line.split()
    if len(fields) != 2:
        return None  # a torn last line
    try:
        return int(fields[0]), int(fields[1], 16)
    except ValueError:
        return None
