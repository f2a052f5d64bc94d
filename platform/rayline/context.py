"""The run context handed to every stage: the Spark session, the spec, the run's directory,
its sources (read once, cached) and the parts of the quarantine table."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from . import sources as src
from .config import PipelineSpec
from .lineage import LineageLog
from .runstore import RunStore
from .storage import Loc, spark_path

__all__ = ["RunContext", "StageError", "QUARANTINE_COLUMNS"]

log = logging.getLogger("rayline")

# Columns the quarantine table adds to the data columns.
REASONS = "_rayline_reasons"
QUARANTINE_COLUMNS = (REASONS, "_rayline_stage", "_rayline_source", "_rayline_raw")


class StageError(RuntimeError):
    """A stage failed for a reason in the data or the spec; the message names what."""

    def __init__(self, stage: str, message: str) -> None:
        super().__init__(f"stage {stage!r}: {message}")
        self.stage = stage


@dataclass
class RunContext:
    spark: Any
    spec: PipelineSpec
    run_id: str
    run_dir: Loc
    store: RunStore
    started_at: datetime
    code_version: str
    lineage: LineageLog
    accepted: dict[str, Any] = field(default_factory=dict)  # source -> StructType
    source_paths: dict[str, list[str]] = field(default_factory=dict)
    source_fingerprints: dict[str, str] = field(default_factory=dict)
    source_rows: dict[str, int] = field(default_factory=dict)  # rows read, malformed included
    quarantine_parts: list[tuple[str, Any]] = field(default_factory=list)
    # source -> (columns to drop, (name, type) of columns to add as null) after reading
    reshape: dict[str, tuple[list[str], list[tuple[str, str]]]] = field(default_factory=dict)
    stage: str = ""
    _raw: dict[str, Any] = field(default_factory=dict)
    _keys: dict[tuple[str, str], Any] = field(default_factory=dict)

    # -- sources ----------------------------------------------------------------------------

    def paths(self, name: str) -> list[str]:
        if name not in self.source_paths:
            paths = src.resolve_paths(name, self.spec.sources[name])
            self.source_paths[name] = paths
            self.source_fingerprints[name] = src.fingerprint(paths)
        return self.source_paths[name]

    def schema_of(self, name: str) -> Any:
        """The accepted schema of a source (the contract, or inferred if there is none)."""
        if name not in self.accepted:
            from pyspark.sql.types import _parse_datatype_string

            spec = self.spec.sources[name]
            if spec.columns:
                ddl = ", ".join(f"`{c.name}` {c.type}" for c in spec.columns)
                self.accepted[name] = _parse_datatype_string(ddl)
            else:
                self.accepted[name] = src.infer_schema(self.spark, name, spec, self.paths(name))
        return self.accepted[name]

    def raw(self, name: str) -> Any:
        """A source read with its accepted schema, malformed lines kept; cached, read once."""
        if name not in self._raw:
            from pyspark.sql import functions as F

            df = src.read_source(
                self.spark, name, self.spec.sources[name], self.paths(name), self.schema_of(name)
            )
            drop, add = self.reshape.get(name, ([], []))
            if drop:
                df = df.drop(*drop)
            for col, typ in add:
                df = df.withColumn(col, F.lit(None).cast(typ))
            self._raw[name] = df.cache()
        return self._raw[name]

    def source(self, name: str) -> Any:
        """The well-formed rows of a source (lazy)."""
        from pyspark.sql import functions as F

        return self.raw(name).where(F.col(src.CORRUPT).isNull()).drop(src.CORRUPT)

    def malformed(self, name: str) -> Any:
        """The lines of a source that did not parse, as quarantine rows."""
        from pyspark.sql import functions as F

        return (
            self.raw(name)
            .where(F.col(src.CORRUPT).isNotNull())
            .select(
                F.array(F.lit("malformed")).alias(REASONS),
                F.lit("read").alias("_rayline_stage"),
                F.lit(name).alias("_rayline_source"),
                F.col(src.CORRUPT).alias("_rayline_raw"),
            )
        )

    def keys_of(self, name: str, column: str) -> Any:
        """The distinct non-null values of a source's column (one column, ``k``); cached and
        computed once per run, so that a streaming job's micro-batches join with the stored set
        instead of recomputing it (a shuffle) every batch."""
        if (name, column) not in self._keys:
            from pyspark.sql import functions as F

            keys = self.source(name).select(F.col(f"`{column}`").alias("k"))
            self._keys[(name, column)] = keys.where(F.col("k").isNotNull()).distinct().cache()
        return self._keys[(name, column)]

    def release(self) -> None:
        for df in [*self._raw.values(), *self._keys.values()]:
            with contextlib.suppress(Exception):  # the session may already be gone
                df.unpersist()
        self._raw.clear()
        self._keys.clear()

    # -- persistence ------------------------------------------------------------------------

    def stage_dir(self, stage: str | None = None) -> Loc:
        return self.run_dir / "stages" / (stage or self.stage)

    def checkpoint(self, df: Any, name: str, partition_by: list[str] | None = None) -> Any:
        """Write ``df`` as Parquet under the stage's directory and return it read back."""
        path = spark_path(self.stage_dir() / name)
        w = df.write.mode("overwrite")  # replaces what an earlier attempt left
        if partition_by:
            w = w.partitionBy(*partition_by)
        w.parquet(path)
        return self.spark.read.parquet(path)

    def progress(self, message: str) -> None:
        log.info("[%s] %s", self.stage or self.spec.name, message)
