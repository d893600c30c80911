"""One end of one peer benchmark transfer, run by benchmarks/peers/run.py as its own OS process.

This file is started with the *peer's* interpreter (a venv holding only that system and torch),
so it imports nothing from this repository: the standard library, torch, and the one system under
test, imported inside that system's functions. The tensorwire ends are started from the repo's
.venv with the repo root on PYTHONPATH.

Protocol with the parent (run.py): lines on stdout starting with "@@peer " carry JSON events
("ready", "sent", "done", "error"); the parent writes "go" to the sender's stdin to start the timed
send and "exit" to both once it has read their VmHWM. Everything else a system prints goes to the
log files the parent keeps.

Work: the sender builds N tensors of 256 MiB float32 from torch.randn (seeded), which writes every
page before anything is timed, and reports a crc32 of each; the receiver receives them into a new
dict of torch tensors, takes its clock reading as soon as it holds the whole dict, then reports
crc32, dtype and shape of each tensor for the parent to compare.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import socket
import struct
import sys
import threading
import time
import zlib

import torch

TENSOR_SHAPE = (8192, 8192)  # 256 MiB of float32
TENSOR_BYTES = 8192 * 8192 * 4
_CRC_BLOCK = 64 * 1024 * 1024


def emit(event: str, **fields: object) -> None:
    sys.stdout.write("@@peer " + json.dumps({"ev": event, **fields}) + "\n")
    sys.stdout.flush()


def wait_line(expected: str) -> None:
    while True:
        line = sys.stdin.readline()
        if not line or line.strip() == expected:
            return


def tensor_view(t: torch.Tensor) -> memoryview:
    """The tensor's bytes, zero-copy (needs no numpy)."""
    assert t.is_contiguous()
    nbytes = t.numel() * t.element_size()
    return memoryview((ctypes.c_char * nbytes).from_address(t.data_ptr())).cast("B")


def crc(t: torch.Tensor) -> int:
    view = tensor_view(t)
    value = 0
    for start in range(0, len(view), _CRC_BLOCK):
        value = zlib.crc32(view[start : start + _CRC_BLOCK], value)
    return value


def describe(sd: dict[str, torch.Tensor]) -> dict[str, list[object]]:
    return {
        name: [crc(t.contiguous()), str(t.dtype), list(t.shape), t.numel() * t.element_size()]
        for name, t in sd.items()
    }


