"""Each test runs in its own temporary working directory: the daemons it starts keep their job
state in `state_dir` (default "state", relative to the working directory), and a test must neither
leave state in the checkout nor resume another test's job."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _own_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
