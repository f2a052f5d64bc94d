"""From Spark to Ray Data, and the deterministic train/validation/test split.

Two ways to get the curated table as a ``ray.data.Dataset``:

- :func:`spark_to_ray`: in the same job as the pipeline, through RayDP. The executors turn rows
  into Arrow record batches; Ray tasks fetch them into Ray's object store. The dataset is
  materialized before returning, its blocks owned by this driver, so it stays available after
  Spark stops. No Parquet round trip.
- :func:`table_to_ray`: in a separate job, from the table's Parquet files in the warehouse,
  with the partition columns restored to their written types.

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

from ..outputs import SCHEMA_FILE
from .features import FeatureError
from .spec import MLSpec

__all__ = ["spark_to_ray", "table_to_ray", "split_dataset", "SPLITS"]

log = logging.getLogger("rayline")

SPLITS = ("train", "validation", "test")
_SPLIT_COL = "_rayline_split"

# Spark simple-string types -> the Arrow types a partition directory name is cast to.
_ARROW_OF_SPARK = {
    "tinyint": "int8",
    "smallint": "int16",
    "int": "int32",
    "bigint": "int64",
    "float": "float32",
    "double": "float64",
    "boolean": "bool",
    "string": "string",
    "date": "date32",
}


def spark_to_ray(df: Any) -> Any:
    """Hand a Spark DataFrame to Ray Data through RayDP, materialized in the object store.

    Args:
        df: A Spark DataFrame of a Spark-on-Ray session.

    Returns:
        A materialized ``ray.data.Dataset`` that outlives the Spark session.
    """
    from raydp.spark.dataset import from_spark_recoverable, release_spark_recoverable

    t0 = time.perf_counter()
    ds = from_spark_recoverable(df).materialize()
    release_spark_recoverable(df)
    log.info("handoff: %d rows Spark -> Ray Data in %.1fs", ds.count(), time.perf_counter() - t0)
    return ds


def table_to_ray(path: str | Path) -> Any:
    """Read a curated table written by Rayline from the warehouse as a Ray Dataset.

    Args:
        path: The table's directory (``<warehouse>/<table>``).

    Returns:
        A lazy ``ray.data.Dataset`` with the partition columns cast to their written types.

    Raises:
        FileNotFoundError: no such table, or it was not written completely.
    """
    import pyarrow as pa
    import ray.data

    p = Path(path)
    schema_file = p / SCHEMA_FILE
    if not p.is_dir() or not schema_file.exists():
        raise FileNotFoundError(
            f"{p}: no complete Rayline table here (missing {SCHEMA_FILE}); run the pipeline first"
        )
    meta = json.loads(schema_file.read_text())
    types = dict(meta["columns"])
    part = meta.get("partition_by") or []
    # Ray Data's v2 Parquet reader runs its listing in actors that fail to load
    # ("Expected str or bytes, got NoneType") once RayDP's conversion tasks have switched
    # pooled workers to load_code_from_local; the v1 reader has no such actors.
    ray.data.DataContext.get_current().use_datasource_v2 = False
    ds = ray.data.read_parquet(str(p), file_extensions=["parquet"])
    # Partition values come back as directory-name strings, and Spark's INT96 timestamps as
    # naive nanoseconds: give both the types the handoff (Spark's Arrow conversion) has.
    casts = {c: pa.type_for_alias(_ARROW_OF_SPARK.get(types[c], "string")) for c in part}
    casts |= {c: pa.timestamp("us", tz="UTC") for c, t in types.items() if t == "timestamp"}
    casts |= {c: pa.timestamp("us") for c, t in types.items() if t == "timestamp_ntz"}
    order = [name for name, _ in meta["columns"]]

    def restore(t: pa.Table) -> pa.Table:
        for c, typ in casts.items():
            if c in t.column_names and t.schema.field(c).type != typ:
                i = t.column_names.index(c)
                t = t.set_column(i, c, t.column(c).cast(typ))
        return t.select([c for c in order if c in t.column_names])

    return ds.map_batches(restore, batch_format="pyarrow", batch_size=None)


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
    dtype = col.dtype
    pa_type = getattr(dtype, "pyarrow_dtype", None)
    is_time = pd.api.types.is_datetime64_any_dtype(dtype) or (
        pa_type is not None and __import__("pyarrow").types.is_timestamp(pa_type)
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
