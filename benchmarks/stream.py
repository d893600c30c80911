"""Stream a synthetic state dict between two processes and report throughput and peak memory.

    python -m benchmarks stream --driver tcp --size 32GiB --baseline --json

The sender streams a SyntheticSource (generated from a seed, never stored, so 32 GiB fits on any
machine) into a DigestSink on the receiver, each in its own spawned process so each side's peak
RSS above its own baseline is measured separately. With --baseline the same bytes first cross a
plain uvloop socket (no framing, no checksums, reused buffers) to give the raw limit of this
machine in this run; `ratio` is tensorwire's throughput over that.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.baselines import raw_throughput
from benchmarks.outside import run_measured
from benchmarks.probes import MIB, RssSampler, parse_size, run_in_uvloop
from transport import create_pki
from transport.progress import progress_wanted, transfer_progress

DRIVERS = ("tcp", "grpc", "http", "memory")
_HOST = "127.0.0.1"
MEMORY_URL = "memory://benchmark-stream"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--driver", choices=DRIVERS, default="tcp")
    parser.add_argument(
        "--size", type=parse_size, default=parse_size("1GiB"), help="bytes to stream, e.g. 32GiB"
    )
    parser.add_argument(
        "--chunk-size", type=parse_size, default=None, help="default: the transport's"
    )
    parser.add_argument("--window", type=parse_size, default=None, help="per-stream credit window")
    parser.add_argument("--dtype", default="BF16")
    parser.add_argument(
        "--source",
        choices=("synthetic", "dict"),
        default="synthetic",
        help="synthetic: generated chunks, never stored (long runs); dict: a real float32 state "
        "dict in memory, the user's work",
    )
    parser.add_argument(
        "--sink",
        choices=("digest", "dict", "into"),
        default=None,
        help="digest (synthetic only), a new dict, or into existing tensors; default: digest for "
        "synthetic, dict for dict",
    )
    parser.add_argument(
        "--loop",
        choices=("asyncio", "uvloop"),
        default=None,
        help="event loop of both sides; default: uvloop for synthetic, asyncio for dict",
    )
    parser.add_argument(
        "--tensor-size", type=parse_size, default=parse_size("256MiB"), help="dict source only"
    )
    add_data_arguments(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--baseline",
        action="store_true",
        help="also measure the bare transport (plain socket, bare grpc.aio, bare aiohttp)",
    )
    parser.add_argument("--tls", action="store_true", help="mutual TLS (tcps, grpcs, https)")
    parser.add_argument("--timeout", type=float, default=3600.0)
    parser.add_argument("--streams", type=int, default=1, help="parallel connections (striping)")
    parser.add_argument(
        "--cut-every",
        type=parse_size,
        default=None,
        help="cut the connection after every N bytes (tcp, through a cutting proxy): resume test",
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    if getattr(args, "source", "synthetic") == "dict":
        return run_dict(args)
    _check_synthetic(args)
    with tempfile.TemporaryDirectory(prefix="tensorwire-pki-") as pki:
        settings = settings_from(args, pki if args.tls else None)
        memory = args.driver == "memory"
        if memory and settings["cut_every"]:
            raise SystemExit(
                "--cut-every cuts a TCP connection: it needs --driver tcp, grpc or http"
            )
        result = _run_in_process(settings) if memory else _run_two_processes(settings)
        result["tls"] = bool(args.tls)
        if args.baseline:
            raw = raw_throughput(args.driver, args.size, settings["tls_dir"], args.timeout)
            result["raw_throughput_mb_s"] = raw
            result["ratio"] = round(result["throughput_mb_s"] / raw, 3) if raw else None
    return result


def _check_synthetic(args: argparse.Namespace) -> None:
    """Refuse what the synthetic mode cannot do before any process starts."""
    from transport import DTYPES

    if getattr(args, "sink", None) not in (None, "digest"):
        raise SystemExit("--sink dict/into needs --source dict (a synthetic stream has no dict)")
    if getattr(args, "loop", None) not in (None, "uvloop"):
        raise SystemExit("--source synthetic runs under uvloop; --loop asyncio needs --source dict")
    itemsize = _itemsize(args.dtype, DTYPES)
    if args.size <= 0 or args.size % itemsize:
        raise SystemExit(
            f"--size {args.size} is not a positive whole number of {args.dtype} elements "
            f"({itemsize} bytes each)"
        )


def _itemsize(dtype: str, dtypes: Any) -> int:
    if dtype not in dtypes:
        raise SystemExit(f"--dtype {dtype!r} is not one of {', '.join(sorted(dtypes))}")
    return int(dtypes[dtype].itemsize)


# --- the user's work: a real dict ---------------------------------------------------------------

BARE_LIBRARY = {"grpc": "grpc", "http": "aiohttp"}


def run_dict(args: argparse.Namespace) -> dict[str, Any]:
    """tensorwire sending a real dict, and with --baseline the bare socket (and the bare library
    under grpc and http) doing the same work in the same run; see benchmarks.samework."""
    from benchmarks import samework

    if args.driver == "memory" or args.cut_every or getattr(args, "streams", 1) != 1:
        raise SystemExit("--source dict runs over tcp, grpc or http, one stream, no cuts")
    samework.check_size(args.size, args.tensor_size)
    with tempfile.TemporaryDirectory(prefix="tensorwire-pki-") as pki:
        if args.tls:
            create_pki(Path(pki), clients=("client",))
        settings = {
            "driver": args.driver, "size": args.size, "tensor_size": args.tensor_size,
            "seed": args.seed, "sink": args.sink or "dict", "loop": args.loop or "asyncio",
            "tls_dir": pki if args.tls else None, "timeout": args.timeout,
            "compression": getattr(args, "compression", "auto"),
        }  # fmt: skip
        systems = ["tensorwire"]
        if args.baseline:
            systems += [
                "socket",
                *([BARE_LIBRARY[args.driver]] if args.driver in BARE_LIBRARY else []),
            ]
        runs = {system: samework.measure(system, settings) for system in systems}
    return _dict_summary(settings, runs)


def _dict_summary(settings: dict[str, Any], runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    ours = runs["tensorwire"]
    result: dict[str, Any] = {
        "benchmark": "stream",
        "source": "dict",
        "sink": settings["sink"],
        "loop": settings["loop"],
        "driver": settings["driver"],
        "tls": bool(settings["tls_dir"]),
        "bytes": settings["size"],
        "tensors": -(-settings["size"] // settings["tensor_size"]),
        **{key: value for key, value in ours.items() if key != "system"},
    }
    for system, figures in runs.items():
        if system == "tensorwire":
            continue
        rate = figures["throughput_mb_s"]
        result[f"{system}_mb_s"] = rate
        result[f"{system}_receiver_above_dict_mib"] = figures["receiver_above_dict_mib"]
        result[f"ratio_to_{system}"] = round(ours["throughput_mb_s"] / rate, 3)
    if "socket_mb_s" in result:
        result["ratio"] = result["ratio_to_socket"]
    return result


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """What the synthetic model holds and whether chunks are compressed (shared with wan)."""
    parser.add_argument(
        "--compression", choices=("auto", "on", "off"), default="auto", help="chunk compression"
    )
    parser.add_argument(
        "--values",
        choices=("bytes", "weights"),
        default="bytes",
        help="uniform random bytes (incompressible) or N(0, 0.02) weights of --dtype",
    )


def settings_from(args: argparse.Namespace, pki: str | None = None) -> dict[str, Any]:
    if pki is not None:
        create_pki(Path(pki), clients=("client",))
    overrides: dict[str, Any] = {"compression": getattr(args, "compression", "auto")}
    if args.chunk_size:
        overrides["chunk_size"] = args.chunk_size
    if args.window:
        overrides["stream_window"] = args.window
        overrides["connection_window"] = max(args.window, 128 * MIB)
    return {
        "driver": args.driver,
        "size": args.size,
        "dtype": args.dtype,
        "seed": args.seed,
        "overrides": overrides,
        "timeout": args.timeout,
        "cut_every": getattr(args, "cut_every", None),
        "values": getattr(args, "values", "bytes"),
        "streams": getattr(args, "streams", 1),
        "tls_dir": pki,
        # decided here, where the terminal is, and drawn by the receiver child (same stderr)
        "progress": progress_wanted(getattr(args, "quiet", False)),
    }


def scheme(settings: dict[str, Any]) -> str:
    """The URL scheme: the driver's name, with an "s" under TLS (tcps, grpcs, https)."""
    driver = str(settings["driver"])
    return f"{driver}s" if settings.get("tls_dir") and driver != "memory" else driver


