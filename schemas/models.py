"""Pydantic models of everything on the wire.

Model and field docstrings/descriptions end up in the exported JSON Schemas, so they are written
for a producer in any language. Every model forbids unknown fields and validates strictly (no
"3" -> 3 or true -> 1 coercion): a message means exactly what it says or is rejected. The one
conversion is JSON's own: a number with an integral value, such as 2.0, is an integer.
"""

from __future__ import annotations

from collections.abc import Callable
from math import prod
from typing import Annotated, Any, Final, Generic, Literal, NamedTuple, TypeAlias, TypeVar

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    model_validator,
)
from pydantic.config import JsonDict
from pydantic.json_schema import SkipJsonSchema
from pydantic_core import PydanticCustomError

from schemas.errors import ErrorCode, SvdServiceError

#: The latest version. Version 2 adds references to stored payloads (a request's matrix, a
#: result's factors: docs/wire-format.md, "References"); everything of version 1 is unchanged in
#: it. A request is answered in its own version; error results, unchanged, say version 1.
SCHEMA_VERSION: Final = 2
STORED_PAYLOADS_VERSION: Final = 2
ERROR_SCHEMA_VERSION: Final = 1
#: Dead letters: version 2 appends svd-dlq-original-ref (twelve headers); version 1 had eleven.
DEAD_LETTER_VERSION: Final = 2
SUPPORTED_SCHEMA_VERSIONS: frozenset[int] = frozenset({1, 2})

Dtype: TypeAlias = Literal["float32", "float64"]
EncodingName: TypeAlias = Literal["json", "binary"]
ITEMSIZE: dict[str, int] = {"float32": 4, "float64": 8}
# None and "auto" let the service choose from the shape, k and the input's kind.
Algorithm: TypeAlias = Literal["auto", "dense", "arpack", "propack", "lobpcg", "randomized"]
#: Algorithms that compute only k triplets (they need options.k).
TRUNCATED_ALGORITHMS: frozenset[str] = frozenset({"arpack", "propack", "lobpcg", "randomized"})
SparseFormat: TypeAlias = Literal["csr", "csc", "coo"]
IndexDtype: TypeAlias = Literal["int32", "int64"]
INDEX_ITEMSIZE: dict[str, int] = {"int32": 4, "int64": 8}
#: The index arrays each sparse format carries besides data.
SPARSE_INDEX_ARRAYS: dict[str, tuple[str, str]] = {
    "csr": ("indices", "indptr"),
    "csc": ("indices", "indptr"),
    "coo": ("row", "col"),
}

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


def _integral(value: object) -> object:
    # JSON has one number type: 2.0 and 1e0 are integers there, and JSON Schema's "integer"
    # accepts them, so the service does too. Anything else goes on to the strict int check, which
    # refuses 2.5, "2" and true. int() of any finite float is exact and small (no float exceeds
    # about 1e308), so a huge value is left to the range checks and limits.
    if type(value) is float and value.is_integer():
        return int(value)
    return value


