"""Fixtures every test shares."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from transport import metrics


@pytest.fixture(autouse=True)
def _fresh_peer_labels() -> None:
    """The metrics keep at most MAX_PEER_LABELS distinct peer names per process (a storm of node
    ids must not grow the registry); a test process meets thousands of endpoints' random node
    ids, so each test starts with the budget of a fresh process."""
    metrics._PEER_LABELS.clear()


@pytest.fixture(autouse=True)
def _logging_as_it_was() -> Iterator[None]:
    """A test that runs a daemon's command in-process sets up logging on the stream pytest
    captured for it, which is closed once the test ends: later tests must not log there."""
    loggers = [logging.getLogger(), logging.getLogger("tensorwire.daemon")]
    saved = [(lg, lg.handlers[:], lg.level, lg.propagate) for lg in loggers]
    yield
    for logger, handlers, level, propagate in saved:
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.propagate = propagate
