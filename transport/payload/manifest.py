"""The manifest: what a stream carries (names, dtypes, shapes, chunk size), as plain data.

The sender builds a `Manifest` from its source; it travels as the JSON header of the stream's first
frame (`to_header`), and the receiver rebuilds it with `from_header`, which validates every field
against `ManifestLimits` before anything is allocated: the manifest is the one place where a peer
announces sizes, so it is the one place where absurd sizes are refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import torch

from transport.exceptions import ManifestError

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DIGEST_ALGORITHM",
    "DTYPES",
    "DTYPE_SIZES",
    "MANIFEST_FORMAT",
    "Manifest",
    "ManifestLimits",
    "TensorSpec",
    "dtype_name",
]

DEFAULT_CHUNK_SIZE: Final = 8 * 2**20
MANIFEST_FORMAT: Final = 1
DIGEST_ALGORITHM: Final = "xxh3-128-tree"

# safetensors dtype names -> torch dtypes. Only dtypes that `safetensors.torch.load` decodes are
# listed, because every chunk must be a blob anyone can load (F8_E8M0 and F4 are missing from its
# table in safetensors 0.8, so they are left out on purpose).
DTYPES: Final[Mapping[str, torch.dtype]] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "U16": torch.uint16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "I64": torch.int64,
    "U64": torch.uint64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "C64": torch.complex64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3FNUZ": torch.float8_e4m3fnuz,
    "F8_E5M2FNUZ": torch.float8_e5m2fnuz,
}
DTYPE_SIZES: Final[Mapping[str, int]] = {
    name: torch.empty((), dtype=dtype).element_size() for name, dtype in DTYPES.items()
}
_NAMES_BY_DTYPE: Final[Mapping[torch.dtype, str]] = {dt: name for name, dt in DTYPES.items()}

# A key of the safetensors header that can never be a tensor name.
_RESERVED_NAME: Final = "__metadata__"


def dtype_name(dtype: torch.dtype) -> str | None:
    """The safetensors name of a torch dtype, or None when tensorwire cannot carry it."""
    return _NAMES_BY_DTYPE.get(dtype)


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One tensor of the stream: its name, safetensors dtype name and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        """Number of elements (1 for a 0-d tensor, 0 when any dimension is 0)."""
        count = 1
        for dim in self.shape:
            count *= dim
        return count

    @property
    def nbytes(self) -> int:
        """Size of the tensor's data in bytes (a Python int: no 2**32 cap)."""
        return self.numel * DTYPE_SIZES[self.dtype]

    @property
    def torch_dtype(self) -> torch.dtype:
        """The torch dtype this spec's dtype name stands for."""
        return DTYPES[self.dtype]


@dataclass(frozen=True, slots=True)
class ManifestLimits:
    """Bounds a received manifest must respect; checked before anything is allocated."""

    max_tensors: int = 1_000_000
    max_name_bytes: int = 1024
    max_ndim: int = 16
    max_total_bytes: int = 2**50
    max_chunk_size: int = 256 * 2**20
    # Not in the first sketch: a tiny chunk size with a huge total would make the plan itself
    # (one object per chunk) the allocation a hostile peer controls.
    max_chunks: int = 4 * 2**20
    max_metadata_bytes: int = 64 * 1024


@dataclass(frozen=True, slots=True)
class Manifest:
    """The stream's table of contents: tensors in send order, chunk size and user metadata."""

    tensors: tuple[TensorSpec, ...]
    chunk_size: int = DEFAULT_CHUNK_SIZE
    metadata: Mapping[str, str] = field(default_factory=dict)
    _index: dict[str, int] = field(init=False, repr=False, compare=False, hash=False)
    _total_bytes: int = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        index: dict[str, int] = {}
        for position, spec in enumerate(self.tensors):
            if spec.name in index:
                raise ManifestError(
                    f"tensor name {spec.name!r} appears twice (positions {index[spec.name]} "
                    f"and {position})"
                )
            index[spec.name] = position
        if isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int):
            raise ManifestError(f"chunk_size must be an int, got {self.chunk_size!r}")
        if self.chunk_size < 1:
            raise ManifestError(f"chunk_size must be >= 1, got {self.chunk_size}")
        object.__setattr__(self, "_index", index)
        object.__setattr__(self, "_total_bytes", sum(spec.nbytes for spec in self.tensors))

    @property
    def total_bytes(self) -> int:
        """Sum of every tensor's nbytes."""
        return self._total_bytes

    def index_of(self, name: str) -> int:
        """Position of the tensor called `name`; KeyError when the manifest has none."""
        return self._index[name]

    def to_header(self) -> dict[str, Any]:
        """A JSON-able dict that `from_header` turns back into an equal manifest."""
        return {
            "format": MANIFEST_FORMAT,
            "digest": DIGEST_ALGORITHM,
            "chunk_size": self.chunk_size,
            "total_bytes": self.total_bytes,
            "metadata": dict(self.metadata),
            "tensors": [
                {"name": spec.name, "dtype": spec.dtype, "shape": list(spec.shape)}
                for spec in self.tensors
            ],
        }

    @classmethod
    def from_header(cls, obj: Any, limits: ManifestLimits = ManifestLimits()) -> Manifest:
        """Validate a received manifest header and build the manifest; ManifestError if bad."""
        return _ManifestReader(limits).read(obj)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8", "replace"))


