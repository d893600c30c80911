"""Small request/response exchanges beside the streams, on one connection. One job of a Link
(link.py), split out of it: the link feeds it REQUEST and RESPONSE events and lends it its I/O.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from transport import sfm
from transport.endpoint.outgoing import LinkIO
from transport.exceptions import RemoteRequestError, TensorwireError
from transport.wire import Buffer

log = logging.getLogger("tensorwire.link")

Answer = Callable[[Mapping[str, Any], bytes], Awaitable[tuple[Mapping[str, Any], Buffer]]]


class Requests:
    """Our requests awaiting their response, and the handler that answers the peer's."""

    def __init__(self, io: LinkIO, answer: Answer | None) -> None:
        self._io = io
        self._answer_with = answer
        self._responses: dict[int, asyncio.Future[tuple[Mapping[str, Any], bytes]]] = {}

    async def request(
        self, header: Mapping[str, Any], body: Buffer = b""
    ) -> tuple[Mapping[str, Any], bytes]:
        io = self._io
        io.raise_if_failed()
        request_id = io.protocol.send_request(header, body)
        future: asyncio.Future[tuple[Mapping[str, Any], bytes]] = (
            asyncio.get_running_loop().create_future()
        )
        self._responses[request_id] = future
        try:
            await io.flush()
            done = asyncio.Event()
            future.add_done_callback(lambda _: done.set())
            await io.wait_progress(done, f"the response to request {request_id}")
            return future.result()
        finally:
            self._responses.pop(request_id, None)

    def on_response(self, event: sfm.ResponseReceived) -> None:
        future = self._responses.get(event.request_id)
        if future is None or future.done():
            return
        if event.error:
            reason = str(event.header.get("reason", "request failed"))
            code = str(event.header.get("code", "error"))
            future.set_exception(RemoteRequestError(reason, code=code))
        else:
            future.set_result((event.header, bytes(event.body)))

    async def answer(self, event: sfm.RequestReceived) -> None:
        """Run the handler for the peer's request and send its response (or its failure)."""
        protocol = self._io.protocol
        try:
            if self._answer_with is None:
                raise LookupError("this endpoint serves no requests")
            header, body = await self._answer_with(event.header, bytes(event.body))
        except Exception as error:
            log.info("request handler failed: %r", error)
            reason = f"{type(error).__name__}: {error}"
            failure = {"code": "handler", "reason": reason}
            protocol.send_response(event.request_id, failure, error=True)
        else:
            protocol.send_response(event.request_id, header, body)
        self._io.schedule_flush()

    def fail_all(self, error: TensorwireError) -> None:
        for future in self._responses.values():
            if not future.done():
                future.set_exception(error)
