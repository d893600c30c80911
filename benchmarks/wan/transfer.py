"""The measured tensorwire transfer over the emulated link: the receiver (benchmarks.stream's
receive_synthetic) in namespace b, the sender (send_synthetic) in namespace a, each in its own
spawned process so each side's peak RSS above its own baseline is measured apart.

Socket tuning travels as a dict of TcpOptions fields; each child registers a TcpDriver with them
before it opens any connection, so the tcp:// URL picks the tuned driver.
"""

from __future__ import annotations

import multiprocessing
import time
import traceback
from collections.abc import Callable, Coroutine
from typing import Any

from benchmarks.wan.emulator import EmulatedWan
from benchmarks.wan.netns import run_in_netns

__all__ = ["run_transfer"]

_URL_TIMEOUT_S = 120.0


def run_transfer(
    wan: EmulatedWan, settings: dict[str, Any], tcp_options: dict[str, Any]
) -> dict[str, Any]:
    """Stream settings["size"] bytes from namespace a to b; the sender's and receiver's reports
    plus the transfer's start on this machine's monotonic clock (to line up the link timeline)."""
    url_queue: Any = multiprocessing.get_context("spawn").Queue()
    settings = {**settings, "host": wan.address_b}
    receiver_args = (wan.netns_b, _receiver_child, settings, tcp_options, url_queue)
    sender_args = (wan.netns_a, _sender_child, settings, tcp_options, url_queue)
    receiver, sender = _run_pair(receiver_args, sender_args, settings["timeout"])
    wall_to_monotonic = time.monotonic() - time.time()
    return {
        "sender": sender,
        "receiver": receiver,
        "started_monotonic": sender["started_at"] + wall_to_monotonic,
        "size": settings["size"],
    }


def _run_pair(
    receiver_args: tuple[Any, ...], sender_args: tuple[Any, ...], timeout: float
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Both children's reports; when one fails, the error carries what the other reported."""
    context = multiprocessing.get_context("spawn")
    queues = [context.Queue(), context.Queue()]
    processes = [
        context.Process(target=run_in_netns, args=(queue, *args), daemon=True)
        for queue, args in zip(queues, (receiver_args, sender_args), strict=True)
    ]
    try:
        for process in processes:
            process.start()
        receiver, sender = (queue.get(timeout=timeout) for queue in queues)
    except BaseException:  # Ctrl-C, SIGTERM, a timeout: stop both now, not after a transfer
        for process in processes:
            if process.is_alive():
                process.kill()
        raise
    for process in processes:
        process.join(timeout=30)
        if process.is_alive():
            process.kill()
    for failed, other in ((receiver, sender), (sender, receiver)):
        if "error" in failed:
            shown = {key: value for key, value in other.items() if "timeline" not in key}
            raise RuntimeError(f"{failed['role']} failed: {failed['error']}\nthe other: {shown}")
    return receiver, sender


def _receiver_child(
    queue: Any, settings: dict[str, Any], tcp_options: dict[str, Any], url_queue: Any
) -> None:
    from benchmarks.stream import receive_synthetic

    _run_child("receiver", queue, tcp_options, lambda: receive_synthetic(settings, url_queue.put))


def _sender_child(
    queue: Any, settings: dict[str, Any], tcp_options: dict[str, Any], url_queue: Any
) -> None:
    from benchmarks.stream import send_synthetic

    def body() -> Coroutine[Any, Any, dict[str, Any]]:
        return send_synthetic(settings, url_queue.get(timeout=_URL_TIMEOUT_S))

    _run_child("sender", queue, tcp_options, body)


def _run_child(
    role: str,
    queue: Any,
    tcp_options: dict[str, Any],
    body: Callable[[], Coroutine[Any, Any, dict[str, Any]]],
) -> None:
    """Install the tuned tcp driver, run `body()` under uvloop, put its result (or the error)."""
    try:
        import uvloop

        from transport.drivers import TcpDriver, TcpOptions, register_driver

        register_driver(TcpDriver(TcpOptions(**tcp_options)))
        queue.put(uvloop.run(body()))
    except BaseException:
        queue.put({"role": role, "error": traceback.format_exc()})
