"""Output tables: Delta Lake tables under the warehouse, each publish one Delta commit, registered
in the Spark catalog.

The warehouse is a local directory or an object-store URI (``s3://bucket/prefix``); a table lives
at ``<warehouse>/<table>`` (``db.table`` -> ``<warehouse>/db/table``). Spark reaches ``s3://``
through Hadoop's S3A connector (as ``s3a://``, see :func:`rayline.storage.spark_path`); pyarrow
and delta-rs (``deltalake``) keep ``s3://``.

Atomicity is Delta's: data files are written first, under names no reader of the table looks at
until the commit (one new ``_delta_log/<version>.json``) lists them, so a reader sees the previous
version or the new one, never a part, locally and on S3 (no rename, no staging directory). A
failed or killed write leaves the table at its previous version, with at most some unreferenced
files beside it (``VACUUM`` removes them). On S3 Delta's default LogStore for ``s3a``
(``S3SingleDriverLogStore``) makes commits from one Spark driver at a time safe; concurrent
writers of one table from several clusters need the DynamoDB LogStore (``io.delta:delta-storage-s3-
dynamodb``, ``spark.delta.logStore.s3a.impl=io.delta.storage.S3DynamoDBLogStore``).

How: Delta Lake's own transaction in the driver (``DeltaLog.startTransaction``: the data files
written by its writer in a Spark job, ``txn.writeFiles``, or already on disk for
:func:`link_table`; then ``txn.commit``). That is what ``df.write.format("delta")`` does, minus
the Spark job it runs to list the files an overwrite removes: those come from the previous
version's log through delta-rs, in this process. This drives delta-spark 3.3's transaction API
(checked at run time, :data:`DELTA_SPARK_LINE`); an append that adds columns goes through
``df.write.format("delta")`` with ``mergeSchema``.

Modes: ``overwrite`` is Delta's overwrite (the new version holds only this write's rows, the old
files stay for time travel until vacuumed; the schema and partitioning may change). ``append``
adds rows (new columns merged into the schema) and is idempotent under retries: the commit carries
Delta's transaction identifier ``txnAppId = "<pipeline>/<table>"``, ``txnVersion = <the run's start
time in ms since the epoch>`` (:func:`txn_version_of`; a resumed run keeps its start time), and
a write whose ``txnVersion`` is not above the last one recorded for that appId is skipped (as
Delta's writer does with the ``txnAppId``/``txnVersion`` options). So an attempt that retries an
append already committed adds nothing; the flip side: resuming an *older* run after a newer run of
the same pipeline appended to the table adds nothing either (logged).

:func:`link_table` publishes Parquet files a stage already wrote (the quality stage's kept rows,
partitioned as the table is) without rewriting them: they are hard-linked (copied across file
systems, to or within an object store) into the table's directory under fresh names and added to
the table by one commit, each with its row count from its footer. Where that is not possible
(partition columns of other types than integers, strings, dates and booleans, or an append that
changes the schema) the rows are written by Delta's writer instead.

The result of a publish names the table version it produced (``version``); readers read a
version through the log (Spark ``format("delta")``, :func:`read_table_arrow`, :func:`delta_table`),
never all the Parquet files under the directory: an overwrite leaves the old ones there.

Timestamps are written as Parquet INT64 ``TIMESTAMP_MICROS`` (the session sets
``spark.sql.parquet.outputTimestampType``), not the legacy INT96.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from .config import OutputSpec
from .storage import ObjectPath, is_uri
from .storage import location as storage_location
from .storage import spark_path as spark_uri

__all__ = [
    "write_table",
    "link_table",
    "table_path",
    "table_location",
    "txn_version_of",
    "storage_options",
    "delta_table",
    "read_table_arrow",
    "table_snapshot",
    "is_delta_table",
    "with_version",
]

log = logging.getLogger("rayline")

# Written beside the data by Rayline before tables were Delta tables (column types for readers
# that saw partition values only as directory names); read only to convert such a table.
SCHEMA_FILE = "_rayline_schema.json"

# The Delta Lake (Spark) release whose transaction API link_table drives (see _commit_files).
DELTA_SPARK_LINE = "3.3."


# -- locations ----------------------------------------------------------------------------------


def table_location(warehouse: str | os.PathLike[str], table: str) -> str:
    """Where the table ``table`` lives: an absolute local path, or a URI under a warehouse URI
    (``s3://bucket/prefix/table``)."""
    return str(storage_location(warehouse) / table.replace(".", "/"))


def table_path(warehouse: str | os.PathLike[str], table: str) -> Path:
    """The table's directory in a local warehouse (see :func:`table_location` for URIs)."""
    if is_uri(warehouse):
        raise ValueError(f"warehouse {warehouse} is not local: use table_location()")
    return Path(table_location(warehouse, table))


def txn_version_of(started_at: str) -> int:
    """The Delta ``txnVersion`` of a run: its start time (ISO 8601, as in the run record) in
    milliseconds since the epoch. Monotonic across runs of a pipeline, the same for every attempt
    of one run (``--resume`` keeps ``started_at``)."""
    return int(datetime.fromisoformat(started_at).timestamp() * 1000)


def _endpoint(env: Any) -> str | None:
    return env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")


def storage_options(environ: Any = None) -> dict[str, str]:
    """Options for delta-rs (``deltalake``) on S3 from the standard AWS environment: endpoint,
    region, plain HTTP for an ``http://`` endpoint. Credentials are not copied here: delta-rs
    reads ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN`` and
    ``AWS_PROFILE`` from the environment itself."""
    env = os.environ if environ is None else environ
    opts: dict[str, str] = {}
    endpoint = _endpoint(env)
    if endpoint:
        opts["AWS_ENDPOINT_URL"] = endpoint
        opts["AWS_VIRTUAL_HOSTED_STYLE_REQUEST"] = "false"
        if endpoint.lower().startswith("http://"):
            opts["AWS_ALLOW_HTTP"] = "true"
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    if region:
        opts["AWS_REGION"] = region
    return opts


def _fs(loc: str) -> tuple[Any, str]:
    """A ``pyarrow.fs`` file system for a location and the path within it."""
    import pyarrow.fs as pafs

    where = storage_location(loc)
    if isinstance(where, ObjectPath):
        return where.fs, where.fs_path
    return pafs.LocalFileSystem(), str(where)


def _delta_uri(location: str) -> str:
    """The location as delta-rs names it (``s3a://`` -> ``s3://``)."""
    if location.startswith(("s3a://", "s3n://")):
        return "s3://" + location.split("://", 1)[1]
    return location


def delta_table(location: str, version: int | None = None) -> Any:
    """The Delta table at ``location`` (a path or URI) read with delta-rs, at ``version``
    (default: the current one)."""
    from deltalake import DeltaTable

    opts = storage_options() if is_uri(location) else None
    return DeltaTable(_delta_uri(str(location)), version=version, storage_options=opts)


def is_delta_table(location: str) -> bool:
    """Whether a Delta table (with at least one commit) exists at ``location``."""
    from deltalake import DeltaTable

    opts = storage_options() if is_uri(location) else None
    return bool(DeltaTable.is_deltatable(_delta_uri(location), storage_options=opts))


def table_snapshot(location: str, version: int | None = None) -> tuple[int, str]:
    """(version, fingerprint) of the Delta table at ``location`` (default: its current version).
    The fingerprint names the table and that version's data files: equal for two readers of the
    same version, different after any write."""
    import hashlib

    table = delta_table(location, version)
    h = hashlib.sha256(str(table.metadata().id).encode())
    for name in sorted(u.rsplit("/", 1)[-1] for u in table.file_uris()):
        h.update(f"\n{name}".encode())
    return int(table.version()), h.hexdigest()[:16]


def read_table_arrow(location: str, version: int | None = None) -> Any:
    """A Delta table's rows at ``version`` (default: current) as a ``pyarrow.Table``, without
    Spark."""
    return delta_table(location, version).to_pyarrow_table()


def with_version(ds: dict[str, Any], version: int | None) -> dict[str, Any]:
    """An OpenLineage dataset (:func:`rayline.lineage.dataset`) with the table's Delta version
    (the standard ``version`` dataset facet), so that an event names the exact data."""
    if version is not None:
        from .lineage import PRODUCER

        ds["facets"]["version"] = {
            "_producer": PRODUCER,
            "_schemaURL": "https://openlineage.io/spec/facets/1-0-1/"
            "DatasetVersionDatasetFacet.json#/$defs/DatasetVersionDatasetFacet",
            "datasetVersion": str(version),
        }
    return ds


# -- writing ------------------------------------------------------------------------------------


def _check_partitions(out: OutputSpec, columns: list[str]) -> None:
    missing = [c for c in out.partition_by if c not in columns]
    if missing:
        raise ValueError(
            f"output {out.table!r}: partition column(s) {missing} not in the data; "
            f"available: {sorted(columns)}"
        )


def _app_id(pipeline: str | None, out: OutputSpec) -> str:
    return f"{pipeline or 'rayline'}/{out.table}"


def write_table(
    spark: Any,
    df: Any,
    out: OutputSpec,
    warehouse: str | os.PathLike[str],
    run_id: str,
    *,
    pipeline: str | None = None,
    txn_version: int | None = None,
) -> dict[str, Any]:
    """Write ``df`` as the Delta table ``out.table`` (one commit) and register it.

    Args:
        spark: The SparkSession (with Delta Lake, see :mod:`rayline.session`).
        df: The rows.
        out: Table name, partitioning and mode.
        warehouse: Local directory or ``s3://bucket/prefix``.
        run_id: The run writing it (logged).
        pipeline: With ``txn_version``, makes an append idempotent (see the module docstring).
        txn_version: The run's :func:`txn_version_of`.

    Returns:
        ``table``, ``path`` (location), ``rows`` (the table's rows after the commit),
        ``partition_by``, ``format`` (``delta``), ``version`` (the Delta version the table is at
        after this publish) and, for appends, ``rows_written`` (0 when a retry was skipped).
    """
    _check_partitions(out, list(df.columns))
    loc = table_location(warehouse, out.table)
    res = _commit(
        spark,
        df.schema,
        out,
        loc,
        run_id,
        pipeline,
        txn_version,
        lambda txn: _write_files(spark, df, txn),
        "written",
    )
    if res is not None:
        return res
    return _merge_append(spark, df, out, loc, run_id, pipeline, txn_version)


def _merge_append(
    spark: Any,
    df: Any,
    out: OutputSpec,
    loc: str,
    run_id: str,
    pipeline: str | None,
    txn_version: int | None,
) -> dict[str, Any]:
    """An append whose columns differ from the table's: Delta's own writer merges the schemas
    (``mergeSchema``), with the same transaction identifier."""
    sloc = spark_uri(loc)
    before = _current_version(spark, sloc)
    w = df.write.format("delta").mode("append").option("mergeSchema", "true")
    if txn_version is not None:
        w = w.option("txnAppId", _app_id(pipeline, out)).option("txnVersion", txn_version)
    if out.partition_by:
        w = w.partitionBy(*out.partition_by)
    t0 = time.perf_counter()
    w.save(sloc)
    version, metrics = _last_commit(spark, sloc, loc)
    written = int(metrics.get("numOutputRows", 0)) if version != before else 0
    if version == before:
        log.warning(
            "%s: append of run %s skipped: Delta transaction %s already at version >= %s "
            "(a retry of a committed append, or an older run resumed after a newer one)",
            out.table,
            run_id,
            _app_id(pipeline, out),
            txn_version,
        )
    log.info(
        "%s: Delta version %d: appended with new columns merged in %.1fs (%s rows)",
        out.table,
        version,
        time.perf_counter() - t0,
        f"{written:,}",
    )
    _register(spark, out.table, sloc)
    return _result(out, loc, _count(spark, sloc, version, loc), version, written)


def _result(
    out: OutputSpec, loc: str, rows: int, version: int, written: int | None
) -> dict[str, Any]:
    res: dict[str, Any] = {
        "table": out.table,
        "path": loc,
        "rows": rows,
        "partition_by": out.partition_by,
        "format": "delta",
        "version": version,
    }
    if written is not None:
        res["rows_written"] = written
    return res


def link_table(
    spark: Any,
    dirs: list[str],
    schema: Any,
    out: OutputSpec,
    warehouse: str | os.PathLike[str],
    run_id: str,
    rows: int | None = None,
    *,
    df: Any = None,
    pipeline: str | None = None,
    txn_version: int | None = None,
) -> dict[str, Any]:
    """Publish the Parquet files under ``dirs`` (each laid out as the table: partition
    directories of ``out.partition_by`` below it, or the files themselves) as the Delta table
    ``out.table`` without rewriting them (see the module docstring), and register it.

    ``schema``: the rows' Spark schema (partition columns included); ``rows``: unused (each
    file's count comes from its footer: Delta's statistics need it per file); ``df``: the same
    rows as a DataFrame, written with
    :func:`write_table` when the files cannot be added as they are (else read from ``dirs``).
    Returns what :func:`write_table` returns.
    """
    _check_partitions(out, [f.name for f in schema.fields])
    reason = _not_linkable(schema, out)
    if reason is None:
        loc = table_location(warehouse, out.table)
        files = _files_of(dirs, out)
        res = _commit_files(spark, files, schema, out, loc, run_id, pipeline, txn_version)
        if res is not None:
            return res
        reason = "the append changes the table's schema"
    log.info("%s: writing the rows with Spark (%s)", out.table, reason)
    if df is None:
        df = spark.read.schema(schema).parquet(*dirs)
    return write_table(
        spark, df, out, warehouse, run_id, pipeline=pipeline, txn_version=txn_version
    )


# Partition column types whose Parquet directory values are already Delta's partition values.
_LINKABLE_PARTITION_TYPES = {"string", "int", "bigint", "smallint", "tinyint", "date", "boolean"}


def _not_linkable(schema: Any, out: OutputSpec) -> str | None:
    types = {f.name: f.dataType.simpleString() for f in schema.fields}
    odd = {c: types[c] for c in out.partition_by if types[c] not in _LINKABLE_PARTITION_TYPES}
    if odd:
        return f"partition column types {odd}"
    return None


_HIVE_NULL = "__HIVE_DEFAULT_PARTITION__"


def _unescape(value: str) -> str:
    """Spark's (Hive's) partition directory unescaping: ``%XX`` -> the character."""
    return re.sub(r"%([0-9A-Fa-f]{2})", lambda m: chr(int(m.group(1), 16)), value)


@dataclass
class _File:
    fs: Any  # pyarrow.fs file system of the source
    path: str  # within fs
    size: int
    part_dir: str  # the partition directories, relative to the table ("" when unpartitioned)
    values: dict[str, str | None]  # partition values, as Delta records them

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]