_INTEGRAL = BeforeValidator(_integral)
# The validator comes after the constraints: the other way round pydantic exports them as
# unknown keywords ("ge") instead of "minimum".
Dim = Annotated[int, Field(ge=1), _INTEGRAL]
NonNegInt = Annotated[int, Field(ge=0), _INTEGRAL]
SchemaVersion = Annotated[Literal[1, 2], _INTEGRAL]
ErrorSchemaVersion = Annotated[Literal[1], _INTEGRAL]
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
    algorithm: Algorithm | None = Field(
        default=None,
        description="How to compute: dense (LAPACK), arpack, propack or lobpcg "
        "(scipy.sparse.linalg.svds), randomized (Halko et al.). The last four compute only the "
        "k largest triplets and need k. Absent or auto: the service chooses from the shape, k "
        "and whether the matrix is sparse; the result's algorithm field says which ran.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> SvdOptions:
        if self.k is not None and self.full_matrices:
            raise _invalid_options("k and full_matrices=true cannot be combined")
        if self.quality and not self.compute_uv:
            raise _invalid_options("quality needs compute_uv=true (it is measured on U and Vt)")
        if self.algorithm in TRUNCATED_ALGORITHMS and self.k is None:
            raise _invalid_options(
                f"algorithm {self.algorithm!r} computes the k largest triplets: it needs k"
            )
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


# ------------------------------------------------------------------------------ sparse input
# A matrix with a "format" is sparse. Its arrays are checked by schemas/sparse.py (bounds,
# lengths, finiteness); the models settle the fields. MatrixSpec.nbytes of a sparse spec is its
# dense size, not what was sent.


def _sparse_arrays_schema(schema: JsonDict) -> None:
    # Which index arrays go with which format, for JSON Schema readers.
    rules: list[JsonDict] = []
    for fmt, names in SPARSE_INDEX_ARRAYS.items():
        others: list[JsonDict] = [
            {"required": [o]} for o in ("indices", "indptr", "row", "col") if o not in names
        ]
        then: JsonDict = {"required": list(names), "not": {"anyOf": list(others)}}
        rules.append({"if": {"properties": {"format": {"const": fmt}}}, "then": then})
    schema["allOf"] = list(rules)


class SparseMatrixSpec(MatrixSpec):
    """A sparse input matrix, without its arrays."""

    format: SparseFormat = Field(
        description="csr: data, indices (the column of each entry) and indptr (rows+1 offsets: "
        "row i is data[indptr[i]:indptr[i+1]]); csc: the same by columns; coo: data, row, col."
    )

    def _check_arrays(self) -> None:
        # Given means present in the message; a null counts as given (and is refused).
        names = ("indices", "indptr", "row", "col")
        present = {n for n in names if n in self.model_fields_set}
        nulls = sorted(n for n in present if getattr(self, n) is None)
        if nulls:
            raise PydanticCustomError(
                "sparse_arrays", "{names}: null is not an array", {"names": ", ".join(nulls)}
            )
        wanted = set(SPARSE_INDEX_ARRAYS[self.format])
        if present != wanted:
            raise PydanticCustomError(
                "sparse_arrays",
                "format {fmt} needs data, {wanted} and nothing else; got {present}",
                {"fmt": self.format, "wanted": " and ".join(sorted(wanted)),
                 "present": ", ".join(sorted(present)) or "no index arrays"},
            )  # fmt: skip


class ByteRange(_Wire):
    """Where one array of a binary sparse request lies in the Kafka value."""

    offset: NonNegInt = Field(description="Byte offset of the array in the value.")
    nbytes: NonNegInt = Field(description="Byte length of the array.")


class SparseBinaryMatrix(SparseMatrixSpec):
    """A sparse matrix in the svd-meta header of a binary request; its arrays are in the value,
    each little-endian at its offset, together filling the value exactly."""

    model_config = ConfigDict(json_schema_extra=_sparse_arrays_schema)

    index_dtype: IndexDtype = Field(description="Type of the index arrays (little-endian).")
    nnz: NonNegInt = Field(description="Stored entries: the length of data, indices, row and col.")
    data: ByteRange = Field(description="nnz values of the matrix dtype.")
    # Absent unless the format has them (None is never valid on the wire: not in the schema).
    indices: ByteRange | SkipJsonSchema[None] = Field(
        default=None, description="csr, csc: nnz indices."
    )
    indptr: ByteRange | SkipJsonSchema[None] = Field(
        default=None, description="csr: rows+1 offsets; csc: cols+1 offsets."
    )
    row: ByteRange | SkipJsonSchema[None] = Field(default=None, description="coo: nnz row indices.")
    col: ByteRange | SkipJsonSchema[None] = Field(
        default=None, description="coo: nnz column indices."
    )

    @model_validator(mode="after")
    def _arrays(self) -> SparseBinaryMatrix:
        self._check_arrays()
        return self


class InlineSparseMatrix(SparseMatrixSpec):
    """A sparse input matrix of a JSON request, arrays included."""

    model_config = ConfigDict(json_schema_extra=_sparse_arrays_schema)

    data: list[float] = Field(description="The stored values (nnz finite numbers).")
    indices: list[NonNegInt] | SkipJsonSchema[None] = Field(
        default=None, description="csr: the column of each value; csc: its row."
    )
    indptr: list[NonNegInt] | SkipJsonSchema[None] = Field(
        default=None, description="csr: rows+1 offsets into data; csc: cols+1."
    )
    row: list[NonNegInt] | SkipJsonSchema[None] = Field(
        default=None, description="coo: the row of each value."
    )
    col: list[NonNegInt] | SkipJsonSchema[None] = Field(
        default=None, description="coo: the column of each value."
    )

    @model_validator(mode="after")
    def _arrays(self) -> InlineSparseMatrix:
        self._check_arrays()
        return self


# ---------------------------------------------------------------------- stored payloads (v2)


class ObjectRef(_Wire):
    """A payload kept in an object store instead of the Kafka record (the claim check)."""

    # Any visible ASCII here: whether a URL may be read is the reader's trust check, which
    # answers every other URL, another scheme included, with one code (UNTRUSTED_REFERENCE).
    url: Annotated[str, Field(min_length=1, max_length=2048, pattern=r"^[!-~]+$")] = Field(
        description="s3://bucket/key or file:///absolute/path. Only locations the reader is "
        "configured to trust are read (UNTRUSTED_REFERENCE otherwise); the URL names the "
        "object, never a host to connect to."
    )
    nbytes: NonNegInt = Field(description="The object's exact size in bytes.")
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")] = Field(
        description="SHA-256 of the object's bytes, lower-case hex; verified before use."
    )


class StoredMatrix(MatrixSpec):
    """A dense input matrix kept in a store: the object holds rows*cols IEEE 754 floats,
    little-endian, row-major, exactly as the value of a binary request (schema_version 2)."""

    ref: ObjectRef


class StoredSparseMatrix(SparseBinaryMatrix):
    """A sparse input matrix kept in a store: the object holds its arrays at the offsets given,
    exactly as the value of a binary sparse request (schema_version 2)."""

    model_config = ConfigDict(json_schema_extra=_sparse_arrays_schema)

    ref: ObjectRef


