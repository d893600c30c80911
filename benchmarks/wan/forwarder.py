"""The user-space link between the two namespaces: one TUN device in each, and a loop that reads
frames from one, runs them through that direction's LinkModel and writes them to the other when
they are due.

The TUN devices are opened with IFF_VNET_HDR and TSO offloads, so the kernel hands over 64 KB
super-packets (a few thousand frames per second at 1 Gbit/s, which Python keeps up with) while
the MTU stays 1500 and loss still applies per 1448-byte TCP segment. Frames are written with
os.writev, so a cut super-packet's payload is never copied. The loop waits in select() (which
takes microsecond timeouts, where epoll rounds up to milliseconds) for the next due time or a
readable device.

Runs in its own spawned process (`forwarder_process`); the devices disappear when it exits.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import select
import signal
import struct
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from benchmarks.wan.link import LinkModel
from benchmarks.wan.netns import enter
from benchmarks.wan.profiles import Profile
from benchmarks.wan.vnet import Packet, parse_packet, split_run

__all__ = ["DEVICE", "Direction", "forwarder_process", "open_tun"]

DEVICE = "tw0"
TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
IFF_TUN, IFF_NO_PI, IFF_VNET_HDR = 0x0001, 0x1000, 0x4000
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN = 0x01, 0x02, 0x04, 0x08
_READ_SIZE = 65536 + 256  # the largest GSO frame (64 KB IP packet) plus the virtio_net_hdr
_READ_BATCH = 64  # frames read per wake-up before due frames get written again
TIMELINE_BIN_S = 0.1


def open_tun(name: str = DEVICE) -> int:
    """Create TUN device `name` in the caller's namespace with vnet headers and TSO; its fd."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        request = struct.pack("16sH22x", name.encode(), IFF_TUN | IFF_NO_PI | IFF_VNET_HDR)
        fcntl.ioctl(fd, TUNSETIFF, request)
        fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN)
    except OSError:
        os.close(fd)
        raise
    return fd


@dataclass
class Direction:
    """Frames from `source_fd` to `sink_fd` through `model`."""

    source_fd: int
    sink_fd: int
    model: LinkModel
    started: float = field(default_factory=time.monotonic)
    pending: deque[tuple[float, list[Any]]] = field(default_factory=deque)
    timeline: dict[int, int] = field(default_factory=dict)  # bin -> IP bytes written
    late_threshold_s: float = 0.002
    malformed: int = 0
    write_errors: int = 0
    frames: int = 0
    late_frames: int = 0  # written more than late_threshold_s after they were due
    max_late_s: float = 0.0

    def receive(self, now: float) -> None:
        """Read what the source device holds (up to a batch) and queue what survives."""
        for _ in range(_READ_BATCH):
            try:
                frame = os.read(self.source_fd, _READ_SIZE)
            except BlockingIOError:
                return
            try:
                packet = parse_packet(frame)
            except ValueError:
                self.malformed += 1
                continue
            self.enqueue(packet, now)

    def enqueue(self, packet: Packet, now: float) -> None:
        """Run `packet` through the link model; queue the surviving runs at their due times."""
        sizes = [packet.wire_bytes(index) for index in range(packet.segments)]
        for first, last, due in self.model.admit(now, sizes):
            self.pending.append((due, split_run(packet, first, last)))

    def release(self, now: float) -> float | None:
        """Write every frame due by `now`; the due time of the next one, or None."""
        pending = self.pending
        while pending and pending[0][0] <= now:
            due, parts = pending.popleft()
            self.frames += 1
            if now - due > self.late_threshold_s:
                self.late_frames += 1
                self.max_late_s = max(self.max_late_s, now - due)
            try:
                written = os.writev(self.sink_fd, parts)
            except OSError:
                self.write_errors += 1  # e.g. the device is not up yet: the frame is lost
                continue
            slot = int((now - self.started) / TIMELINE_BIN_S)
            self.timeline[slot] = self.timeline.get(slot, 0) + written
        return pending[0][0] if pending else None

    def counters(self) -> dict[str, Any]:
        """Counters of this direction; late_frames/frames tells whether the forwarder kept up."""
        return {
            **self.model.stats.as_dict(),
            "started_monotonic": self.started,
            "malformed": self.malformed,
            "write_errors": self.write_errors,
            "frames": self.frames,
            "late_frames": self.late_frames,
            "late_threshold_ms": round(self.late_threshold_s * 1000, 3),
            "max_late_ms": round(self.max_late_s * 1000, 3),
        }

    def report(self) -> dict[str, Any]:
        """Counters and the bytes-over-time of this direction."""
        return {
            **self.counters(),
            "timeline": [
                (round(slot * TIMELINE_BIN_S, 3), nbytes)
                for slot, nbytes in sorted(self.timeline.items())
            ],
        }


def forward(directions: list[Direction], control: Any) -> None:
    """Move frames until `control` (a multiprocessing Connection) says "stop" or closes; answer
    "counters" with both directions' counters."""
    control_fd = control.fileno()
    by_fd = {direction.source_fd: direction for direction in directions}
    watched = [*by_fd, control_fd]
    while True:
        now = time.monotonic()
        dues = [due for direction in directions if (due := direction.release(now)) is not None]
        timeout = max(0.0, min(dues) - time.monotonic()) if dues else None
        readable, _, _ = select.select(watched, [], [], timeout)
        now = time.monotonic()
        for fd in readable:
            if fd != control_fd:
                by_fd[fd].receive(now)
            elif not _answer(control, directions):
                return


def _answer(control: Any, directions: list[Direction]) -> bool:
    """Serve one control message; False when it is time to stop."""
    try:
        request = control.recv()
    except EOFError:
        return False
    if request != "counters":
        return False
    control.send([direction.counters() for direction in directions])
    return True


def forwarder_process(conn: Any, netns_a: str, netns_b: str, profile: Profile, seed: int) -> None:
    """Process entry: open a TUN device in each namespace, say ready, forward until told to stop,
    then send back both directions' reports."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us; Ctrl-C is its business
    try:
        enter(netns_a)
        fd_a = open_tun()
        enter(netns_b)
        fd_b = open_tun()
    except OSError as exc:
        conn.send({"error": f"cannot open the TUN devices: {exc}"})
        return
    conn.send({"ready": True})
    rng = random.Random(seed)
    # Late by a tenth of the one-way delay (at least 2 ms) distorts the RTT the flow sees.
    threshold = max(0.002, profile.one_way_delay_s / 10)
    directions = [
        Direction(fd_a, fd_b, _model(profile, rng), late_threshold_s=threshold),
        Direction(fd_b, fd_a, _model(profile, rng), late_threshold_s=threshold),
    ]
    _raise_priority()
    forward(directions, conn)
    conn.send({"a_to_b": directions[0].report(), "b_to_a": directions[1].report()})


def _model(profile: Profile, seeds: random.Random) -> LinkModel:
    return LinkModel(
        rate_bytes_s=profile.rate_bytes_s,
        delay_s=profile.one_way_delay_s,
        queue_bytes=profile.queue_bytes,
        loss=profile.loss,
        rng=random.Random(seeds.random()),
    )


def _raise_priority() -> None:
    """Run ahead of ordinary processes: a forwarder that waits for a CPU delivers late and in
    bursts, and the link it emulates is then neither its RTT nor its rate. It sleeps in select()
    between frames, so a low real-time priority costs the others little."""
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
    except (OSError, AttributeError):
        with contextlib.suppress(OSError):
            os.nice(-10)
