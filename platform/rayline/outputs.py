"""Writing output tables: Parquet under the warehouse, visible only once complete, registered
in the Spark catalog.

A table is first written to ``<warehouse>/_staging/<table>-<run_id>``; only when Spark's job has
succeeded is it renamed into ``<warehouse>/<table>`` (overwrite: the old directory is swapped out
by two renames, so a reader sees the old table, briefly none, or the new one, never a part;
append: the new files are moved in). A failed or interrupted run leaves its
staging directory behind, never a partial table.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from .config import OutputSpec

__all__ = ["write_table", "table_path"]


SCHEMA_FILE = "_rayline_schema.json"


def table_path(warehouse: str | os.PathLike[str], table: str) -> Path:
    return Path(warehouse).resolve() / table.replace(".", "/")


def _move_files_into(src: Path, dst: Path, tag: str) -> None:
    for f in src.rglob("*"):
        if f.is_file() and not f.name.startswith(("_", ".")):
            target = dst / f.relative_to(src)
            target = target.with_name(f"{tag}-{target.name}")
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(f, target)


def write_table(
    spark: Any, df: Any, out: OutputSpec, warehouse: str | os.PathLike[str], run_id: str
) -> dict[str, Any]:
    """Write ``df`` as the table ``out.table`` and register it; returns path and row count."""
    wh = Path(warehouse).resolve()
    final = table_path(wh, out.table)
    staging = wh / "_staging" / f"{out.table}-{run_id}"
    if staging.exists():
        shutil.rmtree(staging)
    missing = [c for c in out.partition_by if c not in df.columns]
    if missing:
        raise ValueError(
            f"output {out.table!r}: partition column(s) {missing} not in the data; "
            f"available: {sorted(df.columns)}"
        )
    w = df.write.mode("overwrite").format("parquet")
    if out.partition_by:
        w = w.partitionBy(*out.partition_by)
    w.save(str(staging))
    # The column types, for readers that see partition values only as directory names.
    (staging / SCHEMA_FILE).write_text(
        json.dumps(
            {
                "columns": [[f.name, f.dataType.simpleString()] for f in df.schema.fields],
                "partition_by": out.partition_by,
            }
        )
    )

    final.parent.mkdir(parents=True, exist_ok=True)
    if out.mode == "append" and final.exists():
        _move_files_into(staging, final, run_id)
        os.replace(staging / SCHEMA_FILE, final / SCHEMA_FILE)
        shutil.rmtree(staging)
    else:
        old = wh / "_staging" / f".old-{out.table}-{run_id}"
        if final.exists():
            os.replace(final, old)
        os.replace(staging, final)
        if old.exists():
            shutil.rmtree(old, ignore_errors=True)
    rows = spark.read.parquet(str(final)).count()

    # Register (or re-register) as an external table over the directory.
    if "." in out.table:
        spark.sql(f"CREATE DATABASE IF NOT EXISTS {out.table.split('.')[0]}")
    spark.sql(f"DROP TABLE IF EXISTS {out.table}")
    spark.catalog.createTable(out.table, path=str(final), source="parquet")
    if out.partition_by:
        spark.sql(f"MSCK REPAIR TABLE {out.table}")
    spark.sql(f"REFRESH TABLE {out.table}")
    return {"table": out.table, "path": str(final), "rows": rows, "partition_by": out.partition_by}
