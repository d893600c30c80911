"""The user's work, measured: a state dict that lives in memory, sent from one process and
received into a new dict (or into existing tensors) in another, on the stock event loop or uvloop.

    python -m benchmarks stream --source dict --sink dict --driver grpc --loop asyncio --baseline

The dict is `size` bytes of float32 in tensors of `tensor_size` bytes, filled with uniform random
values before the clock starts. The sender's clock starts right before it sends; the run ends when
the receiver holds every tensor. Every received tensor is checked against the sender's xxh3 digest
(after the clock stops). Both sides' resident memory is sampled from outside (benchmarks.outside).

`system` picks who does the work: "tensorwire" (the Endpoint over `driver`), or a bare baseline
doing the same work from and into the same tensors (benchmarks.bare): "socket" (blocking sockets:
sendall of each tensor's memory, recv_into fresh tensors), "grpc" (bare grpc.aio bidi streaming
of 4 MiB messages) and "aiohttp" (one streamed aiohttp POST).
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.outside import child_main, run_measured

__all__ = ["SYSTEMS", "check_size", "make_state_dict", "measure", "tensor_digests"]

SYSTEMS = ("tensorwire", "socket", "grpc", "aiohttp")
_LIBRARIES = {
    "tensorwire": ("transport",),
    "socket": ("ssl", "transport"),  # transport: its TLS contexts
    "grpc": ("grpc.aio", "transport"),
    "aiohttp": ("aiohttp.web", "transport"),
}
FLOAT32 = 4


def check_size(size: int, tensor_size: int) -> None:
    """Refuse, before any process starts, a size the dict cannot have."""
    for name, value in (("--size", size), ("--tensor-size", tensor_size)):
        if value <= 0 or value % FLOAT32:
            raise SystemExit(f"{name} {value} is not a positive whole number of float32 (4 bytes)")


def tensor_sizes(size: int, tensor_size: int) -> list[int]:
    """Bytes of each tensor: whole tensors of tensor_size, then the rest."""
    sizes = [tensor_size] * (size // tensor_size)
    return sizes + ([size % tensor_size] if size % tensor_size else [])


def make_state_dict(size: int, tensor_size: int, seed: int, *, fill: bool = True) -> dict[str, Any]:
    """float32 tensors `layers.<i>.weight` totalling `size` bytes, every page touched: uniform
    random values (one random block, scaled differently per tensor: generating 2 GiB of random
    numbers would take longer than sending them), or zeros (an existing model to receive into)."""
    import torch

    sizes = tensor_sizes(size, tensor_size)
    block = torch.empty(max(sizes) // FLOAT32, dtype=torch.float32)
    if fill:
        block.uniform_(-1.0, 1.0, generator=torch.Generator().manual_seed(seed))
    state: dict[str, Any] = {}
    for index, nbytes in enumerate(sizes):
        tensor = torch.empty(nbytes // FLOAT32, dtype=torch.float32)
        if fill:
            torch.mul(block[: tensor.numel()], 1.0 + index / 64, out=tensor)
        else:
            tensor.zero_()
        state[f"layers.{index}.weight"] = tensor
    del block
    return state


def byte_view(tensor: Any) -> memoryview:
    """The tensor's memory as bytes, without a copy."""
    return memoryview(tensor.view(-1).view(_uint8()).numpy()).cast("B")


def _uint8() -> Any:
    import torch

    return torch.uint8


def tensor_digests(state: dict[str, Any]) -> dict[str, int]:
    import xxhash

    return {name: xxhash.xxh3_64_intdigest(byte_view(tensor)) for name, tensor in state.items()}


def verify(received: dict[str, Any], digests: dict[str, int]) -> None:
    """Raise naming the first tensor that is missing, extra or differs from what was sent."""
    if set(received) != set(digests):
        missing = sorted(set(digests) - set(received))[:5]
        extra = sorted(set(received) - set(digests))[:5]
        raise AssertionError(f"received dict differs: missing {missing}, unexpected {extra}")
    for name, digest in tensor_digests(received).items():
        if digest != digests[name]:
            raise AssertionError(f"tensor {name} arrived with different bytes")


# --- orchestration -------------------------------------------------------------------------------


def measure(system: str, settings: dict[str, Any]) -> dict[str, Any]:
    """One run of `system` doing the work; MB/s and both sides' RSS from outside."""
    sender_body, receiver_body = _bodies(system)
    settings = {**settings, "system": system}
    context = multiprocessing.get_context("spawn")
    address, digests = context.Queue(), context.Queue()
    receiver, sender = run_measured(
        [
            (_receiver_child, (receiver_body, settings, address, digests)),
            (_sender_child, (sender_body, settings, address, digests)),
        ],
        timeout=settings["timeout"],
        payload_bytes=settings["size"],
    )
    seconds = receiver["finished_at"] - sender["started_at"]
    return {
        "system": system,
        "seconds": round(seconds, 3),
        "throughput_mb_s": round(settings["size"] / seconds / 1e6, 1),
        "sender_peak_rss_mib": round(sender["outside_peak_rss_mib"], 1),
        "receiver_peak_rss_mib": round(receiver["outside_peak_rss_mib"], 1),
        "sender_above_dict_mib": round(sender["above_payload_mib"], 1),
        "receiver_above_dict_mib": round(receiver["above_payload_mib"], 1),
        "digest_ok": True,  # the receiver raised otherwise
        # payload bytes on the wire: below the dict's size when chunks went compressed
        **({"wire_bytes": sender["wire_bytes"]} if "wire_bytes" in sender else {}),
    }


