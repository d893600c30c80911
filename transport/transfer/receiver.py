"""The receiving side of transfers, sans-I/O: which stream belongs to which transfer, which chunks
are new, when every stripe ended, whether the whole transfer checks out, and the verdict.

`IncomingRegistry` answers each stream the peer opens (a new transfer, another stripe or attempt of
a known one, a duplicate of one already committed, or a refusal) and routes every later stream
event to its transfer.

Owner rule: a transfer belongs to the authenticated identity that opened it (an opaque string the
endpoint derives: certificate name, else token, else node id). Transfer ids live in one namespace
per owner: another identity that opens, resumes or re-offers the same id gets a transfer of its own
(or nothing it may see of the owner's), never the owner's held chunks, routes or verdict; and an
identity that opens an id first cannot pre-empt the owner's own transfer of that id.

`IncomingState` is one transfer. Connections are opaque hashable keys; time is an input; nothing
here waits or writes.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from transport.exceptions import (
    ConnectionClosedError,
    DigestMismatchError,
    IdleTimeoutError,
    IntegrityError,
    StreamResetError,
    StreamStateError,
    TensorwireError,
    TransferCancelledError,
    UnexpectedFrameError,
)
from transport.transfer import headers
from transport.transfer.headers import OpenHeader
from transport.transfer.states import TERMINAL, Role, TransferInput, TransferState, next_state

In = TransferInput
StreamKey = tuple[Hashable, int]  # (connection, stream id)
TransferKey = tuple[str, str]  # (owner identity, transfer id)
# Committed transfers remembered so that a sender which lost our verdict and reopens one is told
# "all held" and gets the verdict again, instead of delivering the transfer a second time.
COMPLETED_REMEMBERED: Final = 1024


class Data(enum.Enum):
    """What to do with an arriving chunk."""

    NEW = "new"  # hand it to the application
    DUPLICATE = "duplicate"  # already held: drop it and give its credit back


@dataclass
class IncomingState:
    """One transfer this side receives."""

    opened: OpenHeader
    key: StreamKey
    now: float
    owner: str = ""  # the identity that opened it: only its streams may join
    state: TransferState = TransferState.IDLE
    attempt: int = 0
    stripes: int = 1
    current: set[StreamKey] = field(default_factory=set)  # streams of the current attempt
    ended: set[StreamKey] = field(default_factory=set)
    streams: set[StreamKey] = field(default_factory=set)  # every stream ever routed here
    received: dict[int, int] = field(default_factory=dict)  # chunk index -> checksum
    end_header: Mapping[str, Any] = field(default_factory=dict)
    lost_since: float | None = None
    error: TensorwireError | None = None

    def __post_init__(self) -> None:
        self.attempt, self.stripes = self.opened.attempt, self.opened.stripes
        self.current = {self.key}
        self.streams = {self.key}
        self._step(In.OPEN_ATTEMPT)

    @property
    def transfer_id(self) -> str | None:
        return self.opened.transfer_id

    @property
    def resumable(self) -> bool:
        return self.transfer_id is not None and self.opened.kind == headers.STATE_DICT

    @property
    def holds_credit(self) -> bool:
        """Only a transfer the application took may be granted stream credit (rule 4)."""
        return self.state not in (TransferState.ANNOUNCED, TransferState.IDLE, *TERMINAL)

    def _step(self, event: TransferInput) -> bool:
        new = next_state(Role.RECEIVER, self.state, event, self.transfer_id or "")
        if new is None:
            return False
        self.state = new
        return True

    # --- streams and attempts --------------------------------------------------------------

    def release_manifest(self) -> None:
        """The raw manifest was parsed: drop it (a resumed attempt is matched by its digest)."""
        self.opened = self.opened.without_manifest()

    def join(self, key: StreamKey, opened: OpenHeader, now: float) -> bool:
        """Another stream of this transfer opened. True: it joins (a stripe of the current
        attempt, or the first of a newer one); False: an older attempt's (reset it STALE)."""
        if opened.attempt < self.attempt:
            return False
        self.streams.add(key)
        if opened.attempt > self.attempt:
            self.attempt, self.stripes = opened.attempt, opened.stripes
            self.current, self.ended = set(), set()
            self.lost_since = None
        self.current.add(key)
        self._step(In.OPEN_ATTEMPT)
        return True

    def resume_point(self) -> dict[str, Any]:
        """The RESUME header: every chunk held (received, queued, or kept by a persisting sink)."""
        return {"held": headers.index_ranges(self.received)}

    def on_data(self, key: StreamKey, index: int, checksum: int) -> Data:
        if index in self.received:
            return Data.DUPLICATE
        self.received[index] = checksum
        return Data.NEW

    def on_end(self, key: StreamKey, header: Mapping[str, Any]) -> bool:
        """A stream's END (sfm verified its own digest). True once every stripe of the current
        attempt ended: the transfer moves to VERIFYING."""
        if key not in self.current:
            return False  # a stream of an attempt that was given up
        self.ended.add(key)
        self.end_header = header
        if len(self.ended) < self.stripes:
            return False
        return self._step(In.ALL_ENDED) and self.state is TransferState.VERIFYING

    def on_reset(self, key: StreamKey, code: str, reason: str, now: float) -> None:
        """The sender reset one of our streams: a superseded attempt, a cancel, or a failure."""
        if key not in self.current:
            return
        if code == headers.SUPERSEDED and self.resumable:
            self.on_lost(key, now)
            return
        if code == headers.CANCELLED:
            error: TensorwireError = TransferCancelledError(
                f"the sender cancelled transfer {self.transfer_id}: {reason}", code=code
            )
            if self._step(In.CANCEL):
                self.error = self.error or error
            return
        self.fail(
            StreamResetError(f"the sender reset transfer {self.transfer_id}: {reason}", code=code)
        )

    def on_lost(self, key: StreamKey, now: float, error: TensorwireError | None = None) -> None:
        """A stream (or its connection) of the current attempt is gone."""
        if key not in self.current or self.state in TERMINAL:
            return
        if not self.resumable:
            self.fail(error or IdleTimeoutError(f"byte stream {self.transfer_id} lost"))
            return
        self.current.discard(key)
        if self._step(In.LOSE) and self.lost_since is None:
            self.lost_since = now

    def deadline(self, idle_timeout: float) -> float | None:
        """When waiting for the sender's next attempt gives up (None: not waiting)."""
        if self.lost_since is None or self.state in TERMINAL:
            return None
        return self.lost_since + idle_timeout

    def give_up(self, idle_timeout: float) -> list[tuple[StreamKey, str, str]]:
        return self.fail(
            IdleTimeoutError(
                f"transfer {self.transfer_id}: the sender did not come back within "
                f"{idle_timeout:g} s after the connection was lost"
            )
        )

    # --- the application's side ------------------------------------------------------------

    def take(self) -> None:
        """The application takes the transfer; one that already ended raises why it did."""
        if self.state in TERMINAL:
            raise self.error or StreamStateError(f"transfer {self.transfer_id} already ended")
        self._step(In.TAKE)
        if self.lost_since is not None:
            self._step(In.LOSE)

    def verify(self, chunk_count: int) -> str:
        """Every planned chunk arrived once and the sender's transfer digest matches; returns it.
        The digest is mandatory for a state dict: a sender that leaves it out fails here."""
        if len(self.received) != chunk_count:
            raise IntegrityError(
                f"transfer {self.transfer_id}: {len(self.received)} of {chunk_count} chunks "
                "arrived before END"
            )
        computed = headers.transfer_digest(self.received)
        expected = self.end_header.get("transfer_digest")
        if expected is None:
            raise IntegrityError(f"transfer {self.transfer_id}: END carries no transfer_digest")
        if expected != computed:
            raise DigestMismatchError(
                f"transfer {self.transfer_id}: digest over all chunks {computed} != the "
                f"sender's {expected}"
            )
        return computed

    def commit(self) -> list[StreamKey]:
        """The sink committed: the streams whose final ACK carries the verdict."""
        self._step(In.COMMIT)
        return sorted(self.current, key=lambda k: k[1])

    def reject(self, reason: str) -> list[tuple[StreamKey, str, str]]:
        self._step(In.REJECT)
        return [(key, headers.REJECTED, reason) for key in self.current]

    def fail(
        self, error: TensorwireError, code: str | None = None
    ) -> list[tuple[StreamKey, str, str]]:
        """A final error here: the resets that tell the sender why (`code` or receiver_failed)."""
        if self.state in TERMINAL:
            return []
        self._step(In.FAIL)
        self.error = self.error or error
        code = code or headers.RECEIVER_FAILED
        reason = f"{type(error).__name__}: {error}"
        return [(key, code, reason) for key in self.current]


