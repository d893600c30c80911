"""One FedAvg round to N sites behind a rate-limited server uplink, direct or through relays.

    python -m benchmarks fanout --clients 16 --model-size 512MiB --uplink 1Gbit --json
    python -m benchmarks fanout --clients 16 --model-size 512MiB --uplink 1Gbit --relays 4 --json

The network (benchmarks/fanout_net.py) is in the kernel: the server's namespace and one namespace
per region on a bridge, tbf on both ends of every link (the server's uplink at --uplink, its
downlink and each region's link at the same rate unless told otherwise). The N sites are dealt
round-robin over the regions (--regions, default --relays, else min(4, N)) and run in their
region's namespace. Direct: every site connects to the server over its region's link and the
server's. Relayed (--relays R, one relay per region): the relay daemon (`tensorwire relay`)
connects to the server over its region's link, and the region's sites connect to it on the
region's loopback (with the server as their fallback). The server runs fl.fedavg.FedAvg on an
fl.server.FLServer for one round; the sites are benchmarks/fanout_roles.py.

Reported (one JSON object; also written to benchmarks/results/fanout-*.json):
- round time: `send_seconds` (the task goes out, i.e. the round starts, until the last site holds
  the whole model), `gather_seconds` (from then until the server's round is over: every result
  aggregated, the next model written), `round_seconds` (their sum);
- server egress and ingress: the kernel's counters of the server's interface over the whole run
  (`server_egress_bytes`, layer 2, TCP/IP headers included) and within the round, and the
  transport's own count of model bytes (`server_model_bytes_sent`), each also in models;
- `uplink_check`: the server's egress, sampled every 50 ms, never above what the tbf allows over
  any 1 s (rate * T + burst); `send_uplink_utilization`: egress during the send phase / rate;
- peak RSS from outside, above each process's own baseline (after its imports; for a relay,
  when it starts listening), per role;
- `fedavg`: the final model against flat FedAvg computed directly (float64) from the known
  deltas and sample counts, with the max abs error.

Needs root and iproute2's `ip` and `tc`; without them the run reports why and nothing else.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.fanout_fleet import Fleet, RelayDaemon
from benchmarks.fanout_net import (
    SERVER_ADDRESS,
    WIRE_PER_COUNTED,
    FanoutNet,
    LinkSpec,
    NetSampler,
    format_rate,
    parse_rate,
    rate_check,
)
from benchmarks.fanout_roles import (
    ModelSpec,
    check_fedavg,
    run_server,
    run_site,
    write_initial_model,
)
from benchmarks.probes import format_size, parse_size
from benchmarks.wan import sigterm_as_exit

__all__ = ["add_arguments", "preflight_problem", "run"]

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SERVER_PORT = 8765
RELAY_PORT = 8770
IDLE_TIMEOUT = 300.0  # a loaded 2-core machine: generous
HEARTBEAT_INTERVAL = 5.0  # the daemons' default: a site fails over after 3 unanswered (15 s)
MIB = 2**20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--clients", type=int, default=2, help="sites (default 2)")
    parser.add_argument(
        "--model-size", type=parse_size, default=parse_size("512MiB"), help="float32 bytes"
    )
    parser.add_argument("--uplink", type=parse_rate, default=parse_rate("1Gbit"), help="RATE")
    parser.add_argument("--downlink", type=parse_rate, default=None, help="default: --uplink")
    parser.add_argument(
        "--region-link",
        type=parse_rate,
        default=None,
        help="each region's link (default: --uplink)",
    )
    parser.add_argument("--relays", type=int, default=0, help="0: direct (default)")
    parser.add_argument(
        "--regions", type=int, default=None, help="default: --relays, else min(4, clients)"
    )
    parser.add_argument(
        "--compression",
        choices=("off", "auto"),
        default="off",
        help="chunk compression of the server, relays and sites (default off: the wire carries "
        "the model)",
    )
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds for the whole run")
    parser.add_argument("--work-dir", type=Path, default=None, help="model files (default: /tmp)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--no-files", action="store_true", help="write nothing to results/")


def preflight_problem() -> str | None:
    """Why the benchmark cannot run here, or None."""
    if sys.platform != "linux":
        return "the fanout benchmark needs Linux network namespaces"
    if os.geteuid() != 0:
        return "the fanout benchmark needs root (network namespaces, veth, tc)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"the fanout benchmark needs `{tool}` (iproute2)"
    return None


def run(args: argparse.Namespace) -> dict[str, Any]:
    regions = args.regions or args.relays or min(4, args.clients)
    if args.clients < 1 or args.relays < 0 or regions < 1:
        raise SystemExit("fanout: --clients and --regions must be at least 1, --relays >= 0")
    if args.relays and args.relays != regions:
        raise SystemExit("fanout: one relay per region: --regions must equal --relays")
    regions = min(regions, args.clients)
    spec = ModelSpec(args.model_size)
    base: dict[str, Any] = {
        "benchmark": "fanout",
        "mode": "relayed" if args.relays else "direct",
        "clients": args.clients,
        "relays": min(args.relays, regions),
        "regions": regions,
        "model_bytes": spec.nbytes,
        "model_size": format_size(spec.nbytes),
        "tensors": len(spec.layout()),
        "compression": args.compression,
    }
    problem = preflight_problem()
    if problem is not None:
        print(f"fanout: skipped: {problem}", file=sys.stderr)
        return base | {"skipped": problem}
    uplink = LinkSpec(args.uplink)
    downlink = LinkSpec(args.downlink or args.uplink)
    region_link = LinkSpec(args.region_link or args.uplink)
    base |= {
        "machine": _machine(),
        "started_at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    if args.work_dir is not None:
        args.work_dir.mkdir(parents=True, exist_ok=True)
    with (
        sigterm_as_exit(),
        tempfile.TemporaryDirectory(prefix="fanout-", dir=args.work_dir) as work,
    ):
        directory = Path(work)
        initial = write_initial_model(spec, directory / "initial.safetensors")
        load_before = _load()
        with FanoutNet(regions, uplink, downlink, region_link) as net:
            measured = _measure(args, base, net, directory)
        final = directory / "state" / "final.safetensors"
        sites = list(range(args.clients))
        measured["fedavg"] = check_fedavg(spec, initial, final, sites)
    result = base | net.describe() | measured | {"load_before": load_before, "load_after": _load()}
    result["goals"] = _goals(result)
    timeline = result.pop("egress_timeline")
    cpu_timeline = result.pop("cpu_timeline")
    if not args.no_files:
        result["files"] = _write(result, timeline, cpu_timeline, args.results_dir)
    return result


def _measure(
    args: argparse.Namespace, base: dict[str, Any], net: FanoutNet, directory: Path
) -> dict[str, Any]:
    """Start the processes, wait for all, the figures. Direct: the server, then the sites.
    Relayed: the relays, then the sites (until each is connected to its relay), then the server:
    a relay joins its upstream as soon as it listens, and the round must not start (the server
    waits for every relay) before the sites are there to take the model."""
    regions = base["regions"]
    deadline = time.monotonic() + args.timeout

    def left() -> float:  # every wait shares the run's one deadline
        return max(1.0, deadline - time.monotonic())

    server_url = f"tcp://{SERVER_ADDRESS}:{SERVER_PORT}"
    state_dir = directory / "state"
    before = {name: net.counters(name) for name in (net.server, *net.regions)}
    fleet = Fleet()
    sampler: NetSampler | None = None
    relays_listening: dict[str, float] = {}
    site_pids: dict[int, int] = {}
    server_settings = {
        "listen": server_url,
        "state_dir": str(state_dir),
        "initial_model": str(directory / "initial.safetensors"),
        "final_model": str(state_dir / "final.safetensors"),
        "expected_clients": base["relays"] or args.clients,
        "join_timeout": args.timeout,
        "idle_timeout": IDLE_TIMEOUT,
        "compression": args.compression,
    }
    in_region = [
        [site for site in range(args.clients) if site % regions == r] for r in range(regions)
    ]
    reports: dict[str, Any] | None = None
    try:
        if not base["relays"]:
            sampler = _start_server(fleet, net, server_settings, left())
        urls = [server_url] * regions
        for index in range(base["relays"]):
            relay = _relay(
                index,
                net.regions[index],
                server_url,
                directory,
                len(in_region[index]),
                args.compression,
            )
            fleet.start_relay(relay)
            urls[index] = relay.url
        for relay in fleet.relays:
            relays_listening[relay.name] = fleet.wait_listening(
                relay.pid, relay.port, relay.name, left()
            )
        for site in range(args.clients):
            region = site % regions
            settings = {
                "site": site,
                "url": urls[region],
                "fallback_urls": [server_url] if urls[region] != server_url else [],
                "heartbeat_interval": HEARTBEAT_INTERVAL,
                "connect_timeout": args.timeout,
                "idle_timeout": IDLE_TIMEOUT,
                "compression": args.compression,
            }
            site_pids[site] = fleet.spawn(f"site-{site}", run_site, net.regions[region], settings)
        for index, relay in enumerate(fleet.relays):
            fleet.wait_connected(relay.pid, relay.port, len(in_region[index]), relay.name, left())
        if base["relays"]:
            sampler = _start_server(fleet, net, server_settings, left())
        reports = fleet.collect(left())
    finally:
        if sampler is not None:
            sampler.stop()
        relay_status = fleet.end(graceful=reports is not None)  # a failure kills at once
    after = {name: net.counters(name) for name in (net.server, *net.regions)}
    qdisc = net.qdisc(net.server)
    if qdisc.get("bytes") and after[net.server]["tx_bytes"]:  # both counted since creation
        qdisc["wire_per_counted_byte"] = round(qdisc["bytes"] / after[net.server]["tx_bytes"], 4)
    return _figures(
        args, base, net, fleet, reports, sampler, before, after, relays_listening, site_pids
    ) | {"server_tbf": qdisc, "relay_exit_status": relay_status}


def _start_server(
    fleet: Fleet, net: FanoutNet, settings: dict[str, Any], timeout: float
) -> NetSampler:
    """The server child (spawned first in the fleet's order of names), listening; the sampler of
    its interface's counters."""
    pid = fleet.spawn("server", run_server, net.server, settings)
    sampler = NetSampler(pid).start()
    fleet.wait_listening(pid, SERVER_PORT, "server", timeout)
    return sampler


def _relay(
    index: int, netns_name: str, upstream: str, directory: Path, sites: int, compression: str
) -> RelayDaemon:
    name = f"relay-{index}"
    config: dict[str, Any] = {
        "name": name,
        "upstream": upstream,
        "listen": [f"tcp://127.0.0.1:{RELAY_PORT}"],
        "state_dir": str(directory / name / "state"),
        "insecure": True,
        "idle_timeout": IDLE_TIMEOUT,
        "heartbeat_interval": HEARTBEAT_INTERVAL,
        "heartbeat_timeout": IDLE_TIMEOUT,
        "min_sites": max(1, sites),  # the task waits for this region's sites
        "compression": compression,
    }
    return RelayDaemon(name, netns_name, config, directory / name)


def _figures(
    args: argparse.Namespace,
    base: dict[str, Any],
    net: FanoutNet,
    fleet: Fleet,
    reports: dict[str, Any],
    sampler: NetSampler | None,
    before: dict[str, dict[str, int]],
    after: dict[str, dict[str, int]],
    relays_listening: dict[str, float],
    site_pids: dict[int, int],
) -> dict[str, Any]:
    model = base["model_bytes"]
    server = reports["server"]
    sites = [reports[f"site-{site}"] for site in range(args.clients)]
    start, end = server["round_started_at"], server["round_ended_at"]
    everywhere = max(site["received_at"] for site in sites)
    egress = after[net.server]["tx_bytes"] - before[net.server]["tx_bytes"]
    ingress = after[net.server]["rx_bytes"] - before[net.server]["rx_bytes"]
    assert sampler is not None
    in_round = sampler.between(start, end)
    in_send = sampler.between(start, everywhere)
    send_seconds = everywhere - start
    figures: dict[str, Any] = {
        "send_seconds": round(send_seconds, 3),
        "gather_seconds": round(end - everywhere, 3),
        "round_seconds": round(end - start, 3),
        "server_report_seconds": round(server["report_seconds"], 3),
        "server_peers": server["round_clients"],
        "sites_behind_relays": _behind_relays(base, server),
        "server_egress_bytes": egress,
        "server_ingress_bytes": ingress,
        "server_egress_models": round(egress / model, 3),
        "server_ingress_models": round(ingress / model, 3),
        "server_egress_round_bytes": in_round["tx_bytes"],
        "server_ingress_round_bytes": in_round["rx_bytes"],
        "server_model_bytes_sent": server["bytes_sent"],
        "server_model_bytes_received": server["bytes_received"],
        "server_model_sends": round(server["bytes_sent"] / model, 3),
        # counted bytes in the send phase, scaled to wire bytes (at most WIRE_PER_COUNTED)
        "send_uplink_utilization": round(
            in_send["tx_bytes"]
            * WIRE_PER_COUNTED
            * 8
            / max(send_seconds, 1e-9)
            / net.uplink.rate_bps,
            3,
        ),
        "uplink_check": rate_check(sampler.timeline, net.uplink),
        "uplink_check_5s": rate_check(sampler.timeline, net.uplink, window=5.0),
        "region_bytes": {
            f"r{index}": {
                "tx_bytes": after[name]["tx_bytes"] - before[name]["tx_bytes"],
                "rx_bytes": after[name]["rx_bytes"] - before[name]["rx_bytes"],
            }
            for index, name in enumerate(net.regions)
        },
        "round_failed": server["failed"],
        "per_site": [
            {
                "site": site["site"],
                "region": site["site"] % base["regions"],
                "received_s": round(site["received_at"] - start, 3),
                "sent_s": round(site["sent_at"] - start, 3),
                "sample_count": site["sample_count"],
                "tasks": site["tasks"],
                "failovers_s": [round(at - start, 2) for at in site["failovers"]],
            }
            for site in sites
        ],
        "site_failovers": sum(len(site["failovers"]) for site in sites),
        "site_warnings": sorted(
            (round(at - start, 2), f"site-{site['site']}: {text}")
            for site in sites
            for at, text in site["warnings"]
        )[:40],
        "server_egress_busy_s": _busy_span(sampler.timeline, start, 2, net.uplink.rate_bps),
        "server_ingress_busy_s": _busy_span(sampler.timeline, start, 3, net.downlink.rate_bps),
        "egress_timeline": [
            (round(before_at - start, 3), tx, rx) for before_at, _, tx, rx in sampler.timeline
        ],
    }
    figures["rss"] = _rss(fleet, reports, sites, server, relays_listening, site_pids, model)
    figures["cpu"] = _cpu(fleet, site_pids, start, end)
    figures["cpu_timeline"] = _cpu_timeline(fleet, site_pids, start, end)
    return figures


def _cpu_timeline(
    fleet: Fleet, site_pids: dict[int, int], start: float, end: float, step: float = 2.0
) -> list[dict[str, float]]:
    """Cores used per role in each `step` seconds of the round (from 0.5 s samples: rough)."""
    watch = fleet.rss
    roles = {
        "server": [fleet.processes[fleet.names.index("server")].pid],
        "relays": [relay.pid for relay in fleet.relays],
        "sites": list(site_pids.values()),
    }
    bins = []
    at = start
    while at < end:
        until = min(at + step, end)
        row = {"t": round(at - start, 1)}
        for role, pids in roles.items():
            used = sum(watch.cpu_seconds(pid, at, until) for pid in pids)
            row[role] = round(used / (until - at), 2)
        machine = watch.machine_seconds(at, until)
        row["machine_busy"] = round(machine.get("busy", 0.0) / (until - at), 2)
        bins.append(row)
        at = until
    return bins


def _cpu(fleet: Fleet, site_pids: dict[int, int], start: float, end: float) -> dict[str, Any]:
    """CPU seconds over the round: this run's processes by role, and the whole machine's (busy,
    of which softirq: the kernel's packet work, bridge and tbf included). `others` is what the
    machine was busy with beyond this run's processes and softirq (other jobs, this parent)."""
    watch = fleet.rss
    server = watch.cpu_seconds(fleet.processes[fleet.names.index("server")].pid, start, end)
    relays = sum(watch.cpu_seconds(relay.pid, start, end) for relay in fleet.relays)
    sites = sum(watch.cpu_seconds(pid, start, end) for pid in site_pids.values())
    machine = watch.machine_seconds(start, end)
    cores = os.cpu_count() or 1
    figures: dict[str, Any] = {
        "server_s": round(server, 2),
        "relays_s": round(relays, 2),
        "sites_s": round(sites, 2),
        "machine": machine,
        "cores": cores,
    }
    if machine:
        ours = server + relays + sites
        figures["others_s"] = round(machine["busy"] - machine["softirq"] - ours, 2)
        figures["machine_busy_fraction"] = round(
            machine["busy"] / max(1e-9, machine["busy"] + machine["idle"]), 3
        )
        figures["ours_fraction_of_machine"] = round(ours / (cores * max(end - start, 1e-9)), 3)
    return figures


def _busy_span(
    timeline: list[tuple[float, float, int, int]], start: float, column: int, rate_bps: int
) -> list[float] | None:
    """Seconds since `start` of the first and the last half second in which the counter in
    `column` grew faster than a tenth of `rate_bps` (the ACKs of the other direction do not)."""
    busy = []
    last_at, last_count = None, 0
    for sample in timeline:
        if last_at is None or sample[0] - last_at >= 0.5:
            if last_at is not None and (sample[column] - last_count) * 8 > rate_bps / 10 * (
                sample[0] - last_at
            ):
                busy.append((round(last_at - start, 2), round(sample[0] - start, 2)))
            last_at, last_count = sample[0], sample[column]
    return [busy[0][0], busy[-1][1]] if busy else None


def _behind_relays(base: dict[str, Any], server: dict[str, Any]) -> bool | None:
    """Relayed: whether the server saw only relays (no site fell back to it)."""
    if not base["relays"]:
        return None
    return not any(peer.startswith("site-") for peer in server["round_clients"])


def _rss(
    fleet: Fleet,
    reports: dict[str, Any],
    sites: list[dict[str, Any]],
    server: dict[str, Any],
    relays_listening: dict[str, float],
    site_pids: dict[int, int],
    model: int,
) -> dict[str, Any]:
    start, end = server["round_started_at"], server["round_ended_at"]
    server_pid = fleet.processes[fleet.names.index("server")].pid
    figures: dict[str, Any] = {
        "server": fleet.rss.window(server_pid, server["baseline_at"], start, end)
    }
    relays = {}
    for relay in fleet.relays:
        listening_at = relays_listening.get(relay.name, relay.started_at)
        relays[relay.name] = fleet.rss.window(relay.pid, listening_at, start, end)
    figures["relays"] = relays
    if relays:
        figures["relay_max_above_baseline_mib"] = max(
            entry["peak_above_baseline_mib"] for entry in relays.values()
        )
        figures["relay_max_anon_above_baseline_mib"] = max(
            entry["anon_peak_above_baseline_mib"] for entry in relays.values()
        )
    per_site = [
        fleet.rss.window(
            site_pids[site["site"]], site["baseline_at"], site["ready_at"], site["finished_at"]
        )
        for site in sites
    ]
    above = [entry["peak_above_baseline_mib"] for entry in per_site]
    figures["sites"] = {
        "max_peak_above_baseline_mib": max(above),
        "mean_peak_above_baseline_mib": round(sum(above) / len(above), 1),
        "max_peak_above_baseline_and_model_mib": round(max(above) - model / MIB, 1),
        "max_peak_rss_mib": max(entry["peak_rss_mib"] for entry in per_site),
        "mean_baseline_rss_mib": round(
            sum(entry["baseline_rss_mib"] for entry in per_site) / len(per_site), 1
        ),
    }
    return figures


def _goals(result: dict[str, Any]) -> dict[str, Any]:
    """The issue's goals that one run can judge: egress at most (relays + direct sites) models
    (the transport's model bytes; the interface counts TCP/IP headers on top), relays' RSS."""
    direct_sites = result["clients"] if result["mode"] == "direct" else 0
    allowed = result["relays"] + direct_sites
    goals: dict[str, Any] = {
        "egress_allowed_models": allowed,
        "egress_within": result["server_model_sends"] <= allowed + 1e-6,
    }
    if result["mode"] == "relayed":
        relay_peak = result["rss"].get("relay_max_above_baseline_mib")
        goals["relay_rss_within_256mib"] = relay_peak is not None and relay_peak <= 256
        relay_anon = result["rss"].get("relay_max_anon_above_baseline_mib")
        goals["relay_anon_within_256mib"] = relay_anon is not None and relay_anon <= 256
    return goals


def _machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "python": sys.version.split()[0], **_code()}