def _files_of(dirs: list[str], out: OutputSpec) -> list[_File]:
    """Every data file under ``dirs`` (local paths or URIs) with its partition values."""
    import pyarrow.fs as pafs

    files = []
    for d in dirs:
        fs, base = _fs(d)
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
        for info in sorted(infos, key=lambda i: i.path):
            rel = info.path[len(base) :].strip("/").split("/")
            if info.type != pafs.FileType.File or rel[-1].startswith(("_", ".")):
                continue
            if any(p.startswith(("_", ".")) for p in rel[:-1]):
                continue  # e.g. _temporary of an interrupted writer
            if len(rel) - 1 != len(out.partition_by):
                raise ValueError(
                    f"output {out.table!r}: {d}/{'/'.join(rel)} is not laid out as the table"
                )
            values: dict[str, str | None] = {}
            for part, col in zip(rel[:-1], out.partition_by, strict=True):
                name, _, value = part.partition("=")
                if name != col:
                    raise ValueError(
                        f"output {out.table!r}: {d}/{'/'.join(rel)}: directory {part!r} is not "
                        f"of column {col!r}"
                    )
                values[col] = None if value == _HIVE_NULL else _unescape(value)
            files.append(_File(fs, info.path, int(info.size or 0), "/".join(rel[:-1]), values))
    return files


