"""The fan-out benchmark's network: a hub bridge, the server's namespace and one per region, all in
the kernel (veth pairs, a bridge, tbf), so 16 flows at 1 Gbit/s cost Python nothing.

    netns <tag>s (server)     netns <tag>h (hub)              netns <tag>r0 .. r<R-1> (regions)
    wan0 10.202.0.1 <-veth->  s  \\                        /  r0 <-veth-> wan0 10.202.0.10
                                  br0 (a plain L2 bridge)      ...
                                                           \\  rK <-veth-> wan0 10.202.0.(10+K)

- The server's uplink is a tbf on its own wan0 (its egress), its downlink a tbf on the hub's end
  of the same pair (the hub's egress towards it). A region's link is the same pair of tbfs on its
  pair. Every namespace sits on one /24 behind the bridge: no routing, no IP forwarding.
- tbf's burst is 8 ms of the rate (at least 64 KiB): over any window of T seconds the link can
  pass at most rate * T + burst bytes, which is what `rate_check` holds the server's egress to.
  Its queue is 20 ms of the rate (at least 1 MiB), drop-tail.
- No added delay: this kernel has no netem (nor fq or etf), and the user-space forwarder of
  benchmarks/wan (which models delay) moves one flow at 1 Gbit/s with a core of its own; here
  16-32 flows cross the links while the server, the relays and up to 16 sites share two cores.
  RTT is that of veth and a bridge: tens of microseconds.
- Names are `twwan<pid>x<random><suffix>` (benchmarks/wan/netns.py), so `netns.remove_stale`
  deletes what a killed run left behind, and leaving the `FanoutNet` block (error, Ctrl-C, SIGTERM
  turned into SystemExit) deletes every namespace (their devices go with them).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import threading
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from benchmarks.wan import netns
from benchmarks.wan.emulator import NAMESPACE_SYSCTLS

__all__ = [
    "DEVICE",
    "SERVER_ADDRESS",
    "WIRE_PER_COUNTED",
    "FanoutNet",
    "LinkSpec",
    "NetSampler",
    "format_rate",
    "parse_rate",
    "rate_check",
    "region_address",
]

DEVICE = "wan0"
SERVER_ADDRESS = "10.202.0.1"
_PREFIX_LEN = 24
_BURST_SECONDS = 0.008
_QUEUE_SECONDS = 0.020
# The interface counters count a GSO super-packet (up to 64 KB) with one set of headers; tbf
# splits it and counts every 1514-byte frame (14 Ethernet + 20 IP + 32 TCP with timestamps +
# 1448 payload). Wire bytes are therefore at most the counted bytes times this.
WIRE_PER_COUNTED = 1514 / 1448
_RATE_UNITS = {"": 1, "bit": 1, "k": 10**3, "kbit": 10**3, "m": 10**6, "mbit": 10**6}
_RATE_UNITS |= {"g": 10**9, "gbit": 10**9}


def region_address(index: int) -> str:
    """The address of region `index`'s namespace on the bridge."""
    if not 0 <= index < 200:
        raise ValueError(f"at most 200 regions, got index {index}")
    return f"10.202.0.{10 + index}"


