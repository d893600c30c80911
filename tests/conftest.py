"""Fixtures every test shares."""

from __future__ import annotations

import pytest

from transport import metrics


@pytest.fixture(autouse=True)
def _fresh_peer_labels() -> None:
    """The metrics keep at most MAX_PEER_LABELS distinct peer names per process (a storm of node
    ids must not grow the registry); a test process meets thousands of endpoints' random node
    ids, so each test starts with the budget of a fresh process."""
    metrics._PEER_LABELS.clear()
