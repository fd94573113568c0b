"""Turns the cases of corpus.yaml into Kafka records (key, value, headers, codec) and expectations.

The corpus is data; this module is its small vocabulary. A case (see the header of corpus.yaml)
names a record and what the service owes it. ``expand`` turns cases into records (one per codec
and per ``each`` value) without building any bytes; ``build`` makes the bytes of one record, and
of the objects it references (schema_version 2's claim check), which the test puts in a real
store before producing the record.

Bytes are made by hand (orjson, struct-free numpy, raw text), never with the project's codec, so
a bad record is exactly as bad as the corpus says. Everything is deterministic but the places a
run fills in: its topics, and where its objects go (``places``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import re
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import yaml

CORPUS = Path(__file__).with_name("corpus.yaml")

CODECS = ("none", "gzip", "snappy", "lz4", "zstd")
DEAD_LETTERS = ("none", "exact", "truncated")
ANSWER_TOPICS = ("results", "reply")
# Codes only the computation can produce: their dead letters count at least one attempt.
COMPUTE_CODES = frozenset({"SVD_FAILED", "RESULT_OVERFLOW", "TIMEOUT", "WORKER_CRASHED"})
# Codes no record can trigger on purpose: the service's own faults, its time limit, and a record
# it cannot read from Kafka at all (the broker checks every batch's CRC on produce, and the
# service reads every codec a producer can use; tests/faults/test_unreadable.py covers it).
# STORE_UNAVAILABLE is the store's state, not the request's: the service waits out an unreachable
# store (SVD_STORE_OUTAGE_S) and only then answers it; tests/faults covers the store down and back.
NOT_FROM_INPUT = frozenset(
    {"TIMEOUT", "WORKER_CRASHED", "INTERNAL", "UNREADABLE_RECORD", "STORE_UNAVAILABLE"}
)
RETRYABLE = frozenset({"EXPIRED", "INTERNAL", "STORE_UNAVAILABLE"})
# The limits the test runs the service with (the corpus's sizes are chosen against them).
SERVICE_MESSAGE_BYTES = 2 * 1024 * 1024  # SVD_MAX_MESSAGE_BYTES
DLQ_MESSAGE_BYTES = 1024 * 1024  # max.message.bytes of the dead-letter topic

CONTENT_TYPE_JSON = b"application/json"
CONTENT_TYPE_BINARY = b"application/vnd.svd.binary"

BASE_REQUEST: dict[str, Any] = {
    "schema_version": 1,
    "request_id": "$id",
    "matrix": {"shape": [2, 3], "dtype": "float64", "data": [3, 2, 2, 2, 3, -2]},
}
DROP = "$drop"  # in a merge: remove this field

_CASE_FIELDS = frozenset(
    {
        "name", "why", "key", "value", "headers", "extra_headers", "meta", "meta_text",
        "truncate", "codecs", "each", "request_id", "shared_id", "answer", "answer_topic",
        "dead_letter", "attempts", "code", "object", "stored", "result",
    }
)  # fmt: skip
RESULTS = ("inline", "stored")
# Placeholders a case may use in text; the test fills in the topics and places of its run.
_NAMES = (
    "id|each|results|requests|dlq|reply|other|store|elsewhere|bucket|root|outside|object|key|name"
)
# $name, or ${name} when letters follow
_PLACEHOLDER = re.compile(rf"\$(?:\{{({_NAMES})\}}|({_NAMES})\b)")
_RAW = re.compile(rb'"@@raw(\d+)@@"')
# A string that is exactly this, anywhere in a request, json or meta tree, becomes the record's
# object reference {url, nbytes, sha256}.
REF = "$ref"


def places(bucket: str, run: str, directory: str) -> dict[str, str]:
    """A run's places: the service's own location ``$store`` (s3://bucket/<run>/svc), a prefix of
    the same bucket the service does not trust (``$elsewhere``), a directory it trusts (``$root``,
    file://) and a sibling it does not (``$outside``). ``directory``: absolute, no trailing /."""
    return {
        "store": f"s3://{bucket}/{run}/svc",
        "elsewhere": f"s3://{bucket}/{run}/elsewhere",
        "bucket": bucket,
        "root": f"{directory}/files",
        "outside": f"{directory}/outside",
    }


# The places of a run as the unit tests see them; the integration test makes its own, under a
# prefix of its own in the session's bucket and a directory of its own.
EXAMPLE_PLACES = places("svd-payloads", "adv-run", "/srv/adv-run")


class CorpusError(ValueError):
    """corpus.yaml says something the vocabulary does not know."""


@dataclass(frozen=True)
class Case:
    """One record of the corpus, expanded, with its expectations (no bytes yet)."""

    name: str  # unique; the default request id is "adv-<name>"
    case: str  # the corpus entry it came from
    group: str
    why: str
    codec: str
    each: str | None  # the expansion value substituted for $each
    spec: Mapping[str, Any] = field(repr=False)
    id: str  # what $id stands for
    request_id: str | None  # the id the answer must carry; None: no answer at all
    shared_id: bool  # other records carry the same request id (each is answered)
    answer: str  # "ok", "none" or an error code
    code: str | None  # the error code (of the answer, or of the dead letter alone); None: ok
    answer_topic: str  # "results" or "reply"
    dead_letter: str  # "none", "exact" or "truncated"
    attempts: str  # "0", ">=1" or "-" (no dead letter)
    result: str = "inline"  # an ok answer's factors: in the record, or "stored" (factors_ref)


@dataclass(frozen=True)
class Upload:
    """An object to put in the store (or a file to write) before the corpus is produced."""

    url: str  # s3://<bucket>/<key> or file:///<path>
    data: bytes
    link: str | None = None  # file:// only: a symbolic link to this path instead of data


@dataclass
class Record:
    """A case's bytes, ready for a plain Kafka producer."""

    case: Case
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes | None]]
    # For answers that must be checked numerically: the dense input in its wire dtype, and
    # the request's options as sent (None when the request is not a valid one).
    matrix: np.ndarray[Any, Any] | None = None
    options: dict[str, Any] = field(default_factory=dict)
    # The objects it references (and decoys), put in place before the record is produced.
    uploads: list[Upload] = field(default_factory=list)
    # The URL its matrix.ref names (value or svd-meta), if it names one.
    reference: str | None = None

    @property
    def name(self) -> str:
        return self.case.name


