"""The manifest: what a stream carries (names, dtypes, shapes, chunk size), as plain data.

The sender builds a `Manifest` from its source; it travels as the JSON header of the stream's first
frame (`to_header`), and the receiver rebuilds it with `from_header`, which validates every field
against `ManifestLimits` before anything is allocated: the manifest is the one place where a peer
announces sizes, so it is the one place where absurd sizes are refused.

Tied tensors: `aliases` maps a tensor's name to the name of the tensor it is the very same tensor as
(see aliases.py). An alias keeps its entry in `tensors` (so the manifest still lists every name of
the state dict, with its dtype and shape) but carries no bytes: `total_bytes` counts each tensor
once, and the plan gives aliases no piece. The header has an "aliases" object only when there are
aliases, so a stream without any looks exactly as before; a peer that predates aliases refuses one
with aliases (its tensors no longer sum to `total_bytes`) instead of mis-receiving it.
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
    # The largest chunk the plan may hold (min(chunk_size, total bytes)), None: max_chunk_size. A
    # receiver allocates one such buffer to decompress a chunk into, whatever the compressed
    # frame's size, so it sets this to its own chunk size.
    max_chunk_bytes: int | None = None
    # Not in the first sketch: a tiny chunk size with a huge total would make the plan itself
    # (one object per chunk) the allocation a hostile peer controls.
    max_chunks: int = 4 * 2**20
    max_metadata_bytes: int = 64 * 1024
    # Tied weights are a handful per model; the bound keeps a hostile alias table small.
    max_aliases: int = 65_536


@dataclass(frozen=True, slots=True)
class Manifest:
    """The stream's table of contents: tensors in send order, chunk size, user metadata, aliases."""

    tensors: tuple[TensorSpec, ...]
    chunk_size: int = DEFAULT_CHUNK_SIZE
    metadata: Mapping[str, str] = field(default_factory=dict)
    aliases: Mapping[str, str] = field(default_factory=dict)  # alias name -> target name
    _index: dict[str, int] = field(init=False, repr=False, compare=False, hash=False)
    _total_bytes: int = field(init=False, repr=False, compare=False, hash=False)
    _target_of: dict[int, int] = field(init=False, repr=False, compare=False, hash=False)
    _aliases_of: dict[int, tuple[int, ...]] = field(
        init=False, repr=False, compare=False, hash=False
    )

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
        target_of = _resolve_aliases(self.tensors, index, self.aliases)
        aliases_of: dict[int, tuple[int, ...]] = {}
        for alias, target in target_of.items():
            aliases_of[target] = (*aliases_of.get(target, ()), alias)
        travelling = (spec.nbytes for i, spec in enumerate(self.tensors) if i not in target_of)
        object.__setattr__(self, "_index", index)
        object.__setattr__(self, "_target_of", target_of)
        object.__setattr__(self, "_aliases_of", aliases_of)
        object.__setattr__(self, "_total_bytes", sum(travelling))

    @property
    def total_bytes(self) -> int:
        """Bytes the stream carries: every tensor's nbytes, each alias's bytes not again."""
        return self._total_bytes

    @property
    def target_of(self) -> Mapping[int, int]:
        """Position of each alias -> position of the tensor it is (its target, never an alias)."""
        return self._target_of

    def aliases_of(self, position: int) -> tuple[int, ...]:
        """Positions of the aliases of the tensor at `position` (empty for most tensors)."""
        return self._aliases_of.get(position, ())

    def index_of(self, name: str) -> int:
        """Position of the tensor called `name`; KeyError when the manifest has none."""
        return self._index[name]

    def to_header(self) -> dict[str, Any]:
        """A JSON-able dict that `from_header` turns back into an equal manifest."""
        header = {
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
        if self.aliases:
            header["aliases"] = dict(self.aliases)
        return header

    @classmethod
    def from_header(cls, obj: Any, limits: ManifestLimits = ManifestLimits()) -> Manifest:
        """Validate a received manifest header and build the manifest; ManifestError if bad."""
        return _ManifestReader(limits).read(obj)


def _resolve_aliases(
    tensors: tuple[TensorSpec, ...], index: Mapping[str, int], aliases: Mapping[str, str]
) -> dict[int, int]:
    """Alias position -> target position; ManifestError naming the first alias that is wrong."""
    if not isinstance(aliases, Mapping):
        raise ManifestError(f"aliases must map names to names, got {type(aliases).__name__}")
    target_of: dict[int, int] = {}
    for alias, target in aliases.items():
        _check_alias(alias, target, index, aliases)
        mine, theirs = tensors[index[alias]], tensors[index[target]]
        if (mine.dtype, mine.shape) != (theirs.dtype, theirs.shape):
            raise ManifestError(
                f"alias {alias!r} is {mine.dtype}{list(mine.shape)} but its target {target!r} "
                f"is {theirs.dtype}{list(theirs.shape)}: an alias is the same tensor under "
                "another name"
            )
        target_of[index[alias]] = index[target]
    return target_of


def _check_alias(
    alias: Any, target: Any, index: Mapping[str, int], aliases: Mapping[str, str]
) -> None:
    if not isinstance(alias, str) or not isinstance(target, str):
        raise ManifestError(f"alias {alias!r:.80} -> {target!r:.80} is not a name -> name pair")
    if alias not in index:
        raise ManifestError(f"alias {alias!r:.80} is not the name of a tensor in the manifest")
    if target == alias:
        raise ManifestError(f"alias {alias!r} points at itself")
    if target not in index:
        raise ManifestError(
            f"alias {alias!r} points at {target!r:.80}, which is not a tensor in the manifest"
        )
    if target in aliases:
        raise ManifestError(
            f"alias {alias!r} points at {target!r}, itself an alias of "
            f"{aliases[target]!r:.80}: an alias must point at the tensor that carries the bytes"
        )


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
        aliases = self._aliases(obj.get("aliases", {}))
        specs = self._tensors(obj.get("tensors"))
        # Aliases count here although they do not travel: a file sink writes each one out under
        # its own name, so this is what a receiver may have to store.
        stored = sum(spec.nbytes for spec in specs)
        if stored > self.limits.max_total_bytes:
            raise ManifestError(
                f"manifest totals {stored} bytes, over the limit of {self.limits.max_total_bytes}"
            )
        manifest = Manifest(tuple(specs), chunk_size, metadata, aliases)
        self._check_chunks(obj.get("total_bytes", manifest.total_bytes), manifest)
        return manifest

    def _check_chunks(self, announced: Any, manifest: Manifest) -> None:
        total, chunk_size = manifest.total_bytes, manifest.chunk_size
        if announced != total:
            shared = " (each alias counted once)" if manifest.aliases else ""
            raise ManifestError(
                f"total_bytes says {announced!r} but the tensors sum to {total}{shared}"
            )
        largest, allowed = min(chunk_size, total), self.limits.max_chunk_bytes
        if allowed is not None and largest > allowed:
            raise ManifestError(
                f"chunk_size {chunk_size} makes chunks of up to {largest} bytes; this receiver "
                f"takes chunks of at most {allowed} (its own chunk_size): send with a chunk_size "
                "no larger than the receiver's"
            )
        min_chunks = -(-total // chunk_size)
        if min_chunks > self.limits.max_chunks:
            raise ManifestError(
                f"{total} bytes in chunks of {chunk_size} makes at least {min_chunks} chunks, "
                f"over the limit of {self.limits.max_chunks}"
            )

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

    def _aliases(self, value: Any) -> dict[str, str]:
        # Only the shape of the table here; which names it may use is checked by Manifest itself.
        if not isinstance(value, dict):
            raise ManifestError(f"aliases must be a JSON object, got {type(value).__name__}")
        if len(value) > self.limits.max_aliases:
            raise ManifestError(
                f"manifest lists {len(value)} aliases, over the limit of {self.limits.max_aliases}"
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