# -- Delta through the session's JVM (delta-spark 3.3's transaction API; see DELTA_SPARK_LINE) --


def _jvm_seq(spark: Any, items: list[Any]) -> Any:
    jvm = spark._jvm
    lst = jvm.java.util.ArrayList()
    for it in items:
        lst.add(it)
    return jvm.scala.collection.JavaConverters.asScalaBufferConverter(lst).asScala().toList()


def _delta_log(spark: Any, sloc: str) -> Any:
    return spark._jvm.org.apache.spark.sql.delta.DeltaLog.forTable(spark._jsparkSession, sloc)


def _current_version(spark: Any, sloc: str) -> int:
    """The table's current Delta version, -1 when there is no Delta table at ``sloc``."""
    return int(_delta_log(spark, sloc).startTransaction().readVersion())


def _last_commit(spark: Any, sloc: str, loc: str) -> tuple[int, dict[str, str]]:
    """(version, operation metrics) of the table's latest commit: the version from the Delta
    log's listing, the metrics from that commit's ``commitInfo`` (the log file itself; Delta's
    ``history()`` would run a Spark job for it)."""
    version = _current_version(spark, sloc)
    commit = storage_location(loc) / "_delta_log" / f"{version:020d}.json"
    for line in commit.read_text().splitlines():
        info = json.loads(line).get("commitInfo") if line.strip() else None
        if info is not None:
            return version, dict(info.get("operationMetrics") or {})
    return version, {}


