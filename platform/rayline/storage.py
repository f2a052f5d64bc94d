"""Locations: every place Rayline reads or writes is a local path or a URI.

A local path (``runs``, ``/data/x``, ``file:///data/x``) becomes a :class:`pathlib.Path`, and
everything that worked on one machine works as before (atomic renames included). A URI of an
object store (``s3://bucket/prefix``; any scheme ``pyarrow.fs.FileSystem.from_uri`` opens)
becomes an :class:`ObjectPath`: the subset of ``Path`` that Rayline uses (``/``, ``read_text``,
``write_text``, ``glob``, ``exists``, ...), read and written through ``pyarrow.fs``. Spark reads
and writes the same URIs through Hadoop's S3A connector (:func:`spark_path`).

Endpoint, region and credentials come from the standard AWS variables and profiles
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``,
``AWS_PROFILE``, ...), never from a spec, and are never written anywhere by Rayline.

What is atomic where: on S3 a single object is written whole or not at all (a PUT), so a run
record or report is never seen half-written; a directory of objects is not, which is why
tables are Delta tables (one commit) and registry versions have their ``metadata.json``
written last. Appending to an object (the lineage log) rewrites it: one writer per run.

Example:
    >>> from rayline.storage import location
    >>> location("runs") / "r1" / "run.json"  # doctest: +SKIP
    PosixPath('/work/runs/r1/run.json')
    >>> location("s3://bucket/runs") / "r1" / "run.json"  # doctest: +SKIP
    ObjectPath('s3://bucket/runs/r1/run.json')
"""

from __future__ import annotations

import fnmatch
import functools
import os
import posixpath
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

__all__ = [
    "ObjectPath",
    "StorageError",
    "Loc",
    "location",
    "is_uri",
    "spark_path",
    "check_location",
    "remove_tree",
    "display",
    "append_text",
    "write_figure",
]

# Schemes this module hands to pyarrow.fs (and Spark to S3A).
OBJECT_SCHEMES = ("s3", "s3a", "gs", "gcs", "hdfs", "abfs", "abfss")


class StorageError(RuntimeError):
    """A location that cannot be used; the message names it and what to check."""


def is_uri(value: str | os.PathLike[str]) -> bool:
    """True for an object-store URI (``s3://...``), False for a local path or ``file://``."""
    text = os.fspath(value)
    scheme = urlsplit(text).scheme.lower() if "://" in text else ""
    return scheme not in ("", "file")


