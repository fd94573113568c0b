"""Pydantic models of everything on the wire.

Model and field docstrings/descriptions end up in the exported JSON Schemas, so they are written
for a producer in any language. Every model forbids unknown fields and validates strictly (no
"3" -> 3 or true -> 1 coercion): a message means exactly what it says or is rejected.
"""

from __future__ import annotations

from collections.abc import Callable
from math import prod
from typing import Annotated, Any, Final, Generic, Literal, NamedTuple, TypeAlias, TypeVar

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    model_validator,
)
from pydantic.config import JsonDict
from pydantic_core import PydanticCustomError

from schemas.errors import ErrorCode, SvdServiceError

SCHEMA_VERSION: Final = 1
SUPPORTED_SCHEMA_VERSIONS: frozenset[int] = frozenset({SCHEMA_VERSION})

Dtype: TypeAlias = Literal["float32", "float64"]
EncodingName: TypeAlias = Literal["json", "binary"]
ITEMSIZE: dict[str, int] = {"float32": 4, "float64": 8}

# Visible ASCII only: the id becomes the Kafka key and shows up in logs and shells unescaped.
RequestId = Annotated[
    str,
    Field(
        min_length=1,
        max_length=128,
        pattern=r"^[!-~]+$",
        description="1-128 visible ASCII characters (0x21-0x7E); also the Kafka key.",
    ),
]
# Kafka's own rule (legal characters, at most 249 long, not "." or "..").
TopicName = Annotated[
    str,
    Field(min_length=1, max_length=249, pattern=r"^[A-Za-z0-9._-]*[A-Za-z0-9_-][A-Za-z0-9._-]*$"),
]
CorrelationId = Annotated[str, Field(min_length=1, max_length=256, pattern=r"^[ -~]+$")]
TraceParent = Annotated[
    str,
    Field(
        pattern=r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$",
        description="W3C Trace Context traceparent.",
    ),
]
TraceState = Annotated[str, Field(max_length=512, pattern=r"^[ -~]*$")]
Dim = Annotated[int, Field(ge=1)]
NonNegInt = Annotated[int, Field(ge=0)]
Millis = Annotated[float, Field(ge=0)]


def _truncate(limit: int) -> BeforeValidator:
    # Free-text fields are produced from exception messages of any length; cutting them keeps the
    # error path itself from failing validation.
    def cut(value: object) -> object:
        if isinstance(value, str) and len(value) > limit:
            return value[: limit - 1] + "\u2026"
        return value

    return BeforeValidator(cut)


Message = Annotated[str, _truncate(4096), Field(max_length=4096)]
Label = Annotated[str, Field(min_length=1, max_length=128)]


def _also_required(*names: str) -> Callable[[JsonDict], None]:
    # Fields with a Python default that a reader still needs on the wire (to dispatch on).
    def extra(schema: JsonDict) -> None:
        rest = [r for r in schema.get("required", []) if isinstance(r, str) and r not in names]  # type: ignore[union-attr]
        schema["required"] = [*names, *rest]

    return extra


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


def _invalid_options(message: str) -> PydanticCustomError:
    return PydanticCustomError("invalid_options", message)


# ----------------------------------------------------------------------------------- request


class SvdOptions(_Wire):
    """What to compute. Unknown options are rejected (UNKNOWN_OPTION), never ignored."""

    full_matrices: bool = Field(
        default=False,
        description="Return U as m x m and Vt as n x n instead of the reduced m x r, r x n "
        "(r = min(m, n)). Cannot be combined with k.",
    )
    compute_uv: bool = Field(
        default=True, description="false: return the singular values S only (no U, no Vt)."
    )
    k: Dim | None = Field(
        default=None,
        description="Return only the k largest singular triplets (1 <= k <= min(m, n)): "
        "U is m x k, S has k values, Vt is k x n.",
    )
    dtype: Dtype | None = Field(
        default=None,
        description="Precision of the computation and of the result; absent: the matrix dtype.",
    )
    quality: bool = Field(
        default=False,
        description="Also return numerical quality figures (needs compute_uv).",
    )

    @model_validator(mode="after")
    def _consistent(self) -> SvdOptions:
        if self.k is not None and self.full_matrices:
            raise _invalid_options("k and full_matrices=true cannot be combined")
        if self.quality and not self.compute_uv:
            raise _invalid_options("quality needs compute_uv=true (it is measured on U and Vt)")
        return self


