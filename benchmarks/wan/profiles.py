"""Link profiles of the emulated WAN and the arithmetic derived from them.

A profile is symmetric: each direction gets half the round trip as one-way delay, the same rate
and the same random loss. Rates count IP bytes (headers included, no Ethernet framing), as tbf
does on a tun device; the best TCP goodput over such a link is therefore 1448/1500 of the rate
(1500-byte packets carrying 1448 bytes of payload with timestamps).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["MIN_QUEUE_BYTES", "PROFILES", "Profile", "profile_named"]

# The drop-tail queue holds about one bandwidth-delay product, but never less than this: the
# kernel hands the tun device 64 KB TSO bursts, and a LAN switch buffers a few of them.
MIN_QUEUE_BYTES = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Profile:
    """One emulated link: round-trip time, rate per direction, random loss per segment."""

    name: str
    rtt_s: float
    rate_bit_s: float
    loss: float = 0.0
    congestion_control: str = "bbr"  # bbr holds its rate under random loss; cubic collapses
    description: str = ""

    def __post_init__(self) -> None:
        if self.rtt_s < 0:
            raise ValueError(f"profile {self.name!r}: rtt_s must be >= 0, got {self.rtt_s}")
        if self.rate_bit_s <= 0:
            raise ValueError(
                f"profile {self.name!r}: rate_bit_s must be > 0, got {self.rate_bit_s}"
            )
        if not 0.0 <= self.loss < 1.0:
            raise ValueError(f"profile {self.name!r}: loss must be in [0, 1), got {self.loss}")

    @property
    def one_way_delay_s(self) -> float:
        """Delay added in each direction."""
        return self.rtt_s / 2

    @property
    def rate_bytes_s(self) -> float:
        """Link rate in IP bytes per second, per direction."""
        return self.rate_bit_s / 8

    @property
    def link_mb_s(self) -> float:
        """Link rate in MB/s (10**6 bytes), the unit the benchmarks report throughput in."""
        return self.rate_bytes_s / 1e6

    @property
    def bdp_bytes(self) -> int:
        """Bandwidth-delay product: the bytes in flight that fill the link."""
        return int(self.rate_bytes_s * self.rtt_s)

    @property
    def queue_bytes(self) -> int:
        """Capacity of the bottleneck's drop-tail queue."""
        return max(self.bdp_bytes, MIN_QUEUE_BYTES)

    def describe(self) -> dict[str, float | int | str]:
        """The profile as plain JSON values."""
        return {
            "profile": self.name,
            "profile_rtt_ms": round(self.rtt_s * 1000, 3),
            "rate_mbit_s": round(self.rate_bit_s / 1e6, 3),
            "loss": self.loss,
            "queue_bytes": self.queue_bytes,
        }


PROFILES: dict[str, Profile] = {
    profile.name: profile
    for profile in (
        Profile("lan", 0.0, 1e9, description="no added delay, 1 Gbit/s"),
        Profile("regional", 0.050, 1e9, description="50 ms RTT, 1 Gbit/s"),
        Profile(
            "intercontinental", 0.200, 200e6, loss=0.001, description="200 ms RTT, 200 Mbit/s, 0.1%"
        ),
    )
}


def profile_named(name: str) -> Profile:
    """The profile called `name`; ValueError listing the known ones otherwise."""
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown WAN profile {name!r}; known: {', '.join(PROFILES)}") from None
