"""State dict <-> safetensors chunks: manifest, plan, chunk codec, sources and sinks.

Pure: no asyncio, no sockets. The sender builds a Source (its manifest travels first), plans the
chunks with plan_chunks, and sends encode_chunk(...) buffers; the receiver rebuilds the manifest
with Manifest.from_header, plans the same chunks, decode_chunk(...)s each one and writes the pieces
to a Sink. Tied tensors (one tensor under several names) travel once: see aliases.py.
"""

from transport.payload.aliases import SharedStorageWarning, find_aliases
from transport.payload.chunk import METADATA_KEY, chunk_header, decode_chunk, encode_chunk
from transport.payload.manifest import (
    DEFAULT_CHUNK_SIZE,
    DIGEST_ALGORITHM,
    DTYPE_SIZES,
    DTYPES,
    MANIFEST_FORMAT,
    Manifest,
    ManifestLimits,
    TensorSpec,
    dtype_name,
)
from transport.payload.plan import Chunk, Piece, is_whole, plan_chunks
from transport.payload.relaying import RelayFile
from transport.payload.sinks import (
    CallbackSink,
    DigestSink,
    DigestStats,
    SafetensorsFileSink,
    Sink,
    StateDictSink,
    safetensors_file_header,
)
from transport.payload.sources import (
    SafetensorsSource,
    Source,
    StateDictSource,
    SyntheticSource,
    tensor_bytes,
)

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DIGEST_ALGORITHM",
    "DTYPES",
    "DTYPE_SIZES",
    "MANIFEST_FORMAT",
    "METADATA_KEY",
    "CallbackSink",
    "Chunk",
    "DigestSink",
    "DigestStats",
    "Manifest",
    "ManifestLimits",
    "Piece",
    "RelayFile",
    "SafetensorsFileSink",
    "SafetensorsSource",
    "SharedStorageWarning",
    "Sink",
    "Source",
    "StateDictSink",
    "StateDictSource",
    "SyntheticSource",
    "TensorSpec",
    "chunk_header",
    "decode_chunk",
    "dtype_name",
    "encode_chunk",
    "find_aliases",
    "is_whole",
    "plan_chunks",
    "safetensors_file_header",
    "tensor_bytes",
]