class MatrixSpec(_Wire):
    """Shape and dtype of the input matrix."""

    shape: list[Dim] = Field(
        min_length=2, max_length=2, description="[rows, cols]; both at least 1."
    )
    dtype: Dtype = Field(description="Element type; binary data is IEEE 754 little-endian.")

    @classmethod
    def of(cls, array: Any) -> MatrixSpec:
        return cls(shape=[int(d) for d in array.shape], dtype=str(array.dtype.name))  # type: ignore[arg-type]

    @property
    def rows(self) -> int:
        return self.shape[0]

    @property
    def cols(self) -> int:
        return self.shape[1]

    @property
    def nbytes(self) -> int:
        return prod(self.shape) * ITEMSIZE[self.dtype]


class InlineMatrix(MatrixSpec):
    """The input matrix of a JSON request, data included."""

    data: list[float] = Field(
        description="rows*cols finite numbers, row-major (row 0 first). No NaN/Infinity."
    )


class ResultShapes(NamedTuple):
    u: tuple[int, int] | None
    s: tuple[int]
    vt: tuple[int, int] | None


class SvdRequestMeta(_Wire):
    """An SVD request without the matrix data (the svd-meta header of a binary request)."""

    model_config = ConfigDict(json_schema_extra=_also_required("schema_version"))

    schema_version: Literal[1] = Field(
        default=SCHEMA_VERSION, description="Version of this contract; required."
    )
    request_id: RequestId
    options: SvdOptions = Field(default_factory=SvdOptions)
    created_at_ms: NonNegInt | None = Field(
        default=None, description="When the producer created the request (epoch ms)."
    )
    deadline_ms: NonNegInt | None = Field(
        default=None,
        description="Epoch ms after which the result is useless; the service then answers "
        "EXPIRED instead of computing.",
    )
    reply_topic: TopicName | None = Field(
        default=None, description="Topic for the result; absent: svd-results."
    )
    result_encoding: EncodingName | None = Field(
        default=None, description="Encoding of the result; absent: the request's encoding."
    )
    correlation_id: CorrelationId | None = Field(
        default=None, description="Opaque; echoed in the result."
    )
    traceparent: TraceParent | None = None
    tracestate: TraceState | None = None
    # Last, so that in a JSON request the large data array comes after everything else.
    matrix: MatrixSpec

    @model_validator(mode="after")
    def _k_fits(self) -> SvdRequestMeta:
        k, rank = self.options.k, min(self.matrix.shape)
        if k is not None and k > rank:
            raise _invalid_options(f"options.k={k} exceeds min(rows, cols)={rank}")
        return self

    @property
    def compute_dtype(self) -> Dtype:
        return self.options.dtype or self.matrix.dtype

    def result_shapes(self) -> ResultShapes:
        """Shapes of U, S, Vt this request asks for (U and Vt None without compute_uv)."""
        m, n = self.matrix.shape
        k = self.options.k or min(m, n)
        if not self.options.compute_uv:
            return ResultShapes(None, (k,), None)
        if self.options.full_matrices:
            return ResultShapes((m, m), (k,), (n, n))
        return ResultShapes((m, k), (k,), (k, n))

    def result_nbytes(self) -> int:
        itemsize = ITEMSIZE[self.compute_dtype]
        return sum(prod(shape) * itemsize for shape in self.result_shapes() if shape is not None)


class SvdRequestJson(SvdRequestMeta):
    """An SVD request encoded as JSON (content-type application/json): the whole Kafka value."""

    matrix: InlineMatrix


# ------------------------------------------------------------------------------------ result


class Timings(_Wire):
    queue_wait_ms: Millis = Field(description="From the record's Kafka timestamp to compute start.")
    compute_ms: Millis = Field(description="The SVD itself, in the worker.")
    total_ms: Millis = Field(description="From the record's Kafka timestamp to the result.")


class WorkerInfo(_Wire):
    instance_id: Label = Field(description="The service instance (consumer) that answered.")
    host: Annotated[str, Field(min_length=1, max_length=255)]
    pid: NonNegInt = Field(description="Process id of the worker that computed the SVD.")


class Quality(_Wire):
    """Computed in float64 on the first r = len(S) columns of U and rows of Vt."""

    reconstruction_error: float = Field(
        ge=0,
        description="||A - U_r diag(S) Vt_r||_F / ||A||_F (absolute when A = 0); for a top-k "
        "result this is the truncation error.",
    )
    orthogonality_error: float = Field(
        ge=0,
        description="max(max|U_r^T U_r - I|, max|Vt_r Vt_r^T - I|): the largest absolute entry.",
    )


