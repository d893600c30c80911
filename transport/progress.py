"""Progress bars for long transfers: bytes, rate and ETA, for a person watching a terminal.

    with transfer_progress(manifest.total_bytes, "receiving", "received"):
        await transfer.receive_into(sink)

The bar follows this process's `tensorwire_tensor_bytes_total` counter (tensor bytes as chunks are
sent or placed, before compression) from a thread, so any transfer in the process drives it with
no callback threaded through the transport, and several concurrent transfers (a server sending a
model to many sites) add up on one bar. It draws on stderr and only when stderr is a terminal:
under systemd, in a container log, or piped, it stays silent, as it does with `quiet`.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from tqdm import tqdm

from transport import metrics

__all__ = ["byte_bar", "progress_wanted", "transfer_progress"]

_REFRESH_SECONDS = 0.25
_FALLBACK_SIZE = (100, 24)  # columns, lines


def progress_wanted(quiet: bool = False) -> bool:
    """Progress bars only for a person watching: not with quiet, not into a file or a pipe."""
    return not quiet and sys.stderr.isatty()


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
        yield bar
        completed = True
    finally:
        stop.set()
        if follower.is_alive():
            follower.join()
        if completed:
            bar.update(total - bar.n)
        bar.close()


def byte_bar(total: int, description: str, *, enabled: bool) -> tqdm[Any]:
    """A tqdm bar of `total` bytes (binary units, rate, ETA) on stderr, sized for it."""
    columns, lines = _terminal_size()
    return tqdm(
        total=total,
        desc=description,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        disable=not enabled,
        file=sys.stderr,
        ncols=columns,
        nrows=lines,
    )


def _terminal_size() -> tuple[int, int]:
    """stderr's columns and lines. A fresh pty (a container's, before its client sized it) says
    0 by 0, where tqdm would draw nothing at all: assume a common size then."""
    try:
        size = os.get_terminal_size(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return _FALLBACK_SIZE
    return size.columns or _FALLBACK_SIZE[0], size.lines or _FALLBACK_SIZE[1]


def _moved(directions: tuple[str, ...]) -> float:
    return sum(metrics.tensor_bytes_total(direction) for direction in directions)
