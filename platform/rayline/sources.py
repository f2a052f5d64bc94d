"""Reading the sources of a spec: path resolution, fingerprints, schema inference, and reading
with an accepted schema while keeping malformed lines (never dropping them silently)."""

from __future__ import annotations

import glob
import hashlib
import os
from pathlib import Path
from typing import Any

from .config import SourceSpec
from .storage import ObjectPath, StorageError, check_location, location, spark_path

__all__ = [
    "CORRUPT",
    "SourceError",
    "resolve_paths",
    "fingerprint",
    "infer_schema",
    "read_source",
    "source_bytes",
]

# Column holding the raw text of a line that did not parse against the accepted schema.
CORRUPT = "_rayline_corrupt"


class SourceError(RuntimeError):
    """A source that cannot be read; the message names the source and the path."""


def resolve_paths(name: str, spec: SourceSpec) -> list[str]:
    """Absolute paths (or ``s3://`` URIs) of the files or directories a source covers.

    Raises:
        SourceError: nothing matches, or the location cannot be reached (names what to check).
    """
    if "://" in spec.path and not spec.path.startswith("file://"):
        return _resolve_remote(name, spec)
    pattern = os.path.expanduser(spec.path.removeprefix("file://"))
    if glob.has_magic(pattern):
        paths = sorted(glob.glob(pattern))
    else:
        paths = [pattern] if os.path.exists(pattern) else []
    if not paths:
        raise SourceError(f"source {name!r}: no file matches {spec.path!r} (cwd {os.getcwd()})")
    return [str(Path(p).resolve()) for p in paths]


def _resolve_remote(name: str, spec: SourceSpec) -> list[str]:
    import pyarrow.fs as pafs

    head, magic, _ = spec.path.partition("*") if "*" in spec.path else (spec.path, "", "")
    try:
        if not glob.has_magic(spec.path):
            loc = check_location(spec.path, f"source {name!r}", must_exist=True)
            return [str(loc)]
        # A glob: list below its fixed part and match the rest.
        base = location(head.rsplit("/", 1)[0])
        assert isinstance(base, ObjectPath)
        check_location(str(base), f"source {name!r}")
        full = location(spec.path)
        assert isinstance(full, ObjectPath)
        rel = full.key[len(base.key) :].lstrip("/")
        found = sorted(str(p) for p in base.glob(rel))
    except StorageError as e:
        raise SourceError(str(e)) from None
    except (OSError, pafs.ArrowException) as e:  # type: ignore[attr-defined]
        raise SourceError(f"source {name!r}: cannot list {spec.path!r}: {e}") from None
    if not found:
        raise SourceError(f"source {name!r}: no object matches {spec.path!r}")
    return found


def _files(p: str) -> list[tuple[str, int, int]]:
    """The data files under a path or URI (a file, or a directory's files): name, size, mtime."""
    loc = location(p)
    if isinstance(loc, ObjectPath):
        import pyarrow.fs as pafs

        info = loc.fs.get_file_info(loc.fs_path)
        if info.type == pafs.FileType.File:
            return [(str(loc), int(info.size or 0), int(info.mtime_ns or 0))]
        return sorted(
            (f"{loc.scheme}://{i.path}", int(i.size or 0), int(i.mtime_ns or 0))
            for i in loc._walk(recursive=True)
            if i.type == pafs.FileType.File
        )
    if loc.is_dir():
        out = []
        for f in sorted(loc.rglob("*")):
            if f.is_file():
                st = f.stat()
                out.append((str(f), st.st_size, st.st_mtime_ns))
        return out
    st = loc.stat()
    return [(str(loc), st.st_size, st.st_mtime_ns)]


def fingerprint(paths: list[str]) -> str:
    """A cheap content fingerprint: each file's path, size and modification time."""
    h = hashlib.sha256()
    for p in paths:
        for f, size, mtime in _files(p):
            h.update(f"{f}\0{size}\0{mtime}\n".encode())
    return h.hexdigest()[:16]


def source_bytes(paths: list[str]) -> int:
    """The bytes of a source's files (paths or URIs)."""
    return sum(size for p in paths for _, size, _ in _files(p))