def listen_url(settings: dict[str, Any]) -> str:
    """Where the receiver listens: a free port on settings["host"] (default 127.0.0.1), or for
    the in-process memory driver a name (memory URLs have no host or port)."""
    if settings["driver"] == "memory":
        return MEMORY_URL
    return f"{scheme(settings)}://{settings.get('host', _HOST)}:0"


def _summary(
    settings: dict[str, Any], sender: dict[str, Any], receiver: dict[str, Any]
) -> dict[str, Any]:
    seconds = receiver["finished_at"] - sender["started_at"]
    nbytes = receiver["bytes"]
    return {
        "benchmark": "stream",
        "driver": settings["driver"],
        "streams": settings.get("streams", 1),
        "bytes": nbytes,
        "seconds": round(seconds, 3),
        "throughput_mb_s": round(nbytes / seconds / 1e6, 1),
        # above each process's RSS before its Endpoint existed, sampled from outside (the
        # in-process sampler starts after the receive pool exists; it still draws the plots)
        "sender_peak_rss_mib": _above_baseline(sender),
        "receiver_peak_rss_mib": _above_baseline(receiver),
        "sender_inprocess_peak_rss_mib": round(sender["peak_rss_mib"], 1),
        "receiver_inprocess_peak_rss_mib": round(receiver["peak_rss_mib"], 1),
        "digest_ok": bool(receiver["digest_ok"] and nbytes == settings["size"]),
        "chunk_size": sender["chunk_size"],
        "stream_window": sender["stream_window"],
        "chunks": receiver["chunks"],
        "resumes": sender["resumes"],
        "bytes_sent": sender["bytes_sent"],
    }