def build_dict(count: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {f"layer{i:02d}.weight": torch.randn(TENSOR_SHAPE, generator=gen) for i in range(count)}


# --------------------------------------------------------------------------------------------
# bare: one blocking socket, sendall of each tensor's memory, recv_into a fresh torch.empty


def bare_recv(args: argparse.Namespace) -> None:
    srv = socket.create_server(("127.0.0.1", args.port))
    emit("ready")
    conn, _ = srv.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def read_exact(n: int) -> bytes:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            k = conn.recv_into(view[got:])
            if k == 0:
                raise ConnectionError("peer closed")
            got += k
        return bytes(buf)

    received: dict[str, torch.Tensor] = {}
    (count,) = struct.unpack("!I", read_exact(4))
    for _ in range(count):
        (hlen,) = struct.unpack("!I", read_exact(4))
        header = json.loads(read_exact(hlen))
        t = torch.empty(header["shape"], dtype=torch.float32)
        view = tensor_view(t)
        got = 0
        while got < len(view):
            k = conn.recv_into(view[got:])
            if k == 0:
                raise ConnectionError("peer closed")
            got += k
        received[header["name"]] = t
    t1 = time.time()
    conn.sendall(b"k")
    finish_receiver(received, t1)
    conn.close()


def bare_send(args: argparse.Namespace) -> None:
    sd = build_dict(args.count, args.seed)
    sock = socket.create_connection(("127.0.0.1", args.port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    emit("ready", tensors=describe(sd))
    wait_line("go")
    t0 = time.time()
    sock.sendall(struct.pack("!I", len(sd)))
    for name, t in sd.items():
        header = json.dumps({"name": name, "shape": list(t.shape)}).encode()
        sock.sendall(struct.pack("!I", len(header)) + header)
        sock.sendall(tensor_view(t))
    sock.recv(1)  # the receiver holds the dict
    emit("sent", t0=t0, t_sent=time.time())
    wait_line("exit")
    sock.close()


# --------------------------------------------------------------------------------------------
# tensorwire: the public API with asyncio.run and default settings


def tensorwire_recv(args: argparse.Namespace) -> None:
    import asyncio

    from transport import Endpoint, StateDictSink

    async def main() -> None:
        loop = asyncio.get_running_loop()
        async with Endpoint() as server:
            url = await server.listen(f"{args.driver}://127.0.0.1:0")
            emit("ready", url=url)
            async for transfer in server.incoming():
                received = await transfer.receive_into(StateDictSink())
                t1 = time.time()
                break
            await loop.run_in_executor(None, finish_receiver, received, t1)

    asyncio.run(main())


def tensorwire_send(args: argparse.Namespace) -> None:
    import asyncio

    from transport import Endpoint

    sd = build_dict(args.count, args.seed)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        async with Endpoint() as client:
            peer = await client.connect(args.url)
            emit("ready", tensors=describe(sd))
            await loop.run_in_executor(None, wait_line, "go")
            t0 = time.time()
            result = await peer.send_state_dict(sd)
            emit("sent", t0=t0, t_sent=time.time(), reported_bytes=result.bytes)
            await loop.run_in_executor(None, wait_line, "exit")

    asyncio.run(main())


# --------------------------------------------------------------------------------------------
# NVFlare: two CellNet cells (nvflare.fuel.f3.cellnet.cell.Cell), the receiver the root "server"
# cell listening on tcp/grpc/http, the sender a child cell connecting to it. The dict goes as the
# payload of Cell.send_request on a stream channel, serialised by FOBS with the PyTorch
# TensorDecomposer: since 2.7 that replaces each tensor by a download reference, and decoding on the
# receiving side pulls every tensor from the sender through the f3 download service
# (nvflare.fuel.f3.streaming.download_service), which is how FLARE moves large models.

_NVF_CHANNEL = "tensorwire_bench"
_NVF_TOPIC = "state_dict"


def _nvflare_setup() -> None:
    import logging

    from nvflare.app_opt.pt.decomposers import TensorDecomposer
    from nvflare.fuel.utils import fobs

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    fobs.register(TensorDecomposer)


def nvflare_recv(args: argparse.Namespace) -> None:
    from nvflare.fuel.f3.cellnet.cell import Cell
    from nvflare.fuel.f3.message import Message

    _nvflare_setup()
    got = threading.Event()
    holder: dict[str, object] = {}

    def on_request(message: Message) -> Message:
        payload = message.payload
        if isinstance(payload, dict) and "ping" in payload:
            return Message(payload={"pong": True})
        holder["t1"] = time.time()
        holder["sd"] = payload
        got.set()
        return Message(payload={"ok": True})

    cell = Cell(
        fqcn="server",
        root_url=f"{args.driver}://127.0.0.1:{args.port}",
        secure=False,
        credentials={},
    )
    cell.register_request_cb(channel=_NVF_CHANNEL, topic=_NVF_TOPIC, cb=on_request)
    cell.start()
    emit("ready")
    got.wait()
    received = holder["sd"]
    assert isinstance(received, dict), type(received)
    t1 = holder["t1"]
    assert isinstance(t1, float)
    finish_receiver(received, t1)
    cell.stop()


def nvflare_send(args: argparse.Namespace) -> None:
    from nvflare.fuel.f3.cellnet.cell import Cell
    from nvflare.fuel.f3.message import Message

    _nvflare_setup()
    sd = build_dict(args.count, args.seed)
    cell = Cell(
        fqcn="site-1",
        root_url=f"{args.driver}://127.0.0.1:{args.port}",
        secure=False,
        credentials={},
    )
    cell.start()
    deadline = time.time() + 60
    while True:  # a small request first, so connecting is not timed
        reply = cell.send_request(
            channel=_NVF_CHANNEL,
            topic=_NVF_TOPIC,
            target="server",
            request=Message(payload={"ping": True}),
            timeout=5.0,
        )
        if isinstance(reply.payload, dict) and reply.payload.get("pong"):
            break
        if time.time() > deadline:
            raise RuntimeError(f"NVFlare receiver not reachable: {reply.headers}")
        time.sleep(0.2)
    emit("ready", tensors=describe(sd))
    wait_line("go")
    t0 = time.time()
    reply = cell.send_request(
        channel=_NVF_CHANNEL,
        topic=_NVF_TOPIC,
        target="server",
        request=Message(payload=sd),
        timeout=600.0,
    )
    t_sent = time.time()
    if not (isinstance(reply.payload, dict) and reply.payload.get("ok")):
        emit("error", error=f"NVFlare reply: headers={reply.headers} payload={reply.payload!r}")
    emit("sent", t0=t0, t_sent=t_sent)
    wait_line("exit")
    cell.stop()


# --------------------------------------------------------------------------------------------


def finish_receiver(received: dict[str, torch.Tensor], t1: float) -> None:
    types = sorted({type(t).__name__ for t in received.values()})
    emit("done", t1=t1, tensors=describe(received), types=types)
    wait_line("exit")


ENDS = {
    ("bare", "send"): bare_send,
    ("bare", "recv"): bare_recv,
    ("tensorwire", "send"): tensorwire_send,
    ("tensorwire", "recv"): tensorwire_recv,
    ("nvflare", "send"): nvflare_send,
    ("nvflare", "recv"): nvflare_recv,
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--system", required=True)
    parser.add_argument("--role", choices=["send", "recv"], required=True)
    parser.add_argument("--driver", default="tcp")
    parser.add_argument("--count", type=int, default=8)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--url", default="")
    args = parser.parse_args()
    try:
        ENDS[(args.system, args.role)](args)
    except BaseException as exc:
        emit("error", error=f"{type(exc).__name__}: {exc}")
        raise
    os._exit(0)  # some systems leave non-daemon threads behind


if __name__ == "__main__":
    main()