def _matrix_kind(value: Any) -> str:
    if isinstance(value, dict):
        kind = "sparse" if "format" in value else "dense"
        return f"stored-{kind}" if "ref" in value else kind
    if isinstance(value, StoredMatrix | StoredSparseMatrix):
        return "stored-sparse" if isinstance(value, SparseMatrixSpec) else "stored-dense"
    return "sparse" if isinstance(value, SparseMatrixSpec) else "dense"


# The tags appear in pydantic's error locations; schemas/_validation.py leaves them out.
MATRIX_TAGS: Final = ("dense", "sparse", "stored-dense", "stored-sparse")
AnyMatrixSpec = Annotated[
    Annotated[MatrixSpec, Tag("dense")] | Annotated[SparseBinaryMatrix, Tag("sparse")],
    Discriminator(_matrix_kind),
]
AnyInlineMatrix = Annotated[
    Annotated[InlineMatrix, Tag("dense")]
    | Annotated[InlineSparseMatrix, Tag("sparse")]
    | Annotated[StoredMatrix, Tag("stored-dense")]
    | Annotated[StoredSparseMatrix, Tag("stored-sparse")],
    Discriminator(_matrix_kind),
]


class ResultShapes(NamedTuple):
    u: tuple[int, int] | None
    s: tuple[int]
    vt: tuple[int, int] | None


class SvdRequestMeta(_Wire):
    """An SVD request without the matrix data (the svd-meta header of a binary request)."""

    model_config = ConfigDict(json_schema_extra=_also_required("schema_version"))

    schema_version: SchemaVersion = Field(
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
    matrix: AnyMatrixSpec

    @model_validator(mode="after")
    def _k_fits(self) -> SvdRequestMeta:
        k, rank = self.options.k, min(self.matrix.shape)
        if k is not None and k > rank:
            raise _invalid_options(f"options.k={k} exceeds min(rows, cols)={rank}")
        if isinstance(self.matrix, SparseMatrixSpec):
            if k is None:
                raise _invalid_options(
                    "a sparse matrix needs options.k (its full SVD would be dense)"
                )
            if self.options.algorithm == "dense":
                raise _invalid_options(
                    "algorithm 'dense' would densify the sparse matrix; use auto, arpack, "
                    "propack, lobpcg or randomized"
                )
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
    """An SVD request encoded as JSON (content-type application/json): the whole Kafka value.
    From schema_version 2 its matrix may be a reference to a stored object instead of data."""

    matrix: AnyInlineMatrix

    @model_validator(mode="after")
    def _stored_needs_v2(self) -> SvdRequestJson:
        if self.stored is not None and self.schema_version < STORED_PAYLOADS_VERSION:
            raise PydanticCustomError(
                "stored_version",
                "matrix.ref needs schema_version {v}",
                {"v": STORED_PAYLOADS_VERSION},
            )
        return self

    @property
    def stored(self) -> ObjectRef | None:
        return (
            self.matrix.ref if isinstance(self.matrix, StoredMatrix | StoredSparseMatrix) else None
        )


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

    schema_version: SchemaVersion = SCHEMA_VERSION
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


class SvdResultStored(SvdResultMeta):
    """A successful result whose factors are kept in a store (schema_version 2; JSON). The object
    holds the factors' bytes as the value of a binary result does: at each factor's offset,
    little-endian, row-major."""

    factors: BinaryFactors
    factors_ref: ObjectRef

    @model_validator(mode="after")
    def _stored_needs_v2(self) -> SvdResultStored:
        if self.schema_version < STORED_PAYLOADS_VERSION:
            raise PydanticCustomError(
                "stored_version", "factors_ref needs schema_version {v}",
                {"v": STORED_PAYLOADS_VERSION},
            )  # fmt: skip
        return self


class SvdResultSpec(SvdResultMeta):
    """A JSON result with the data arrays taken out (what the decoder validates)."""

    factors: SpecFactors


# ------------------------------------------------------------------------------------- error


class ErrorResult(_Wire):
    """The answer to a request that could not be served; always JSON."""

    model_config = ConfigDict(json_schema_extra=_also_required("schema_version", "status"))

    # Unchanged since version 1, so every reader reads it: always 1.
    schema_version: ErrorSchemaVersion = ERROR_SCHEMA_VERSION
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

    schema_version: SchemaVersion = DEAD_LETTER_VERSION
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
    value_bytes: NonNegInt | None = Field(
        default=None,
        description="Size of the original value in bytes; null when the record could not be read.",
    )
    truncated: bool = Field(
        default=False,
        description=(
            "True when the dead letter does not hold the whole original record: its value is a "
            "prefix and its original headers may be cut (it did not fit the dead-letter topic), "
            "or the record could not be read at all."
        ),
    )
    # Last: version 2's one addition, so a version 1 reader's eleven are a prefix of ours.
    original_ref: ObjectRef | None = Field(
        default=None,
        description=(
            "Where the whole original value is kept when the dead letter could not hold it "
            "(a service with an object store): the header holds the reference as compact JSON; "
            "empty otherwise."
        ),
    )
