"""Transport metrics and the ops HTTP server, on real endpoints over loopback tcp."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest
import torch

from tests.ops.helpers import Samples, scrape, status_of, total
from transport import Endpoint, EndpointConfig, StateDictSink
from transport.metrics import OpsServer, start_ops_server

SMALL = {
    "chunk_size": 1 << 20,
    "stream_window": 4 << 20,
    "connection_window": 8 << 20,
    "heartbeat_interval": 0.0,  # no pings: the byte counters must settle to exact equality
    "compression": "off",
}


@pytest.fixture(scope="module")
def ops() -> OpsServer:
    """One ops server for the module (it serves the process's one registry; the tests compare
    before and after, or labels of their own): closing one costs half a second of polling."""
    server = start_ops_server(0)
    yield server  # type: ignore[misc]
    server.close()


def model(megabytes: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(megabytes)
    return {
        f"layer{i}.weight": torch.randn(megabytes * 2**18 // 4, generator=generator)
        for i in range(4)
    }


async def settle(ops: OpsServer, node: str, peer: str) -> Samples:
    """Scrape until what `node` sent equals what `peer` received and back (frames in flight)."""
    for _ in range(100):
        samples = await asyncio.to_thread(scrape, ops.url)
        sent = total(samples, "tensorwire_wire_bytes_total", direction="out", peer=peer)
        got = total(samples, "tensorwire_wire_bytes_total", direction="in", peer=node)
        back = total(samples, "tensorwire_wire_bytes_total", direction="out", peer=node)
        back_got = total(samples, "tensorwire_wire_bytes_total", direction="in", peer=peer)
        if sent == got and back == back_got:
            return samples
        await asyncio.sleep(0.05)
    raise AssertionError(f"wire bytes never settled: out {sent} in {got}, {back} vs {back_got}")


async def scrape_until(ops: OpsServer, done: Callable[[Samples], bool], what: str) -> Samples:
    """Scrape until `done(samples)`: a connection's counters move a little after the call that
    ended it returned (on the loop, for both ends)."""
    for _ in range(200):
        samples = await asyncio.to_thread(scrape, ops.url)
        if done(samples):
            return samples
        await asyncio.sleep(0.05)
    raise AssertionError(f"never saw {what}")


@pytest.fixture
async def pair(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Endpoint, Endpoint]]:
    name = request.node.name[-20:]
    server = Endpoint(EndpointConfig(node_id=f"srv-{name}", **SMALL))  # type: ignore[arg-type]
    client = Endpoint(EndpointConfig(node_id=f"cli-{name}", **SMALL))  # type: ignore[arg-type]
    async with server, client:
        yield server, client


async def test_byte_counters_equal_the_bytes_moved(
    ops: OpsServer, pair: tuple[Endpoint, Endpoint]
) -> None:
    server, client = pair
    url = await server.listen("tcp://127.0.0.1:0")
    peer = await client.connect(url)
    state_dict = model(24)
    nbytes = sum(t.nbytes for t in state_dict.values())

    async def receive() -> None:
        transfer = await anext(server.incoming())
        await transfer.receive_into(StateDictSink())

    receiver = asyncio.ensure_future(receive())
    result = await peer.send_state_dict(state_dict, transfer_id="ops-test")
    await receiver
    srv, cli = server.config.node_id, client.config.node_id
    samples = await settle(ops, srv, cli)

    # The endpoints' own tallies, the metrics of both sides and the transfer agree exactly.
    links_out = sum(link.bytes_out for link in client._links)
    assert total(samples, "tensorwire_wire_bytes_total", direction="out", peer=srv) == links_out
    assert total(samples, "tensorwire_wire_bytes_total", direction="in", peer=cli) == links_out
    chunks = total(samples, "tensorwire_chunks_total", direction="out", peer=srv)
    assert chunks == result.chunks == total(samples, "tensorwire_chunks_total", peer=cli)
    chunk_bytes = total(samples, "tensorwire_chunk_bytes_total", direction="out", peer=srv)
    assert chunk_bytes == total(samples, "tensorwire_chunk_bytes_total", direction="in", peer=cli)
    assert nbytes < chunk_bytes < nbytes + result.chunks * 4096  # safetensors headers
    assert links_out > chunk_bytes
    # A window of 4 MiB for 24 MiB: the sender waited for credit, and says so.
    assert total(samples, "tensorwire_credit_stalls_total", peer=srv) > 0
    assert total(samples, "tensorwire_credit_stall_seconds_total", peer=srv) > 0
    assert total(samples, "tensorwire_connections_active", driver="tcp") >= 2
    assert total(samples, "process_resident_memory_bytes") > 0
    assert total(samples, "tensorwire_process_peak_resident_memory_bytes") > 0


async def test_transfer_metrics_count_completed_transfers(
    ops: OpsServer, pair: tuple[Endpoint, Endpoint]
) -> None:
    before = await asyncio.to_thread(scrape, ops.url)
    server, client = pair
    peer = await client.connect(await server.listen("tcp://127.0.0.1:0"))
    state_dict = model(2)
    nbytes = sum(t.nbytes for t in state_dict.values())

    async def receive() -> None:
        for _ in range(2):  # each transfer is counted before its receive_into returns
            await (await anext(server.incoming())).receive_into(StateDictSink())

    receiver = asyncio.ensure_future(receive())
    for _ in range(2):
        await peer.send_state_dict(state_dict)
    await asyncio.wait_for(receiver, 30)
    after = await asyncio.to_thread(scrape, ops.url)

    def grew(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    for direction in ("sent", "received"):
        assert grew("tensorwire_transfers_total", direction=direction, outcome="ok") == 2
        assert grew("tensorwire_transfer_bytes_total", direction=direction) == 2 * nbytes
        assert grew("tensorwire_transfer_duration_seconds_count", direction=direction) == 2
        rate = total(after, "tensorwire_transfer_throughput_bytes_per_second", direction=direction)
        assert rate > 0


async def test_errors_count_by_kind_but_a_normal_close_is_none(
    ops: OpsServer, pair: tuple[Endpoint, Endpoint]
) -> None:
    server, client = pair
    url = await server.listen("tcp://127.0.0.1:0")
    before = await asyncio.to_thread(scrape, ops.url)
    peer = await client.connect(url)
    server_side = await anext(server.accepted())
    await peer.close()
    # Each end counts its link (as an error or not) before it reports the link closed.
    await asyncio.wait_for(asyncio.gather(peer.wait_closed(), server_side.wait_closed()), 10)
    middle = await asyncio.to_thread(scrape, ops.url)
    assert total(middle, "tensorwire_errors_total") == total(before, "tensorwire_errors_total")
    # A peer that is cut off without goodbye is an error, named by its class.
    peer = await client.connect(url)
    peer._link._driver.abort()  # type: ignore[union-attr]
    errors = total(middle, "tensorwire_errors_total")
    await scrape_until(
        ops,
        lambda samples: total(samples, "tensorwire_errors_total") > errors,
        "an error counted for the connection cut off",
    )


async def test_health_endpoints() -> None:
    ready = False
    ops = start_ops_server(0, ready=lambda: ready)
    try:
        assert await asyncio.to_thread(status_of, f"{ops.url}/healthz") == 200
        assert await asyncio.to_thread(status_of, f"{ops.url}/readyz") == 503
        ready = True
        assert await asyncio.to_thread(status_of, f"{ops.url}/readyz") == 200
        assert await asyncio.to_thread(status_of, f"{ops.url}/nothing") == 404
        # A watched event loop that stops turning makes the daemon unhealthy.
        ops.stale_after = 0.2
        watcher = asyncio.ensure_future(ops.watch_loop(interval=0.05))
        await asyncio.sleep(0)  # one turn of the loop: the watcher stamps its first tick
        assert await asyncio.to_thread(status_of, f"{ops.url}/healthz") == 200
        watcher.cancel()
        async with asyncio.timeout(10):  # stale_after (0.2 s) of real time without a tick
            while await asyncio.to_thread(status_of, f"{ops.url}/healthz") != 503:
                await asyncio.sleep(0.05)
        assert await asyncio.to_thread(status_of, f"{ops.url}/readyz") == 503
    finally:
        ops.close()


def test_importing_the_library_starts_no_server() -> None:
    import subprocess
    import sys

    code = (
        "import threading, transport, transport.metrics, transport.logs;"
        "print(sorted(t.name for t in threading.enumerate()))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "['MainThread']", done.stdout + done.stderr


def test_peer_labels_are_capped_so_a_storm_of_node_ids_cannot_grow_the_registry() -> None:
    from transport.metrics import MAX_PEER_LABELS, OTHER_PEERS, LinkMetrics

    names = []
    for index in range(MAX_PEER_LABELS + 3):
        link = LinkMetrics()
        link.named(f"storm-{index}")
        names.append(link.peer)
    assert names[:MAX_PEER_LABELS] == [f"storm-{i}" for i in range(MAX_PEER_LABELS)]
    assert names[MAX_PEER_LABELS:] == [OTHER_PEERS] * 3
    again = LinkMetrics()
    again.named("storm-0")  # a name already labelled keeps its label
    assert again.peer == "storm-0"
