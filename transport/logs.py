"""Structured logs: one line per event, key=value or JSON, and the transfer start/end lines.

    configure_logging("kv"):
        ts=2025-01-01T12:00:00.000Z level=info logger=tensorwire.transfer event=transfer_end
        direction=received transfer=round-3/site-1 peer=site-1 bytes=14000000000 seconds=41.2
        rate_mb_s=339.8 digest=3f2a... resumes=0 outcome=ok          (one line in the log)
    configure_logging("json"):
        {"ts": "...", "level": "info", "event": "transfer_end", "bytes": 14000000000, ...}

The library only emits records (on the "tensorwire.*" loggers); it configures nothing unless the
application (or a daemon) calls `configure_logging`. At INFO there is one line when a transfer
starts and one when it ends, never one per chunk. Under plain `logging` (no configure_logging) the
message itself carries the fields: `transfer_end direction=received transfer=... bytes=...`.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from types import TracebackType
from typing import Any, Literal, TextIO

from transport import metrics

LogFormat = Literal["kv", "json"]
FORMATS: tuple[LogFormat, ...] = ("kv", "json")
FIELDS_ATTRIBUTE = "tensorwire_fields"
EVENT_ATTRIBUTE = "tensorwire_event"

transfer_log = logging.getLogger("tensorwire.transfer")


def log_event(logger: logging.Logger, level: int, event: str, **fields: Any) -> None:
    """Log `event` with `fields`: the message is `event key=value ...`, so an application's own
    logging setup (`logging.basicConfig()`) shows the fields too; the formatters of
    `configure_logging` take event and fields from the record instead, so they never repeat them.
    """
    if logger.isEnabledFor(level):
        pairs = (f"{key}={_logfmt(value)}" for key, value in fields.items() if value is not None)
        logger.log(
            level,
            " ".join((event, *pairs)),
            extra={FIELDS_ATTRIBUTE: fields, EVENT_ATTRIBUTE: event},
        )


class _StructuredFormatter(logging.Formatter):
    def fields(self, record: logging.LogRecord) -> dict[str, Any]:
        created = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        base: dict[str, Any] = {
            "ts": f"{created}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        extra = getattr(record, FIELDS_ATTRIBUTE, None)
        if isinstance(extra, dict):
            base["event"] = getattr(record, EVENT_ATTRIBUTE, None) or record.getMessage()
            base.update((key, value) for key, value in extra.items() if value is not None)
        else:
            base["msg"] = record.getMessage()
        if record.exc_info:
            base["error"] = self.formatException(record.exc_info)
        return base


class KeyValueFormatter(_StructuredFormatter):
    """`key=value` pairs (logfmt); values with spaces, quotes or `=` are quoted."""

    def format(self, record: logging.LogRecord) -> str:
        return " ".join(f"{key}={_logfmt(value)}" for key, value in self.fields(record).items())


class JsonFormatter(_StructuredFormatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(self.fields(record), default=str)


def _logfmt(value: Any) -> str:
    if isinstance(value, float):
        value = f"{value:.6g}"
    text = "" if value is None else str(value)
    if not text or any(c in text for c in ' ="\n\t'):
        return json.dumps(text)
    return text


def configure_logging(
    format: LogFormat = "kv", level: int | str = "INFO", stream: TextIO | None = None
) -> logging.Handler:
    """Send every log record to `stream` (stderr) as key=value or JSON lines; returns the
    handler (it replaces the root logger's handlers)."""
    if format not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {format!r}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if format == "json" else KeyValueFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper() if isinstance(level, str) else level)
    return handler


class TransferRecord:
    """Logs a transfer's start and end (size, time, rate, digest) and feeds the transfer metrics.

    Use as a context manager around the transfer, or call `begin`/`end` yourself; an exception
    that leaves the block ends the record as failed."""

    def __init__(
        self, direction: str, transfer_id: str | None, nbytes: int, chunks: int, peer: str | None
    ) -> None:
        self.direction = direction
        self.transfer_id = transfer_id or "-"
        self.nbytes = nbytes
        self.chunks = chunks
        self.peer = peer
        self.digest: str | None = None
        self.resumes = 0
        self.started = time.perf_counter()
        self._begun = self._ended = False

    def begin(self, peer: str | None = None) -> None:
        """Log the start line (once)."""
        self.peer = peer or self.peer
        if self._begun:
            return
        self._begun = True
        log_event(
            transfer_log, logging.INFO, "transfer_start", **self._identity(), chunks=self.chunks
        )

    def end(self, error: BaseException | None = None) -> None:
        """Log the end line (once) and count the transfer."""
        if self._ended:
            return
        self._ended = True
        seconds = time.perf_counter() - self.started
        metrics.transfer_ended(self.direction, self.nbytes, seconds, error)
        outcome = (
            {"outcome": "ok"} if error is None else {"outcome": "failed", "error": _name(error)}
        )
        rate = self.nbytes / max(seconds, 1e-9) / 1e6
        log_event(
            transfer_log,
            logging.INFO if error is None else logging.WARNING,
            "transfer_end",
            **self._identity(),
            seconds=round(seconds, 3),
            rate_mb_s=round(rate, 1),
            chunks=self.chunks,
            digest=self.digest,
            resumes=self.resumes,
            **outcome,
        )

    def _identity(self) -> dict[str, Any]:
        return {
            "direction": self.direction,
            "transfer": self.transfer_id,
            "peer": self.peer,
            "bytes": self.nbytes,
        }

    def __enter__(self) -> TransferRecord:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.begin()
        self.end(error)


def _name(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
