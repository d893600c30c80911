"""The asyncio glue: endpoints, peers and transfers over any driver (public API re-exported by
`transport`)."""

from transport.endpoint.config import EndpointConfig, EndpointOptions
from transport.endpoint.endpoint import Endpoint
from transport.endpoint.peer import Peer
from transport.endpoint.receiving import IncomingTransfer
from transport.endpoint.sending import TransferResult

__all__ = [
    "Endpoint",
    "EndpointConfig",
    "EndpointOptions",
    "IncomingTransfer",
    "Peer",
    "TransferResult",
]
