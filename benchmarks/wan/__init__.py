"""Stream a synthetic state dict over an emulated WAN between two network namespaces.

    python -m benchmarks wan --profile regional --driver tcp --size 2GiB --json

Builds the link of the profile (benchmarks/wan/emulator.py: namespaces, TUN devices, the user-space
forwarder), validates it (RTT within 10%, one bulk TCP flow near the link rate; a link that fails
gets no throughput figure), then streams with tensorwire from namespace a to namespace b and
reports throughput against the link rate, the raw TCP rate measured in the same run, and each
side's peak RSS above its baseline. Needs root (namespaces, /dev/net/tun); without it the run is
skipped with a message, never faked. Results also go to benchmarks/results/ (JSON with
timelines, a markdown table, PNG plots when matplotlib is installed).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from benchmarks.probes import parse_size
from benchmarks.stream import add_data_arguments, settings_from
from benchmarks.wan.emulator import NAMESPACE_SYSCTLS, EmulatedWan
from benchmarks.wan.forwarder import TIMELINE_BIN_S
from benchmarks.wan.profiles import PROFILES, Profile, profile_named
from benchmarks.wan.report import link_throughput_series, write_results
from benchmarks.wan.tcpstate import TcpSampler
from benchmarks.wan.transfer import run_transfer
from benchmarks.wan.validate import validate_link

__all__ = ["DRIVERS", "HELP", "add_arguments", "preflight_problem", "run"]

HELP = "stream a synthetic state dict over an emulated WAN (network namespaces; needs root)"
DRIVERS = ("tcp", "grpc", "http")
RESULTS_DIR = Path(__file__).resolve().parent.parent / "results"
SYSTEM_DEFAULT = "system"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The wan benchmark's options."""
    parser.add_argument("--profile", choices=tuple(PROFILES), default="regional")
    parser.add_argument("--driver", choices=DRIVERS, default="tcp")
    parser.add_argument("--size", type=parse_size, default=parse_size("1GiB"))
    parser.add_argument("--streams", type=int, default=1, help="connections to stripe across")
    parser.add_argument(
        "--congestion-control",
        default=None,
        help=f"TCP_CONGESTION per socket (default: the profile's, bbr); '{SYSTEM_DEFAULT}' "
        "leaves the kernel default",
    )
    parser.add_argument("--send-buffer", type=parse_size, default=None, help="SO_SNDBUF")
    parser.add_argument("--recv-buffer", type=parse_size, default=None, help="SO_RCVBUF")
    parser.add_argument("--chunk-size", type=parse_size, default=None)
    parser.add_argument("--window", type=parse_size, default=None, help="per-stream credit")
    parser.add_argument("--dtype", default="BF16")
    add_data_arguments(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--validation-seconds", type=float, default=None)
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--no-files", action="store_true", help="write nothing to results/")
    parser.add_argument("--timeout", type=float, default=3600.0)


def preflight_problem() -> str | None:
    """Why the emulation cannot run on this machine, or None when it can."""
    if sys.platform != "linux":
        return "the WAN emulation needs Linux network namespaces"
    if os.geteuid() != 0:
        return "the WAN emulation needs root (network namespaces and /dev/net/tun)"
    if not os.path.exists("/dev/net/tun"):
        return "the WAN emulation needs /dev/net/tun, which this machine lacks"
    if shutil.which("ip") is None:
        return "the WAN emulation needs the `ip` command (iproute2)"
    return None


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Set up the profile's link, validate it, measure; one result dict (see module doc)."""
    profile = profile_named(args.profile)
    base = {"benchmark": "wan", "profile": profile.name, "driver": args.driver}
    base["streams"] = args.streams
    problem = preflight_problem()
    if problem is not None:
        print(f"wan: skipped: {problem}", file=sys.stderr)
        return base | {"skipped": problem, "emulation_validated": False}
    tcp_options = _tcp_options(args, profile)
    with sigterm_as_exit(), EmulatedWan(profile, seed=args.seed) as wan:
        checked = validate_link(wan, tcp_options.get("congestion_control"), args.validation_seconds)
        if not checked["emulation_validated"]:
            print(
                f"wan: not reporting: {'; '.join(checked['validation_problems'])}", file=sys.stderr
            )
            return base | profile.describe() | checked
        with TcpSampler(wan.netns_a, wan.address_b) as sampler:
            transfer = run_transfer(wan, _settings(args), tcp_options)
    result = base | _summary(profile, checked, transfer, tcp_options, wan.forwarder_report or {})
    tcp_state = sampler.report(transfer["started_monotonic"])
    result |= {key: value for key, value in tcp_state.items() if not key.startswith("sender_")}
    if not args.no_files:
        timelines = _timelines(transfer, wan.forwarder_report or {})
        timelines |= {key: value for key, value in tcp_state.items() if key.startswith("sender_")}
        result["files"] = write_results(result, timelines, args.results_dir)
    return result


def _tcp_options(args: argparse.Namespace, profile: Profile) -> dict[str, Any]:
    """TcpOptions fields for both sides; refuses a congestion control the kernel lacks."""
    wanted = args.congestion_control or profile.congestion_control
    options: dict[str, Any] = {}
    if wanted != SYSTEM_DEFAULT:
        available = Path("/proc/sys/net/ipv4/tcp_available_congestion_control").read_text().split()
        if wanted not in available:
            raise SystemExit(
                f"wan: congestion control {wanted!r} is not offered by this kernel "
                f"(available: {' '.join(available)}); pick one or '{SYSTEM_DEFAULT}'"
            )
        options["congestion_control"] = wanted
    if args.send_buffer:
        options["send_buffer_size"] = args.send_buffer
    if args.recv_buffer:
        options["recv_buffer_size"] = args.recv_buffer
    return options


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    """The stream benchmark's settings (the transfer is the same one, run in namespaces)."""
    return settings_from(args)


@contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """Turn SIGTERM into SystemExit so the namespaces are deleted (and children ended) on the
    way out."""

    def leave(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, leave)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _summary(
    profile: Profile,
    checked: dict[str, Any],
    transfer: dict[str, Any],
    tcp_options: dict[str, Any],
    forwarder: dict[str, Any],
) -> dict[str, Any]:
    sender, receiver = transfer["sender"], transfer["receiver"]
    seconds = receiver["finished_at"] - sender["started_at"]
    nbytes = receiver["bytes"]
    throughput = nbytes / seconds / 1e6
    data_link = forwarder.get("a_to_b", {})
    return {
        "bytes": nbytes,
        "seconds": round(seconds, 3),
        "throughput_mb_s": round(throughput, 2),
        "link_mb_s": round(profile.link_mb_s, 3),
        "link_utilization": round(throughput / profile.link_mb_s, 3),
        "sender_peak_rss_mib": round(sender["peak_rss_mib"], 1),
        "receiver_peak_rss_mib": round(receiver["peak_rss_mib"], 1),
        "digest_ok": bool(receiver["digest_ok"] and nbytes == transfer["size"]),
        **profile.describe(),
        **checked,
        "congestion_control": tcp_options.get("congestion_control", SYSTEM_DEFAULT),
        "tcp_options": {"tcp_nodelay": True, **tcp_options},
        "socket_buffers": "autotuned; tcp_rmem/tcp_wmem max "
        + NAMESPACE_SYSCTLS["net.ipv4.tcp_rmem"].split()[-1],
        "chunk_size": sender["chunk_size"],
        "stream_window": sender["stream_window"],
        "link_segments_lost_random": data_link.get("lost_random"),
        "link_segments_dropped_queue": data_link.get("dropped_queue"),
        "forwarder_late_fraction": round(
            data_link.get("late_frames", 0) / max(1, data_link.get("frames", 0)), 4
        ),
        "forwarder_max_late_ms": data_link.get("max_late_ms"),
    }


def _timelines(transfer: dict[str, Any], forwarder: dict[str, Any]) -> dict[str, Any]:
    data_link = forwarder.get("a_to_b", {})
    offset = transfer["started_monotonic"] - data_link.get("started_monotonic", 0.0)
    return {
        "link_mb_s": link_throughput_series(data_link.get("timeline", []), offset, TIMELINE_BIN_S),
        "sender_rss": transfer["sender"].get("rss_timeline", []),
        "receiver_rss": transfer["receiver"].get("rss_timeline", []),
    }
