"""Check the emulated link before trusting any figure measured over it.

Plain blocking sockets, one child process in each namespace:
- RTT: a TCP connect and a few 1-byte echoes with TCP_NODELAY on an idle link; the kernel's
  min RTT of that connection (TCP_INFO, immune to the two processes' scheduling on a busy
  machine) must be within 10% of the profile's RTT (within 1 ms for a profile without added
  delay). The echoes' median is reported beside it.
- rate: one bulk TCP flow with the profile's congestion control for `bulk_seconds`; its goodput
  from the middle (slow start is over) to its end (a least-squares slope) must reach
  MIN_RATE_FRACTION of the link rate. The
  namespaces let socket buffers grow to 64 MiB, well above every profile's BDP, so the window
  never limits this flow.
"""

from __future__ import annotations

import multiprocessing
import socket
import statistics
import struct
import time
import traceback
from typing import Any

from benchmarks.probes import MIB, run_children
from benchmarks.wan.emulator import EmulatedWan
from benchmarks.wan.netns import run_in_netns
from benchmarks.wan.profiles import Profile

__all__ = [
    "MAX_LATE_FRACTION",
    "MAX_RATE_FRACTION",
    "MIN_RATE_FRACTION",
    "RTT_TOLERANCE",
    "bulk_seconds_for",
    "judge",
    "steady_rate",
    "validate_link",
]

RTT_TOLERANCE = 0.10
RTT_FLOOR_S = 0.001  # a profile without added delay: the forwarder's own latency must stay below
MIN_RATE_FRACTION = 0.85  # goodput can reach at most 1448/1500 of an IP-level rate
MAX_RATE_FRACTION = 1.10  # well above the link rate, something disturbed the measurement
MAX_LATE_FRACTION = 0.01  # frames the forwarder may write later than its lateness threshold
_PINGS = 5
_TCP_INFO_LEN = 256
_TCPI_MIN_RTT_OFFSET = 148  # struct tcp_info, linux/tcp.h (since 4.10)
_PORT_TIMEOUT_S = 60.0


def bulk_seconds_for(profile: Profile) -> float:
    """Long enough for slow start (and BBR's drain of the queue it overfilled, ~12 RTTs at
    200 ms) to end well inside the first half of the flow."""
    return max(3.0, 40 * profile.rtt_s)


def validate_link(
    wan: EmulatedWan, congestion_control: str | None, bulk_seconds: float | None = None
) -> dict[str, Any]:
    """Measure RTT and one bulk flow's rate over `wan`; the figures and whether they pass."""
    seconds = bulk_seconds if bulk_seconds is not None else bulk_seconds_for(wan.profile)
    before = wan.counters()[0]
    port_queue: Any = multiprocessing.get_context("spawn").Queue()
    server_args = (wan.netns_b, _server_child, wan.address_b, port_queue)
    client_args = (wan.netns_a, _client_child, wan.address_b, port_queue, seconds)
    server, client = run_children(
        [(run_in_netns, server_args), (run_in_netns, (*client_args, congestion_control))],
        timeout=seconds + 120,
    )
    after = wan.counters()[0]
    frames = max(1, after["frames"] - before["frames"])
    late_fraction = (after["late_frames"] - before["late_frames"]) / frames
    rate = steady_rate(server["timeline"], seconds)
    figures = judge(wan.profile, client["min_rtt_s"], rate, late_fraction)
    return figures | {
        "echo_rtt_ms": round(statistics.median(client["rtts_s"]) * 1e3, 3),
        "connect_ms": round(client["connect_s"] * 1e3, 3),
        "validation_late_threshold_ms": after["late_threshold_ms"],
        "validation_bulk_seconds": seconds,
        "validation_congestion_control": client["congestion_control"],
    }


def judge(
    profile: Profile, rtt_s: float, rate_bytes_s: float, late_fraction: float = 0.0
) -> dict[str, Any]:
    """The validation verdict for measured RTTs, bulk goodput and the share of frames the
    forwarder wrote late (a starved forwarder delivers in bursts: neither rate nor RTT hold)."""
    allowed = RTT_TOLERANCE * profile.rtt_s if profile.rtt_s > 0 else RTT_FLOOR_S
    rtt_ok = abs(rtt_s - profile.rtt_s) <= allowed
    utilization = rate_bytes_s / profile.rate_bytes_s
    rate_ok = MIN_RATE_FRACTION <= utilization <= MAX_RATE_FRACTION
    reasons = []
    if late_fraction > MAX_LATE_FRACTION:
        reasons.append(
            f"the forwarder wrote {late_fraction:.1%} of the frames late (more than "
            f"{MAX_LATE_FRACTION:.0%}): this machine is too busy to emulate the link faithfully"
        )
    if not rtt_ok:
        reasons.append(
            f"RTT {rtt_s * 1e3:.2f} ms is not within {allowed * 1e3:.2f} ms of the profile's "
            f"{profile.rtt_s * 1e3:.1f} ms"
        )
    if utilization > MAX_RATE_FRACTION:
        reasons.append(
            f"a bulk TCP flow reached {rate_bytes_s / 1e6:.1f} MB/s, more than the "
            f"{profile.link_mb_s:.1f} MB/s link: the measurement was disturbed (busy CPU?)"
        )
    elif not rate_ok:
        reasons.append(
            f"a bulk TCP flow reached {rate_bytes_s / 1e6:.1f} MB/s, {utilization:.0%} of the "
            f"{profile.link_mb_s:.1f} MB/s link (needs {MIN_RATE_FRACTION:.0%}): the emulation "
            f"(or this machine's CPU) cannot carry the profile's rate"
        )
    return {
        "emulation_validated": rtt_ok and rate_ok and late_fraction <= MAX_LATE_FRACTION,
        "validation_problems": reasons,
        "rtt_ms": round(rtt_s * 1e3, 3),
        "raw_tcp_mb_s": round(rate_bytes_s / 1e6, 2),
        "raw_tcp_utilization": round(utilization, 3),
        "validation_late_fraction": round(late_fraction, 4),
    }