class _ManifestReader:
    """Checks a manifest header field by field; each failure names the tensor and the value."""

    def __init__(self, limits: ManifestLimits) -> None:
        self.limits = limits

    def read(self, obj: Any) -> Manifest:
        if not isinstance(obj, dict):
            raise ManifestError(f"manifest must be a JSON object, got {type(obj).__name__}")
        self._check_envelope(obj)
        chunk_size = self._chunk_size(obj.get("chunk_size"))
        metadata = self._metadata(obj.get("metadata", {}))
        specs = self._tensors(obj.get("tensors"))
        total = sum(spec.nbytes for spec in specs)
        if total > self.limits.max_total_bytes:
            raise ManifestError(
                f"manifest totals {total} bytes, over the limit of {self.limits.max_total_bytes}"
            )
        announced = obj.get("total_bytes", total)
        if announced != total:
            raise ManifestError(f"total_bytes says {announced!r} but the tensors sum to {total}")
        min_chunks = -(-total // chunk_size)
        if min_chunks > self.limits.max_chunks:
            raise ManifestError(
                f"{total} bytes in chunks of {chunk_size} makes at least {min_chunks} chunks, "
                f"over the limit of {self.limits.max_chunks}"
            )
        return Manifest(tuple(specs), chunk_size, metadata)

    def _check_envelope(self, obj: dict[str, Any]) -> None:
        if obj.get("format") != MANIFEST_FORMAT:
            raise ManifestError(
                f"manifest format {obj.get('format')!r} is not supported (this side speaks "
                f"{MANIFEST_FORMAT})"
            )
        if obj.get("digest") != DIGEST_ALGORITHM:
            raise ManifestError(
                f"digest algorithm {obj.get('digest')!r} is not supported (expected "
                f"{DIGEST_ALGORITHM!r})"
            )

    def _chunk_size(self, value: Any) -> int:
        if not _is_int(value) or not 1 <= value <= self.limits.max_chunk_size:
            raise ManifestError(
                f"chunk_size {value!r} is not an int in [1, {self.limits.max_chunk_size}]"
            )
        return int(value)

    def _metadata(self, value: Any) -> dict[str, str]:
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            raise ManifestError("metadata must be a JSON object of string keys and string values")
        size = sum(_utf8_len(key) + _utf8_len(text) for key, text in value.items())
        if size > self.limits.max_metadata_bytes:
            raise ManifestError(
                f"metadata is {size} bytes, over the limit of {self.limits.max_metadata_bytes}"
            )
        return dict(value)

    def _tensors(self, value: Any) -> list[TensorSpec]:
        if not isinstance(value, list):
            raise ManifestError(f"tensors must be a JSON array, got {type(value).__name__}")
        if len(value) > self.limits.max_tensors:
            raise ManifestError(
                f"manifest lists {len(value)} tensors, over the limit of {self.limits.max_tensors}"
            )
        specs: list[TensorSpec] = []
        seen: set[str] = set()
        for position, entry in enumerate(value):
            spec = self._tensor(position, entry)
            if spec.name in seen:
                raise ManifestError(
                    f"tensor name {spec.name!r} appears twice (again at {position})"
                )
            seen.add(spec.name)
            specs.append(spec)
        return specs

    def _tensor(self, position: int, entry: Any) -> TensorSpec:
        if not isinstance(entry, dict):
            raise ManifestError(f"tensor #{position} must be a JSON object, got {entry!r:.80}")
        name = self._name(position, entry.get("name"))
        dtype = entry.get("dtype")
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise ManifestError(
                f"tensor {name!r} has unknown dtype {dtype!r:.40} (known: {', '.join(DTYPES)})"
            )
        shape = self._shape(name, DTYPE_SIZES[dtype], entry.get("shape"))
        return TensorSpec(name, dtype, shape)

    def _name(self, position: int, name: Any) -> str:
        if not isinstance(name, str) or not name:
            raise ManifestError(f"tensor #{position} name must be a non-empty string, got {name!r}")
        try:
            size = len(name.encode("utf-8"))
        except UnicodeEncodeError as exc:
            raise ManifestError(f"tensor #{position} name is not valid UTF-8: {name!r}") from exc
        if size > self.limits.max_name_bytes:
            raise ManifestError(
                f"tensor #{position} name is {size} bytes, over the limit of "
                f"{self.limits.max_name_bytes}: {name[:64]!r}..."
            )
        if name == _RESERVED_NAME:
            raise ManifestError(f"tensor #{position} uses the reserved name {_RESERVED_NAME!r}")
        return name

    def _shape(self, name: str, itemsize: int, shape: Any) -> tuple[int, ...]:
        if not isinstance(shape, list):
            raise ManifestError(f"tensor {name!r} shape must be a JSON array, got {shape!r:.80}")
        if len(shape) > self.limits.max_ndim:
            raise ManifestError(
                f"tensor {name!r} has {len(shape)} dimensions, over the limit of "
                f"{self.limits.max_ndim}"
            )
        nbytes = itemsize
        for dim in shape:
            if not _is_int(dim) or not 0 <= dim <= self.limits.max_total_bytes:
                raise ManifestError(f"tensor {name!r} has invalid dimension {dim!r} in {shape}")
            # Multiplying step by step and checking each time keeps the numbers small even
            # when a hostile shape would overflow any fixed-width integer.
            nbytes *= dim
            if nbytes > self.limits.max_total_bytes:
                raise ManifestError(
                    f"tensor {name!r} with shape {shape} is over {self.limits.max_total_bytes} "
                    "bytes (the total limit)"
                )
        return tuple(int(dim) for dim in shape)
