"""Network namespaces: create, configure, enter, delete; run a function inside one.

Names carry the creating process's pid (`twwan<pid>x<random><side>`), so two runs never collide
and a later run can delete what a killed one left behind (`remove_stale`). Python 3.11 has no
os.setns: `enter` calls libc's setns(2). A child enters its namespace before it creates any
socket, since a socket belongs to the namespace it was created in.
"""

from __future__ import annotations

import ctypes
import os
import secrets
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

__all__ = [
    "NETNS_DIR",
    "enter",
    "ip",
    "make_names",
    "netns_add",
    "netns_delete",
    "remove_stale",
    "run_in_netns",
    "set_sysctl",
]

NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000
_PREFIX = "twwan"


def make_names() -> tuple[str, str]:
    """Two fresh namespace names (sender side a, receiver side b) unique to this process."""
    tag = f"{_PREFIX}{os.getpid()}x{secrets.token_hex(2)}"
    return f"{tag}a", f"{tag}b"


def ip(*args: str) -> str:
    """Run `ip ARGS`; RuntimeError with its message when it fails."""
    result = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed: {result.stderr.strip()}")
    return result.stdout


def netns_add(name: str) -> None:
    """Create namespace `name` with its loopback up."""
    ip("netns", "add", name)
    ip("-n", name, "link", "set", "lo", "up")


def netns_delete(name: str) -> None:
    """Delete namespace `name` if it exists (its devices go with it)."""
    if (NETNS_DIR / name).exists():
        subprocess.run(["ip", "netns", "delete", name], capture_output=True, check=False)


def set_sysctl(name: str, key: str, value: str) -> None:
    """Write /proc/sys/<key> as seen from inside namespace `name`."""
    result = subprocess.run(
        ["ip", "netns", "exec", name, "sysctl", "-q", "-w", f"{key}={value}"],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"cannot set {key}={value} in netns {name}: {result.stderr.strip()}")


def remove_stale() -> list[str]:
    """Delete namespaces left by benchmark runs whose process is gone; return their names."""
    removed = []
    for path in NETNS_DIR.glob(f"{_PREFIX}*"):
        pid_text = path.name[len(_PREFIX) :].split("x", 1)[0]
        if pid_text.isdigit() and not psutil.pid_exists(int(pid_text)):
            netns_delete(path.name)
            removed.append(path.name)
    return removed


def enter(name: str) -> None:
    """Move the calling thread into namespace `name` (setns(2) with CLONE_NEWNET)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(NETNS_DIR / name, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"setns into network namespace {name!r}: {os.strerror(errno)}")
    finally:
        os.close(fd)


def run_in_netns(queue: Any, name: str, target: Callable[..., None], *args: Any) -> None:
    """Child-process entry for benchmarks.probes.run_children: enter `name`, then run
    target(queue, *args). A failure to enter is reported on the queue like any other."""
    try:
        enter(name)
    except OSError as exc:
        queue.put({"role": f"child in netns {name}", "error": str(exc)})
        return
    target(queue, *args)