def steady_rate(timeline: list[tuple[float, int]], seconds: float) -> float:
    """Bytes/s of a flow sent for `seconds`, from (time since the first byte, total bytes) points:
    the least-squares slope from the middle of the flow (slow start is over) to end of file.

    Not the difference of two points: with random loss, a receiver's byte count jumps by up to a
    BDP when a retransmission fills a hole (the out-of-order data behind it become readable at
    once), and one such point at either end of the window would shift the rate by BDP/window."""
    window = [point for point in timeline if point[0] >= seconds / 2]
    if len(window) < 3:
        window = timeline[-3:]
    if len(window) < 2 or window[0][0] == window[-1][0]:
        return 0.0
    times, totals = zip(*window, strict=True)
    return max(0.0, statistics.linear_regression(times, totals).slope)


def _server_child(queue: Any, host: str, port_queue: Any) -> None:
    try:
        with socket.create_server((host, 0)) as listener:
            port_queue.put(listener.getsockname()[1])
            _serve_echo(listener)
            timeline = _serve_bulk(listener)
        queue.put({"role": "validation server", "timeline": timeline})
    except BaseException:
        queue.put({"role": "validation server", "error": traceback.format_exc()})


def _serve_echo(listener: socket.socket) -> None:
    conn, _ = listener.accept()
    with conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while data := conn.recv(64):
            conn.sendall(data)


def _serve_bulk(listener: socket.socket) -> list[tuple[float, int]]:
    conn, _ = listener.accept()
    buffer = bytearray(MIB)
    timeline: list[tuple[float, int]] = []
    total = 0
    with conn:
        count = conn.recv_into(buffer)
        started = last = time.perf_counter()
        while count:
            total += count
            now = time.perf_counter()
            if now - last >= 0.05:
                timeline.append((now - started, total))
                last = now
            count = conn.recv_into(buffer)
    timeline.append((time.perf_counter() - started, total))
    return timeline


def _client_child(
    queue: Any, host: str, port_queue: Any, seconds: float, congestion_control: str | None
) -> None:
    try:
        port = port_queue.get(timeout=_PORT_TIMEOUT_S)
        connect_s, rtts_s, min_rtt_s = _measure_rtt(host, port)
        used = _send_bulk(host, port, seconds, congestion_control)
        queue.put(
            {
                "role": "validation client",
                "connect_s": connect_s,
                "rtts_s": rtts_s,
                "min_rtt_s": min_rtt_s,
                "congestion_control": used,
            }
        )
    except BaseException:
        queue.put({"role": "validation client", "error": traceback.format_exc()})


def _kernel_min_rtt_s(conn: socket.socket) -> float:
    """tcpi_min_rtt from TCP_INFO: the kernel's smallest RTT sample (the handshake's included),
    taken in softirq and so not delayed by either process waiting for a CPU."""
    info = conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
    if len(info) < _TCPI_MIN_RTT_OFFSET + 4:
        raise RuntimeError("this kernel's TCP_INFO has no tcpi_min_rtt")
    return int(struct.unpack_from("I", info, _TCPI_MIN_RTT_OFFSET)[0]) / 1e6


def _measure_rtt(host: str, port: int) -> tuple[float, list[float], float]:
    started = time.perf_counter()
    with socket.create_connection((host, port), timeout=30) as conn:
        connect_s = time.perf_counter() - started
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        rtts = []
        for _ in range(_PINGS):
            sent = time.perf_counter()
            conn.sendall(b"p")
            if conn.recv(1) != b"p":
                raise RuntimeError("the validation echo server answered with the wrong byte")
            rtts.append(time.perf_counter() - sent)
        min_rtt_s = _kernel_min_rtt_s(conn)
    return connect_s, rtts, min_rtt_s


def _send_bulk(host: str, port: int, seconds: float, congestion_control: str | None) -> str:
    block = memoryview(bytearray(MIB))
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as conn:
        if congestion_control is not None:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, congestion_control.encode())
        conn.settimeout(30)
        conn.connect((host, port))
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            conn.sendall(block)
        used = conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16)
    return used.split(b"\0", 1)[0].decode()