@dataclass(frozen=True, slots=True)
class Opened:
    """The registry's answer to a stream the peer opened."""

    action: str  # NEW, JOINED, DUPLICATE, REFUSED
    transfer: IncomingState | None = None
    code: str = ""
    reason: str = ""
    held_chunks: int = 0  # DUPLICATE: how many chunks the committed transfer had


NEW, JOINED, DUPLICATE, REFUSED = "new", "joined", "duplicate", "refused"


class IncomingRegistry:
    """Every transfer this side receives, keyed by (owner, transfer id), and the route of every
    stream."""

    def __init__(self) -> None:
        self._by_id: dict[TransferKey, IncomingState] = {}
        self._routes: dict[StreamKey, IncomingState] = {}
        # (owner, transfer id) -> chunk count of a committed transfer
        self._committed: OrderedDict[TransferKey, int] = OrderedDict()
        # Streams of a sender re-offering a transfer we committed (it lost our verdict): told
        # "all held", their END gets the verdict again; the application never sees them.
        self._settling: set[StreamKey] = set()

    def __len__(self) -> int:
        return len(self._routes)

    def route(self, key: StreamKey) -> IncomingState | None:
        return self._routes.get(key)

    def on_open(
        self, key: StreamKey, header: Mapping[str, Any], now: float, owner: str = ""
    ) -> Opened:
        """A stream `owner` opened (ProtocolError for a malformed header: refuse the peer). Only
        `owner`'s own transfers of that id are joined or re-offered (see the owner rule)."""
        opened = OpenHeader.parse(header)
        tid = opened.transfer_id
        named = (owner, tid) if tid is not None else None
        known = self._by_id.get(named) if named is not None else None
        if known is not None:
            return self._join(known, key, opened, now)
        if named is not None and named in self._committed and opened.kind == headers.STATE_DICT:
            self._settling.add(key)
            return Opened(DUPLICATE, held_chunks=self._committed[named])
        transfer = IncomingState(opened, key, now, owner)
        self._routes[key] = transfer
        if named is not None:
            self._by_id[named] = transfer
        return Opened(NEW, transfer)

    def _join(self, known: IncomingState, key: StreamKey, opened: OpenHeader, now: float) -> Opened:
        if not known.resumable:
            raise UnexpectedFrameError(f"transfer id {known.transfer_id!r} is already in use")
        if not opened.same_transfer(known.opened):
            return Opened(REFUSED, code=headers.MISMATCH, reason="resumed with another manifest")
        if not known.join(key, opened, now):
            reason = f"attempt {opened.attempt} < {known.attempt}"
            return Opened(REFUSED, code=headers.STALE, reason=reason)
        self._routes[key] = known
        return Opened(JOINED, known)

    def settling(self, key: StreamKey, *, ended: bool = False) -> bool:
        """Is `key` a duplicate's stream (its data is dropped)? With `ended`, its END or reset
        arrived: it is done (on END, the caller completes it: the verdict again)."""
        if key not in self._settling:
            return False
        if ended:
            self._settling.discard(key)
        return True

    def connection_lost(
        self, connection: Hashable, now: float, error: TensorwireError, *, said_goodbye: bool
    ) -> list[IncomingState]:
        """Every transfer with a stream on `connection` loses it: it waits for the sender's next
        attempt, unless the peer said goodbye first (it closed its endpoint: nothing will come
        back, so the transfer fails now). Returns those affected."""
        self._settling = {key for key in self._settling if key[0] != connection}
        lost = [(key, t) for key, t in self._routes.items() if key[0] == connection]
        for key, transfer in lost:
            del self._routes[key]
            if said_goodbye and transfer.state is not TransferState.VERIFYING:
                transfer.fail(ConnectionClosedError(f"the sender closed its endpoint: {error}"))
            else:
                transfer.on_lost(key, now)
        return list({id(t): t for _, t in lost}.values())

    def finished(self, transfer: IncomingState) -> None:
        """The transfer ended: forget its routes; remember it if it committed."""
        for key in transfer.streams:
            if self._routes.get(key) is transfer:
                del self._routes[key]
        tid = transfer.transfer_id
        named = (transfer.owner, tid) if tid is not None else None
        if named is not None and self._by_id.get(named) is transfer:
            del self._by_id[named]
        if named is not None and transfer.state is TransferState.COMMITTED:
            self._committed[named] = len(transfer.received)
            while len(self._committed) > COMPLETED_REMEMBERED:
                self._committed.popitem(last=False)

    def transfers(self) -> list[IncomingState]:
        return list({id(t): t for t in self._routes.values()}.values())
