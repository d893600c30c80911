"""Per-chunk lossless compression: zstd with byte grouping for floating dtypes. Pure.

Sender, per thread:

    compressor = ChunkCompressor(level=1)
    parts = encode_chunk(manifest, chunk, source.chunk_views(chunk))
    codec_header, payload = compressor.compress(segments_for_chunk(manifest, chunk), parts)
    # codec_header goes into the frame header, payload parts into one writev

Receiver, per thread:

    size = ChunkDecompressor().decompress_into(codec_header, payload, blob_buffer)
    decode_chunk(manifest, chunk, blob_buffer[:size])

`CompressionPolicy` says whether a chunk should be compressed at all ("off", "on", "auto").
The codec header format is described in transport.codecs.header.
"""

from transport.codecs.chunk import (
    DEFAULT_LEVEL,
    MIN_COMPRESS_BYTES,
    RAW_RATIO,
    ChunkCompressor,
    ChunkDecompressor,
)
from transport.codecs.header import CODEC_NAME, CODEC_VERSION, MAX_SEGMENTS
from transport.codecs.policy import CompressionMode, CompressionPolicy
from transport.codecs.segments import Segment, plane_count, segments_for_chunk

__all__ = [
    "CODEC_NAME",
    "CODEC_VERSION",
    "DEFAULT_LEVEL",
    "MAX_SEGMENTS",
    "MIN_COMPRESS_BYTES",
    "RAW_RATIO",
    "ChunkCompressor",
    "ChunkDecompressor",
    "CompressionMode",
    "CompressionPolicy",
    "Segment",
    "plane_count",
    "segments_for_chunk",
]
