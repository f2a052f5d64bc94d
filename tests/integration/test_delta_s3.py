"""Delta tables in an S3 warehouse (a real S3 server: scripts/objectstore.sh), written by the
Spark-on-Ray session through Hadoop's S3A connector (the executors write the data files, with
the credentials of their own environment) and read back by Spark and by delta-rs.

Skipped (with the reason) when no object store is configured: the AWS_* variables must be set
before the shared session starts (scripts/test.sh does; or ``eval "$(scripts/objectstore.sh
env)"`` first).
"""

from __future__ import annotations

import datetime as dt
import os
import uuid

import pyarrow.parquet as pq
import pytest

from rayline.config import OutputSpec
from rayline.outputs import (
    delta_table,
    link_table,
    read_table_arrow,
    table_location,
    write_table,
)
from rayline.storage import ObjectPath, location, remove_tree, spark_path

from .test_delta import T0, arrow_rows, frame, quality_like_dirs, spark_rows

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not os.environ.get("AWS_ENDPOINT_URL") or not os.environ.get("RAYLINE_S3_BUCKET"),
        reason="no object store: start scripts/objectstore.sh and eval its `env` (test.sh does)",
    ),
]


@pytest.fixture
def warehouse():
    wh = f"s3://{os.environ['RAYLINE_S3_BUCKET']}/tests/delta-{uuid.uuid4().hex[:12]}/warehouse"
    yield wh
    remove_tree(location(wh))


def data_objects(loc: str) -> list[ObjectPath]:
    root = location(loc)
    assert isinstance(root, ObjectPath)
    return [o for o in root.rglob("*.parquet") if "_delta_log" not in o.parts]


def test_delta_table_on_s3_written_through_s3a_and_read_by_delta_rs(spark, warehouse, tmp_path):
    out = OutputSpec(table="s3_delta", partition_by=["month"])
    first = write_table(spark, frame(spark, range(12), "a"), out, warehouse, "r1")
    second = write_table(spark, frame(spark, range(100, 105), "b"), out, warehouse, "r2")
    loc = table_location(warehouse, out.table)
    assert loc.startswith("s3://") and first["path"] == loc
    assert (first["version"], second["version"]) == (0, 1)
    expected = sorted((i, 1 + i % 3, "b") for i in range(100, 105))
    assert spark_rows(spark, spark_path(loc)) == expected == arrow_rows(loc)
    assert sorted(r["id"] for r in spark.table(out.table).collect()) == list(range(100, 105))
    assert arrow_rows(loc, 0) == sorted((i, 1 + i % 3, "a") for i in range(12))
    assert len(data_objects(loc)) > 3  # version 0's objects are still there, unreferenced

    # the footer of an object the executors wrote: INT64 microseconds, not INT96
    obj = data_objects(loc)[0]
    footer = pq.ParquetFile(obj.fs_path, filesystem=obj.fs).schema
    col = footer.column(footer.names.index("at"))
    assert col.physical_type == "INT64"
    assert "timeUnit=microseconds" in str(col.logical_type)
    assert min(read_table_arrow(loc)["at"].to_pylist()) == T0 + dt.timedelta(seconds=100)

    # an append retried by the same run adds its rows once
    app = out.model_copy(update={"mode": "append"})
    txn = {"pipeline": "p", "txn_version": 7}
    a = write_table(spark, frame(spark, [200, 201], "c"), app, warehouse, "r3", **txn)
    retry = write_table(spark, frame(spark, [200, 201], "c"), app, warehouse, "r3", **txn)
    assert (a["version"], a["rows"], retry["version"], retry["rows"]) == (2, 7, 2, 7)
    assert len(arrow_rows(loc)) == 7

    # files a stage wrote locally, added to the S3 table by one commit (copied, not rewritten)
    dirs, df = quality_like_dirs(spark, tmp_path, range(300, 310), "d")
    linked = link_table(spark, dirs, df.schema, out, warehouse, "r4", df=df)
    assert (linked["version"], linked["rows"]) == (3, 10)
    assert arrow_rows(loc) == sorted((i, 1 + i % 3, "d") for i in range(300, 310))
    assert spark_rows(spark, spark_path(loc)) == arrow_rows(loc)
    assert delta_table(loc).version() == 3


def test_no_secret_in_the_sessions_configuration(spark):
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    key_id = os.environ["AWS_ACCESS_KEY_ID"]
    conf = dict(spark.sparkContext.getConf().getAll())
    assert not [k for k, v in conf.items() if secret in v or key_id in v]
    assert conf["spark.hadoop.fs.s3a.endpoint"] == os.environ["AWS_ENDPOINT_URL"]
    assert (
        "EnvironmentVariableCredentialsProvider"
        in conf["spark.hadoop.fs.s3a.aws.credentials.provider"]
    )