def _count(spark: Any, sloc: str, version: int, loc: str | None = None) -> int:
    """The table's rows at ``version``: the sum of its files' ``numRecords`` statistics, listed
    by delta-rs (no Spark job); counted by Spark where a file has none."""
    if loc is not None:
        import pyarrow as pa

        adds = pa.table(delta_table(loc, version).get_add_actions(flatten=True))
        records = adds.column("num_records").to_pylist() if adds.num_rows else []
        if all(r is not None for r in records):
            return int(sum(records))
    return int(spark.read.format("delta").option("versionAsOf", version).load(sloc).count())


def _check_delta_line(delta_log: Any) -> None:
    where = str(delta_log.getClass().getProtectionDomain().getCodeSource().getLocation())
    if f"delta-spark_2.12-{DELTA_SPARK_LINE}" not in where:
        raise RuntimeError(
            f"link_table drives Delta Lake {DELTA_SPARK_LINE}x's transaction API; the session "
            f"has {where}"
        )


def _all_nullable(t: Any) -> Any:
    """A Spark schema JSON with every field nullable, as Delta stores a table's schema."""
    if not isinstance(t, dict):
        return t
    t = dict(t)
    if t.get("type") == "struct":
        t["fields"] = [
            {**f, "nullable": True, "type": _all_nullable(f["type"])} for f in t["fields"]
        ]
    elif t.get("type") == "array":
        t["containsNull"] = True
        t["elementType"] = _all_nullable(t["elementType"])
    elif t.get("type") == "map":
        t["valueContainsNull"] = True
        t["keyType"] = _all_nullable(t["keyType"])
        t["valueType"] = _all_nullable(t["valueType"])
    return t


