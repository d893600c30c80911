"""Connection settings: ours (`ConnectionConfig`) and the peer's (`PeerSettings`, from its HELLO).

Each side announces in its HELLO header, under the key "sfm", the initial credit it grants and the
concurrency it accepts. The peer starts sending on that credit without waiting for a CREDIT frame
(one round trip saved per stream on a long link) and never opens more streams or requests than
announced.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from transport.exceptions import ConfigError, UnexpectedFrameError
from transport.sfm.flow import MAX_WINDOW
from transport.wire import DEFAULT_LIMITS, PREFIX_SIZE, Limits

__all__ = [
    "HELLO_LIMITS",
    "HELLO_SCRATCH",
    "HELLO_SETTINGS_KEY",
    "SCRATCH",
    "ConnectionConfig",
    "PeerSettings",
]

HELLO_SETTINGS_KEY: Final = "sfm"
# A peer's first frame (its HELLO, or a GOAWAY refusing us) is parsed under these limits, in a
# scratch of HELLO_SCRATCH bytes: what a connection nobody has authenticated yet may cost. A
# HELLO carries a node id, a token and a few settings: a few hundred bytes.
HELLO_LIMITS: Final = Limits(max_header=16 * 1024, max_payload=0, max_frame=PREFIX_SIZE + 16 * 1024)
HELLO_SCRATCH: Final = 64 * 1024
SCRATCH: Final = 256 * 1024  # the parser's scratch once the peer is accepted
_SETTING_RANGES: Final = {
    "stream_window": (0, MAX_WINDOW),
    "connection_window": (0, MAX_WINDOW),
    "max_streams": (0, 2**31),
    "max_pending_requests": (0, 2**31),
    "min_data_credit": (0, 2**20),
}
# Settings a HELLO may leave out, and what they then are.
_OPTIONAL_SETTINGS: Final = {"min_data_credit": 0}


@dataclass(frozen=True, slots=True)
class ConnectionConfig:
    """This side's protocol settings; windows and counts are what we grant the peer."""

    is_initiator: bool  # the initiator opens odd stream and request ids, the acceptor even ones
    stream_window: int = 32 * 2**20  # credit granted to the peer per stream at open
    connection_window: int = 128 * 2**20  # credit granted to the peer for all streams together
    max_streams: int = 64  # concurrent streams the peer may open; more is a protocol error
    max_pending_requests: int = 256  # unanswered requests the peer may have; more is an error
    limits: Limits = DEFAULT_LIMITS
    # Credit a stream gets when it opens; the rest of stream_window comes with `grant_stream()`.
    # None: the whole window at once. 0 lets the application decide which streams may hold
    # credit (a stream nobody reads yet must not hold connection credit others need).
    stream_credit: int | None = None
    # Send the final ACK of a stream as soon as its END checks out (True), or only when the
    # application calls `complete_stream()` (False): then the ACK is the application's verdict.
    ack_on_end: bool = True
    # Credit each DATA frame we receive takes at least (announced in HELLO): every frame costs
    # us an event and its bookkeeping whatever its size, so a flood of tiny or empty frames
    # must use up the window too. 0 counts payload bytes only.
    min_data_credit: int = 256
    # Parse nothing after the peer's HELLO until the application calls `accept_peer()` (it
    # checks the peer's token or certificate first). False: accepted as soon as it said hello.
    hold_hello: bool = False

    def __post_init__(self) -> None:
        for name, (low, high) in _SETTING_RANGES.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ConfigError(f"ConnectionConfig.{name}={value!r} is outside {low}..{high}")
        if self.stream_window == 0 or self.connection_window == 0:
            raise ConfigError(
                f"ConnectionConfig windows must be > 0 (stream_window={self.stream_window}, "
                f"connection_window={self.connection_window}): the peer could never send data"
            )
        if self.stream_credit is not None and not 0 <= self.stream_credit <= self.stream_window:
            raise ConfigError(
                f"ConnectionConfig.stream_credit={self.stream_credit} is outside "
                f"0..stream_window ({self.stream_window})"
            )

    @property
    def open_credit(self) -> int:
        """Credit a stream the peer opens gets at once."""
        return self.stream_window if self.stream_credit is None else self.stream_credit

    def hello_settings(self) -> dict[str, int]:
        """The settings this side announces in its HELLO header."""
        settings = {name: getattr(self, name) for name in _SETTING_RANGES}
        settings["stream_credit"] = self.open_credit
        return settings


@dataclass(frozen=True, slots=True)
class PeerSettings:
    """What the peer announced in its HELLO: the credit and concurrency it grants us."""

    stream_window: int
    connection_window: int
    max_streams: int
    max_pending_requests: int
    min_data_credit: int  # credit each DATA frame we send takes at least
    stream_credit: int  # credit each stream we open gets at once (the rest comes as CREDIT)

    @classmethod
    def from_hello(cls, header: Mapping[str, Any]) -> PeerSettings:
        """Read and check the peer's announced settings; absent or absurd ones are an error."""
        announced = header.get(HELLO_SETTINGS_KEY)
        if not isinstance(announced, Mapping):
            raise UnexpectedFrameError(
                f"HELLO header lacks the {HELLO_SETTINGS_KEY!r} settings object "
                f"(got {type(announced).__name__})"
            )
        values: dict[str, int] = {}
        for name, (low, high) in _SETTING_RANGES.items():
            value = announced.get(name, _OPTIONAL_SETTINGS.get(name))
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise UnexpectedFrameError(
                    f"HELLO setting {HELLO_SETTINGS_KEY}.{name}={value!r} is outside {low}..{high}"
                )
            values[name] = value
        credit = announced.get("stream_credit", values["stream_window"])
        if isinstance(credit, bool) or not isinstance(credit, int):
            credit = -1
        if not 0 <= credit <= values["stream_window"]:
            raise UnexpectedFrameError(
                f"HELLO setting {HELLO_SETTINGS_KEY}.stream_credit="
                f"{announced.get('stream_credit')!r} is outside 0..stream_window "
                f"({values['stream_window']})"
            )
        return cls(**values, stream_credit=credit)
