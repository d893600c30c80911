"""Job state that survives the server: what a restarted server needs to continue the job.

The state directory holds `job.json` and the files it names: the global model each round starts
from (`global-<round>.safetensors`) and the algorithm's own state (FedAdam's moments). `job.json`
is replaced atomically (temporary file, fsync, rename, fsync of the directory) and only after every
file it names is on disk, so a server killed at any moment restarts from a consistent state: the
last finished round's model, or the round it was in with the same sampled clients.

    {"format": 1, "job": "llm", "rounds": 10, "round": 3, "model": "global-3.safetensors",
     "round_clients": ["site-1", "site-2"] | null, "sites": [...], "finished": false,
     "history": [{round report}, ...]}

`round` is the round to run next (== rounds once the job finished); `round_clients` is set while
that round is under way (it was sampled before the kill, and is kept so the resumed round sends to
the same sites and takes their uploads in flight).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fl.model_file import fsync_directory

STATE_FORMAT = 1
STATE_FILE = "job.json"


class JobStateError(ValueError):
    """The state directory holds a state this server cannot continue (another job, bad file)."""


@dataclass
class JobState:
    job: str
    rounds: int
    round: int = 0
    model: str = "global-0.safetensors"
    round_clients: list[str] | None = None
    sites: list[str] = field(default_factory=list)
    finished: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)

    def model_path(self, directory: Path) -> Path:
        return directory / self.model


def model_name(round_number: int) -> str:
    """The file the global model that round `round_number` starts from is kept in."""
    return f"global-{round_number}.safetensors"


def load_state(directory: Path, job: str) -> JobState | None:
    """The saved state of `job` in `directory`, or None when the job never ran there."""
    path = directory / STATE_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as error:
        raise JobStateError(f"cannot read the job state {path}: {error}") from None
    if not isinstance(data, dict) or data.pop("format", None) != STATE_FORMAT:
        raise JobStateError(f"{path} is not a job state file this version can read")
    try:
        state = JobState(**data)
    except TypeError as error:
        raise JobStateError(f"{path}: {error}") from None
    if state.job != job:
        raise JobStateError(
            f"{directory} holds the state of job {state.job!r}, not {job!r}: give each job its "
            "own state_dir (or remove the old state to start over)"
        )
    if not state.finished and not state.model_path(directory).is_file():
        raise JobStateError(f"{path} names {state.model}, which is not in {directory}")
    return state


def save_state(directory: Path, state: JobState) -> None:
    """Replace `job.json` atomically."""
    path = directory / STATE_FILE
    partial = directory / (STATE_FILE + ".partial")
    text = json.dumps({"format": STATE_FORMAT, **asdict(state)}, indent=1, sort_keys=True)
    with partial.open("w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    partial.replace(path)
    fsync_directory(directory)


def remove_stale_models(directory: Path, keep: set[str]) -> None:
    """Delete global model files (and partials) no state points to any more."""
    for path in directory.glob("global-*.safetensors*"):
        if path.name not in keep:
            path.unlink(missing_ok=True)
