"""Child-process bodies for the bounded-memory tests (spawned, so they must be importable)."""

from __future__ import annotations

import threading
import time
from typing import Any

from benchmarks.probes import RssSampler, run_in_uvloop


def file_receiver(queue: Any, path: str, url_queue: Any) -> None:
    async def body() -> dict[str, Any]:
        from transport import Endpoint, SafetensorsFileSink

        async with Endpoint() as endpoint:
            url_queue.put(await endpoint.listen("tcp://127.0.0.1:0"))
            sampler = RssSampler().start()
            transfer = await anext(endpoint.incoming())
            written = await transfer.receive_into(SafetensorsFileSink(path))
            sampler.stop()
        return {
            "role": "receiver",
            "path": str(written),
            "peak_rss_mib": sampler.peak_above_baseline_mib,
        }

    run_in_uvloop("receiver", queue, body)


def synthetic_sender(queue: Any, nbytes: int, url_queue: Any) -> None:
    async def body() -> dict[str, Any]:
        from transport import Endpoint, SyntheticSource

        async with Endpoint() as endpoint:
            peer = await endpoint.connect(url_queue.get(timeout=60))
            source = SyntheticSource(nbytes, seed=11, chunk_size=endpoint.config.chunk_size)
            sampler = RssSampler().start()
            started = time.perf_counter()
            result = await peer.send_state_dict(source)
            sampler.stop()
        return {
            "role": "sender",
            "bytes": result.bytes,
            "seconds": time.perf_counter() - started,
            "peak_rss_mib": sampler.peak_above_baseline_mib,
        }

    run_in_uvloop("sender", queue, body)


def restartable_file_receiver(queue: Any, path: str, port: int, hold_after: int | None) -> None:
    """Receive one transfer into a safetensors file on a fixed port. With `hold_after`, once that
    many chunks are written (and journaled) the receiver says so on `queue` and hangs, so the
    test can kill this process mid-transfer and start another on the same port."""

    async def body() -> dict[str, Any]:
        from transport import Endpoint, SafetensorsFileSink

        class SlowFileSink(SafetensorsFileSink):
            written = 0

            def write(self, chunk: Any, pieces: Any) -> None:
                # The receiver journals each chunk after its write returned and writes the next
                # only then: here, every earlier chunk is on disk and in the journal.
                if hold_after is not None and self.written >= hold_after:
                    queue.put({"role": "receiver", "holding": self.written})
                    threading.Event().wait()  # until killed
                super().write(chunk, pieces)
                self.written += 1

        async with Endpoint(chunk_size=1 << 20, stream_window=4 << 20) as endpoint:
            await endpoint.listen(f"tcp://127.0.0.1:{port}")
            queue.put({"role": "receiver", "listening": True})
            transfer = await anext(endpoint.incoming())
            written = await transfer.receive_into(SlowFileSink(path))
        return {"role": "receiver", "path": str(written)}

    run_in_uvloop("receiver", queue, body)