@functools.lru_cache(maxsize=16)
def _filesystem(scheme: str, bucket: str) -> Any:
    """One pyarrow filesystem per scheme and bucket, built from the standard environment."""
    import pyarrow.fs as pafs

    if scheme in ("s3", "s3a"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        kwargs: dict[str, Any] = {
            # Fail fast on an unreachable endpoint instead of the SDK's long default retries.
            "connect_timeout": 5,
            "request_timeout": 60,
            "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=3),
        }
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            kwargs["region"] = region
        if endpoint:
            u = urlsplit(endpoint)
            kwargs["endpoint_override"] = u.netloc or u.path
            kwargs["scheme"] = u.scheme or "https"
            kwargs["force_virtual_addressing"] = False
        return pafs.S3FileSystem(**kwargs)  # credentials: the SDK's default chain
    fs, _ = pafs.FileSystem.from_uri(f"{scheme}://{bucket}/")
    return fs


class ObjectPath:
    """A file or prefix on an object store, with the ``pathlib.Path`` methods Rayline uses."""

    __slots__ = ("scheme", "bucket", "key")

    def __init__(self, scheme: str, bucket: str, key: str = "") -> None:
        self.scheme = "s3" if scheme == "s3a" else scheme
        self.bucket = bucket
        self.key = posixpath.normpath(key.strip("/")) if key.strip("/") else ""

    # -- naming -------------------------------------------------------------------------------

    @classmethod
    def parse(cls, uri: str) -> ObjectPath:
        u = urlsplit(uri)
        if not u.netloc:
            raise StorageError(f"{uri!r}: no bucket in the URI (expected {u.scheme}://bucket/...)")
        return cls(u.scheme.lower(), u.netloc, u.path)

    @property
    def fs(self) -> Any:
        return _filesystem(self.scheme, self.bucket)

    @property
    def fs_path(self) -> str:
        """The path as pyarrow.fs names it: ``bucket/key``."""
        return f"{self.bucket}/{self.key}" if self.key else self.bucket

    def __str__(self) -> str:
        return f"{self.scheme}://{self.fs_path}"

    def __repr__(self) -> str:
        return f"ObjectPath({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ObjectPath) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    def __truediv__(self, part: str | os.PathLike[str]) -> ObjectPath:
        part = os.fspath(part)
        return ObjectPath(self.scheme, self.bucket, posixpath.join(self.key, part))

    @property
    def name(self) -> str:
        return posixpath.basename(self.key)

    @property
    def stem(self) -> str:
        return posixpath.splitext(self.name)[0]

    @property
    def suffix(self) -> str:
        return posixpath.splitext(self.name)[1]

    @property
    def parent(self) -> ObjectPath:
        return ObjectPath(self.scheme, self.bucket, posixpath.dirname(self.key))

    @property
    def parts(self) -> tuple[str, ...]:
        return tuple(p for p in self.key.split("/") if p)

    def with_name(self, name: str) -> ObjectPath:
        return self.parent / name

    def relative_to(self, other: ObjectPath) -> Path:
        if self.bucket != other.bucket or not (
            self.key == other.key or self.key.startswith(other.key + "/") or not other.key
        ):
            raise ValueError(f"{self} is not under {other}")
        return Path(self.key[len(other.key) :].lstrip("/"))

    def resolve(self) -> ObjectPath:
        return self

    def expanduser(self) -> ObjectPath:
        return self

    # -- queries ------------------------------------------------------------------------------

    def _info(self) -> Any:
        return self.fs.get_file_info(self.fs_path)

    def exists(self) -> bool:
        import pyarrow.fs as pafs

        return bool(self._info().type != pafs.FileType.NotFound)

    def is_file(self) -> bool:
        import pyarrow.fs as pafs

        return bool(self._info().type == pafs.FileType.File)

    def is_dir(self) -> bool:
        import pyarrow.fs as pafs

        return bool(self._info().type == pafs.FileType.Directory)

    def stat_size_mtime(self) -> tuple[int, int]:
        info = self._info()
        return int(info.size or 0), int(info.mtime_ns or 0)

    def _walk(self, recursive: bool) -> Iterator[Any]:
        import pyarrow.fs as pafs

        sel = pafs.FileSelector(self.fs_path, allow_not_found=True, recursive=recursive)
        yield from self.fs.get_file_info(sel)

    def _from_fs(self, fs_path: str) -> ObjectPath:
        bucket, _, key = fs_path.partition("/")
        return ObjectPath(self.scheme, bucket, key)

    def iterdir(self) -> Iterator[ObjectPath]:
        for info in self._walk(recursive=False):
            yield self._from_fs(info.path)

    def glob(self, pattern: str) -> Iterator[ObjectPath]:
        """Entries matching a relative pattern (``*/run.json``, ``v*.json``, ``**/*.csv``)."""
        recursive = "**" in pattern or "/" in pattern
        for info in self._walk(recursive=recursive):
            rel = info.path[len(self.fs_path) :].lstrip("/")
            if _match(rel, pattern):
                yield self._from_fs(info.path)

    def rglob(self, pattern: str) -> Iterator[ObjectPath]:
        for info in self._walk(recursive=True):
            if fnmatch.fnmatchcase(posixpath.basename(info.path), pattern):
                yield self._from_fs(info.path)

    # -- reading and writing ------------------------------------------------------------------

    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.fs_path) as f:
            return bytes(f.read())

    def read_text(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return self.read_bytes().decode(encoding, errors)

    def write_bytes(self, data: bytes) -> int:
        # One PUT: readers see the old object or the new one, never a part.
        with self.fs.open_output_stream(self.fs_path) as f:
            f.write(data)
        return len(data)

    def write_text(self, text: str, encoding: str = "utf-8") -> int:
        return self.write_bytes(text.encode(encoding))

    def append_text(self, text: str) -> None:
        """Append by rewriting the object (object stores cannot append): one writer only."""
        old = self.read_bytes() if self.is_file() else b""
        self.write_bytes(old + text.encode())

    def open_input(self) -> Any:
        """A binary input stream (``pyarrow.NativeFile``); use as a context manager."""
        return self.fs.open_input_stream(self.fs_path)

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Prefixes need no creation on an object store; nothing to do."""

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self.fs.delete_file(self.fs_path)
        except FileNotFoundError:
            if not missing_ok:
                raise


Loc = Path | ObjectPath


def _match(rel: str, pattern: str) -> bool:
    if "**" in pattern:
        head, _, tail = pattern.partition("**/")
        return rel.startswith(head) and fnmatch.fnmatchcase(posixpath.basename(rel), tail or "*")
    if rel.count("/") != pattern.count("/"):
        return False
    return all(
        fnmatch.fnmatchcase(a, b) for a, b in zip(rel.split("/"), pattern.split("/"), strict=True)
    )


def location(value: str | os.PathLike[str] | ObjectPath) -> Loc:
    """A local path (absolute, ``~`` expanded) or an :class:`ObjectPath` for a URI.

    Raises:
        StorageError: an unknown scheme.
    """
    if isinstance(value, ObjectPath):
        return value
    text = os.fspath(value)
    if "://" not in text:
        return Path(text).expanduser().resolve()
    u = urlsplit(text)
    scheme = u.scheme.lower()
    if scheme == "file":
        return Path(u.path).resolve()
    if scheme not in OBJECT_SCHEMES:
        raise StorageError(
            f"{text!r}: unknown scheme {scheme!r}; use a local path, file://, or one of "
            + ", ".join(f"{s}://" for s in OBJECT_SCHEMES[:2])
        )
    return ObjectPath.parse(text)


def display(value: str | os.PathLike[str] | ObjectPath) -> str:
    """The location as users write it (``s3://...`` or an absolute path)."""
    return str(location(value))


def spark_path(value: str | os.PathLike[str] | ObjectPath) -> str:
    """The location as Spark opens it: ``s3a://`` for S3 (Hadoop's S3A connector)."""
    loc = location(value)
    if isinstance(loc, ObjectPath) and loc.scheme == "s3":
        return f"s3a://{loc.fs_path}"
    return str(loc)


def remove_tree(loc: Loc) -> None:
    """Delete a directory (or prefix) and everything under it; missing is fine."""
    if isinstance(loc, ObjectPath):
        import contextlib

        with contextlib.suppress(FileNotFoundError):
            loc.fs.delete_dir(loc.fs_path)
        return
    import shutil

    shutil.rmtree(loc, ignore_errors=True)


def append_text(loc: Loc, text: str) -> None:
    """Append ``text`` to a file (local: ``O_APPEND``; object store: rewritten whole)."""
    if isinstance(loc, ObjectPath):
        loc.append_text(text)
        return
    loc.parent.mkdir(parents=True, exist_ok=True)
    with loc.open("a") as f:
        f.write(text)


def write_figure(fig: Any, loc: Loc, **savefig: Any) -> None:
    """Save a matplotlib figure as PNG to a local path or an object."""
    import io

    if isinstance(loc, Path):
        loc.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(loc, **savefig)
        return
    buf = io.BytesIO()
    fig.savefig(buf, format="png", **savefig)
    loc.write_bytes(buf.getvalue())


def _explain(loc: ObjectPath, e: BaseException) -> str:
    text = str(e)
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    where = f"endpoint {endpoint}" if endpoint else "the default AWS endpoint"
    if "NETWORK_CONNECTION" in text or "curlCode" in text:
        return f"cannot reach {where}: check AWS_ENDPOINT_URL and that the server is running"
    if "NO_SUCH_BUCKET" in text or "NoSuchBucket" in text or "does not exist" in text:
        return f"bucket {loc.bucket!r} does not exist at {where}: create it or fix the URI"
    if any(
        k in text
        for k in (
            "ACCESS_DENIED",
            "AccessDenied",
            "InvalidAccessKeyId",
            "SignatureDoesNotMatch",
            "INVALID_ACCESS_KEY_ID",
            "SIGNATURE_DOES_NOT_MATCH",
            "403",
        )
    ):
        return (
            f"access denied at {where}: check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY "
            "(or AWS_PROFILE) and the bucket's permissions"
        )
    if "credentials" in text.lower():
        return "no credentials: set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE"
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def check_location(value: str | os.PathLike[str], what: str, *, must_exist: bool = False) -> Loc:
    """Check that a location can be used, before any engine starts; return it.

    For an object store: the scheme is known, the endpoint answers, the credentials are
    accepted and the bucket exists. ``must_exist``: the path itself must exist (a source).

    Raises:
        StorageError: naming ``what``, the location and what to check.
    """
    try:
        loc = location(value)
    except StorageError as e:
        raise StorageError(f"{what}: {e}") from None
    if isinstance(loc, Path):
        if must_exist and not loc.exists():
            raise StorageError(f"{what}: {loc} does not exist")
        return loc
    import pyarrow.fs as pafs

    try:
        bucket = loc.fs.get_file_info(loc.bucket)
        if bucket.type == pafs.FileType.NotFound:
            raise StorageError(
                f"{what}: {loc}: bucket {loc.bucket!r} does not exist: create it or fix the URI"
            )
        # Listing needs the credentials to be accepted (HeadBucket may be allowed anonymously).
        next(iter(loc.parent._walk(recursive=False)), None)
        if must_exist and not loc.exists():
            raise StorageError(f"{what}: {loc} does not exist")
    except StorageError:
        raise
    except (OSError, ValueError) as e:
        raise StorageError(f"{what}: {loc}: {_explain(loc, e)}") from None
    return loc