def parse_rate(text: str) -> int:
    """'1Gbit' / '1gbit/s' / '100Mbit' / '5e8' -> bits per second."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)(?:/s|ps)?\s*", text)
    if not match or match.group(2).lower() not in _RATE_UNITS:
        raise ValueError(f"cannot read {text!r} as a rate (use e.g. 1Gbit, 100Mbit, 5e8)")
    return int(float(match.group(1)) * _RATE_UNITS[match.group(2).lower()])


def format_rate(bits_per_second: float) -> str:
    """1e9 -> '1Gbit/s'."""
    for unit, scale in (("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bits_per_second >= scale:
            return f"{bits_per_second / scale:g}{unit}"
    return f"{bits_per_second:g}bit/s"


@dataclass(frozen=True)
class LinkSpec:
    """A tbf: rate in bits per second, burst and queue in bytes (derived from the rate)."""

    rate_bps: int

    @property
    def burst_bytes(self) -> int:
        return max(64 * 1024, int(self.rate_bps / 8 * _BURST_SECONDS))

    @property
    def queue_bytes(self) -> int:
        return max(1 << 20, int(self.rate_bps / 8 * _QUEUE_SECONDS))

    def tbf(self) -> list[str]:
        rate, burst, limit = f"{self.rate_bps}bit", str(self.burst_bytes), str(self.queue_bytes)
        return ["tbf", "rate", rate, "burst", burst, "limit", limit]

    def describe(self) -> dict[str, Any]:
        return {
            "rate_bps": self.rate_bps,
            "rate": format_rate(self.rate_bps),
            "burst_bytes": self.burst_bytes,
            "queue_bytes": self.queue_bytes,
        }


class FanoutNet:
    """Context manager: the hub, the server's namespace and `regions` region namespaces."""

    def __init__(
        self, regions: int, uplink: LinkSpec, downlink: LinkSpec, region_link: LinkSpec
    ) -> None:
        if regions < 1:
            raise ValueError("at least one region")
        tag = f"twwan{os.getpid()}x{secrets.token_hex(2)}"
        self.hub = f"{tag}h"
        self.server = f"{tag}s"
        self.regions = [f"{tag}r{index}" for index in range(regions)]
        self.uplink, self.downlink, self.region_link = uplink, downlink, region_link
        self._created: list[str] = []

    def __enter__(self) -> FanoutNet:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        netns.remove_stale()
        for name in (self.hub, self.server, *self.regions):
            netns.netns_add(name)
            self._created.append(name)
        netns.ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
        netns.ip("-n", self.hub, "link", "set", "br0", "up")
        self._attach(self.server, "s", SERVER_ADDRESS, self.uplink, self.downlink)
        for index, name in enumerate(self.regions):
            link = self.region_link
            self._attach(name, f"r{index}", region_address(index), link, link)

    def _attach(self, name: str, hub_end: str, address: str, up: LinkSpec, down: LinkSpec) -> None:
        """A veth pair from namespace `name` (wan0) to the hub's bridge, rate-limited both ways."""
        for key, value in NAMESPACE_SYSCTLS.items():
            netns.set_sysctl(name, key, value)
        netns.ip("link", "add", DEVICE, "netns", name, "type", "veth", "peer", "name", hub_end)
        netns.ip("link", "set", hub_end, "netns", self.hub)
        netns.ip("-n", self.hub, "link", "set", hub_end, "master", "br0", "up")
        netns.ip("-n", name, "addr", "add", f"{address}/{_PREFIX_LEN}", "dev", DEVICE)
        netns.ip("-n", name, "link", "set", DEVICE, "up")
        _tc(name, "qdisc", "add", "dev", DEVICE, "root", *up.tbf())
        _tc(self.hub, "qdisc", "add", "dev", hub_end, "root", *down.tbf())

    def stop(self) -> None:
        """Delete every namespace this object created; idempotent."""
        while self._created:
            netns.netns_delete(self._created.pop())

    def counters(self, name: str) -> dict[str, int]:
        """wan0's byte and packet counters in namespace `name` (the kernel's, layer 2)."""
        out = netns.ip("-n", name, "-s", "-j", "link", "show", "dev", DEVICE)
        stats = json.loads(out)[0]["stats64"]
        return {
            "tx_bytes": stats["tx"]["bytes"],
            "rx_bytes": stats["rx"]["bytes"],
            "tx_packets": stats["tx"]["packets"],
            "rx_packets": stats["rx"]["packets"],
        }

    def qdisc(self, name: str) -> dict[str, Any]:
        """The tbf's own counters on wan0 in namespace `name` (bytes sent, drops, overlimits)."""
        result = subprocess.run(
            ["tc", "-n", name, "-s", "-j", "qdisc", "show", "dev", DEVICE],
            capture_output=True,
            text=True,
            check=False,
        )
        try:
            entries = json.loads(result.stdout)
        except ValueError:
            return {}
        for entry in entries:
            if entry.get("kind") == "tbf":
                keys = ("bytes", "packets", "drops", "overlimits")
                return {key: entry.get(key) for key in keys}
        return {}

    def describe(self) -> dict[str, Any]:
        return {
            "uplink": self.uplink.describe(),
            "downlink": self.downlink.describe(),
            "region_link": self.region_link.describe(),
            "topology": "server and region namespaces on one bridge; tbf on each end of each "
            "veth pair; sites in their region's namespace",
            "rtt": "~0: veth and a bridge, no added delay (no netem on this kernel)",
        }


