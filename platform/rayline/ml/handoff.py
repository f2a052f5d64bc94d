"""From Spark to Ray Data, and the deterministic train/validation/test split.

Two ways to get the curated table as a ``ray.data.Dataset``:

- :func:`spark_to_ray`: in the same job as the pipeline, in memory. The executors turn rows into
  Arrow record batches in parallel and write them, uncompressed, as Arrow IPC files to shared
  memory; the driver maps each file and puts it in Ray's object store. The dataset is
  materialized before returning, its blocks owned by this driver, so it stays available after
  Spark stops. No Parquet round trip (``benchmarks/handoff.py`` measures both).
- :func:`table_to_ray`: in a separate job, from the Delta table in the warehouse (the files of
  one table version, listed by delta-rs), with Spark's column types.

Both give the same rows and column types (an integration test compares them).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .features import FeatureError
from .spec import MLSpec

__all__ = ["spark_to_ray", "table_to_ray", "split_dataset", "SPLITS"]

log = logging.getLogger("rayline")

SPLITS = ("train", "validation", "test")
_SPLIT_COL = "_rayline_split"

# Blocks of the handed-off dataset: at most this many bytes of Arrow data each (Ray Data's own
# default target is 128 MiB; smaller blocks give downstream operators more parallelism).
_HANDOFF_BLOCK_BYTES = 64 << 20


def spark_to_ray(df: Any) -> Any:
    """Hand a Spark DataFrame to Ray Data in memory, materialized in the object store.

    Each Spark task streams its partition to a Python worker as Arrow record batches
    (``mapInArrow``: Spark's own row-to-Arrow conversion, in parallel on the executors) and
    writes them as uncompressed Arrow IPC files of up to 64 MiB in shared memory (``/dev/shm``;
    a local temporary directory when that is missing or full). The driver memory-maps each file,
    puts the table in Ray's object store (one copy) and deletes the file; files written on
    another node are loaded by a Ray task pinned to that node. No Spark-side cache, and no
    partition is ever held whole in an executor's heap, so the executor memory does not bound
    the partition size.

    Args:
        df: A Spark DataFrame of a Spark-on-Ray session.

    Returns:
        A materialized ``ray.data.Dataset`` (blocks in the DataFrame's partition order, owned by
        this driver) that outlives the Spark session. Column names and Arrow types are Spark's
        Arrow conversion's (timestamps in the session time zone, as ``timestamp[us, tz]``).
    """
    import os
    import shutil
    import socket
    import uuid

    import pyarrow as pa

    t0 = time.perf_counter()
    run = f"rayline-handoff-{uuid.uuid4().hex[:16]}"
    here = socket.gethostname()
    written: list[Any] = []
    try:
        written = df.mapInArrow(
            _arrow_file_writer(run, _HANDOFF_BLOCK_BYTES),
            "part long, seq long, path string, rows long, host string",
        ).collect()
        t1 = time.perf_counter()
        written.sort(key=lambda r: (r.part, r.seq))
        blocks = _load_arrow_files(written, here)
    finally:
        # Also what failed task attempts (or a failed job) left behind.
        for root in _spill_roots():
            shutil.rmtree(os.path.join(root, run), ignore_errors=True)
        _clean_remote(written, here)
    if not blocks:
        from pyspark.sql.pandas.types import to_arrow_schema

        blocks = [_put_block(pa.Table.from_batches([], schema=to_arrow_schema(df.schema)))]
    ds = _materialized(blocks)
    t2 = time.perf_counter()
    log.info(
        "handoff: %d rows Spark -> Ray Data in %.1fs (Spark job %.1fs, into the object store "
        "%.1fs; %d blocks)",
        ds.count(),
        t2 - t0,
        t1 - t0,
        t2 - t1,
        len(blocks),
    )
    return ds


def _spill_roots() -> list[str]:
    """Where the handoff's files go: shared memory first, else the temporary directory."""
    import os
    import tempfile

    tmp = tempfile.gettempdir()
    return ["/dev/shm", tmp] if os.path.isdir("/dev/shm") and tmp != "/dev/shm" else [tmp]


def _arrow_file_writer(run: str, block_bytes: int) -> Any:
    """The ``mapInArrow`` function of :func:`spark_to_ray` (runs in the executors' Python
    workers; self-contained, so that they need not import Rayline)."""

    def write(batches: Any) -> Any:
        import os
        import shutil
        import socket
        import tempfile

        import pyarrow as pa
        from pyspark import TaskContext

        ctx = TaskContext.get()
        assert ctx is not None
        part, attempt = ctx.partitionId(), ctx.attemptNumber()
        host = socket.gethostname()
        tmp = tempfile.gettempdir()  # as _spill_roots (not imported: no Rayline needed here)
        roots = ["/dev/shm", tmp] if os.path.isdir("/dev/shm") and tmp != "/dev/shm" else [tmp]

        def flush(buf: list[Any], nbytes: int, seq: int) -> Any:
            # Shared memory unless it lacks room for this file (with a margin); then local disk.
            root = next(
                (r for r in roots if shutil.disk_usage(r).free > 2 * nbytes + (64 << 20)),
                roots[-1],
            )
            d = os.path.join(root, run)
            os.makedirs(d, exist_ok=True)
            path = os.path.join(d, f"p{part:06d}-a{attempt}-{seq:05d}.arrow")
            schema = buf[0].schema.remove_metadata()
            with pa.OSFile(path, "wb") as f, pa.ipc.new_file(f, schema) as w:
                for b in buf:
                    w.write_batch(b)
            return pa.RecordBatch.from_pydict(
                {
                    "part": [part],
                    "seq": [seq],
                    "path": [path],
                    "rows": [sum(b.num_rows for b in buf)],
                    "host": [host],
                }
            )

        buf: list[Any] = []
        nbytes = seq = 0
        for b in batches:
            if b.num_rows == 0:
                continue
            buf.append(b)
            nbytes += b.nbytes
            if nbytes >= block_bytes:
                yield flush(buf, nbytes, seq)
                buf, nbytes, seq = [], 0, seq + 1
        if buf:
            yield flush(buf, nbytes, seq)

    return write


def _read_arrow_file(path: str) -> Any:
    import os

    import pyarrow as pa

    table = pa.ipc.open_file(pa.memory_map(path)).read_all()
    os.unlink(path)  # the mapping stays valid until the table is gone
    return table


def _put_block(table: Any) -> tuple[Any, Any]:
    import ray

    return ray.put(table), _block_metadata(table)


def _block_metadata(table: Any) -> Any:
    try:
        from ray.data.block import BlockExecStats, BlockMetadataWithSchema
    except ImportError:  # another Ray version: _materialized asks Ray Data instead
        return None
    return BlockMetadataWithSchema.from_block(
        table, block_exec_stats=BlockExecStats.builder().build()
    )


def _load_remote(path: str) -> tuple[Any, Any]:
    table = _read_arrow_file(path)
    return table, _block_metadata(table)


def _load_arrow_files(written: list[Any], here: str) -> list[tuple[Any, Any]]:
    """(block ref, metadata) per file, in order: local files through the driver, files on other
    nodes through Ray tasks pinned to their node (the tasks' outputs are owned by the driver)."""
    import ray

    blocks: list[tuple[Any, Any]] = []
    remote: list[tuple[int, Any]] = []
    nodes = _node_ids() if any(r.host != here for r in written) else {}
    load = ray.remote(num_cpus=0.1, num_returns=2, max_retries=0)(_load_remote)
    for r in written:
        if r.host == here:
            table = _read_arrow_file(r.path)
            blocks.append(_put_block(table))
            del table
        else:
            task: Any = load
            if r.host in nodes:
                from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

                task = task.options(
                    scheduling_strategy=NodeAffinitySchedulingStrategy(nodes[r.host], soft=False)
                )
            ref, meta = task.remote(r.path)
            remote.append((len(blocks), meta))
            blocks.append((ref, None))
    for i, meta in remote:
        blocks[i] = (blocks[i][0], ray.get(meta))
    return blocks


def _node_ids() -> dict[str, str]:
    import ray

    return {n["NodeManagerHostname"]: n["NodeID"] for n in ray.nodes() if n.get("Alive")}


def _clean_remote(written: list[Any], here: str) -> None:
    """Best effort: remove the run's directories on other nodes (files of failed task attempts;
    loaded files are deleted as they are read)."""
    import os

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    hosts = {r.host for r in written if r.host != here}
    if not hosts:
        return
    nodes = _node_ids()

    def rm(dirs: list[str]) -> None:
        import shutil

        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)

    refs = []
    for h in hosts & set(nodes):
        dirs = sorted({os.path.dirname(r.path) for r in written if r.host == h})
        refs.append(
            ray.remote(num_cpus=0.1, max_retries=0)(rm)
            .options(scheduling_strategy=NodeAffinitySchedulingStrategy(nodes[h], soft=True))
            .remote(dirs)
        )
    ray.wait(refs, num_returns=len(refs), timeout=30)


