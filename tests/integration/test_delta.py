"""Output tables are Delta tables (rayline.outputs) written by Spark on Ray: one commit per
publish, read back by Spark and by delta-rs alike, idempotent appends, a failed write invisible."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from rayline.config import OutputSpec
from rayline.outputs import (
    link_table,
    read_table_arrow,
    table_location,
    txn_version_of,
    write_table,
)

pytestmark = pytest.mark.integration

T0 = dt.datetime(2026, 1, 1, 5, 30, 15, 123456, tzinfo=dt.UTC)


def frame(spark, ids, tag):
    from pyspark.sql.types import (
        IntegerType,
        LongType,
        StringType,
        StructField,
        StructType,
        TimestampType,
    )

    schema = StructType(
        [
            StructField("id", LongType()),
            StructField("month", IntegerType()),
            StructField("tag", StringType()),
            StructField("at", TimestampType()),
        ]
    )
    rows = [(i, 1 + i % 3, tag, T0 + dt.timedelta(seconds=i)) for i in ids]
    return spark.createDataFrame(rows, schema)


def spark_rows(spark, location, version=None):
    r = spark.read.format("delta")
    if version is not None:
        r = r.option("versionAsOf", version)
    loaded = r.load(location)
    return sorted((r["id"], r["month"], r["tag"]) for r in loaded.collect())


def arrow_rows(location, version=None):
    t = read_table_arrow(location, version)
    cols = [t[c].to_pylist() for c in ("id", "month", "tag")]
    return sorted(zip(*cols, strict=True))


def data_files(location):
    return [f for f in Path(location).rglob("*.parquet") if "_delta_log" not in f.parts]


def test_overwrite_twice_keeps_only_the_last_version(spark, tmp_path):
    out = OutputSpec(table="delta_ow", partition_by=["month"])
    wh = tmp_path / "wh"
    first = write_table(spark, frame(spark, range(10), "a"), out, wh, "r1")
    second = write_table(spark, frame(spark, range(100, 104), "b"), out, wh, "r2")
    loc = table_location(wh, out.table)
    assert (first["version"], second["version"]) == (0, 1)
    assert first["format"] == second["format"] == "delta"
    assert (first["rows"], second["rows"]) == (10, 4)
    expected = sorted((i, 1 + i % 3, "b") for i in range(100, 104))
    # the old version's files are still in the directory: only the log says which are current
    assert len(data_files(loc)) > 4
    assert spark_rows(spark, loc) == expected
    assert arrow_rows(loc) == expected
    assert sorted((r["id"], r["month"], r["tag"]) for r in spark.table(out.table).collect()) == (
        expected
    )
    assert arrow_rows(loc, 0) == sorted((i, 1 + i % 3, "a") for i in range(10))
    info = {
        r["col_name"]: r["data_type"] for r in spark.sql(f"DESCRIBE EXTENDED {out.table}").collect()
    }
    assert info["Provider"].lower() == "delta"
    # timestamps: INT64 microseconds, adjusted to UTC (not INT96), read back exactly
    f = data_files(loc)[0]
    footer = pq.ParquetFile(f).schema
    col = footer.column(footer.names.index("at"))
    assert col.physical_type == "INT64"
    assert "isAdjustedToUTC=true, timeUnit=microseconds" in str(col.logical_type)
    t = read_table_arrow(loc)
    assert str(t.schema.field("at").type) == "timestamp[us, tz=UTC]"
    assert min(t["at"].to_pylist()) == T0 + dt.timedelta(seconds=100)


def test_append_retried_by_the_same_run_adds_rows_once(spark, tmp_path):
    out = OutputSpec(table="delta_app", partition_by=["month"], mode="append")
    wh = tmp_path / "wh"
    v1 = txn_version_of("2026-12-01T10:00:00.000+00:00")
    txn = {"pipeline": "p", "txn_version": v1}
    a = write_table(spark, frame(spark, range(6), "a"), out, wh, "r1", **txn)
    again = write_table(spark, frame(spark, range(6), "a"), out, wh, "r1", **txn)
    assert (a["version"], a["rows"], a["rows_written"]) == (0, 6, 6)
    assert (again["version"], again["rows"], again["rows_written"]) == (0, 6, 0)
    later = {"pipeline": "p", "txn_version": txn_version_of("2026-12-01T10:00:00.001+00:00")}
    b = write_table(spark, frame(spark, range(6, 9), "b"), out, wh, "r2", **later)
    assert (b["version"], b["rows"], b["rows_written"]) == (1, 9, 3)
    loc = table_location(wh, out.table)
    assert len(spark_rows(spark, loc)) == 9 and arrow_rows(loc) == spark_rows(spark, loc)
    # another pipeline's transactions are its own
    other = write_table(spark, frame(spark, [50], "c"), out, wh, "r3", pipeline="q", txn_version=v1)
    assert other["rows_written"] == 1 and other["rows"] == 10


def test_a_write_that_fails_midway_leaves_the_previous_version(spark, tmp_path):
    from pyspark.sql import functions as F
    from pyspark.sql.types import LongType

    out = OutputSpec(table="delta_fail", partition_by=["month"])
    wh = tmp_path / "wh"
    good = write_table(spark, frame(spark, range(20), "good"), out, wh, "r1")
    loc = table_location(wh, out.table)
    before = spark_rows(spark, loc)
    files_before = len(data_files(loc))

    df = frame(spark, range(1000, 1400), "bad").repartition(4)
    last = df.rdd.getNumPartitions() - 1

    @F.udf(LongType())
    def boom(pid, x):
        if pid == last:
            raise RuntimeError("killed mid-write")
        return x

    failing = df.withColumn("id", boom(F.spark_partition_id(), F.col("id")))
    with pytest.raises(Exception, match="killed mid-write"):  # after the task's retries
        write_table(spark, failing, out, wh, "r2")
    # the other partitions' files were written, and are not part of the table
    assert len(data_files(loc)) > files_before
    assert spark_rows(spark, loc) == before
    assert arrow_rows(loc) == before
    from rayline.outputs import delta_table

    assert delta_table(loc).version() == good["version"]


def quality_like_dirs(spark, tmp_path, ids, tag):
    """Parquet files laid out as the quality stage leaves its kept rows: <base>/kind=.../month=."""
    base = tmp_path / f"stage-{tag}"
    df = frame(spark, ids, tag)
    df.write.partitionBy("month").parquet(str(base / "kind=clean"))
    return [str(base / "kind=clean")], df


def test_link_table_commits_the_files_without_rewriting_them(spark, tmp_path):
    out = OutputSpec(table="delta_link", partition_by=["month"])
    wh = tmp_path / "wh"
    dirs, df = quality_like_dirs(spark, tmp_path, range(30), "a")
    first = link_table(spark, dirs, df.schema, out, wh, "r1", df=df)
    dirs2, df2 = quality_like_dirs(spark, tmp_path, range(200, 205), "b")
    second = link_table(spark, dirs2, df2.schema, out, wh, "r2", df=df2)
    loc = table_location(wh, out.table)
    assert (first["version"], second["version"]) == (0, 1)
    assert (first["rows"], second["rows"]) == (30, 5)
    expected = sorted((i, 1 + i % 3, "b") for i in range(200, 205))
    assert spark_rows(spark, loc) == expected == arrow_rows(loc)
    assert spark.table(out.table).count() == 5
    # the same files, linked: no second copy of the data
    src = sorted(f for f in Path(dirs2[0]).rglob("*.parquet"))
    linked = [f for f in data_files(loc) if any(f.name.endswith(s.name) for s in src)]
    assert linked and all(f.stat().st_nlink >= 2 for f in linked)

    app = out.model_copy(update={"mode": "append"})
    txn = {"pipeline": "p", "txn_version": 1_000}
    dirs3, df3 = quality_like_dirs(spark, tmp_path, range(300, 303), "c")
    a = link_table(spark, dirs3, df3.schema, app, wh, "r3", **txn)
    retry = link_table(spark, dirs3, df3.schema, app, wh, "r3", **txn)
    assert (a["version"], a["rows"], a["rows_written"]) == (2, 8, 3)
    assert (retry["version"], retry["rows"], retry["rows_written"]) == (2, 8, 0)
    assert len(arrow_rows(loc)) == 8 == len(spark_rows(spark, loc))


def test_an_older_plain_parquet_table_is_replaced_or_converted(spark, tmp_path, caplog):
    wh = tmp_path / "wh"
    for mode, expect in (("overwrite", 3), ("append", 10 + 3)):
        out = OutputSpec(table=f"delta_legacy_{mode}", partition_by=["month"], mode=mode)
        loc = Path(table_location(wh, out.table))
        frame(spark, range(10), "old").write.partitionBy("month").parquet(str(loc))
        (loc / "_rayline_schema.json").write_text(
            json.dumps({"columns": [["id", "bigint"], ["month", "int"]], "partition_by": ["month"]})
        )
        spark.sql(f"DROP TABLE IF EXISTS {out.table}")
        spark.catalog.createTable(out.table, path=str(loc), source="parquet")
        with caplog.at_level("WARNING", logger="rayline"):
            res = write_table(spark, frame(spark, range(500, 503), "new"), out, wh, "r1")
        assert "plain-Parquet table" in caplog.text
        assert res["rows"] == expect == len(arrow_rows(str(loc)))
        assert spark.table(out.table).count() == expect
        if mode == "overwrite":  # the old files are gone, not just unreferenced
            assert len(data_files(loc)) == len(
                spark.read.format("delta").load(str(loc)).inputFiles()
            )


def test_schema_and_partitioning_change_with_overwrite_and_append(spark, tmp_path):
    from pyspark.sql import functions as F

    wh = tmp_path / "wh"
    out = OutputSpec(table="delta_evolve", partition_by=["month"])
    write_table(spark, frame(spark, range(5), "a"), out, wh, "r1")
    # overwrite: another partitioning, a new column, a dropped one
    wider = frame(spark, range(10, 13), "b").withColumn("extra", F.lit(1.5)).drop("at")
    res = write_table(spark, wider, out.model_copy(update={"partition_by": ["tag"]}), wh, "r2")
    loc = table_location(wh, out.table)
    t = read_table_arrow(loc)
    assert res["version"] == 1 and sorted(t.column_names) == ["extra", "id", "month", "tag"]
    assert sorted(t["id"].to_pylist()) == [10, 11, 12]
    assert spark.read.format("delta").load(loc).count() == 3
    # append with one more column: merged into the schema, older rows get nulls
    more = wider.withColumn("note", F.lit("x"))
    app = out.model_copy(update={"partition_by": ["tag"], "mode": "append"})
    res = write_table(spark, more, app, wh, "r3", pipeline="p", txn_version=5)
    again = write_table(spark, more, app, wh, "r3", pipeline="p", txn_version=5)
    assert (res["version"], res["rows"], res["rows_written"]) == (2, 6, 3)
    assert (again["version"], again["rows"], again["rows_written"]) == (2, 6, 0)
    t = read_table_arrow(loc)
    assert sorted(t["note"].to_pylist(), key=str) == [None, None, None, "x", "x", "x"]


def test_a_resumed_run_appends_its_rows_once_and_names_the_versions(
    spark, write_csv, make_spec, monkeypatch, tmp_path
):
    """The run fails after its curated append committed (the quarantine table's write fails):
    resuming it publishes again with the same transaction version, which Delta skips; a new run
    appends. The run record and the lineage events name the versions."""
    import threading

    from rayline import runner
    from rayline.outputs import is_delta_table
    from rayline.runner import RunFailed, run_pipeline

    from .test_stages import adults_stages, people_sources

    table = f"delta_resume_{tmp_path.name[-8:]}"
    spec = make_spec(
        people_sources(write_csv),
        adults_stages(severity="quarantine"),
        outputs={"curated": {"table": table, "mode": "append"}},
    )
    loc = table_location(spec.warehouse, table)
    real = runner.write_table

    def quarantine_fails(s, df, out, warehouse, run_id, **kw):
        if out.table != table:
            for _ in range(600):  # once the curated append has committed
                if is_delta_table(loc):
                    break
                threading.Event().wait(0.1)
            raise OSError("disk full")
        return real(s, df, out, warehouse, run_id, **kw)

    monkeypatch.setattr(runner, "write_table", quarantine_fails)
    with pytest.raises(RunFailed, match="disk full") as e:
        run_pipeline(spec, spark=spark)
    monkeypatch.setattr(runner, "write_table", real)
    assert len(read_table_arrow(loc)) == 5  # committed before the run failed

    resumed = run_pipeline(spec, spark=spark, resume=e.value.run_id)
    cur = resumed.record["outputs"]["curated"]
    assert (cur["version"], cur["rows"], cur["rows_written"]) == (0, 5, 0)
    assert len(read_table_arrow(loc)) == 5

    later = run_pipeline(spec, spark=spark)
    cur = later.record["outputs"]["curated"]
    assert (cur["version"], cur["rows"], cur["rows_written"]) == (1, 10, 5)
    events = [
        json.loads(x)
        for x in Path(later.run_dir, "lineage", "events.jsonl").read_text().splitlines()
    ]
    published = next(
        e for e in events if e["job"]["name"].endswith(".publish") and e["eventType"] == "COMPLETE"
    )
    versions = {o["name"]: o["facets"]["version"]["datasetVersion"] for o in published["outputs"]}
    assert versions[loc] == "1"