def _bodies(system: str) -> tuple[Callable[..., Any], Callable[..., Any]]:
    if system == "tensorwire":
        return send_tensorwire, receive_tensorwire
    from benchmarks import bare

    return bare.SENDERS[system], bare.RECEIVERS[system]


def _loop_for(body: Callable[..., Any], settings: dict[str, Any]) -> str | None:
    import inspect

    return settings["loop"] if inspect.iscoroutinefunction(body) else None


def _sender_child(queue: Any, body: Any, settings: dict[str, Any], *channels: Any) -> None:
    _run_side("sender", queue, body, settings, channels)


def _receiver_child(queue: Any, body: Any, settings: dict[str, Any], *channels: Any) -> None:
    _run_side("receiver", queue, body, settings, channels)


def _run_side(
    role: str, queue: Any, body: Any, settings: dict[str, Any], channels: tuple[Any, ...]
) -> None:
    def work() -> Any:
        return body(Side(settings, *channels))

    child_main(role, queue, work, _loop_for(body, settings))


class Side:
    """What one side of a run knows: the settings, and the two channels to the other side."""

    def __init__(self, settings: dict[str, Any], address: Any, digests: Any) -> None:
        import importlib

        # The libraries load before the baseline mark: the figures are what the work costs.
        for module in ("torch", "xxhash", *_LIBRARIES[settings["system"]]):
            importlib.import_module(module)
        self.settings = settings
        self._address = address
        self._digests = digests
        self.baseline_at = time.time()
        self.ready_at = self.baseline_at

    @property
    def size(self) -> int:
        return int(self.settings["size"])

    def make_source(self) -> dict[str, Any]:
        """The sender's dict, and its digests for the receiver to check against."""
        settings = self.settings
        state = make_state_dict(self.size, settings["tensor_size"], settings["seed"])
        self._digests.put(tensor_digests(state))
        return state

    def make_target(self) -> dict[str, Any] | None:
        """Existing zeroed tensors to receive into (sink "into"), or None for a new dict."""
        if self.settings["sink"] != "into":
            return None
        return make_state_dict(self.size, self.settings["tensor_size"], 0, fill=False)

    def publish(self, address: Any) -> None:
        """Tell the sender where to connect: the receiver is set up, its work starts."""
        self.ready_at = time.time()
        self._address.put(address)

    def peer_address(self) -> Any:
        return self._address.get(timeout=120)

    def check(self, received: dict[str, Any]) -> None:
        verify(received, self._digests.get(timeout=120))

    def report(self, **marks: float) -> dict[str, Any]:
        return {"baseline_at": self.baseline_at, "ready_at": self.ready_at, **marks}


# --- tensorwire ----------------------------------------------------------------------------------


def _tls(settings: dict[str, Any], side: str) -> Any:
    from transport import client_tls, server_tls

    tls_dir = settings.get("tls_dir")
    if not tls_dir:
        return None
    return server_tls(Path(tls_dir)) if side == "server" else client_tls(Path(tls_dir), "client")


def _scheme(settings: dict[str, Any]) -> str:
    return f"{settings['driver']}s" if settings.get("tls_dir") else str(settings["driver"])


def _options(side: Side) -> dict[str, Any]:
    """Endpoint settings the command line changed (none by default: the user's defaults)."""
    compression = side.settings.get("compression", "auto")
    return {} if compression == "auto" else {"compression": compression}


async def send_tensorwire(side: Side) -> dict[str, Any]:
    from transport import Endpoint

    state = side.make_source()
    async with Endpoint(tls=_tls(side.settings, "client"), **_options(side)) as endpoint:
        peer = await endpoint.connect(side.peer_address())
        started_at = time.time()
        result = await peer.send_state_dict(state)
        finished_at = time.time()
    marks = {"ready_at": started_at, "started_at": started_at, "finished_at": finished_at}
    return side.report(**marks, wire_bytes=result.bytes_sent)


async def receive_tensorwire(side: Side) -> dict[str, Any]:
    from transport import Endpoint, StateDictSink

    target = side.make_target()
    async with Endpoint(tls=_tls(side.settings, "server"), **_options(side)) as endpoint:
        side.publish(await endpoint.listen(f"{_scheme(side.settings)}://127.0.0.1:0"))
        transfer = await anext(endpoint.incoming())
        received = await transfer.receive_into(StateDictSink(target))
        finished_at = time.time()
    side.check(received)
    return side.report(finished_at=finished_at)