def _tc(name: str, *args: str) -> None:
    result = subprocess.run(["tc", "-n", name, *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"`tc -n {name} {' '.join(args)}` failed: {result.stderr.strip()}")


class NetSampler:
    """wan0's tx/rx byte counters in the namespace of process `pid`, every `interval` seconds
    (from /proc/<pid>/net/dev, which shows the namespace that process is in)."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid = pid
        self.interval = interval
        # (time.time() before and after the read, tx bytes, rx bytes)
        self.timeline: list[tuple[float, float, int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fanout-net", daemon=True)

    def start(self) -> NetSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        path = f"/proc/{self.pid}/net/dev"
        while not self._stop.is_set():
            before = time.time()
            try:
                with open(path) as handle:
                    text = handle.read()
            except OSError:
                return  # the process is gone
            after = time.time()
            for line in text.splitlines():
                name, _, fields = line.partition(":")
                if name.strip() == DEVICE:
                    values = fields.split()
                    self.timeline.append((before, after, int(values[8]), int(values[0])))
            self._stop.wait(self.interval)

    def between(self, start: float, end: float) -> dict[str, int]:
        """Bytes sent and received between two wall-clock times (nearest samples inside)."""
        inside = [sample for sample in self.timeline if start <= sample[0] <= end]
        if len(inside) < 2:
            return {"tx_bytes": 0, "rx_bytes": 0}
        return {
            "tx_bytes": inside[-1][2] - inside[0][2],
            "rx_bytes": inside[-1][3] - inside[0][3],
        }


def rate_check(
    timeline: list[tuple[float, float, int, int]],
    link: LinkSpec,
    window: float = 1.0,
    precision: float = 0.002,
    tolerance: float = 0.001,
) -> dict[str, Any]:
    """The highest egress rate over any `window` seconds of the sampled timeline, and whether
    the tbf's promise held throughout: at most rate * T + burst bytes over any span of T seconds.

    Strict on both counts: a sample's counters were read somewhere between its two timestamps,
    so the span between two samples is taken as the shortest it can have been (the later one's
    `before` less the earlier one's `after`), and the counted bytes are scaled up to the most
    wire bytes they can stand for (WIRE_PER_COUNTED). Samples whose read took longer than
    `precision` (the sampling thread was preempted: a busy machine) are left out, so that the
    uncertainty of a span stays a few milliseconds. What is left (the clocks, a 64 KB GSO
    packet counted whole at one instant) is covered by `tolerance`, a fraction of the rate."""
    precise = [sample for sample in timeline if sample[1] - sample[0] <= precision]
    best = 0.0
    worst_excess: float | None = None
    first = 0
    for last in range(len(precise)):
        while first + 1 < last and precise[last][0] - precise[first + 1][1] >= window:
            first += 1
        span = precise[last][0] - precise[first][1]
        if span < window:
            continue
        sent = (precise[last][2] - precise[first][2]) * WIRE_PER_COUNTED
        best = max(best, sent * 8 / span)
        excess = sent - (link.rate_bps / 8 * span * (1 + tolerance) + link.burst_bytes)
        worst_excess = excess if worst_excess is None else max(worst_excess, excess)
    return {
        "window_s": window,
        "max_wire_egress_bps": round(best),
        "max_egress_over_rate": round(best / link.rate_bps, 4),
        "allowed_over_rate": round(
            1 + tolerance + link.burst_bytes * 8 / link.rate_bps / window, 4
        ),
        "tolerance": tolerance,
        "limit_holds": None if worst_excess is None else worst_excess <= 0,
        "samples": len(timeline),
        "precise_samples": len(precise),
    }