# Delta partition value strings of these types are what str() (bool: lower-case) gives.
_PLAIN_PARTITION_TYPES = {"string", "integer", "long", "short", "byte", "date", "boolean"}


def _removes(
    loc: str, version: int, metadata: dict[str, Any], protocol: dict[str, Any]
) -> list[dict[str, Any]] | None:
    """RemoveFile actions for every file of ``version``, listed by delta-rs (in this process, no
    Spark job); None where Delta's own listing is needed (deletion vectors, partition columns
    whose value strings are not plain)."""
    features = set(protocol.get("protocol", protocol).get("readerFeatures") or [])
    if "deletionVectors" in features:
        return None
    fields = {f["name"]: f["type"] for f in json.loads(metadata["schemaString"])["fields"]}
    parts = list(metadata.get("partitionColumns") or [])
    if any(fields.get(c) not in _PLAIN_PARTITION_TYPES for c in parts):
        return None

    def text(v: Any) -> str | None:
        if v is None:
            return None
        if isinstance(v, bool):
            return "true" if v else "false"
        return v.isoformat() if hasattr(v, "isoformat") else str(v)

    import pyarrow as pa

    adds = pa.table(delta_table(loc, version).get_add_actions(flatten=False)).to_pylist()
    now = int(time.time() * 1000)
    return [
        {
            "path": a["path"],
            "deletionTimestamp": now,
            "dataChange": True,
            "extendedFileMetadata": True,
            "partitionValues": {c: text((a.get("partition") or {}).get(c)) for c in parts},
            "size": int(a["size_bytes"]),
        }
        for a in adds
    ]


