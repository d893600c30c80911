"""The plan: how a manifest's tensors are cut into chunks.

Both sides compute the plan from the manifest alone, so it never travels: a chunk on the wire is
checked against the chunk the receiver expected at that index.

Rules, in manifest order:
- whole tensors are grouped into the current chunk while it stays <= chunk_size;
- a tensor that does not fit starts a new chunk;
- a tensor larger than chunk_size is cut into byte ranges of chunk_size, starting on a chunk of its
  own; its tail range (shorter than chunk_size) stays open, so following tensors may join it;
- an empty tensor still gets a (zero-length) piece so the receiver learns it exists;
- an alias (manifest.target_of) gets no piece at all: its bytes are its target's, and the receiver
  learns it exists from the manifest.
"""

from __future__ import annotations

from dataclasses import dataclass

from transport.payload.manifest import Manifest

__all__ = ["Chunk", "Piece", "is_whole", "plan_chunks"]


@dataclass(frozen=True, slots=True)
class Piece:
    """Byte range [start, stop) of manifest.tensors[tensor]."""

    tensor: int
    start: int
    stop: int

    @property
    def nbytes(self) -> int:
        """Length of the range in bytes."""
        return self.stop - self.start


@dataclass(frozen=True, slots=True)
class Chunk:
    """One unit of transfer: the pieces it carries, in the order their bytes follow each other."""

    index: int
    pieces: tuple[Piece, ...]

    @property
    def nbytes(self) -> int:
        """Sum of the pieces' lengths: the chunk's data size, header excluded."""
        return sum(piece.stop - piece.start for piece in self.pieces)


def is_whole(manifest: Manifest, piece: Piece) -> bool:
    """True when the piece covers its entire tensor (so it travels under the tensor's own name)."""
    return piece.start == 0 and piece.stop == manifest.tensors[piece.tensor].nbytes


class _Planner:
    """Accumulates pieces into chunks; one pass over the manifest, O(tensors + chunks)."""

    def __init__(self, chunk_size: int) -> None:
        self.chunk_size = chunk_size
        self.chunks: list[Chunk] = []
        self.pieces: list[Piece] = []
        self.fill = 0

    def flush(self) -> None:
        if self.pieces:
            self.chunks.append(Chunk(len(self.chunks), tuple(self.pieces)))
        self.pieces = []
        self.fill = 0

    def add_whole(self, tensor: int, nbytes: int) -> None:
        if nbytes > self.chunk_size - self.fill:
            self.flush()
        self.pieces.append(Piece(tensor, 0, nbytes))
        self.fill += nbytes

    def add_split(self, tensor: int, nbytes: int) -> None:
        # Only a chunk holding bytes is closed: empty tensors before us may share the first range.
        if self.fill:
            self.flush()
        full_ranges, tail = divmod(nbytes, self.chunk_size)
        for number in range(full_ranges):
            start = number * self.chunk_size
            self.pieces.append(Piece(tensor, start, start + self.chunk_size))
            self.flush()
        if tail:
            self.pieces.append(Piece(tensor, nbytes - tail, nbytes))
            self.fill = tail


def plan_chunks(manifest: Manifest) -> list[Chunk]:
    """Cut the manifest's tensors into chunks; deterministic, so both sides get the same list."""
    planner = _Planner(manifest.chunk_size)
    aliases = manifest.target_of
    for position, spec in enumerate(manifest.tensors):
        if position in aliases:
            continue
        nbytes = spec.nbytes
        if nbytes <= manifest.chunk_size:
            planner.add_whole(position, nbytes)
        else:
            planner.add_split(position, nbytes)
    planner.flush()
    return planner.chunks
