"""The asyncio glue: endpoints, peers and transfers over any driver (public API re-exported by
`transport`)."""

from transport.endpoint.endpoint import Endpoint, EndpointConfig, Peer
from transport.endpoint.transfers import IncomingTransfer, TransferResult

__all__ = ["Endpoint", "EndpointConfig", "IncomingTransfer", "Peer", "TransferResult"]
