"""One direction of the emulated link, as pure arithmetic over (arrival time, segment sizes).

Per segment, in order:
1. random loss with probability p (drawn as geometric gaps, so the cost is per loss, not per
   segment), before the queue, as a lossy medium upstream of the bottleneck would;
2. the drop-tail queue: the backlog is what the virtual transmit clock has not sent yet
   (`(tx_free_at - now) * rate`); a segment that does not fit is dropped, like a full router
   buffer drops it;
3. the virtual transmit clock advances by the segment's wire time, and the segment is due at the
   far end one one-way delay after its last byte left.

A super-packet whose segments all survive leaves as one unit; losses cut it into contiguous runs,
each due when its last segment is (store and forward). Due times never decrease, so a FIFO of
(due, frame) per direction replaces a heap.
"""

from __future__ import annotations

import math
import random
import sys
from dataclasses import dataclass, field

__all__ = ["LinkModel", "LinkStats", "Run"]

Run = tuple[int, int, float]  # first segment, last segment, due time (seconds, monotonic clock)


@dataclass(slots=True)
class LinkStats:
    """Counters of one direction."""

    segments: int = 0
    delivered_bytes: int = 0
    lost_random: int = 0
    dropped_queue: int = 0
    peak_backlog_bytes: int = 0

    def as_dict(self) -> dict[str, int]:
        """Plain JSON values."""
        return {name: getattr(self, name) for name in self.__slots__}


@dataclass(slots=True)
class LinkModel:
    """Rate, delay, drop-tail queue and random loss of one direction of the link."""

    rate_bytes_s: float
    delay_s: float
    queue_bytes: int
    loss: float = 0.0
    rng: random.Random = field(default_factory=random.Random)
    stats: LinkStats = field(default_factory=LinkStats)
    _tx_free_at: float = 0.0
    _until_loss: int = 0

    def __post_init__(self) -> None:
        if self.rate_bytes_s <= 0 or self.delay_s < 0 or self.queue_bytes <= 0:
            raise ValueError(
                f"link needs rate > 0, delay >= 0, queue > 0; got rate={self.rate_bytes_s}, "
                f"delay={self.delay_s}, queue={self.queue_bytes}"
            )
        if not 0.0 <= self.loss < 1.0:
            raise ValueError(f"loss must be in [0, 1), got {self.loss}")
        self._until_loss = self._draw_gap()

    def _draw_gap(self) -> int:
        """Segments that pass before the next random loss: geometric with parameter p."""
        if self.loss <= 0.0:
            return sys.maxsize
        return int(math.log(1.0 - self.rng.random()) / math.log(1.0 - self.loss))

    def backlog_bytes(self, now: float) -> float:
        """Bytes queued at the bottleneck that the transmit clock has not sent by `now`."""
        return max(0.0, self._tx_free_at - now) * self.rate_bytes_s

    def admit(self, now: float, wire_sizes: list[int]) -> list[Run]:
        """Decide the fate of a packet's segments arriving at `now`; the surviving runs."""
        runs: list[Run] = []
        run_first = -1
        run_due = 0.0
        for index, size in enumerate(wire_sizes):
            if self._passes(now, size):
                if run_first < 0:
                    run_first = index
                run_due = self._tx_free_at + self.delay_s
                continue
            if run_first >= 0:
                runs.append((run_first, index - 1, run_due))
                run_first = -1
        if run_first >= 0:
            runs.append((run_first, len(wire_sizes) - 1, run_due))
        return runs

    def _passes(self, now: float, size: int) -> bool:
        stats = self.stats
        stats.segments += 1
        if self._until_loss == 0:
            self._until_loss = self._draw_gap()
            stats.lost_random += 1
            return False
        self._until_loss -= 1
        backlog = self.backlog_bytes(now)
        if backlog + size > self.queue_bytes:
            stats.dropped_queue += 1
            return False
        stats.peak_backlog_bytes = max(stats.peak_backlog_bytes, int(backlog + size))
        self._tx_free_at = max(self._tx_free_at, now) + size / self.rate_bytes_s
        stats.delivered_bytes += size
        return True
