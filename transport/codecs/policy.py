"""When to compress: "off", "on", or "auto" from measured codec speed, ratio and link rate.

Compression pays when the link is the bottleneck. With a ratio r (raw / compressed), compression
speed C and decompression speed D per thread, T threads per side and a link of L bytes/s, moving
one raw byte takes

    off:  1 / L
    on:   max(1 / (r * L), 1 / (C * T), 1 / (D * T))      (the three stages overlap in a pipeline)

and "auto" compresses iff `on < off * (1 - margin)`. The codec figures come from the stream's own
first chunks (`observe_codec`), the link rate from timed sends (`observe_link_rate`, or passed to
`decide`); both are byte-weighted moving averages, so the decision follows the link as it changes.
Until a codec sample exists "auto" compresses: that is how the first sample is taken.

Pure: no clock is read here; callers time their own work and report it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final, Literal, get_args

from transport.exceptions import ConfigError

__all__ = ["CompressionMode", "CompressionPolicy", "RateEstimate"]

CompressionMode = Literal["off", "on", "auto"]
_MODES: Final = get_args(CompressionMode)


@dataclass(slots=True)
class RateEstimate:
    """Byte-weighted moving average of amount / seconds; older samples fade by `1 - weight`."""

    weight: float
    amount: float = 0.0
    seconds: float = 0.0

    def add(self, amount: float, seconds: float) -> None:
        """Fold in one measurement."""
        keep = 1.0 - self.weight
        self.amount = self.amount * keep + amount
        self.seconds = self.seconds * keep + seconds

    @property
    def rate(self) -> float | None:
        """amount per second, or None before the first usable sample."""
        return self.amount / self.seconds if self.seconds > 0 and self.amount > 0 else None


def _check_count(name: str, value: float) -> None:
    if isinstance(value, bool) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}")


class CompressionPolicy:
    """Decides per chunk whether to compress; see the module docstring for the model."""

    def __init__(
        self,
        mode: CompressionMode = "auto",
        level: int = 1,
        *,
        threads: int = 1,
        receiver_threads: int | None = None,
        margin: float = 0.1,
        weight: float = 0.25,
    ) -> None:
        if mode not in _MODES:
            raise ConfigError(f"compression mode must be one of {_MODES}, got {mode!r}")
        for name, count in (("threads", threads), ("receiver_threads", receiver_threads or 1)):
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise ConfigError(f"{name} must be an int >= 1, got {count!r}")
        if not 0 <= margin < 1 or not 0 < weight <= 1:
            raise ConfigError(
                f"margin must be in [0, 1) and weight in (0, 1], got {margin}, {weight}"
            )
        self.mode: CompressionMode = mode
        self.level = level
        self.threads = threads
        self.receiver_threads = receiver_threads or threads
        self.margin = margin
        self._ratio = RateEstimate(weight)  # raw bytes per compressed byte ("per second" unused)
        self._compress = RateEstimate(weight)
        self._decompress = RateEstimate(weight)
        self._link = RateEstimate(weight)

    def observe_codec(
        self,
        raw_bytes: int,
        compressed_bytes: int,
        seconds: float,
        *,
        decompress_seconds: float | None = None,
    ) -> None:
        """One chunk compressed by one thread: sizes and time (and its decompression time)."""
        for name, value in (("raw_bytes", raw_bytes), ("compressed_bytes", compressed_bytes)):
            _check_count(name, value)
        _check_count("seconds", seconds)
        self._ratio.add(raw_bytes, compressed_bytes)
        self._compress.add(raw_bytes, seconds)
        if decompress_seconds is not None:
            _check_count("decompress_seconds", decompress_seconds)
            self._decompress.add(raw_bytes, decompress_seconds)

    def observe_link_rate(self, nbytes: int, seconds: float) -> None:
        """`nbytes` (as sent on the wire) took `seconds` of sending: the link's rate."""
        _check_count("nbytes", nbytes)
        _check_count("seconds", seconds)
        self._link.add(nbytes, seconds)

    @property
    def ratio(self) -> float | None:
        """Raw / compressed bytes so far, or None before a sample."""
        return self._ratio.rate

    @property
    def link_rate(self) -> float | None:
        """Estimated link rate in bytes/s, or None before a sample."""
        return self._link.rate

    def seconds_per_byte(self, link_bytes_per_s: float) -> tuple[float, float] | None:
        """(without, with compression) time to move one raw byte; None without a codec sample."""
        ratio, compress = self._ratio.rate, self._compress.rate
        if ratio is None or compress is None:
            return None
        stages = [1.0 / (ratio * link_bytes_per_s), 1.0 / (compress * self.threads)]
        decompress = self._decompress.rate
        if decompress is not None:
            stages.append(1.0 / (decompress * self.receiver_threads))
        return 1.0 / link_bytes_per_s, max(stages)

    def decide(self, link_bytes_per_s: float | None = None) -> bool:
        """Compress the next chunk? `link_bytes_per_s` overrides the observed link rate."""
        if self.mode != "auto":
            return self.mode == "on"
        link = link_bytes_per_s if link_bytes_per_s is not None else self._link.rate
        if link is None:
            return True  # nothing known yet: compress, which measures the codec
        if not math.isfinite(link) or link <= 0:
            raise ConfigError(f"link rate must be a finite number > 0, got {link!r}")
        times = self.seconds_per_byte(link)
        if times is None:
            return True
        without, with_compression = times
        return with_compression < without * (1.0 - self.margin)