def _code() -> dict[str, Any]:
    """The commit this ran from, and whether fl/ or transport/ had uncommitted changes (the
    relay and the server are whatever is on disk when they start)."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    head = subprocess.run(
        ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    dirty = subprocess.run(
        ["git", "-C", str(root), "status", "--porcelain", "--", "fl", "transport"],
        capture_output=True,
        text=True,
    )
    return {"commit": head.stdout.strip() or None, "fl_transport_dirty": bool(dirty.stdout.strip())}


def _load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def _write(
    result: dict[str, Any],
    timeline: list[tuple[float, int, int]],
    cpu_timeline: list[dict[str, float]],
    directory: Path,
) -> dict[str, str]:
    directory.mkdir(parents=True, exist_ok=True)
    size = result["model_size"].replace(" ", "")
    stem = "fanout-{}-{}-n{}-r{}-{}-{}".format(
        time.strftime("%Y%m%d-%H%M%S"),
        result["mode"],
        result["clients"],
        result["relays"] or result["regions"],
        size,
        format_rate(result["uplink"]["rate_bps"]).replace("/", ""),
    )
    path = directory / f"{stem}.json"
    files = {**result, "egress_timeline": timeline, "cpu_timeline": cpu_timeline}
    path.write_text(json.dumps(files) + "\n")
    return {"json": str(path)}


def format_human(result: dict[str, Any]) -> str:
    """A few lines for a terminal (the JSON has everything)."""
    if "skipped" in result:
        return f"fanout: skipped: {result['skipped']}"
    fedavg = result["fedavg"]
    lines = [
        f"fanout {result['mode']}: {result['clients']} sites, {result['relays']} relays, "
        f"{result['regions']} regions, {result['model_size']} model, uplink "
        f"{result['uplink']['rate']}",
        f"round {result['round_seconds']:.1f} s = send {result['send_seconds']:.1f} s + gather "
        f"{result['gather_seconds']:.1f} s",
        f"server egress {result['server_egress_models']:.2f} models "
        f"({result['server_model_sends']:.2f} by the transport), ingress "
        f"{result['server_ingress_models']:.2f}; uplink limit holds: "
        f"{result['uplink_check']['limit_holds']} (max "
        f"{result['uplink_check']['max_egress_over_rate']:.3f} x rate over 1 s; send phase at "
        f"{result['send_uplink_utilization']:.2f} of it)",
        f"RSS above baseline MiB: server {result['rss']['server']['peak_above_baseline_mib']}, "
        f"relays {result['rss'].get('relay_max_above_baseline_mib', '-')}, sites max "
        f"{result['rss']['sites']['max_peak_above_baseline_mib']}",
        f"CPU s in the round: server {result['cpu']['server_s']}, relays "
        f"{result['cpu']['relays_s']}, sites {result['cpu']['sites_s']}, others "
        f"{result['cpu'].get('others_s', '-')}; machine busy "
        f"{result['cpu'].get('machine_busy_fraction', '-')}",
        f"FedAvg matches flat FedAvg: {fedavg['matches']} (max abs error "
        f"{fedavg.get('max_abs_error', float('nan')):.3g}, tolerance "
        f"{fedavg.get('tolerance', float('nan')):.3g})",
        f"load before/after: {result['load_before']} / {result['load_after']}",
    ]
    lines += [f"{kind}: {path}" for kind, path in result.get("files", {}).items()]
    return "\n".join(lines)
