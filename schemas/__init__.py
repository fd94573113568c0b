"""The wire contract of the SVD service: models, codecs, limits and error codes.

docs/wire-format.md is the human-readable contract; schemas/jsonschema/ and schemas/asyncapi.yaml
are the machine-readable one. No Kafka and no asyncio in this package.
"""

from schemas import topics
from schemas.codec import (
    DecodedRequest,
    DecodedResult,
    decode_reply,
    decode_request,
    encode_error,
    encode_request,
    encode_result,
    recover_request_id,
)
from schemas.deadletter import DLQ_HEADERS, DeadLetter, encode_dead_letter, read_dead_letter
from schemas.errors import RETRYABLE_CODES, ContractError, ErrorCode, SvdServiceError
from schemas.headers import (
    CONTENT_TYPE,
    CONTENT_TYPE_BINARY,
    CONTENT_TYPE_JSON,
    SVD_META,
    SVD_SCHEMA_VERSION,
    Encoding,
)
from schemas.limits import DecodeLimits
from schemas.models import (
    SCHEMA_VERSION,
    SUPPORTED_SCHEMA_VERSIONS,
    DeadLetterMeta,
    ErrorResult,
    MatrixSpec,
    Quality,
    ResultShapes,
    SvdOptions,
    SvdRequestJson,
    SvdRequestMeta,
    SvdResultBinaryMeta,
    SvdResultJson,
    SvdResultMeta,
    Timings,
    WorkerInfo,
)
from schemas.records import EncodedMessage
from schemas.sparse import SparseMatrix

__all__ = [
    "CONTENT_TYPE",
    "CONTENT_TYPE_BINARY",
    "CONTENT_TYPE_JSON",
    "DLQ_HEADERS",
    "RETRYABLE_CODES",
    "SCHEMA_VERSION",
    "SUPPORTED_SCHEMA_VERSIONS",
    "SVD_META",
    "SVD_SCHEMA_VERSION",
    "ContractError",
    "DeadLetter",
    "DeadLetterMeta",
    "DecodeLimits",
    "DecodedRequest",
    "DecodedResult",
    "EncodedMessage",
    "Encoding",
    "ErrorCode",
    "ErrorResult",
    "MatrixSpec",
    "Quality",
    "ResultShapes",
    "SparseMatrix",
    "SvdOptions",
    "SvdRequestJson",
    "SvdRequestMeta",
    "SvdResultBinaryMeta",
    "SvdResultJson",
    "SvdResultMeta",
    "SvdServiceError",
    "Timings",
    "WorkerInfo",
    "decode_reply",
    "decode_request",
    "encode_dead_letter",
    "encode_error",
    "encode_request",
    "encode_result",
    "read_dead_letter",
    "recover_request_id",
    "topics",
]
