"""The emulated WAN: two namespaces, a TUN device in each, the forwarder process between them.

    with EmulatedWan(profiles.PROFILES["regional"]) as wan:
        ...  # run the sender in wan.netns_a, the receiver in wan.netns_b at wan.address_b
    wan.forwarder_report  # counters and bytes over time of both directions

Leaving the block (normally, by an error or by Ctrl-C) stops the forwarder and deletes both
namespaces; namespaces left by a run that was killed outright are deleted by the next run.
"""

from __future__ import annotations

import multiprocessing
from types import TracebackType
from typing import Any

from benchmarks.wan import netns
from benchmarks.wan.forwarder import DEVICE, forwarder_process
from benchmarks.wan.profiles import Profile

__all__ = ["ADDRESS_A", "ADDRESS_B", "NAMESPACE_SYSCTLS", "EmulatedWan"]

ADDRESS_A = "10.201.0.1"
ADDRESS_B = "10.201.0.2"
_PREFIX_LEN = 24
_START_TIMEOUT_S = 30.0
_STOP_TIMEOUT_S = 10.0

# Socket buffers may grow to 64 MiB (several BDPs of the fattest profile); net.core.wmem_max is
# not per namespace and stays as it is, so sockets keep the kernel's autotuning. No metrics cache:
# the validation flow's ssthresh must not carry over to the measured transfer.
NAMESPACE_SYSCTLS = {
    "net.ipv4.tcp_rmem": "4096 131072 67108864",
    "net.ipv4.tcp_wmem": "4096 16384 67108864",
    "net.ipv4.tcp_no_metrics_save": "1",
    "net.ipv6.conf.all.disable_ipv6": "1",  # keeps router solicitations off the link
}


class EmulatedWan:
    """Context manager that builds the link for `profile` and always takes it down."""

    def __init__(self, profile: Profile, seed: int = 0) -> None:
        self.profile = profile
        self.seed = seed
        self.netns_a, self.netns_b = netns.make_names()
        self.address_a, self.address_b = ADDRESS_A, ADDRESS_B
        self.forwarder_report: dict[str, Any] | None = None
        self._process: Any = None
        self._conn: Any = None
        self._created: list[str] = []

    def __enter__(self) -> EmulatedWan:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Create the namespaces, start the forwarder, configure both devices."""
        netns.remove_stale()
        for name in (self.netns_a, self.netns_b):
            netns.netns_add(name)
            self._created.append(name)
            for key, value in NAMESPACE_SYSCTLS.items():
                netns.set_sysctl(name, key, value)
        self._start_forwarder()
        self._configure(self.netns_a, self.address_a)
        self._configure(self.netns_b, self.address_b)

    def _start_forwarder(self) -> None:
        context = multiprocessing.get_context("spawn")
        conn, child_conn = context.Pipe()
        process = context.Process(
            target=forwarder_process,
            args=(child_conn, self.netns_a, self.netns_b, self.profile, self.seed),
            name="wan-forwarder",
            daemon=True,
        )
        try:
            process.start()
        finally:
            child_conn.close()
        self._process, self._conn = process, conn
        if not conn.poll(_START_TIMEOUT_S):
            raise RuntimeError(f"the WAN forwarder did not start within {_START_TIMEOUT_S} s")
        try:
            answer = conn.recv()
        except EOFError:
            answer = {"error": f"the WAN forwarder exited at start (exit code {process.exitcode})"}
        if "error" in answer:
            raise RuntimeError(answer["error"])

    def _configure(self, name: str, address: str) -> None:
        netns.ip("-n", name, "addr", "add", f"{address}/{_PREFIX_LEN}", "dev", DEVICE)
        netns.ip("-n", name, "link", "set", DEVICE, "mtu", "1500", "txqueuelen", "10000", "up")

    def counters(self) -> list[dict[str, Any]]:
        """The forwarder's counters now, direction a->b then b->a (no timelines)."""
        if self._conn is None:
            raise RuntimeError("the emulated WAN is not running")
        self._conn.send("counters")
        if not self._conn.poll(_STOP_TIMEOUT_S):
            raise RuntimeError(f"the WAN forwarder did not answer within {_STOP_TIMEOUT_S} s")
        answer: list[dict[str, Any]] = self._conn.recv()
        return answer

    def stop(self) -> None:
        """Stop the forwarder (keeping its report) and delete the namespaces; idempotent."""
        try:
            self._stop_forwarder()
        finally:
            while self._created:
                netns.netns_delete(self._created.pop())

    def _stop_forwarder(self) -> None:
        process, conn = self._process, self._conn
        self._process = self._conn = None
        if process is None:
            return
        try:
            conn.send("stop")
            if conn.poll(_STOP_TIMEOUT_S):
                self.forwarder_report = conn.recv()
        except (OSError, EOFError):
            pass  # the forwarder is already gone; it has nothing to report
        finally:
            conn.close()
            process.join(_STOP_TIMEOUT_S)
            if process.is_alive():
                process.kill()
                process.join()
