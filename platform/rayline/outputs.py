"""Writing output tables: Parquet under the warehouse, visible only once complete, registered
in the Spark catalog.

A table is first written to ``<warehouse>/_staging/<table>-<run_id>``; only when Spark's job has
succeeded is it renamed into ``<warehouse>/<table>`` (overwrite: the old directory is swapped out
by two renames, so a reader sees the old table, briefly none, or the new one, never a part;
append: the new files are moved in). A failed or interrupted run leaves its
staging directory behind, never a partial table.

:func:`link_table` publishes Parquet files a stage already wrote (the quality stage's kept rows,
partitioned as the table is) the same way, hard-linking them into the staging directory instead
of writing them again (copying where links are not possible).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from .config import OutputSpec

__all__ = ["write_table", "link_table", "table_path"]


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


def _staging(wh: Path, out: OutputSpec, run_id: str, columns: list[str]) -> Path:
    staging = wh / "_staging" / f"{out.table}-{run_id}"
    if staging.exists():
        shutil.rmtree(staging)
    missing = [c for c in out.partition_by if c not in columns]
    if missing:
        raise ValueError(
            f"output {out.table!r}: partition column(s) {missing} not in the data; "
            f"available: {sorted(columns)}"
        )
    return staging


def write_table(
    spark: Any, df: Any, out: OutputSpec, warehouse: str | os.PathLike[str], run_id: str
) -> dict[str, Any]:
    """Write ``df`` as the table ``out.table`` and register it; returns path and row count."""
    wh = Path(warehouse).resolve()
    staging = _staging(wh, out, run_id, list(df.columns))
    w = df.write.mode("overwrite").format("parquet")
    if out.partition_by:
        w = w.partitionBy(*out.partition_by)
    w.save(str(staging))
    return _commit(spark, wh, staging, df.schema, out, run_id, None)


def link_table(
    spark: Any,
    dirs: list[str],
    schema: Any,
    out: OutputSpec,
    warehouse: str | os.PathLike[str],
    run_id: str,
    rows: int | None = None,
) -> dict[str, Any]:
    """Publish the Parquet files under ``dirs`` (each laid out as the table: partition
    directories of ``out.partition_by`` below it, or the files themselves) as the table
    ``out.table``, atomically like :func:`write_table`, and register it. The files are
    hard-linked (copied across file systems), named ``<i>-<name>`` so that equal names from
    different directories stay apart; the directories are left as they are. ``rows``: their
    row count when known (else counted from the footers)."""
    wh = Path(warehouse).resolve()
    staging = _staging(wh, out, run_id, [f.name for f in schema.fields])
    staging.mkdir(parents=True)
    for i, d in enumerate(dirs):
        src = Path(d)
        for f in src.rglob("*"):
            if not f.is_file() or f.name.startswith(("_", ".")):
                continue
            rel = f.relative_to(src)
            if len(rel.parts) - 1 != len(out.partition_by):
                raise ValueError(f"output {out.table!r}: {f} is not laid out as the table")
            target = staging / rel.parent / f"{i}-{rel.name}"
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(f, target)
            except OSError:
                shutil.copy2(f, target)
    (staging / "_SUCCESS").touch()  # as Spark's writer marks a complete output
    return _commit(spark, wh, staging, schema, out, run_id, rows)


def _commit(
    spark: Any,
    wh: Path,
    staging: Path,
    schema: Any,
    out: OutputSpec,
    run_id: str,
    rows: int | None,
) -> dict[str, Any]:
    """Move a complete staging directory into place and register the table."""
    final = table_path(wh, out.table)
    # The column types, for readers that see partition values only as directory names.
    (staging / SCHEMA_FILE).write_text(
        json.dumps(
            {
                "columns": [[f.name, f.dataType.simpleString()] for f in schema.fields],
                "partition_by": out.partition_by,
            }
        )
    )

    final.parent.mkdir(parents=True, exist_ok=True)
    if out.mode == "append" and final.exists():
        _move_files_into(staging, final, run_id)
        os.replace(staging / SCHEMA_FILE, final / SCHEMA_FILE)
        shutil.rmtree(staging)
        rows = None  # the table's rows, not the run's
    else:
        old = wh / "_staging" / f".old-{out.table}-{run_id}"
        if final.exists():
            os.replace(final, old)
        os.replace(staging, final)
        if old.exists():
            shutil.rmtree(old, ignore_errors=True)
    if rows is None:
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