# ------------------------------------------------------------------------------------- loading


def load(path: Path = CORPUS) -> dict[str, Any]:
    with path.open(encoding="utf-8") as f:
        corpus = yaml.safe_load(f)
    if not isinstance(corpus, dict) or not isinstance(corpus.get("groups"), list):
        raise CorpusError(f"{path}: expected a mapping with a list of groups")
    return corpus


def entries(corpus: Mapping[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(group title, case entry) in corpus order."""
    for group in corpus["groups"]:
        for entry in group["cases"]:
            yield group["title"], entry


def expand(corpus: Mapping[str, Any]) -> list[Case]:
    """Every record of the corpus, in corpus order: one per codec and per ``each`` value."""
    out: list[Case] = []
    for group, entry in entries(corpus):
        unknown = set(entry) - _CASE_FIELDS
        if unknown:
            raise CorpusError(f"case {entry.get('name')!r}: unknown fields {sorted(unknown)}")
        for field_ in ("name", "why", "value", "answer"):
            if field_ not in entry:
                raise CorpusError(f"case {entry.get('name')!r}: {field_} is required")
        codecs = entry.get("codecs", ["none"])
        each = entry.get("each")
        variants: list[tuple[str | None, str | None]] = (
            [(str(slug), str(v)) for slug, v in each.items()] if each else [(None, None)]
        )
        for slug, value in variants:
            for codec in codecs:
                if codec not in CODECS:
                    raise CorpusError(f"case {entry['name']!r}: unknown codec {codec!r}")
                suffix = "".join(f"-{s}" for s in (slug, codec if len(codecs) > 1 else None) if s)
                out.append(_case(group, entry, suffix, codec, value))
    names = [c.name for c in out]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise CorpusError(f"record names must be unique: {sorted(dupes)}")
    return out


def _case(group: str, entry: Mapping[str, Any], suffix: str, codec: str, each: str | None) -> Case:
    name = entry["name"] + suffix
    answer = str(entry["answer"])
    if answer == "none":
        if "code" not in entry:
            raise CorpusError(f"case {name!r}: answer none needs the dead letter's code")
        code: str | None = str(entry["code"])
    else:
        if "code" in entry:
            raise CorpusError(f"case {name!r}: code goes with answer none only")
        code = None if answer == "ok" else answer
    explicit = entry.get("request_id")
    ident = (explicit + suffix) if explicit else f"adv-{name}"
    result = str(entry.get("result", "inline"))
    if result not in RESULTS or (result == "stored" and answer != "ok"):
        raise CorpusError(f"case {name!r}: result must be one of {RESULTS}, stored only if ok")
    uses = str(entry["value"]) + str(entry.get("meta"))
    if ("stored" in entry or REF in uses or "stored_request" in uses) and "object" not in entry:
        raise CorpusError(f"case {name!r}: stored, stored_request and $ref need an object")
    dead_letter = entry.get("dead_letter", "none" if answer == "ok" else "exact")
    if dead_letter not in DEAD_LETTERS:
        raise CorpusError(f"case {name!r}: dead_letter must be one of {DEAD_LETTERS}")
    answer_topic = entry.get("answer_topic", "results")
    if answer_topic not in ANSWER_TOPICS:
        raise CorpusError(f"case {name!r}: answer_topic must be one of {ANSWER_TOPICS}")
    if dead_letter == "none":
        attempts = "-"
    else:
        attempts = str(entry.get("attempts", ">=1" if code in COMPUTE_CODES else "0"))
    return Case(
        name=name,
        case=entry["name"],
        group=group,
        why=entry["why"],
        codec=codec,
        each=each,
        spec=entry,
        id=ident,
        request_id=None if answer == "none" else ident,
        shared_id=bool(entry.get("shared_id", False)),
        answer=answer,
        code=code,
        answer_topic=answer_topic,
        dead_letter=dead_letter,
        attempts=attempts,
        result=result,
    )


# ------------------------------------------------------------------------------------ building


class _Builder:
    """Builds one record; holds what its parts share (rng, raw literals, the binary meta)."""

    def __init__(self, case: Case, topics: Mapping[str, str]) -> None:
        self.case = case
        self.topics = {**EXAMPLE_PLACES, **topics}
        # The stored object of the case (``object``): its bytes, its matrix as svd-meta would
        # describe it, the dense matrix, and the reference to it.
        self.object: bytes | None = None
        self.object_matrix: dict[str, Any] | None = None
        self.object_dense: np.ndarray[Any, Any] | None = None
        self.ref: dict[str, Any] | None = None
        self.rng = np.random.default_rng(zlib.crc32(case.name.encode()))
        self.raw: list[str] = []
        self.binary_matrix: dict[str, Any] | None = None  # svd-meta "matrix" of a binary part
        self.matrix: np.ndarray[Any, Any] | None = None  # of a binary part
        self.is_binary = False

    # -- text ------------------------------------------------------------------------------
    def sub(self, text: str) -> str:
        def repl(m: re.Match[str]) -> str:
            name = m.group(1) or m.group(2)
            if name == "id":
                return self.case.id
            if name == "each":
                if self.case.each is None:
                    raise CorpusError(f"{self.case.name}: $each outside an `each` case")
                return self.case.each
            if name == "name":
                return self.case.name
            if name == "object":  # this record's own object, in the service's location
                return f"{self.topics['store']}/obj/{self.case.name}"
            if name == "key":  # the same object's key in the bucket
                prefix = f"s3://{self.topics['bucket']}/"
                return f"{self.topics['store']}/obj/{self.case.name}".removeprefix(prefix)
            return self.topics[name]

        # $each first: its text may hold other placeholders.
        if "$each" in text or "${each}" in text:
            text = _PLACEHOLDER.sub(lambda m: repl(m) if "each" in m.groups() else m.group(0), text)
        return _PLACEHOLDER.sub(repl, text)

    def sub_tree(self, node: Any) -> Any:
        """Fill placeholders in every string (keys too) of a tree from the corpus."""
        if isinstance(node, str):
            if node == REF:
                if self.ref is None:
                    raise CorpusError(f"{self.case.name}: $ref without an object")
                return dict(self.ref)
            return self.sub(node)
        if isinstance(node, list):
            return [self.sub_tree(x) for x in node]
        if isinstance(node, dict):
            return {self.sub(str(k)): self.sub_tree(v) for k, v in node.items()}
        return node

    def rawify(self, node: Any) -> Any:
        """{$raw: text} -> a marker that dumps() replaces with the raw JSON text."""
        if isinstance(node, list):
            return [self.rawify(x) for x in node]
        if isinstance(node, dict):
            if set(node) == {"$raw"}:
                self.raw.append(str(node["$raw"]))
                return f"@@raw{len(self.raw) - 1}@@"
            return {k: self.rawify(v) for k, v in node.items()}
        return node

    def dumps(self, tree: Any) -> bytes:
        out = orjson.dumps(self.rawify(tree))
        return _RAW.sub(lambda m: self.raw[int(m.group(1))].encode(), out)

    # -- values ----------------------------------------------------------------------------
    def value(self, spec: Any) -> bytes | None:
        if spec is None:
            return None
        if isinstance(spec, list):
            return b"".join(self.value(part) or b"" for part in spec)
        return self.part(spec)

    def part(self, spec: Any) -> bytes:
        if isinstance(spec, str):
            return self.sub(spec).encode()
        if not isinstance(spec, dict):
            raise CorpusError(f"{self.case.name}: a value part is text, a list or a mapping")
        kinds = set(spec) - {"encoding"}
        if len(kinds) != 1:
            raise CorpusError(f"{self.case.name}: one kind per value part, got {sorted(kinds)}")
        (kind,) = kinds
        arg = self.sub_tree(spec[kind])
        if kind == "request":
            data = self.request(arg or {})
        elif kind == "stored_request":
            data = self.stored_request(arg or {})
        elif kind == "json":
            data = self.dumps(arg)
        elif kind == "text":
            data = str(arg).encode()
        elif kind == "hex":
            data = bytes.fromhex(arg)
        elif kind == "random_bytes":
            data = self.rng.bytes(int(arg))
        elif kind == "repeat":
            unit = bytes.fromhex(arg["hex"]) if "hex" in arg else str(arg["text"]).encode()
            data = unit * int(arg["count"])
        elif kind == "many_fields":
            data = ",".join(f'"f{i}":0' for i in range(int(arg["count"]))).encode()
        elif kind == "binary":
            data = self.binary(arg)
        elif kind == "sparse_binary":
            data = self.sparse_binary(arg)
        else:
            raise CorpusError(f"{self.case.name}: unknown value kind {kind!r}")
        if "encoding" in spec:  # re-encode the text, e.g. as UTF-16
            data = data.decode("utf-8").encode(spec["encoding"])
        return data

    def request(self, overrides: Mapping[str, Any]) -> bytes:
        tree = merge(self.sub_tree(BASE_REQUEST), overrides)
        matrix = tree.get("matrix")
        if isinstance(matrix, dict) and "fill" in matrix:
            matrix["data"] = self.fill(matrix)
        return self.dumps(tree)

    def stored_request(self, overrides: Mapping[str, Any]) -> bytes:
        """A version 2 JSON request whose matrix is the case's object: its svd-meta description
        plus ``ref``, deep-merged with ``overrides``."""
        if self.ref is None or self.object_matrix is None:
            raise CorpusError(f"{self.case.name}: stored_request needs a binary or sparse object")
        base = {
            "schema_version": 2,
            "request_id": self.case.id,
            "matrix": {**copy.deepcopy(self.object_matrix), "ref": dict(self.ref)},
        }
        return self.dumps(merge(base, overrides))

    def stored_object(self) -> None:
        """Build the case's object (``object``, a value) and the reference to it, at $object."""
        spec = self.case.spec
        if "object" not in spec:
            return
        maker = _Builder(self.case, self.topics)
        data = maker.value(spec["object"]) or b""
        self.object = data
        self.object_matrix = maker.binary_matrix
        self.object_dense = maker.matrix
        self.ref = {
            "url": self.sub("$object"),
            "nbytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
        }

    def uploads(self) -> list[Upload]:
        """What goes in the store for the case (``stored``; default: its object at $object)."""
        spec = self.case.spec
        if self.object is None:
            return []
        wanted = spec.get("stored", [{}])
        if not isinstance(wanted, list):
            wanted = [wanted]
        out = []
        for entry in wanted:
            unknown = set(entry) - {"url", "cut", "append", "bytes", "link"}
            if unknown:
                raise CorpusError(f"{self.case.name}: unknown stored fields {sorted(unknown)}")
            url = self.sub(str(entry.get("url", "$object")))
            data = self.object
            if "bytes" in entry:
                data = _Builder(self.case, self.topics).value(entry["bytes"]) or b""
            if "cut" in entry:
                data = data[: int(entry["cut"])]
            if "append" in entry:
                data += _Builder(self.case, self.topics).value(entry["append"]) or b""
            link = self.sub(str(entry["link"])) if "link" in entry else None
            if link is not None and not url.startswith("file://"):
                raise CorpusError(f"{self.case.name}: only a file:// object can be a link")
            out.append(Upload(url, data, link))
        return out

    def fill(self, matrix: dict[str, Any]) -> list[Any]:
        """Generated data for a JSON matrix; pops fill, count and set."""
        shape = [int(d) for d in matrix["shape"]]
        dtype = str(matrix.get("dtype", "float64"))
        wire = dtype if dtype in ("float32", "float64") else "float64"
        count = int(matrix.pop("count", math.prod(shape)))
        values = self.generate(matrix.pop("fill"), count, wire, shape)
        data: list[Any] = [float(x) for x in values]
        for where, literal in self.positions(matrix.pop("set", []), shape):
            data[where] = literal if isinstance(literal, float) else {"$raw": literal}
        return data

    def generate(self, fill: Any, count: int, dtype: str, shape: list[int]) -> np.ndarray[Any, Any]:
        if fill == "random":
            values = self.rng.standard_normal(count)
        elif fill == "zeros":
            values = np.zeros(count)
        elif fill == "ones":
            values = np.ones(count)
        elif fill == "identity":
            values = np.eye(shape[0], shape[1]).reshape(-1)[:count]
        else:
            try:  # a number; YAML 1.1 reads 1e308 (no dot) as text
                values = np.full(count, float(fill))
            except (TypeError, ValueError):
                raise CorpusError(f"{self.case.name}: unknown fill {fill!r}") from None
        with np.errstate(over="ignore"):
            return values.astype(dtype)

    @staticmethod
    def positions(entries: list[list[Any]], shape: list[int]) -> Iterator[tuple[int, Any]]:
        """[row, col, value] entries: the flat index, and the value (a float, or a raw literal
        string such as "NaN")."""
        for row, col, value in entries:
            where = int(row) * shape[1] + int(col)
            if isinstance(value, int | float) and not isinstance(value, bool):
                yield where, float(value)
            else:
                yield where, str(value)

    def binary(self, arg: Mapping[str, Any]) -> bytes:
        """Matrix bytes, little-endian row-major; defines the svd-meta matrix."""
        shape = [int(d) for d in arg["shape"]]
        dtype = str(arg.get("dtype", "float64"))
        write = str(arg.get("write_dtype", dtype))
        count = int(arg.get("count", math.prod(shape)))
        values = self.generate(arg.get("fill", "random"), count, "float64", shape)
        for where, value in self.positions(arg.get("set", []), shape):
            values[where] = float(value)  # "nan", "inf", "-inf" spell themselves
        with np.errstate(over="ignore"):
            wire = values.astype("<f4" if write == "float32" else "<f8")
        self.is_binary = True
        if self.binary_matrix is None:
            self.binary_matrix = {"shape": shape, "dtype": dtype}
            if count == math.prod(shape) and write == dtype:
                self.matrix = wire.reshape(shape).astype(wire.dtype.newbyteorder("="))
        return wire.tobytes()

    def sparse_binary(self, arg: Mapping[str, Any]) -> bytes:
        """A sparse matrix's arrays back to back (data first); defines the svd-meta matrix."""
        fmt = str(arg["format"])
        dtype = str(arg.get("dtype", "float64"))
        index_dtype = str(arg.get("index_dtype", "int32"))
        names = ("indices", "indptr") if fmt in ("csr", "csc") else ("row", "col")
        index = "<i8" if index_dtype == "int64" else "<i4"
        arrays = {
            "data": np.asarray(arg["data"], dtype="<f4" if dtype == "float32" else "<f8"),
            **{n: np.asarray(arg[n], dtype=index) for n in names},
        }
        matrix: dict[str, Any] = {
            "format": fmt, "shape": list(arg["shape"]), "dtype": dtype,
            "index_dtype": index_dtype, "nnz": len(arg["data"]),
        }  # fmt: skip
        offset = 0
        for name, array in arrays.items():
            matrix[name] = {"offset": offset, "nbytes": array.nbytes}
            offset += array.nbytes
        self.is_binary = True
        self.binary_matrix = matrix
        if self.case.answer == "ok":
            self.matrix = dense_of(
                fmt, list(arg["shape"]), arrays["data"], *(arrays[n] for n in names)
            )
        return b"".join(a.tobytes() for a in arrays.values())

    def meta(self) -> bytes:
        spec = self.case.spec
        if "meta_text" in spec:
            return self.value(spec["meta_text"]) or b""
        tree: dict[str, Any] = {"schema_version": 1, "request_id": self.case.id}
        if self.binary_matrix is not None:
            tree["matrix"] = copy.deepcopy(self.binary_matrix)
        return self.dumps(merge(tree, self.sub_tree(spec.get("meta", {}))))

    # -- keys and headers ------------------------------------------------------------------
    def blob(self, spec: Any) -> bytes | None:
        """A key or header value: text (placeholders filled), null, {hex}, {repeat}, {text}."""
        if spec is None:
            return None
        if isinstance(spec, dict):
            return self.part(spec)
        return self.sub(str(spec)).encode()

    def headers(self, meta: bytes | None) -> list[tuple[str, bytes | None]]:
        spec = self.case.spec
        if "headers" in spec:
            wanted = spec["headers"]
        elif self.is_binary or "meta" in spec or "meta_text" in spec:
            wanted = [["content-type", "$binary"], ["svd-meta", "$meta"]]
        else:
            wanted = [["content-type", "$json"]]
        out: list[tuple[str, bytes | None]] = []
        for entry in [*wanted, *spec.get("extra_headers", [])]:
            name, raw, *count = entry
            if raw == "$json":
                value: bytes | None = CONTENT_TYPE_JSON
            elif raw == "$binary":
                value = CONTENT_TYPE_BINARY
            elif raw == "$meta":
                if meta is None:
                    raise CorpusError(f"{self.case.name}: $meta without a binary value or meta")
                value = meta
            else:
                value = self.blob(raw)
            out.extend([(self.sub(str(name)), value)] * (int(count[0]) if count else 1))
        return out

    def build(self) -> Record:
        spec = self.case.spec
        self.stored_object()
        value = self.value(spec["value"])
        truncate = spec.get("truncate")
        if truncate is not None and value is not None:
            keep = int(len(value) * truncate) if isinstance(truncate, float) else int(truncate)
            value = value[:keep]
        binary = self.is_binary or "meta" in spec or "meta_text" in spec
        meta = self.meta() if binary else None
        key = self.blob(spec["key"]) if "key" in spec else self.case.id.encode()
        record = Record(case=self.case, key=key, value=value, headers=self.headers(meta))
        record.uploads = self.uploads()
        record.reference = _reference(meta if binary else value)
        if self.case.answer == "ok":
            # What the service will read, read back from the bytes (Python's json: big integers
            # and escapes as any JSON reader sees them).
            request = json.loads(meta if binary else (value or b""))
            options = request.get("options") or {}
            record.options = dict(options)
            if not binary and "ref" in request["matrix"]:
                if self.object_dense is None:
                    raise CorpusError(f"{self.case.name}: an ok stored record needs its matrix")
                record.matrix = self.object_dense
            elif not binary:
                record.matrix = inline_matrix(request["matrix"])
            elif self.matrix is not None:
                record.matrix = self.matrix
            else:
                raise CorpusError(f"{self.case.name}: an ok binary record needs a binary value")
        return record


def build(case: Case, topics: Mapping[str, str]) -> Record:
    return _Builder(case, topics).build()


def build_all(topics: Mapping[str, str], corpus: Mapping[str, Any] | None = None) -> list[Record]:
    return [build(case, topics) for case in expand(corpus or load())]


# --------------------------------------------------------------------------------------- helpers


def _reference(text: bytes | None) -> str | None:
    """matrix.ref.url of a JSON request or svd-meta, read leniently; None if it has none."""
    try:
        tree = json.loads(text or b"")
        url = tree["matrix"]["ref"]["url"]
    except (ValueError, TypeError, KeyError, RecursionError):
        return None
    return url if isinstance(url, str) else None


def merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Deep merge of JSON objects: mappings merge, anything else replaces; "$drop" removes."""
    out = copy.deepcopy(dict(base))
    for key, value in overrides.items():
        if value == DROP:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict) and set(value) != {"$raw"}:
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def dense_of(
    fmt: str, shape: list[int], data: np.ndarray[Any, Any], first: Any, second: Any
) -> np.ndarray[Any, Any]:
    """The dense matrix of sparse arrays (repeated entries add up)."""
    first, second = np.asarray(first, dtype=np.int64), np.asarray(second, dtype=np.int64)
    dense = np.zeros(shape, dtype=data.dtype.newbyteorder("="))
    if fmt == "coo":
        rows, cols = first, second
    else:
        major = np.repeat(np.arange(second.shape[0] - 1), np.diff(second))
        rows, cols = (major, first) if fmt == "csr" else (first, major)
    np.add.at(dense, (rows, cols), data)
    return dense


def inline_matrix(matrix: Mapping[str, Any]) -> np.ndarray[Any, Any]:
    """The dense matrix of a JSON request's matrix object (dense or sparse)."""
    shape = [int(d) for d in matrix["shape"]]
    dtype = np.float32 if matrix["dtype"] == "float32" else np.float64
    data = np.asarray(matrix["data"], dtype=np.float64).astype(dtype)
    fmt = matrix.get("format")
    if fmt is None:
        return data.reshape(shape)
    names = ("indices", "indptr") if fmt in ("csr", "csc") else ("row", "col")
    return dense_of(fmt, shape, data, *(matrix[n] for n in names))
