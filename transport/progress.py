"""Progress bars for long transfers: bytes, rate and ETA, for a person watching a terminal.

    with transfer_progress(manifest.total_bytes, "receiving", "received"):
        await transfer.receive_into(sink)

The bar follows this process's `tensorwire_tensor_bytes_total` counter (tensor bytes as chunks are
sent or placed, before compression) from a thread, so any transfer in the process drives it with
no callback threaded through the transport, and several concurrent transfers (a server sending a
model to many sites) add up on one bar. It draws on stderr and only when stderr is a terminal:
under systemd, in a container log, or piped, it stays silent, as it does with `quiet`.

One unit system: bytes in MiB (2**20 B), rates in MiB/s, as plain fixed-point numbers (`mib`).
While a bar is drawn, log lines are written above it instead of through it (`logs_above_bars`).
`BarBoard` draws one bar per key on its own line (a server's transfer to and from each site).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable, Iterator, MutableMapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from transport import metrics

__all__ = [
    "BarBoard",
    "byte_bar",
    "logs_above_bars",
    "mib",
    "progress_wanted",
    "transfer_progress",
]

_REFRESH_SECONDS = 0.25
_FALLBACK_SIZE = (100, 24)  # columns, lines
MIB = 2**20
_BAR_FORMAT = "{desc} {percentage:3.0f}%|{bar}| {moved}/{size} MiB {speed} MiB/s {remaining}"

if TYPE_CHECKING:
    _Bar = tqdm[Any]
else:
    _Bar = tqdm


def progress_wanted(quiet: bool = False) -> bool:
    """Progress bars only for a person watching: not with quiet, not into a file or a pipe."""
    return not quiet and sys.stderr.isatty()


def mib(nbytes: float) -> str:
    """Bytes as MiB in plain fixed point: 1.5 MiB -> '1.5', 1 GiB -> '1,024' (never '1.02e+03')."""
    value = nbytes / MIB
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


@contextmanager
def transfer_progress(
    total: int,
    description: str,
    directions: str | Sequence[str] = "received",
    *,
    enabled: bool | None = None,
) -> Iterator[tqdm[Any]]:
    """A bar of `total` bytes following the tensor bytes this process moves in `directions`
    ("sent", "received" or both) while the block runs; `enabled` None means `progress_wanted()`.

    When the block ends without an error the bar is filled: chunks a resumed receiver already
    held never move again, yet the transfer is whole."""
    followed = (directions,) if isinstance(directions, str) else tuple(directions)
    bar = byte_bar(total, description, enabled=progress_wanted() if enabled is None else enabled)
    start = _moved(followed)
    stop = threading.Event()

    def follow() -> None:
        while not stop.wait(_REFRESH_SECONDS):
            bar.update(min(_moved(followed) - start, total) - bar.n)

    follower = threading.Thread(target=follow, name="tensorwire-progress", daemon=True)
    if not bar.disable:
        follower.start()
    completed = False
    try:
        with logs_above_bars(enabled=not bar.disable):
            yield bar
        completed = True
    finally:
        stop.set()
        if follower.is_alive():
            follower.join()
        if completed:
            bar.update(total - bar.n)
        bar.close()


class _ByteBar(_Bar):
    """A tqdm bar of bytes that shows them in MiB and its rate in MiB/s (tqdm's own scaling
    mixes binary sizes with a decimal rate)."""

    @property
    def format_dict(self) -> MutableMapping[str, Any]:
        shown = super().format_dict
        rate = shown.get("rate")
        if rate is None and shown.get("elapsed"):
            rate = (shown["n"] - shown.get("initial", 0)) / shown["elapsed"]
        shown["moved"] = mib(shown["n"] or 0)
        shown["size"] = mib(shown["total"] or 0)
        shown["speed"] = "?" if rate is None else mib(rate)
        return shown


def byte_bar(
    total: int, description: str, *, enabled: bool, position: int | None = None
) -> tqdm[Any]:
    """A tqdm bar of `total` bytes (MiB, MiB/s, ETA) on stderr, sized for it; `position` is
    its line below the first bar when several are drawn at once."""
    columns, lines = _terminal_size()
    return _ByteBar(
        total=total,
        desc=description,
        unit="B",
        bar_format=_BAR_FORMAT,
        disable=not enabled,
        file=sys.stderr,
        ncols=columns,
        nrows=lines,
        position=position,
        leave=position is None,
    )


def _terminal_size() -> tuple[int, int]:
    """stderr's columns and lines; COLUMNS and LINES override them (as for shutil). A fresh pty
    (a container's, before its client sized it) says 0 by 0, where tqdm would draw nothing at
    all: assume a common size then."""
    try:
        size = os.get_terminal_size(sys.stderr.fileno())
        columns, lines = size.columns, size.lines
    except (OSError, ValueError, AttributeError):
        columns, lines = 0, 0
    columns = _positive(os.environ.get("COLUMNS")) or columns or _FALLBACK_SIZE[0]
    lines = _positive(os.environ.get("LINES")) or lines or _FALLBACK_SIZE[1]
    return columns, lines


def _positive(text: str | None) -> int:
    try:
        return max(int(text or 0), 0)
    except ValueError:
        return 0


def _moved(directions: tuple[str, ...]) -> float:
    return sum(metrics.tensor_bytes_total(direction) for direction in directions)


class BarBoard:
    """One bar per key, each on its own line, for transfers that run side by side: `show` a
    key's transfer as it moves (a new description or total starts that line's bar over)."""

    def __init__(self, *, enabled: bool) -> None:
        self.enabled = enabled
        self.bars: dict[str, tqdm[Any]] = {}
        self._logs = logs_above_bars(enabled=enabled)
        self._logs.__enter__()

    def show(self, key: str, description: str, done: int, total: int) -> None:
        bar = self.bars.get(key)
        if bar is None:
            bar = byte_bar(total, description, enabled=self.enabled, position=len(self.bars))
            self.bars[key] = bar
        elif bar.desc != description or bar.total != total:
            bar.set_description_str(description, refresh=False)
            bar.reset(total=total)
        moved = min(done, total) - bar.n
        bar.update(moved)
        if moved and done >= total:
            bar.refresh()  # a finished transfer shows 100% however soon after its last update

    def close(self) -> None:
        """Take the bars off the terminal (the lines they used are cleared)."""
        for bar in reversed(self.bars.values()):
            bar.close()
        self.bars.clear()
        self._logs.__exit__(None, None, None)


# --- log lines above the bars --------------------------------------------------------------------

_redirect_lock = threading.Lock()
_redirect_depth = [0]
_wrapped: list[tuple[logging.Handler, Callable[[logging.LogRecord], None] | None]] = []


@contextmanager
def logs_above_bars(*, enabled: bool = True) -> Iterator[None]:
    """While the block runs, every console log handler (any logger's, Python's last-resort one)
    clears the bars, writes its line and draws them again, so a log line never splits a bar.
    Nested or concurrent blocks share one redirection, undone when the last one ends."""
    if not enabled:
        yield
        return
    with _redirect_lock:
        _redirect_depth[0] += 1
        if _redirect_depth[0] == 1:
            _wrap_console_handlers()
    try:
        yield
    finally:
        with _redirect_lock:
            _redirect_depth[0] -= 1
            if _redirect_depth[0] == 0:
                _unwrap_console_handlers()


def _console_handlers() -> list[logging.Handler]:
    loggers = [logging.getLogger()] + [
        logger
        for logger in list(logging.Logger.manager.loggerDict.values())
        if isinstance(logger, logging.Logger)
    ]
    handlers = [handler for logger in loggers for handler in logger.handlers]
    if logging.lastResort is not None:
        handlers.append(logging.lastResort)
    return list({id(h): h for h in handlers if _writes_to_console(h)}.values())


def _writes_to_console(handler: logging.Handler) -> bool:
    """Stream handlers on stdout or stderr, and handlers of other kinds (they may write there:
    clearing the bars around one that does not costs a redraw, nothing more)."""
    if isinstance(handler, logging.StreamHandler):
        return handler.stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)
    return True


def _wrap_console_handlers() -> None:
    for handler in _console_handlers():
        own = vars(handler).get("emit")
        emit = handler.emit

        def above_bars(
            record: logging.LogRecord, emit: Callable[[logging.LogRecord], None] = emit
        ) -> None:
            with tqdm.external_write_mode(file=sys.stderr):
                emit(record)

        handler.emit = above_bars  # type: ignore[method-assign]
        _wrapped.append((handler, own))


def _unwrap_console_handlers() -> None:
    while _wrapped:
        handler, own = _wrapped.pop()
        if own is None:
            del handler.emit
        else:
            handler.emit = own  # type: ignore[method-assign, assignment]
