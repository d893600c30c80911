"""A Peer: the remote endpoint, across however many connections it takes.

A peer we connected to is reconnected by us when its connection drops (backoff with jitter, until
idle_timeout passes with no new connection); a peer that connected to us is expected to come back
by itself, and its new connection (same node id, and same certificate identity under TLS) takes
the place of the old one. Transfers in flight resume on the new connection.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from transport import metrics
from transport.drivers import PeerInfo
from transport.endpoint.link import Link
from transport.endpoint.sending import (
    ProgressCallback,
    TransferResult,
    each_block,
    file_blocks,
    send_blocks,
    send_source,
)
from transport.exceptions import ConnectionClosedError, TensorwireError, TransportError
from transport.logs import TransferRecord
from transport.payload import Source, StateDictSource, plan_chunks
from transport.wire import Buffer

if TYPE_CHECKING:
    from transport.endpoint.endpoint import Endpoint


class Peer:
    """The remote endpoint: send to it, ask it, close it."""

    def __init__(self, endpoint: Endpoint, link: Link, url: str | None = None) -> None:
        self._endpoint = endpoint
        self._link = link
        self._url = url  # set when we connected: we are the ones to reconnect
        self._relinked = asyncio.Event()
        self._recovering = asyncio.Lock()
        self._closing = False
        self._stripes: list[Link] = []  # extra connections a striped transfer uses
        self.reconnects = 0
        self._clock = endpoint.clock
        self._idle_timeout = endpoint.config.idle_timeout

    @property
    def info(self) -> PeerInfo | None:
        """Scheme, address and (under TLS) the verified identity of the peer."""
        return self._link.peer

    @property
    def node_id(self) -> str | None:
        """The node id the peer announced in its hello (one that presented a client certificate
        is refused unless this is the certificate's name)."""
        return self._link.remote_node

    @property
    def closed(self) -> bool:
        return self._closing or self._link.error is not None

    # --- sending ---------------------------------------------------------------------------------

    async def send_state_dict(
        self,
        state_dict: Mapping[str, torch.Tensor] | Source,
        *,
        meta: Mapping[str, Any] | None = None,
        transfer_id: str | None = None,
        streams: int | None = None,
        progress: ProgressCallback | None = None,
    ) -> TransferResult:
        """Stream a state dict (or any Source); return once the peer verified all of it.

        A dropped connection is resumed, not restarted. Give a `transfer_id` that is stable
        across processes (e.g. "round-7/site-3") to let a receiver restarted with a file sink
        continue where its predecessor stopped. `streams` > 1 stripes the chunks over that many
        parallel connections (a peer we dialed only), so their windows add up on a long fat pipe.
        `progress(bytes_done, total_bytes)` is called as chunks go out.

        Returns only once the receiving application committed the transfer (its sink finished);
        raises TransferRejectedError with the receiver's reason when it rejected it or its sink
        failed. Cancelling the call cancels the transfer: the receiver learns it at once.
        """
        self._endpoint.check_loop()
        chunk_size = self._endpoint.config.chunk_size
        source = (
            state_dict
            if isinstance(state_dict, Source)
            else StateDictSource(state_dict, chunk_size=chunk_size)
        )
        config = self._endpoint.config
        codec = (config.compression_policy(), self._endpoint.codec_pool)
        stripes = streams if streams is not None else config.streams
        nbytes, chunks = source.manifest.total_bytes, len(plan_chunks(source.manifest))
        with TransferRecord("sent", transfer_id, nbytes, chunks, self.node_id) as record:
            record.begin()
            result = await send_source(self, source, meta, transfer_id, codec, stripes, progress)
            record.transfer_id, record.resumes = result.transfer_id, result.resumes
            record.digest = result.digest
            metrics.resumed("sent", result.resumes)
            record.peer = self.node_id  # known once connected
        return result

    async def send_file(
        self, path: str | os.PathLike[str], *, meta: Mapping[str, Any] | None = None
    ) -> TransferResult:
        """Stream a plain file's bytes (checkpoints, datasets, logs) with the same guarantees."""
        self._endpoint.check_loop()
        file_path = Path(path)
        size = (await asyncio.to_thread(file_path.stat)).st_size
        info = {"name": file_path.name, **(meta or {})}
        link = await self._live_link()
        blocks = file_blocks(file_path, self._endpoint.config.chunk_size, link.stream_window)
        return await send_blocks(link, blocks, info, size=size)

    async def send_bytes(
        self,
        blocks: AsyncIterable[Buffer] | Iterable[Buffer],
        *,
        meta: Mapping[str, Any] | None = None,
    ) -> TransferResult:
        """Stream any (async) iterable of byte blocks (split to at most a chunk per DATA frame).

        The driver may still read a block after the next one was asked for, so an iterable must
        not refill a block it already yielded (yield fresh buffers, or a ring larger than the
        window as `send_file` does)."""
        self._endpoint.check_loop()
        limit = self._endpoint.config.chunk_size
        return await send_blocks(await self._live_link(), _bounded(blocks, limit), meta)

    async def request(
        self, header: Mapping[str, Any], body: Buffer = b""
    ) -> tuple[Mapping[str, Any], bytes]:
        """A small request/response exchange beside the streams (RemoteRequestError on failure).

        Not retried after a dropped connection: a request may not be safe to repeat."""
        self._endpoint.check_loop()
        return await (await self._live_link()).requests.request(header, body)

    async def close(self) -> None:
        self._closing = True
        for stripe in self._stripes:
            await stripe.close()
        await self._link.close()

    async def wait_closed(self) -> None:
        await self._link.closed.wait()

    # --- staying connected -----------------------------------------------------------------------

    async def _live_link(self) -> Link:
        """The current connection, or a new one if it dropped."""
        link = self._link
        if link.error is None:
            return link
        return await self._recover(link, link.error)

    async def _recover(self, failed: Link, error: BaseException) -> Link:
        """Replace a failed link: reconnect if we dialed, else wait for the peer to come back."""
        async with self._recovering:
            if self._link is not failed and self._link.error is None:
                return self._link
            if self._closing:
                raise ConnectionClosedError("the peer was closed locally") from error
            if failed.said_goodbye and self._url is None:
                raise ConnectionClosedError(
                    f"peer {self.node_id} closed its endpoint ({error})"
                ) from error
            if self._url is not None:
                await self._reconnect(error, once=failed.said_goodbye)
            else:
                await self._await_return(failed, error)
            self.reconnects += 1
            metrics.reconnected()
            return self._link

    async def _stripe_links(self, count: int) -> list[Link]:
        """`count` live connections to the peer: ours first, then extra ones opened as needed
        (only a peer we dialed can be striped; fewer come back if extra dials fail)."""
        primary = await self._live_link()
        if count <= 1 or self._url is None:
            return [primary]
        self._stripes = [link for link in self._stripes if link.error is None]
        while len(self._stripes) < count - 1:
            try:
                self._stripes.append(await self._endpoint.open_link(self._url, stripe=True))
            except TransportError:
                break  # stripe over what we have; the next attempt tries again
        return [primary, *self._stripes[: count - 1]]

    async def _recover_stripes(self, links: list[Link], error: TensorwireError) -> None:
        """After a failed attempt: bring the main connection back if it was lost (failed extra
        ones are simply reopened by the next _stripe_links)."""
        if links[0].error is not None:
            await self._recover(links[0], error)
        else:
            self.reconnects += 1

    def _replace_link(self, link: Link) -> None:
        """A new connection from the same peer takes the old one's place."""
        self._link = link
        self._relinked.set()

    async def _reconnect(self, error: BaseException, *, once: bool = False) -> None:
        """Dial again with backoff until idle_timeout; a peer that closed its endpoint cleanly
        gets one try (it may have restarted), not a whole idle_timeout of them."""
        config, clock = self._endpoint.config, self._clock
        deadline = clock.now() + config.idle_timeout
        delay = config.reconnect_initial_delay
        assert self._url is not None
        while True:
            try:
                self._link = await self._endpoint.open_link(self._url)
                return
            except TransportError as attempt_error:
                if once or clock.now() + delay > deadline:
                    why = "it closed its endpoint" if once else f"within {config.idle_timeout:g} s"
                    raise ConnectionClosedError(
                        f"could not reconnect to {self._url} ({why}) after {error}: {attempt_error}"
                    ) from attempt_error
            await clock.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(delay * 2, config.reconnect_max_delay)

    async def _await_return(self, failed: Link, error: BaseException) -> None:
        timeout, clock = self._endpoint.config.idle_timeout, self._clock
        deadline = clock.now() + timeout
        while self._link is failed or self._link.error is not None:
            self._relinked.clear()
            if not await clock.wait(self._relinked, deadline - clock.now()):
                raise ConnectionClosedError(
                    f"peer {self.node_id} did not reconnect within {timeout:g} s after {error}"
                ) from error


async def _bounded(
    blocks: AsyncIterable[Buffer] | Iterable[Buffer], limit: int
) -> AsyncIterator[memoryview]:
    """Split blocks larger than a chunk so one frame never exceeds the peer's window."""
    async for block in each_block(blocks):
        view = memoryview(block).cast("B")
        for start in range(0, max(view.nbytes, 1), limit):
            yield view[start : start + limit]
