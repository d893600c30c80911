"""Sizes as people write them in flags and config files ("1GiB", "256MiB", "1.5GB", "3145728").

Parsing is pydantic's `ByteSize`, the same rule the config files are validated with (fl/config.py
declares its size fields as `ByteSize`), so a flag and a config entry accept the same spellings.
"""

from __future__ import annotations

from pydantic import ByteSize, TypeAdapter, ValidationError

__all__ = ["format_size", "parse_size"]

_BYTE_SIZE: TypeAdapter[ByteSize] = TypeAdapter(ByteSize)


def parse_size(text: str | int) -> int:
    """'1GiB' -> 1073741824, '1.5GB' -> 1500000000, '4096' or 4096 -> 4096; ValueError if bad."""
    try:
        return int(_BYTE_SIZE.validate_python(text))
    except ValidationError as error:
        reason = error.errors()[0]["msg"]
        raise ValueError(
            f"cannot read {text!r} as a size: {reason} (use e.g. 256MiB, 1GiB or a number of bytes)"
        ) from None


def format_size(nbytes: int) -> str:
    """Three significant digits in binary units: 1073741824 -> '1 GiB', 1536 -> '1.5 KiB'."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.3g} {unit}"
    return f"{nbytes} B"