def _place(files: list[_File], loc: str) -> list[str]:
    """Hard-link (else copy: across file systems, to or within an object store) each file into
    the table's directory under a fresh name (no two attempts, no two versions share a file);
    returns their paths relative to the table."""
    from concurrent.futures import ThreadPoolExecutor

    import pyarrow.fs as pafs

    tag = uuid.uuid4().hex[:12]
    rels = [
        (f"{f.part_dir}/" if f.part_dir else "") + f"{tag}-{i}-{f.name}"
        for i, f in enumerate(files)
    ]
    fs, base = _fs(loc)
    local = isinstance(fs, pafs.LocalFileSystem)

    def place(pair: tuple[_File, str]) -> None:
        f, rel = pair
        if local and isinstance(f.fs, pafs.LocalFileSystem):
            target = Path(base) / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(f.path, target)
            except OSError:
                shutil.copyfile(f.path, target)
            return
        # the same S3 file system object: a server-side copy; else streamed
        pafs.copy_files(f.path, f"{base}/{rel}", source_filesystem=f.fs, destination_filesystem=fs)

    with ThreadPoolExecutor(max_workers=8, thread_name_prefix="rayline-link") as pool:
        list(pool.map(place, zip(files, rels, strict=True)))
    return rels


def _row_counts(files: list[_File]) -> list[int]:
    """Rows per file, from the Parquet footers."""
    from concurrent.futures import ThreadPoolExecutor

    import pyarrow.parquet as pq

    def rows(f: _File) -> int:
        return int(pq.read_metadata(f.path, filesystem=f.fs).num_rows)

    with ThreadPoolExecutor(max_workers=8, thread_name_prefix="rayline-footers") as pool:
        return list(pool.map(rows, files))