def _materialized(blocks: list[tuple[Any, Any]]) -> Any:
    """A MaterializedDataset over blocks already in the object store, from their metadata
    (what ``ray.data.from_arrow_refs`` builds, without its one metadata task per block)."""
    import ray.data

    refs = [ref for ref, _ in blocks]
    metas = [meta for _, meta in blocks]
    try:
        from ray.data._internal.logical.interfaces import LogicalPlan
        from ray.data._internal.logical.operators.from_operators import FromArrow
        from ray.data._internal.stats import DatasetStats
        from ray.data.context import DataContext
        from ray.data.dataset import MaterializedDataset
    except ImportError:
        metas = [None]
    if any(m is None for m in metas):
        return ray.data.from_arrow_refs(refs)
    ctx = DataContext.get_current().copy()
    stats = DatasetStats(metadata={"FromArrow": metas}, parent=None)
    return MaterializedDataset(LogicalPlan(FromArrow(refs, metas), ctx), ctx, stats)


def table_to_ray(path: str | Path, version: int | None = None) -> Any:
    """Read a curated table written by Rayline (a Delta table) as a Ray Dataset.

    Args:
        path: The table's location (``<warehouse>/<table>``: a directory or an ``s3://`` URI).
        version: The Delta version to read (default: the current one). Only that version's
            files are read, never the files an overwrite left for time travel.

    Returns:
        A lazy ``ray.data.Dataset`` with the columns in the table's order and the Arrow types
        Spark's conversion (:func:`spark_to_ray`) gives.

    Raises:
        FileNotFoundError: no Delta table there (not written yet, or by a Rayline before tables
            were Delta tables: run the pipeline again).
    """
    import pyarrow as pa
    import ray.data

    from ..outputs import delta_table, is_delta_table, storage_options
    from ..storage import is_uri

    loc = str(path)
    if not is_delta_table(loc):
        raise FileNotFoundError(
            f"{loc}: no Delta table here; run the pipeline first (a table written before "
            "Rayline's tables were Delta tables is replaced by the next run)"
        )
    table = delta_table(loc, version)
    fields = json.loads(table.schema().to_json())["fields"]
    # Ray Data's v2 Parquet reader runs its listing in actors that fail to load
    # ("Expected str or bytes, got NoneType") once RayDP's conversion tasks have switched
    # pooled workers to load_code_from_local; the v1 reader has no such actors.
    ray.data.DataContext.get_current().use_datasource_v2 = False
    uri = "s3://" + loc.split("://", 1)[1] if loc.startswith("s3a://") else loc
    ds = ray.data.read_delta(
        uri,
        version=table.version(),
        storage_options=storage_options() if is_uri(loc) else None,
    )
    arrow = _arrow_types()
    casts = {
        f["name"]: arrow[f["type"]]()
        for f in fields
        if isinstance(f["type"], str) and f["type"] in arrow
    }
    order = [f["name"] for f in fields]

    def restore(t: pa.Table) -> pa.Table:
        for c, typ in casts.items():
            if c in t.column_names and t.schema.field(c).type != typ:
                i = t.column_names.index(c)
                t = t.set_column(i, c, t.column(c).cast(typ))
        return t.select([c for c in order if c in t.column_names])

    return ds.map_batches(restore, batch_format="pyarrow", batch_size=None)


