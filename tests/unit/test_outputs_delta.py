"""rayline.outputs without Spark: locations, transaction versions, delta-rs options, the layout
of files link_table adds to a Delta commit."""

from __future__ import annotations

import pytest

from rayline import outputs
from rayline.config import OutputSpec


def test_table_location_is_a_path_or_a_uri(tmp_path):
    assert outputs.table_location(tmp_path, "db.t") == str(tmp_path.resolve() / "db" / "t")
    assert outputs.table_location("s3://bkt/wh/", "db.t") == "s3://bkt/wh/db/t"
    assert outputs.table_location("s3a://bkt/wh", "t") == "s3://bkt/wh/t"
    assert outputs.table_path(tmp_path, "t") == tmp_path.resolve() / "t"
    with pytest.raises(ValueError, match="not local"):
        outputs.table_path("s3://bkt/wh", "t")


def test_txn_version_is_the_run_start_in_ms_and_orders_runs():
    a = outputs.txn_version_of("2026-12-07T10:00:00.000+00:00")
    b = outputs.txn_version_of("2026-12-07T10:00:00.001+00:00")
    assert a == 1796637600000 and b == a + 1
    # the same run (a resumed attempt keeps started_at) has the same version
    assert outputs.txn_version_of("2026-12-07T10:00:00.000+00:00") == a


def test_storage_options_for_delta_rs_carry_no_secret():
    env = {
        "AWS_ENDPOINT_URL": "http://127.0.0.1:19333",
        "AWS_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "AKID",
        "AWS_SECRET_ACCESS_KEY": "s3cr3t",
    }
    opts = outputs.storage_options(env)
    assert opts["AWS_ENDPOINT_URL"] == "http://127.0.0.1:19333"
    assert opts["AWS_ALLOW_HTTP"] == "true"
    assert opts["AWS_REGION"] == "us-east-1"
    assert "s3cr3t" not in repr(opts) and "AKID" not in repr(opts)
    assert "AWS_ALLOW_HTTP" not in outputs.storage_options({"AWS_ENDPOINT_URL": "https://x"})
    assert outputs.storage_options({}) == {}


def test_files_of_reads_partition_values_from_spark_directory_names(tmp_path):
    base = tmp_path / "rows" / "kind=clean"
    for d in ("month=1", "month=12", "month=__HIVE_DEFAULT_PARTITION__"):
        (base / d).mkdir(parents=True)
        (base / d / "part-0.parquet").write_bytes(b"x" * 3)
        (base / d / ".part-0.parquet.crc").write_bytes(b"c")
    (base / "_SUCCESS").write_bytes(b"")
    (base / "_temporary" / "0").mkdir(parents=True)
    (base / "_temporary" / "0" / "part-9.parquet").write_bytes(b"t")
    files = outputs._files_of([str(base)], OutputSpec(table="t", partition_by=["month"]))
    got = sorted((f.part_dir, f.values["month"], f.size, f.name) for f in files)
    assert got == [
        ("month=1", "1", 3, "part-0.parquet"),
        ("month=12", "12", 3, "part-0.parquet"),
        ("month=__HIVE_DEFAULT_PARTITION__", None, 3, "part-0.parquet"),
    ]
    assert outputs._unescape("a%3Ab%2Fc%25") == "a:b/c%"
    with pytest.raises(ValueError, match="not laid out as the table"):
        outputs._files_of([str(base)], OutputSpec(table="t"))
    with pytest.raises(ValueError, match="not of column 'day'"):
        outputs._files_of([str(base)], OutputSpec(table="t", partition_by=["day"]))


def test_which_partition_types_are_linked_as_they_are():
    from pyspark.sql.types import (
        DateType,
        DoubleType,
        IntegerType,
        StringType,
        StructField,
        StructType,
        TimestampType,
    )

    schema = StructType(
        [
            StructField("m", IntegerType()),
            StructField("s", StringType()),
            StructField("d", DateType()),
            StructField("t", TimestampType()),
            StructField("x", DoubleType()),
        ]
    )
    assert (
        outputs._not_linkable(schema, OutputSpec(table="t", partition_by=["m", "s", "d"])) is None
    )
    why = outputs._not_linkable(schema, OutputSpec(table="t", partition_by=["m", "t", "x"]))
    assert why is not None and "timestamp" in why and "double" in why


def test_all_nullable_as_delta_stores_a_schema():
    from pyspark.sql.types import ArrayType, LongType, MapType, StringType, StructField, StructType

    schema = StructType(
        [
            StructField("id", LongType(), False),
            StructField("tags", ArrayType(StringType(), False), False),
            StructField(
                "m", MapType(StringType(), StructType([StructField("v", LongType(), False)]), False)
            ),
        ]
    )
    out = outputs._all_nullable(schema.jsonValue())
    assert StructType.fromJson(out) == StructType(
        [
            StructField("id", LongType(), True),
            StructField("tags", ArrayType(StringType(), True), True),
            StructField(
                "m", MapType(StringType(), StructType([StructField("v", LongType(), True)]), True)
            ),
        ]
    )


def test_catalog_locations_compare_with_and_without_the_file_scheme():
    assert outputs._same_location("file:/w/t", "/w/t/")
    assert outputs._same_location("s3a://b/w/t", "s3a://b/w/t")
    assert not outputs._same_location("file:/w/t", "/w/u")


def test_a_window_table_of_the_parquet_file_sink_is_converted_once(tmp_path):
    from rayline.streaming.job import _window_table_to_delta

    class FakeSpark:
        def __init__(self):
            self.sql_calls = []

        def sql(self, text):
            self.sql_calls.append(text)

    table = tmp_path / "windows"
    (table / "_spark_metadata").mkdir(parents=True)
    (table / "_spark_metadata" / "0").write_text("v1\n")
    (table / "part-0.parquet").write_bytes(b"x")
    spark = FakeSpark()
    _window_table_to_delta(spark, table, "windows")
    assert spark.sql_calls == [f"CONVERT TO DELTA parquet.`{table}`"]
    assert not (table / "_spark_metadata").exists()  # no reader takes it for the file list
    # a Delta table (or none yet) is left alone
    (table / "_delta_log").mkdir()
    _window_table_to_delta(spark, table, "windows")
    _window_table_to_delta(spark, tmp_path / "none", "none")
    assert len(spark.sql_calls) == 1
    # a sink log with no batch yet: nothing to convert, the log goes
    fresh = tmp_path / "fresh"
    (fresh / "_spark_metadata").mkdir(parents=True)
    _window_table_to_delta(spark, fresh, "fresh")
    assert len(spark.sql_calls) == 1 and not (fresh / "_spark_metadata").exists()
