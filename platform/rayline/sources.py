"""Reading the sources of a spec: path resolution, fingerprints, schema inference, and reading
with an accepted schema while keeping malformed lines (never dropping them silently)."""

from __future__ import annotations

import glob
import hashlib
import os
from pathlib import Path
from typing import Any

from .config import SourceSpec

__all__ = [
    "CORRUPT",
    "SourceError",
    "resolve_paths",
    "fingerprint",
    "infer_schema",
    "read_source",
]

# Column holding the raw text of a line that did not parse against the accepted schema.
CORRUPT = "_rayline_corrupt"


class SourceError(RuntimeError):
    """A source that cannot be read; the message names the source and the path."""


def resolve_paths(name: str, spec: SourceSpec) -> list[str]:
    """Absolute paths of the files (or Parquet directories) a source covers."""
    pattern = os.path.expanduser(spec.path)
    if glob.has_magic(pattern):
        paths = sorted(glob.glob(pattern))
    else:
        paths = [pattern] if os.path.exists(pattern) else []
    if not paths:
        raise SourceError(f"source {name!r}: no file matches {spec.path!r} (cwd {os.getcwd()})")
    return [str(Path(p).resolve()) for p in paths]


def fingerprint(paths: list[str]) -> str:
    """A cheap content fingerprint: each file's path, size and modification time."""
    h = hashlib.sha256()
    for p in paths:
        files = (
            sorted(str(f) for f in Path(p).rglob("*") if f.is_file()) if os.path.isdir(p) else [p]
        )
        for f in files:
            st = os.stat(f)
            h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


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
        if os.path.isdir(p):
            files += sorted(
                str(f)
                for f in Path(p).rglob("*")
                if f.is_file() and not f.name.startswith(("_", "."))
            )
        else:
            files.append(p)
    files = files[:8]
    if not files or any(
        f.endswith((".gz", ".bz2", ".zip", ".xz", ".zst", ".snappy")) for f in files
    ):
        return None
    out: list[str] = []
    for i, f in enumerate(files):
        with open(f, encoding="utf-8", errors="replace", newline="") as fh:
            for n, line in enumerate(fh):
                if n > rows:
                    break
                if n == 0 and header and i > 0:
                    continue
                out.append(line.rstrip("\r\n"))
    return out


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
            schema = r.load(paths).schema
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
        return r.load(paths)
    df = r.load(paths)
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
