"""Requests and responses on an SFM connection: small asks beside the streams (heartbeats, the FL
layer's hello and errors), each answered once; at most `max_pending_requests` unanswered each way.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from transport.exceptions import StreamStateError, UnexpectedFrameError
from transport.sfm.core import ConnectionCore
from transport.sfm.events import RequestReceived, ResponseReceived
from transport.wire import Buffer, Frame, FrameFlags, FrameType

__all__ = ["Requests"]


class Requests(ConnectionCore):
    """The request verbs and the REQUEST/RESPONSE frame handlers of a Connection."""

    def send_request(self, header: Mapping[str, Any], body: Buffer = b"") -> int:
        """Send a request; the peer's answer becomes `ResponseReceived`. Returns its id."""
        self._require_can_start("send a request")
        limit = self._peer.max_pending_requests if self._peer else self._config.max_pending_requests
        if len(self._requests_sent) >= limit:
            raise StreamStateError(
                f"{len(self._requests_sent)} requests await answers, the peer accepts {limit}"
            )
        request_id = self._take_id("_next_request_id")
        self._send(FrameType.REQUEST, stream_id=request_id, header=header, payload=body)
        self._requests_sent.add(request_id)
        return request_id

    def send_response(
        self, request_id: int, header: Mapping[str, Any], body: Buffer = b"", error: bool = False
    ) -> None:
        """Answer the peer's request `request_id`; `error=True` means its handling failed."""
        self._require_hello()
        if request_id not in self._requests_received:
            raise StreamStateError(f"no unanswered request {request_id} from the peer")
        flags = int(FrameFlags.ERROR) if error else 0
        self._send(
            FrameType.RESPONSE, stream_id=request_id, flags=flags, header=header, payload=body
        )
        self._requests_received.discard(request_id)

    def _on_request(self, frame: Frame) -> None:
        request_id = frame.stream_id
        self._check_peer_id(request_id, self._highest_peer_request, "request", "REQUEST")
        if self._goaway_received:
            raise UnexpectedFrameError(f"REQUEST {request_id} after the peer's GOAWAY")
        pending = len(self._requests_received)
        if pending >= self._config.max_pending_requests:
            raise UnexpectedFrameError(
                f"REQUEST {request_id} while {pending} requests are unanswered: the limit is "
                f"{self._config.max_pending_requests}"
            )
        self._highest_peer_request = request_id
        self._requests_received.add(request_id)
        if self._goaway_sent:
            refusal = {"code": "refused", "reason": "this side sent GOAWAY: no new requests"}
            self.send_response(request_id, refusal, error=True)
            return
        self._events.append(RequestReceived(request_id, frame.header, frame.payload))

    def _on_response(self, frame: Frame) -> None:
        request_id = frame.stream_id
        if request_id not in self._requests_sent:
            raise UnexpectedFrameError(f"RESPONSE to request {request_id}, which is not pending")
        self._requests_sent.discard(request_id)
        error = bool(frame.flags & FrameFlags.ERROR)
        self._events.append(ResponseReceived(request_id, frame.header, frame.payload, error))
