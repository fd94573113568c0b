"""Where a stored payload may be, and the one check that decides whether a reference is read.

A reference names its object by URL: ``s3://<bucket>/<key>`` or ``file:///<absolute path>``.
The URL never says where to connect: an ``s3://`` object is read through the endpoint and
credentials this process is configured with, and only from a bucket and key prefix it is
configured to trust; a ``file://`` object only from under a configured root, after symlinks are
resolved. Anything else (another scheme, a host, a port, credentials, a query, a fragment,
percent escapes, ``.`` or ``..`` segments) is refused before any I/O, so a request cannot make
the service connect anywhere the operator did not configure.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from objectstore.errors import UntrustedLocation

# S3's bucket naming rules (lower case, digits, dots and hyphens, 3-63 long).
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
# Keys and paths from a conservative set, so that no store, shell or URL parser reads them
# differently: letters, digits and ``! - _ . * ' ( ) = + , @`` in ``/``-separated segments.
_SEGMENT = re.compile(r"^[A-Za-z0-9!_.*'()=+,@-]+$")
_MAX_KEY_BYTES = 1024
# A segment is a file name on filesystem-backed stores (a file:// root, S3Proxy, MinIO): longer
# ones fail there with an I/O error, which would read as the store being down.
_MAX_SEGMENT_BYTES = 255


@dataclass(frozen=True, slots=True)
class Location:
    """A store and a prefix in it: ``s3`` with a bucket, or ``file`` with an absolute root."""

    scheme: str  # "s3" or "file"
    bucket: str  # the bucket, or "" for file
    prefix: str  # key prefix, "" or ending in "/"; for file, the root directory (absolute)

    @classmethod
    def parse(cls, url: str) -> Location:
        """A configured location: ``s3://bucket``, ``s3://bucket/prefix`` or ``file:///root``.
        ValueError says what is wrong (this is the operator's setting, not a request)."""
        try:
            ref = ObjectUrl.parse(
                url.rstrip("/") + ("/" if url.startswith("s3://") else ""), None, directory=True
            )
        except UntrustedLocation as exc:
            raise ValueError(f"store location {url!r}: {exc.message}") from None
        if ref.scheme == "file":
            return cls("file", "", ref.key)
        prefix = ref.key
        return cls("s3", ref.bucket, prefix if not prefix or prefix.endswith("/") else prefix + "/")

    def url(self, key: str) -> str:
        """The reference URL of ``key`` (relative to this location's prefix)."""
        if self.scheme == "file":
            return "file://" + os.path.join(self.prefix, key)
        return f"s3://{self.bucket}/{self.prefix}{key}"

    def holds(self, ref: ObjectUrl) -> bool:
        if ref.scheme != self.scheme:
            return False
        if self.scheme == "s3":
            return ref.bucket == self.bucket and ref.key.startswith(self.prefix)
        root = os.path.realpath(self.prefix)
        # realpath resolves symlinks: a link under the root that points outside is outside.
        real = os.path.realpath(ref.key)
        return real != root and os.path.commonpath([real, root]) == root

    def __str__(self) -> str:
        return (
            f"file://{self.prefix}"
            if self.scheme == "file"
            else f"s3://{self.bucket}/{self.prefix}"
        )


@dataclass(frozen=True, slots=True)
class ObjectUrl:
    """A parsed reference URL: for s3 the bucket and key, for file the absolute path."""

    scheme: str
    bucket: str
    key: str

    @classmethod
    def parse(cls, url: str, request_id: str | None, *, directory: bool = False) -> ObjectUrl:
        """Raises UntrustedLocation for anything but a plain s3:// or file:// URL (of an object;
        ``directory``: of a configured location, whose s3 key may be empty or end in /)."""

        def refuse(why: str) -> UntrustedLocation:
            return UntrustedLocation(f"reference {url[:300]!r}: {why}", request_id=request_id)

        if not url.startswith(("s3://", "file://")):
            raise refuse("the scheme must be s3 or file, in lower case")
        if not url.isascii() or any(c in url for c in "%?#\\ ") or not url.isprintable():
            raise refuse("only plain ASCII, without percent escapes, query, fragment or spaces")
        parts = urlsplit(url)
        if parts.scheme == "s3":
            if not _BUCKET.match(parts.netloc):
                raise refuse("s3:// needs a bucket name (no credentials, no port, no host)")
            key = parts.path[1:]
            _check_key(key, refuse, allow_empty=directory)
            return cls("s3", parts.netloc, key)
        if parts.scheme == "file":
            if parts.netloc:
                raise refuse("file:// takes no host: file:///absolute/path")
            _check_key(parts.path[1:], refuse, allow_empty=False)
            return cls("file", "", parts.path)
        raise refuse("the scheme must be s3 or file")


def _check_key(key: str, refuse: object, *, allow_empty: bool) -> None:
    assert callable(refuse)
    if len(key.encode()) > _MAX_KEY_BYTES:
        raise refuse(f"longer than {_MAX_KEY_BYTES} bytes")
    segments = key.split("/")
    if allow_empty and segments[-1] == "":
        segments = segments[:-1]
    if not segments and allow_empty:
        return
    for segment in segments:
        if segment in ("", ".", "..") or not _SEGMENT.match(segment):
            raise refuse(
                "path segments are letters, digits and !_.*'()=+,@- (no empty, . or .. segment)"
            )
        if len(segment) > _MAX_SEGMENT_BYTES:
            raise refuse(f"a path segment is longer than {_MAX_SEGMENT_BYTES} bytes")


class Trust:
    """The locations a process reads from: where it writes, and any it is told to trust."""

    def __init__(self, locations: tuple[Location, ...]) -> None:
        self.locations = locations

    def check(self, url: str, request_id: str | None) -> tuple[Location, ObjectUrl]:
        """The location holding ``url``, or UntrustedLocation: nothing is fetched otherwise."""
        ref = ObjectUrl.parse(url, request_id)
        for location in self.locations:
            if location.holds(ref):
                return location, ref
        where = ", ".join(str(loc) for loc in self.locations) or "nothing (no store configured)"
        raise UntrustedLocation(
            f"reference {url[:300]!r} is outside the trusted stores: this service reads {where}",
            request_id=request_id,
        )


def file_path(location: Location, ref: ObjectUrl) -> Path:
    """The real path of a trusted file:// reference (symlinks resolved, inside the root)."""
    return Path(os.path.realpath(ref.key))
