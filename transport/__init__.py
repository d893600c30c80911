"""tensorwire transport: stream state dicts of any size as safetensors chunks over tcp, grpc, http
or memory, with memory bounded by a window, per-chunk integrity and one idle timeout.

This module is the public API; everything else in the package is internal and may change.
"""

from transport import logs, metrics, progress, sync
from transport.certs import (
    CertificateFiles,
    client_tls,
    create_ca,
    create_pki,
    issue_certificate,
    server_tls,
    tls_config_for,
)
from transport.drivers import PeerInfo, TLSConfig
from transport.endpoint import (
    Endpoint,
    EndpointConfig,
    EndpointOptions,
    IncomingTransfer,
    Peer,
    TransferResult,
)
from transport.exceptions import *  # noqa: F403 - the whole exception tree is public
from transport.exceptions import __all__ as _exception_names
from transport.payload import (
    DEFAULT_CHUNK_SIZE,
    DTYPES,
    CallbackSink,
    DigestSink,
    Manifest,
    RelayFile,
    SafetensorsFileSink,
    SafetensorsSource,
    Sink,
    Source,
    StateDictSink,
    StateDictSource,
    SyntheticSource,
    TensorSpec,
    dtype_name,
)

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DTYPES",
    "CallbackSink",
    "CertificateFiles",
    "DigestSink",
    "Endpoint",
    "EndpointConfig",
    "EndpointOptions",
    "IncomingTransfer",
    "Manifest",
    "Peer",
    "PeerInfo",
    "RelayFile",
    "SafetensorsFileSink",
    "SafetensorsSource",
    "Sink",
    "Source",
    "StateDictSink",
    "StateDictSource",
    "SyntheticSource",
    "TLSConfig",
    "TensorSpec",
    "TransferResult",
    "__version__",
    "client_tls",
    "create_ca",
    "create_pki",
    "dtype_name",
    "issue_certificate",
    "logs",
    "metrics",
    "progress",
    "server_tls",
    "sync",
    "tls_config_for",
    *_exception_names,
]