def _above_baseline(side: dict[str, Any]) -> float:
    if "outside_peak_rss_mib" not in side:  # one process (memory driver): the in-process figure
        return round(side["peak_rss_mib"], 1)
    return round(side["outside_peak_rss_mib"] - side["outside_baseline_rss_mib"], 1)


# --- tensorwire, two processes ------------------------------------------------------------------


def _run_two_processes(settings: dict[str, Any]) -> dict[str, Any]:
    sender, receiver = run_pair(settings)
    return _summary(settings, sender, receiver)


def run_pair(settings: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Sender and receiver in their own processes; each side's full report (timelines too)."""
    url_queue: Any = multiprocessing.get_context("spawn").Queue()
    receiver, sender = run_measured(
        [(_receiver_child, (settings, url_queue)), (_sender_child, (settings, url_queue))],
        timeout=settings["timeout"],
    )
    return sender, receiver


def _receiver_child(queue: Any, settings: dict[str, Any], url_queue: Any) -> None:
    run_in_uvloop("receiver", queue, lambda: receive_synthetic(settings, url_queue.put))


def _sender_child(queue: Any, settings: dict[str, Any], url_queue: Any) -> None:
    run_in_uvloop("sender", queue, lambda: send_synthetic(settings, url_queue.get(timeout=120)))


async def receive_synthetic(settings: dict[str, Any], publish_url: Any) -> dict[str, Any]:
    """Listen on settings["driver"]://settings["host"] (default 127.0.0.1), publish the URL, take
    one transfer into a DigestSink; return bytes, timing, digest_ok and peak RSS above baseline."""
    from transport import DigestMismatchError, DigestSink, Endpoint, server_tls

    tls_dir = settings.get("tls_dir")
    tls = server_tls(Path(tls_dir)) if tls_dir else None
    baseline_at = time.time()
    async with Endpoint(**settings["overrides"], tls=tls) as endpoint:
        publish_url(await endpoint.listen(listen_url(settings)))
        ready_at = time.time()
        sampler = RssSampler().start()
        transfer = await anext(endpoint.incoming())
        nbytes = transfer.manifest.total_bytes if transfer.manifest else 0
        try:
            with transfer_progress(nbytes, "streaming", enabled=settings.get("progress", False)):
                stats = await transfer.receive_into(DigestSink())
            digest_ok = True
        except DigestMismatchError:
            stats, digest_ok = None, False
        finished_at = time.time()
        sampler.stop()
    manifest = transfer.manifest
    return {
        "role": "receiver",
        "bytes": manifest.total_bytes if manifest and digest_ok else 0,
        "chunks": _count(stats, "chunks"),
        "digest_ok": digest_ok,
        "finished_at": finished_at,
        "baseline_at": baseline_at,
        "ready_at": ready_at,
        "peak_rss_mib": sampler.peak_above_baseline_mib,
        "rss_timeline": sampler.timeline,
    }


def _count(stats: Any, key: str) -> int | None:
    if isinstance(stats, dict):
        return stats.get(key)
    return getattr(stats, key, None)


async def send_synthetic(settings: dict[str, Any], url: str) -> dict[str, Any]:
    """Stream settings["size"] bytes of SyntheticSource to `url`; return timing and peak RSS."""
    from transport import Endpoint, SyntheticSource, client_tls

    tls_dir = settings.get("tls_dir")
    tls = client_tls(Path(tls_dir), "client") if tls_dir else None
    baseline_at = time.time()
    async with Endpoint(**settings["overrides"], tls=tls) as endpoint:
        config = endpoint.config
        source = SyntheticSource(
            settings["size"],
            seed=settings["seed"],
            dtype=settings["dtype"],
            chunk_size=config.chunk_size,
            values=settings.get("values", "bytes"),
        )
        proxy = await _cutting_proxy(url, settings) if settings.get("cut_every") else None
        peer = await endpoint.connect(proxy[1] if proxy else url)
        sampler = RssSampler().start()
        started_at = time.time()
        result = await peer.send_state_dict(source, streams=settings.get("streams", 1))
        finished_at = time.time()
        sampler.stop()
        if proxy:
            await proxy[0].close()
    return {
        "role": "sender",
        "resumes": result.resumes,
        "bytes_sent": result.bytes_sent,
        "started_at": started_at,
        "baseline_at": baseline_at,
        "ready_at": started_at,
        "finished_at": finished_at,
        "peak_rss_mib": sampler.peak_above_baseline_mib,
        "rss_timeline": sampler.timeline,
        "chunk_size": config.chunk_size,
        "stream_window": config.stream_window,
    }


async def _cutting_proxy(url: str, settings: dict[str, Any]) -> tuple[Any, str]:
    """A proxy in front of `url` that cuts the connection every settings["cut_every"] bytes."""
    from benchmarks.faults import CuttingProxy

    host, port = url.split("://", 1)[1].rsplit(":", 1)
    every = settings["cut_every"]
    proxy = CuttingProxy(host, int(port), range(every, settings["size"] + 1, every))
    proxy_host, proxy_port = await proxy.start(host)
    return proxy, f"tcp://{proxy_host}:{proxy_port}"


# --- tensorwire, one process (memory driver) ------------------------------------------------------


def _run_in_process(settings: dict[str, Any]) -> dict[str, Any]:
    import uvloop

    async def both() -> tuple[dict[str, Any], dict[str, Any]]:
        urls: asyncio.Queue[str] = asyncio.Queue()
        settings_here = {**settings, "driver": "memory"}
        receiving = asyncio.ensure_future(receive_synthetic(settings_here, urls.put_nowait))
        url = asyncio.ensure_future(urls.get())
        # A receiver that fails before it publishes its URL fails the run (no endless wait).
        await asyncio.wait({receiving, url}, return_when=asyncio.FIRST_COMPLETED)
        if not url.done():
            url.cancel()
            await receiving  # raises the receiver's error
            raise RuntimeError("the receiver finished without listening")
        sender = await send_synthetic(settings_here, url.result())
        return sender, await receiving

    sender, receiver = uvloop.run(both())
    return _summary(settings, sender, receiver)