def _arrow_types() -> dict[str, Any]:
    """Delta schema type names -> the Arrow type Spark's Arrow conversion gives."""
    import pyarrow as pa

    return {
        "byte": pa.int8,
        "short": pa.int16,
        "integer": pa.int32,
        "long": pa.int64,
        "float": pa.float32,
        "double": pa.float64,
        "boolean": pa.bool_,
        "string": pa.string,
        "binary": pa.binary,
        "date": pa.date32,
        "timestamp": lambda: pa.timestamp("us", tz="UTC"),
        "timestamp_ntz": lambda: pa.timestamp("us"),
    }


def _assign(batch: pd.DataFrame, spec: MLSpec, keys: list[str]) -> pd.DataFrame:
    s = spec.split
    if s.method == "random":
        h = pd.util.hash_pandas_object(
            _canonical(batch[keys]), index=False, hash_key=f"{s.seed:016d}"[-16:]
        ).to_numpy()
        u = (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)
        split = np.where(
            u < s.test_fraction, 2, np.where(u < s.test_fraction + s.validation_fraction, 1, 0)
        )
    else:
        col = batch[s.time_column]
        vstart, tstart = _cut(col, s.validation_start), _cut(col, s.test_start)
        split = np.where(col >= tstart, 2, np.where(col >= vstart, 1, 0))
    batch[_SPLIT_COL] = split.astype(np.int8)
    return batch