def _commit(
    spark: Any,
    schema: Any,
    out: OutputSpec,
    loc: str,
    run_id: str,
    pipeline: str | None,
    txn_version: int | None,
    add: Any,
    how: str,
) -> dict[str, Any] | None:
    """One Delta commit of the table at ``loc`` through Delta's transaction API: the table's
    metadata (created, or replaced by an overwrite whose schema or partitioning differs),
    ``add(txn)`` -> (the new files' actions, their rows, how many), for an overwrite a
    RemoveFile of every file of the current version, and for an idempotent append the
    ``SetTransaction``. None (nothing done) for an append that would change the table's schema:
    that is Delta's writer's (mergeSchema)."""
    t0 = time.perf_counter()
    jvm = spark._jvm
    delta = jvm.org.apache.spark.sql.delta
    sloc = spark_uri(loc)
    table_schema = _all_nullable(json.loads(schema.json()))
    legacy = _adopt_legacy(spark, loc, out, schema)
    delta_log = _delta_log(spark, sloc)
    _check_delta_line(delta_log)
    txn = delta_log.startTransaction()
    before = int(txn.readVersion())
    app_id = _app_id(pipeline, out)
    if before >= 0:
        current = json.loads(txn.metadata().json())["metaData"]
        same = _all_nullable(json.loads(current["schemaString"])) == table_schema and list(
            current["partitionColumns"]
        ) == list(out.partition_by)
    else:
        current, same = None, False
    if out.mode == "append":
        if current is not None and not same:
            return None
        if txn_version is not None and int(txn.txnVersion(app_id)) >= txn_version:
            log.warning(
                "%s: append of run %s skipped: Delta transaction %s already at version >= %s "
                "(a retry of a committed append, or an older run resumed after a newer one)",
                out.table,
                run_id,
                app_id,
                txn_version,
            )
            _register(spark, out.table, sloc)
            return _result(out, loc, _count(spark, sloc, before, loc), before, 0)
    if current is None or not same:
        meta = dict(current or {})
        meta.setdefault("id", str(uuid.uuid4()))
        meta.setdefault("format", {"provider": "parquet", "options": {}})
        meta.setdefault("configuration", {})
        meta.setdefault("createdTime", int(time.time() * 1000))
        meta["schemaString"] = json.dumps(table_schema, separators=(",", ":"))
        meta["partitionColumns"] = list(out.partition_by)
        metadata = delta.actions.Action.fromJson(json.dumps({"metaData": meta}))
        if current is None:
            delta_log.createLogDirectoriesIfNotExists()
            txn.updateMetadata(metadata, False)
        else:
            txn.updateMetadataForTableOverwrite(metadata)
    actions = []
    if out.mode == "overwrite" and before >= 0:
        removes = _removes(loc, before, current or {}, json.loads(txn.protocol().json()))
        if removes is not None:
            actions += [delta.actions.Action.fromJson(json.dumps({"remove": r})) for r in removes]
        else:  # Delta's own listing (a Spark job reconstructing the version's state)
            listed = jvm.scala.collection.JavaConverters.seqAsJavaList(txn.filterFiles())
            actions += [a.remove() for a in listed]

    added, written, n_files = add(txn)
    actions += added
    if txn_version is not None:
        now = int(time.time() * 1000)
        txn_action = {"appId": app_id, "version": txn_version, "lastUpdated": now}
        actions.append(delta.actions.Action.fromJson(json.dumps({"txn": txn_action})))
    save_mode = jvm.org.apache.spark.sql.SaveMode.valueOf(
        "Overwrite" if out.mode == "overwrite" else "Append"
    )
    option = jvm.scala.Option
    operation = getattr(delta, "DeltaOperations$Write")(
        save_mode,
        option.apply(_jvm_seq(spark, list(out.partition_by))),
        option.apply(None),
        option.apply(None),
    )
    version = int(txn.commit(_jvm_seq(spark, actions), operation))
    log.info(
        "%s: Delta version %d: %d file(s) %s by run %s in %.2fs (%s rows)",
        out.table,
        version,
        n_files,
        how,
        run_id,
        time.perf_counter() - t0,
        f"{written:,}",
    )
    _drop_legacy(loc, legacy)
    _register(spark, out.table, sloc)
    if out.mode == "overwrite":
        return _result(out, loc, written, version, None)
    return _result(out, loc, _count(spark, sloc, version, loc), version, written)


def _commit_files(
    spark: Any,
    files: list[_File],
    schema: Any,
    out: OutputSpec,
    loc: str,
    run_id: str,
    pipeline: str | None,
    txn_version: int | None,
) -> dict[str, Any] | None:
    """Add ``files`` (already written) to the table in one commit, see :func:`_commit`."""

    def add(txn: Any) -> tuple[list[Any], int, int]:
        delta = spark._jvm.org.apache.spark.sql.delta
        counts = _row_counts(files)
        rels = _place(files, loc)
        now = int(time.time() * 1000)
        hadoop_path = spark._jvm.org.apache.hadoop.fs.Path
        actions = []
        for f, rel, n in zip(files, rels, counts, strict=True):
            entry = {
                "path": str(hadoop_path(rel).toUri().toString()),
                "partitionValues": f.values,
                "size": f.size,
                "modificationTime": now,
                "dataChange": True,
                "stats": json.dumps({"numRecords": n}),
            }
            actions.append(delta.actions.Action.fromJson(json.dumps({"add": entry})))
        return actions, sum(counts), len(files)

    return _commit(
        spark, schema, out, loc, run_id, pipeline, txn_version, add, "linked (not rewritten)"
    )


