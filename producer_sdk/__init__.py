"""producer_sdk: the client web services use to get SVDs computed by the service over Kafka.

    async with AsyncSvdClient(bootstrap_servers="kafka:9092") as client:
        result = await client.svd(matrix, timeout=10)   # result.u, result.s, result.vt

See docs/sdk.md.
"""

from producer_sdk._base import ClientStats, SvdHandle
from producer_sdk.client import AsyncSvdClient, ClientStartError
from producer_sdk.errors import (
    ClientClosed,
    InvalidReply,
    SendFailed,
    SvdComputeError,
    SvdError,
    SvdExpired,
    SvdInternalError,
    SvdInvalidRequest,
    SvdTimeout,
)
from producer_sdk.listener import ResultsListener
from producer_sdk.result import SvdResult
from producer_sdk.settings import ClientSettings
from producer_sdk.sync import SvdClient
from schemas.errors import ErrorCode
from schemas.headers import Encoding

__all__ = [
    "AsyncSvdClient",
    "ClientClosed",
    "ClientSettings",
    "ClientStartError",
    "ClientStats",
    "Encoding",
    "ErrorCode",
    "InvalidReply",
    "ResultsListener",
    "SendFailed",
    "SvdClient",
    "SvdComputeError",
    "SvdError",
    "SvdExpired",
    "SvdHandle",
    "SvdInternalError",
    "SvdInvalidRequest",
    "SvdResult",
    "SvdTimeout",
]