class ArraySpec(_Wire):
    shape: list[Dim] = Field(min_length=1, max_length=2, description="[n] or [rows, cols].")
    dtype: Dtype


class BinaryArray(ArraySpec):
    """Where an array lies in the value of a binary result (little-endian, row-major)."""

    offset: NonNegInt = Field(description="Byte offset of the array in the Kafka value.")
    nbytes: NonNegInt = Field(description="Byte length: product of shape times 4 or 8.")


class InlineArray(ArraySpec):
    data: list[float] = Field(description="The elements, row-major.")


A = TypeVar("A", bound=ArraySpec)


class Factors(_Wire, Generic[A]):
    """U, S, Vt of A = U diag(S) Vt; S descending. U and Vt are absent when compute_uv=false."""

    u: A | None = None
    s: A
    vt: A | None = None


class BinaryFactors(Factors[BinaryArray]):
    pass


class InlineFactors(Factors[InlineArray]):
    pass


class SpecFactors(Factors[ArraySpec]):
    pass


class SvdResultMeta(_Wire):
    """A successful result, without the factors (which the encoder describes from the arrays)."""

    model_config = ConfigDict(json_schema_extra=_also_required("schema_version", "status"))

    schema_version: Literal[1] = SCHEMA_VERSION
    request_id: RequestId
    status: Literal["ok"] = "ok"
    timings: Timings
    worker: WorkerInfo
    quality: Quality | None = Field(default=None, description="Present when options.quality.")
    algorithm: Label | None = Field(default=None, description="Informational.")
    driver: Label | None = Field(default=None, description="Informational (e.g. LAPACK driver).")
    correlation_id: CorrelationId | None = None
    traceparent: TraceParent | None = None


class SvdResultBinaryMeta(SvdResultMeta):
    """The svd-meta header of a binary result; the value is the arrays' bytes."""

    factors: BinaryFactors


class SvdResultJson(SvdResultMeta):
    """A successful result encoded as JSON (content-type application/json)."""

    factors: InlineFactors


class SvdResultSpec(SvdResultMeta):
    """A JSON result with the data arrays taken out (what the decoder validates)."""

    factors: SpecFactors


# ------------------------------------------------------------------------------------- error


class ErrorResult(_Wire):
    """The answer to a request that could not be served; always JSON."""

    model_config = ConfigDict(json_schema_extra=_also_required("schema_version", "status"))

    schema_version: Literal[1] = SCHEMA_VERSION
    request_id: RequestId | None = Field(
        description="null when it could not be recovered from the request."
    )
    status: Literal["error"] = "error"
    code: ErrorCode = Field(strict=False, description="Stable code; see docs/wire-format.md.")
    message: Message = Field(description="Human-readable; not stable, do not parse.")
    retryable: bool = Field(description="Whether sending the same request again may succeed.")
    correlation_id: CorrelationId | None = None
    traceparent: TraceParent | None = None

    @classmethod
    def from_exception(
        cls,
        exc: SvdServiceError,
        *,
        request_id: str | None = None,
        correlation_id: str | None = None,
        traceparent: str | None = None,
    ) -> ErrorResult:
        return cls(
            request_id=request_id if request_id is not None else exc.request_id,
            code=exc.code,
            message=exc.message,
            retryable=exc.retryable,
            correlation_id=correlation_id,
            traceparent=traceparent,
        )


# ------------------------------------------------------------------------------- dead letter


class DeadLetterMeta(_Wire):
    """Why and from where a record was dead-lettered. On the wire each field is a header
    `svd-dlq-<field with - for _>` holding UTF-8 text (integers in decimal, null as empty)."""

    model_config = ConfigDict(json_schema_extra=_also_required("schema_version"))

    schema_version: Literal[1] = SCHEMA_VERSION
    code: ErrorCode = Field(strict=False)
    reason: Message
    source_topic: TopicName
    source_partition: NonNegInt
    source_offset: NonNegInt
    attempts: NonNegInt = Field(
        description="Compute attempts made (0 when the record was rejected before compute)."
    )
    request_id: RequestId | None = None
    timestamp_ms: NonNegInt = Field(description="When the record was dead-lettered (epoch ms).")
