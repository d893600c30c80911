"""Running a command with its stderr on a pseudo-terminal, as a person at a shell would, to see
what it draws there (progress bars are only drawn on a terminal)."""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Terminal:
    """A pty whose far end is a child's stderr; `text` is what the child wrote there."""

    master: int
    chunks: list[bytes] = field(default_factory=list)
    reader: threading.Thread | None = None

    def start(self) -> Terminal:
        def drain() -> None:  # keep reading so the child never blocks on a full pty
            while True:
                try:
                    data = os.read(self.master, 65536)
                except OSError:  # EIO once every writer closed its end
                    return
                if not data:
                    return
                self.chunks.append(data)

        self.reader = threading.Thread(target=drain, daemon=True)
        self.reader.start()
        return self

    def finish(self) -> str:
        if self.reader is not None:
            self.reader.join(timeout=30)
        os.close(self.master)
        return self.text

    @property
    def text(self) -> str:
        return b"".join(self.chunks).decode(errors="replace")


def popen_on_terminal(
    command: Sequence[str], **options: Any
) -> tuple[subprocess.Popen[str], Terminal]:
    """Start `command` with stderr on a new pty (stdout and stdin as `options` say)."""
    master, slave = os.openpty()
    try:
        process = subprocess.Popen(command, stderr=slave, text=True, **options)
    finally:
        os.close(slave)
    return process, Terminal(master).start()


def run_on_terminal(
    command: Sequence[str], timeout: float = 240, **options: Any
) -> tuple[subprocess.CompletedProcess[str], str]:
    """Run `command` to its end with stderr on a pty; (the result with stdout, the pty's text)."""
    process, terminal = popen_on_terminal(command, stdout=subprocess.PIPE, **options)
    stdout, _ = process.communicate(timeout=timeout)
    result = subprocess.CompletedProcess(command, process.returncode, stdout, None)
    return result, terminal.finish()
