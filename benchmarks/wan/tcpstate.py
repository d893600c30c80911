"""The sender's TCP state during a transfer, sampled from outside with `ss -tin` in its namespace.

Why: the link throughput of a long bbr flow drops to zero about every 10 s. That is the kernel's
BBR (v1) PROBE_RTT: when its min-RTT estimate is 10 s old it holds cwnd at 4 packets for 200 ms
plus a round trip, then restores the cwnd it had. At a 200 ms RTT that is ~0.4 s without data on
the link, while the socket still holds megabytes the application has written (`notsent`). The
samples let a run show that (`bbr_probe_rtt` in the JSON, shaded on the throughput plot) instead
of leaving a dip that looks like the transport's flow control.

`ss -N <netns>` runs once per sample (10 per second, a few ms of CPU each); no socket of the
measured processes is touched.
"""

from __future__ import annotations

import re
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Any

__all__ = [
    "PROBE_RTT_CWND",
    "SAMPLE_S",
    "SocketState",
    "TcpSampler",
    "parse_ss",
    "probe_rtt_spans",
]

SAMPLE_S = 0.1
PROBE_RTT_CWND = 4  # bbr_cwnd_min_target: the cwnd BBR holds while it probes the min RTT
_ADDRESSES = re.compile(r"(\S+:\d+)\s+(\S+:\d+)")
_FIELD = re.compile(r"\b(cwnd|notsent|bytes_acked|mrtt|pacing_gain):([\d.]+)")


@dataclass(frozen=True, slots=True)
class SocketState:
    """One connection in one `ss -tin` sample."""

    peer: str
    cwnd: int
    bytes_acked: int = 0
    notsent: int = 0
    bbr: bool = False
    pacing_gain: float | None = None
    min_rtt_ms: float | None = None

    @property
    def in_probe_rtt(self) -> bool:
        """BBR holding cwnd at its floor: PROBE_RTT (startup begins at 10, never at 4)."""
        return self.bbr and self.cwnd <= PROBE_RTT_CWND and self.pacing_gain == 1.0


def parse_ss(text: str) -> list[SocketState]:
    """The connections in the output of `ss -tinH` (each socket line followed by its info)."""
    states = []
    blocks = re.split(r"\n(?=\S)", text.strip())  # a socket line starts at column 0
    for block in blocks:
        addresses = _ADDRESSES.search(block)
        fields = dict(_FIELD.findall(block))
        if addresses is None or "cwnd" not in fields:
            continue
        gain = fields.get("pacing_gain")
        mrtt = fields.get("mrtt")
        states.append(
            SocketState(
                peer=addresses.group(2),
                cwnd=int(fields["cwnd"]),
                bytes_acked=int(fields.get("bytes_acked", 0)),
                notsent=int(fields.get("notsent", 0)),
                bbr="bbr:(" in block,
                pacing_gain=float(gain) if gain is not None else None,
                min_rtt_ms=float(mrtt) if mrtt is not None else None,
            )
        )
    return states


def probe_rtt_spans(
    samples: list[tuple[float, list[SocketState]]], sample_s: float = SAMPLE_S
) -> list[tuple[float, float]]:
    """(start, end) of the times some connection was in PROBE_RTT; a span covers its samples
    plus one sample period (the state held at least until the next one was taken)."""
    spans: list[tuple[float, float]] = []
    for moment, states in samples:
        if not any(state.in_probe_rtt for state in states):
            continue
        if spans and moment - spans[-1][1] <= sample_s / 2:
            spans[-1] = (spans[-1][0], moment + sample_s)
        else:
            spans.append((moment, moment + sample_s))
    return spans


class TcpSampler:
    """Sample the TCP connections from namespace `netns` to `peer_address` every SAMPLE_S
    seconds in a thread, between `with` and its end; times on time.monotonic()."""

    def __init__(self, netns: str, peer_address: str) -> None:
        self._command = ["ss", "-N", netns, "-tinH", "state", "established", "dst", peer_address]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tcp-sampler", daemon=True)
        self.samples: list[tuple[float, list[SocketState]]] = []
        self.failures = 0

    def __enter__(self) -> TcpSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            moment = time.monotonic()
            try:
                done = subprocess.run(
                    self._command, capture_output=True, text=True, timeout=5, check=False
                )
            except (OSError, subprocess.SubprocessError):
                self.failures += 1
                continue
            if done.returncode != 0:
                self.failures += 1
                continue
            states = parse_ss(done.stdout)
            if states:
                self.samples.append((moment, states))

    def report(self, offset_s: float) -> dict[str, Any]:
        """Summary figures and the cwnd timeline, times in seconds since `offset_s`."""
        shifted = [
            (round(moment - offset_s, 3), states)
            for moment, states in self.samples
            if moment >= offset_s
        ]
        spans = probe_rtt_spans(shifted)
        return {
            "bbr_probe_rtt": [(round(start, 3), round(end, 3)) for start, end in spans],
            "bbr_probe_rtt_seconds": round(sum(end - start for start, end in spans), 2),
            "tcp_sampler_failures": self.failures,
            "sender_cwnd": [
                (moment, sum(state.cwnd for state in states)) for moment, states in shifted
            ],
            "sender_notsent": [
                (moment, sum(state.notsent for state in states)) for moment, states in shifted
            ],
        }