def _write_files(spark: Any, df: Any, txn: Any) -> tuple[list[Any], int, int]:
    """Delta's writer for the transaction's table (a Spark job: data files under their final
    names, with statistics); the AddFile actions, their rows, how many."""
    written = spark._jvm.scala.collection.JavaConverters.seqAsJavaList(txn.writeFiles(df._jdf))
    actions = list(written)
    rows = 0
    for a in actions:
        stats = a.stats() if a.getClass().getSimpleName() == "AddFile" else None
        if stats:
            rows += int(json.loads(stats).get("numRecords") or 0)
    return actions, rows, len(actions)


# -- tables written before Rayline used Delta -----------------------------------------------------


def _adopt_legacy(spark: Any, loc: str, out: OutputSpec, schema: Any) -> list[Path]:
    """A plain-Parquet table left at ``loc`` by an older Rayline (a local warehouse): for an
    append, converted in place to a Delta table (its rows kept); for an overwrite, left for the
    new version to replace: returns its files, removed by :func:`_drop_legacy` once the commit is
    done (Delta readers never see them; plain-Parquet readers would)."""
    if is_uri(loc):
        return []
    p = Path(loc)
    if not p.is_dir() or (p / "_delta_log").is_dir():
        return []
    files = [f for f in p.rglob("*") if f.is_file()]
    if not files:
        return []
    if out.mode == "overwrite":
        log.warning(
            "%s: %s holds a plain-Parquet table (written before Rayline's tables were Delta "
            "tables): replacing it with a Delta table; its %d file(s) are removed after the "
            "commit",
            out.table,
            loc,
            len(files),
        )
        return files
    types = {f.name: f.dataType.simpleString() for f in schema.fields}
    with contextlib.suppress(FileNotFoundError, KeyError, ValueError):
        written = json.loads((p / SCHEMA_FILE).read_text())
        types |= dict(written["columns"])
    parts = ", ".join(f"`{c}` {types[c]}" for c in out.partition_by)
    log.warning(
        "%s: %s holds a plain-Parquet table (written before Rayline's tables were Delta "
        "tables): converting it to a Delta table in place (CONVERT TO DELTA), its rows kept",
        out.table,
        loc,
    )
    sloc = spark_uri(loc).replace("`", "``")
    spark.sql(
        f"CONVERT TO DELTA parquet.`{sloc}`" + (f" PARTITIONED BY ({parts})" if parts else "")
    )
    for name in (SCHEMA_FILE, "_SUCCESS"):
        (p / name).unlink(missing_ok=True)
    return []


def _drop_legacy(loc: str, files: list[Path]) -> None:
    if not files:
        return
    for f in files:
        f.unlink(missing_ok=True)
    root = Path(loc)
    for d in sorted((d for d in root.rglob("*") if d.is_dir()), key=lambda d: -len(d.parts)):
        if d.name != "_delta_log" and not any(d.iterdir()):
            d.rmdir()


# -- the catalog --------------------------------------------------------------------------------


def _catalog_entry(spark: Any, table: str) -> tuple[str, str] | None:
    """(provider, location) of ``table`` in the session catalog, None when not registered."""
    if not spark.catalog.tableExists(table):
        return None
    info = {
        r["col_name"]: r["data_type"]
        for r in spark.sql(f"DESCRIBE TABLE EXTENDED {table}").collect()
    }
    return (info.get("Provider") or "").lower(), info.get("Location") or ""


def _same_location(a: str, b: str) -> bool:
    def norm(s: str) -> str:
        s = s.rstrip("/")
        return s[len("file:") :] if s.startswith("file:") else s

    return norm(a) == norm(b)


def _register(spark: Any, table: str, sloc: str) -> None:
    """Register ``table`` as the Delta table at ``sloc`` (once; re-registered when it is in the
    catalog as another kind of table or elsewhere)."""
    if "." in table:
        spark.sql(f"CREATE DATABASE IF NOT EXISTS {table.split('.')[0]}")
    entry = _catalog_entry(spark, table)
    if entry is not None and entry[0] == "delta" and _same_location(entry[1], sloc):
        return
    if entry is not None:
        spark.sql(f"DROP TABLE IF EXISTS {table}")
    location = sloc.replace("\\", "\\\\").replace("'", "\\'")
    spark.sql(f"CREATE TABLE {table} USING DELTA LOCATION '{location}'")