def _canonical(keys: pd.DataFrame) -> pd.DataFrame:
    """Key columns in a dtype-independent form: one engine may hand an int column with nulls
    as float64 and another as int32 (or Int64), which would hash differently."""
    out = {}
    for c in keys.columns:
        col = keys[c]
        if pd.api.types.is_bool_dtype(col) or pd.api.types.is_numeric_dtype(col):
            out[c] = pd.to_numeric(col, errors="coerce").astype("float64")
        else:
            out[c] = col.astype("string").fillna("<null>").astype(object)
    return pd.DataFrame(out)


def _cut(col: pd.Series, value: Any) -> Any:
    import pyarrow as pa

    dtype = col.dtype
    pa_type = getattr(dtype, "pyarrow_dtype", None)
    is_time = pd.api.types.is_datetime64_any_dtype(dtype) or (
        pa_type is not None and pa.types.is_timestamp(pa_type)
    )
    if is_time:
        ts = pd.Timestamp(value)
        tz = getattr(pa_type, "tz", None) if pa_type is not None else getattr(dtype, "tz", None)
        if tz is not None and ts.tzinfo is None:
            ts = ts.tz_localize(tz)
        elif tz is None and ts.tzinfo is not None:
            ts = ts.tz_convert("UTC").tz_localize(None)
        return ts
    if pd.api.types.is_numeric_dtype(dtype):
        return float(value)
    return str(value)


def _drop_unlabelled(batch: pd.DataFrame, label: str) -> pd.DataFrame:
    y = batch[label]
    keep = y.notna()
    if pd.api.types.is_float_dtype(y):
        keep &= np.isfinite(y.to_numpy(dtype=np.float64, na_value=np.nan))
    return batch[keep.to_numpy()]


def split_dataset(ds: Any, spec: MLSpec) -> tuple[dict[str, Any], dict[str, int]]:
    """Drop rows without a label, then split deterministically and materialize the splits.

    Random split: a seeded hash of each row's key columns decides its split, so the result does
    not depend on how the data is partitioned or ordered. Time split: by the cut points.

    Args:
        ds: The curated dataset.
        spec: The ``ml`` section.

    Returns:
        ``({"train": ds, "validation": ds, "test": ds}, counts)``; counts also has
        ``without_label``.

    Raises:
        FeatureError: a split column is missing, or a split is empty.
    """
    s = spec.split
    names = ds.schema().names
    keys = s.key_columns or spec.features.columns() + [spec.label]
    for i, k in enumerate(keys):
        if k not in names:
            raise FeatureError(f"ml.split.key_columns[{i}]: column {k!r} is not in the data")
    if s.method == "time" and s.time_column not in names:
        raise FeatureError(f"ml.split.time_column: column {s.time_column!r} is not in the data")

    label = spec.label
    total = ds.count()
    labelled = (
        ds.map_batches(_drop_unlabelled, fn_kwargs={"label": label}, batch_format="pandas")
        .map_batches(_assign, fn_kwargs={"spec": spec, "keys": keys}, batch_format="pandas")
        .materialize()
    )
    out: dict[str, Any] = {}
    counts: dict[str, int] = {"without_label": total - labelled.count()}
    for code, name in enumerate(SPLITS):
        part = labelled.map_batches(
            lambda b, code=code: b[b[_SPLIT_COL] == code].drop(columns=[_SPLIT_COL]),
            batch_format="pandas",
        ).materialize()
        counts[name] = part.count()
        if counts[name] == 0:
            raise FeatureError(
                f"ml.split: the {name} split is empty ({counts}); "
                "check the fractions or the time cut points"
            )
        out[name] = part
    log.info(
        "split: train %d, validation %d, test %d rows (%d without a label left out)",
        counts["train"],
        counts["validation"],
        counts["test"],
        counts["without_label"],
    )
    return out, counts
