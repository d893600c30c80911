"""The streams one connection sends: waiting for credit, for the receiver's resume point and for
its verdict. One job of a Link (link.py), split out of it: the link feeds it the sfm events of its
streams and lends it the connection's I/O (`LinkIO`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from transport import sfm
from transport.endpoint.clock import Clock
from transport.exceptions import ConfigError, StreamResetError, TensorwireError
from transport.metrics import LinkMetrics
from transport.wire import Buffer


class LinkIO(Protocol):
    """What a job of the link needs from it: the protocol, writing, waiting, the clock."""

    clock: Clock
    metrics: LinkMetrics

    @property
    def protocol(self) -> sfm.Connection: ...

    @property
    def stream_window(self) -> int: ...

    async def flush(self) -> None: ...

    def schedule_flush(self) -> None: ...

    async def wait_progress(self, event: asyncio.Event, what: str) -> None: ...

    def moved(self) -> None: ...

    def raise_if_failed(self) -> None: ...


class _SendSlot:
    """What a sending stream waits on: credit, RESUME, the verdict, or the error that ends it."""

    def __init__(self) -> None:
        self.credit = asyncio.Event()
        self.completed = asyncio.Event()
        self.resumed = asyncio.Event()
        self.resume_points: list[Any] = []  # raw "held" values of RESUMEs: the transfer parses
        self.error: TensorwireError | None = None

    def fail(self, error: TensorwireError) -> None:
        if self.completed.is_set() and self.error is None:
            return  # the peer already confirmed the stream: a later connection loss is moot
        self.error = self.error or error
        self.credit.set()
        self.completed.set()
        self.resumed.set()


class OutgoingStreams:
    """Every stream this side sends on one connection."""

    def __init__(self, io: LinkIO) -> None:
        self._io = io
        self._slots: dict[int, _SendSlot] = {}

    def __len__(self) -> int:
        return len(self._slots)

    # --- fed by the link -------------------------------------------------------------------

    def on_credit(self, stream_id: int) -> None:
        slots = self._slots.values() if stream_id == 0 else [self._slots.get(stream_id)]
        for slot in slots:
            if slot is not None:
                slot.credit.set()

    def on_completed(self, stream_id: int) -> None:
        slot = self._slots.get(stream_id)
        if slot is not None:
            slot.completed.set()

    def on_resume(self, event: sfm.ResumeReceived) -> None:
        slot = self._slots.get(event.stream_id)
        if slot is not None:
            slot.resume_points.append(event.header.get("held"))
            slot.resumed.set()
            slot.credit.set()  # a sender waiting for credit re-checks whether it still must send

    def on_reset(self, event: sfm.StreamReset) -> bool:
        """The receiver reset one of our streams (its verdict, or a refusal); False if the
        stream is not one we send."""
        slot = self._slots.get(event.stream_id)
        if slot is None:
            return False
        message = f"peer reset stream {event.stream_id}: {event.reason}"
        slot.fail(StreamResetError(message, code=event.code))
        return True

    def fail_all(self, error: TensorwireError) -> None:
        for slot in self._slots.values():
            slot.fail(error)

    def forget(self, stream_id: int) -> None:
        self._slots.pop(stream_id, None)

    # --- the sender's verbs ----------------------------------------------------------------

    def open(self, header: Mapping[str, Any]) -> int:
        """Open a stream we send."""
        io = self._io
        io.raise_if_failed()
        stream_id = io.protocol.open_stream(header)
        self._slots[stream_id] = _SendSlot()
        # The OPEN goes out now: a resumed attempt sends no DATA until the receiver's RESUME
        # answers it, so waiting for the first chunk to carry it out would wait for the next
        # heartbeat (idle_timeout / 3) on a connection that is otherwise quiet.
        io.schedule_flush()
        return stream_id

    async def wait_resume_point(self, stream_id: int) -> None:
        """Wait for the receiver's RESUME on a reopened stream (what it holds)."""
        slot = self._slots[stream_id]
        what = f"the receiver's resume point on stream {stream_id}"
        await self._io.wait_progress(slot.resumed, what)
        if slot.error is not None:
            raise slot.error

    def take_resume_points(self, stream_id: int) -> list[Any]:
        """The raw "held" values of RESUMEs that arrived on a stream since the last call."""
        slot = self._slots.get(stream_id)
        if slot is None or not slot.resume_points:
            return []
        points, slot.resume_points = slot.resume_points, []
        return points

    async def send_chunk(
        self,
        stream_id: int,
        index: int,
        parts: Sequence[Buffer],
        nbytes: int,
        header: Mapping[str, Any] | None = None,
        flags: int = 0,
        still_needed: Callable[[], bool] = lambda: True,
    ) -> int | None:
        """Send one DATA frame once the peer's credit allows it; return its checksum. None when
        `still_needed()` turned False meanwhile (a RESUME said the receiver holds it: a
        receiver that holds everything grants no credit at all)."""
        io = self._io
        if nbytes > io.stream_window:
            raise ConfigError(
                f"a chunk of {nbytes} bytes can never fit the peer's stream window of "
                f"{io.stream_window} bytes: use a smaller chunk_size"
            )
        slot = self._slots[stream_id]
        while True:
            if slot.error is not None:
                raise slot.error
            if not still_needed():
                return None
            if io.protocol.can_send(stream_id, nbytes):
                break
            await self._wait_credit(slot, stream_id)
        checksum = io.protocol.send_data(stream_id, index, parts, header, flags)
        io.metrics.chunk_sent(nbytes)
        io.moved()
        await io.flush()
        return checksum

    async def _wait_credit(self, slot: _SendSlot, stream_id: int) -> None:
        slot.credit.clear()
        clock = self._io.clock
        stalled_at = clock.now()
        try:
            await self._io.wait_progress(slot.credit, f"credit on stream {stream_id}")
        finally:
            self._io.metrics.stalled(clock.now() - stalled_at)

    async def end(self, stream_id: int, header: Mapping[str, Any] | None = None) -> None:
        """End a stream and wait for the receiver's verdict: its final ACK (it committed the
        transfer), or a reset with its reason."""
        slot = self._slots[stream_id]
        if slot.error is not None:
            raise slot.error
        self._io.protocol.end_stream(stream_id, header)
        await self._io.flush()
        try:
            what = f"the receiver's verdict on stream {stream_id}"
            await self._io.wait_progress(slot.completed, what)
        finally:
            self._slots.pop(stream_id, None)
        if slot.error is not None:
            raise slot.error
