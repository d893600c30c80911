"""A fault-injecting TCP proxy: forwards connections to a target and cuts them at chosen offsets.

Used by the resume tests and by `python -m benchmarks stream --cut-every N`. Offsets count the
client-to-target bytes forwarded over all connections together, so "cut at 100 MiB and 300 MiB"
means the transfer loses its connection twice whatever the reconnects in between. At a cut the
proxy forwards exactly up to the offset, then aborts both sides (an RST, like a middlebox or a
crashed router), so the cut may fall in the middle of a frame.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable

_READ_SIZE = 256 * 1024


class CuttingProxy:
    """`await proxy.start()` -> (host, port) to connect to; `proxy.cuts` counts cuts made."""

    def __init__(self, target_host: str, target_port: int, cut_offsets: Iterable[int]) -> None:
        self._target = (target_host, target_port)
        self._offsets = sorted(cut_offsets)
        self.forwarded = 0  # client -> target bytes, all connections
        self.cuts = 0
        self.connections = 0
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self, host: str = "127.0.0.1") -> tuple[str, int]:
        self._server = await asyncio.start_server(self._serve, host, 0)
        return host, self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        """Stop, and reset every connection still open (as a proxy that goes away does)."""
        self.stall()
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    def stall(self) -> None:
        """Stop accepting and forwarding but leave the connections open: a middlebox (or a
        peer) that hangs, so nothing is read and nothing comes back, yet no socket closes."""
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()

    def _next_cut(self) -> int | None:
        return self._offsets[self.cuts] if self.cuts < len(self._offsets) else None

    async def _serve(
        self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter
    ) -> None:
        self.connections += 1
        try:
            target_in, target_out = await asyncio.open_connection(*self._target)
        except OSError:
            client_out.transport.abort()
            return
        writers = (client_out, target_out)
        self._writers.update(writers)
        upstream = asyncio.ensure_future(self._pipe(client_in, target_out, writers, count=True))
        downstream = asyncio.ensure_future(self._pipe(target_in, client_out, writers, count=False))
        self._tasks.update((upstream, downstream))
        await asyncio.gather(upstream, downstream, return_exceptions=True)
        self._tasks.difference_update((upstream, downstream))
        if upstream.cancelled() and downstream.cancelled():
            return  # stalled: the connections stay open until close()
        for writer in writers:
            writer.close()  # both directions ended (or were cut): release the sockets
        self._writers.difference_update(writers)

    async def _pipe(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        writers: tuple[asyncio.StreamWriter, ...],
        *,
        count: bool,
    ) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            while data := await reader.read(_READ_SIZE):
                cut = self._next_cut() if count else None
                if cut is not None and self.forwarded + len(data) >= cut:
                    writer.write(data[: cut - self.forwarded])
                    self.forwarded = cut
                    self.cuts += 1
                    for each in writers:
                        each.transport.abort()
                    return
                writer.write(data)
                if count:
                    self.forwarded += len(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