def _reader(spark: Any, spec: SourceSpec) -> Any:
    r = spark.read.format(spec.format)
    opts = dict(spec.options)
    if spec.format == "csv":
        opts.setdefault("header", "true")
    for k, v in opts.items():
        r = r.option(k, v)
    return r


def _head_lines(paths: list[str], rows: int, header: bool) -> list[str] | None:
    """The first ``rows`` lines of each file (header kept once), or None when the files are
    not plain text this can sample (compressed, or directories of many parts)."""
    files: list[str] = []
    for p in paths:
        files += [f for f, _, _ in _files(p) if not f.rsplit("/", 1)[-1].startswith(("_", "."))]
    files = files[:8]
    if not files or any(
        f.endswith((".gz", ".bz2", ".zip", ".xz", ".zst", ".snappy")) for f in files
    ):
        return None
    out: list[str] = []
    for i, f in enumerate(files):
        with _open_text(f) as fh:
            for n, line in enumerate(fh):
                if n > rows:
                    break
                if n == 0 and header and i > 0:
                    continue
                out.append(line.rstrip("\r\n"))
    return out


def _open_text(path: str) -> Any:
    import io

    loc = location(path)
    if isinstance(loc, ObjectPath):
        return io.TextIOWrapper(
            io.BufferedReader(loc.open_input()), encoding="utf-8", errors="replace", newline=""
        )
    return open(loc, encoding="utf-8", errors="replace", newline="")


def infer_schema(spark: Any, name: str, spec: SourceSpec, paths: list[str]) -> Any:
    """Infer a source's schema: CSV/JSON from the first rows of its files (or all rows),
    Parquet from the footers."""
    from pyspark.errors import AnalysisException

    r = _reader(spark, spec)
    if spec.format == "csv":
        r = r.option("inferSchema", "true")
    lines = None
    multiline = spec.options.get("multiLine", "false").lower() == "true"
    if spec.format in ("csv", "json") and spec.infer_sample_rows and not multiline:
        header = spec.format == "csv" and spec.options.get("header", "true") == "true"
        lines = _head_lines(paths, spec.infer_sample_rows, header)
    try:
        if lines is not None:
            rdd = spark.sparkContext.parallelize(lines, 1)
            schema = (r.csv(rdd) if spec.format == "csv" else r.json(rdd)).schema
        else:
            schema = r.load([spark_path(p) for p in paths]).schema
    except AnalysisException as e:
        raise SourceError(f"source {name!r}: cannot read {spec.path!r}: {e}") from None
    if not schema.fields:
        raise SourceError(f"source {name!r}: {spec.path!r} is empty (no columns)")
    return schema


def read_source(spark: Any, name: str, spec: SourceSpec, paths: list[str], schema: Any) -> Any:
    """Read a source with its accepted schema.

    CSV and JSON rows that do not parse against the schema (wrong type, wrong number of
    fields) keep their raw text in the ``_rayline_corrupt`` column instead of being dropped;
    the caller separates them. The result is cached: it is read by several passes.
    """
    from pyspark.sql.types import StringType, StructField, StructType

    r = _reader(spark, spec)
    if spec.format in ("csv", "json"):
        full = StructType(list(schema.fields) + [StructField(CORRUPT, StringType(), True)])
        r = r.schema(full).option("mode", "PERMISSIVE").option("columnNameOfCorruptRecord", CORRUPT)
        if spec.format == "csv":
            # Check the header's names against the schema instead of applying it by position.
            r = r.option("enforceSchema", "false")
        return r.load([spark_path(p) for p in paths])
    df = r.load([spark_path(p) for p in paths])
    # Parquet carries its own types; cast to the accepted ones (widening only, checked before).
    from pyspark.sql import functions as F

    cols = []
    have = {f.name: f for f in df.schema.fields}
    for f in schema.fields:
        if f.name in have:
            c = F.col(f"`{f.name}`")
            cols.append(
                c if have[f.name].dataType == f.dataType else c.cast(f.dataType).alias(f.name)
            )
        else:
            cols.append(F.lit(None).cast(f.dataType).alias(f.name))
    return df.select(*cols).withColumn(CORRUPT, F.lit(None).cast("string"))
