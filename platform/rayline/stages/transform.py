"""Transform stage: declarative steps applied lazily to a Spark DataFrame.

Each step checks the columns it names before Spark sees them, so a typo fails with the stage,
the step and the column, not a Spark stack trace.
"""

from __future__ import annotations

from typing import Any

from ..config import (
    CastStep,
    DedupeStep,
    DeriveStep,
    DropStep,
    FillNullStep,
    FilterStep,
    JoinStep,
    QualityStage,
    RenameStep,
    SelectStep,
    TimestampStep,
    TransformStage,
    UniqueRule,
)
from ..context import RunContext, StageError
from ..sources import source_bytes

__all__ = ["run", "apply_steps", "cluster_hint"]


def _need(df: Any, cols: list[str], where: str) -> None:
    have = set(df.columns)
    missing = [c for c in cols if c not in have]
    if missing:
        raise ValueError(f"{where}: unknown column(s) {missing}; available: {sorted(have)}")


def _sql_error(where: str, err: Exception) -> ValueError:
    msg = str(err).splitlines()[0]
    return ValueError(f"{where}: {msg}")


def _apply(
    df: Any,
    step: Any,
    where: str,
    source: Any,
    cluster_by: list[str] | None = None,
    input_bytes: int | None = None,
) -> Any:
    from pyspark.errors import AnalysisException, ParseException
    from pyspark.sql import functions as F
    from pyspark.sql.window import Window

    try:
        if isinstance(step, SelectStep):
            _need(df, step.columns, where)
            return df.select(*[F.col(f"`{c}`") for c in step.columns])
        if isinstance(step, DropStep):
            _need(df, step.columns, where)
            return df.drop(*step.columns)
        if isinstance(step, RenameStep):
            _need(df, list(step.columns), where)
            return df.withColumnsRenamed(step.columns)
        if isinstance(step, CastStep):
            _need(df, list(step.columns), where)
            return df.withColumns({c: F.col(f"`{c}`").cast(t) for c, t in step.columns.items()})
        if isinstance(step, DeriveStep):
            for name, expr in step.columns.items():
                df = df.withColumn(name, F.expr(expr))
            return df
        if isinstance(step, FilterStep):
            return df.where(F.expr(step.condition))
        if isinstance(step, FillNullStep):
            _need(df, list(step.values), where)
            return df.fillna(dict(step.values))
        if isinstance(step, DedupeStep):
            _need(df, step.keys, where)
            if cluster_by:
                # One shuffle, by ``cluster_by`` (a subset of the keys), and one sort, by the keys
                # with ``cluster_by`` first: a window over ``cluster_by`` after this step (a
                # unique rule) then needs neither another shuffle nor another sort. Which row of
                # a group is kept is as arbitrary as with dropDuplicates, unless order_by says.
                keys = cluster_by + [k for k in step.keys if k not in cluster_by]
                order = (
                    [F.expr(step.order_by)] if step.order_by else [F.col(f"`{k}`") for k in keys]
                )
                w = Window.partitionBy(*[F.col(f"`{k}`") for k in keys]).orderBy(*order)
                return (
                    df.repartition(
                        _even_partitions(df, input_bytes), *[F.col(f"`{c}`") for c in cluster_by]
                    )
                    .withColumn("_rayline_rn", F.row_number().over(w))
                    .where("_rayline_rn = 1")
                    .drop("_rayline_rn")
                )
            if step.order_by is None:
                return df.dropDuplicates(step.keys)
            w = Window.partitionBy(*step.keys).orderBy(F.expr(step.order_by))
            return (
                df.withColumn("_rayline_rn", F.row_number().over(w))
                .where("_rayline_rn = 1")
                .drop("_rayline_rn")
            )
        if isinstance(step, JoinStep):
            other = source(step.source)
            right_on = step.right_on or step.on
            _need(df, step.on, where)
            _need(other, right_on, f"{where} (source {step.source!r})")
            cols = step.columns or [c for c in other.columns if c not in right_on]
            _need(other, cols, f"{where} (source {step.source!r})")
            right = other.select(
                *[F.col(f"`{r}`").alias(c) for c, r in zip(step.on, right_on, strict=True)],
                *[F.col(f"`{c}`").alias(step.prefix + c) for c in cols],
            )
            clash = sorted(set(step.prefix + c for c in cols) & (set(df.columns) - set(step.on)))
            if clash:
                raise ValueError(
                    f"{where}: joined columns {clash} already exist; set a prefix or columns"
                )
            if step.broadcast:
                right = F.broadcast(right)
            return df.join(right, on=step.on, how=step.how)
        if isinstance(step, TimestampStep):
            if step.from_parts is not None:
                p = step.from_parts
                y, mo, d, h, mi, sec = (
                    F.expr(p[k]) if k in p else F.lit(0)
                    for k in ("year", "month", "day", "hour", "minute", "second")
                )
                tz = F.lit(step.timezone) if step.timezone else None
                ts = F.make_timestamp(y, mo, d, h, mi, sec, tz)
            else:
                _need(df, [step.from_string or ""], where)
                c = F.col(f"`{step.from_string}`")
                ts = F.to_timestamp(c, step.format) if step.format else F.to_timestamp(c)
            return df.withColumn(step.column, ts)
    except (AnalysisException, ParseException) as e:
        raise _sql_error(where, e) from None
    raise TypeError(f"{where}: unsupported step {step!r}")


# Input bytes per shuffle partition and core that the dedupe's shuffle aims at (see below).
BYTES_PER_PARTITION = 128 * 1024 * 1024


def _even_partitions(df: Any, input_bytes: int | None) -> int:
    """The partitions of the dedupe's shuffle: a multiple of the cluster's cores, one per core
    for each ``BYTES_PER_PARTITION`` of input per core (at most spark.sql.shuffle.partitions,
    rounded up to a multiple of the cores). A shuffle given its number of partitions is exempt
    from adaptive execution's coalescing, which, aiming at as many partitions as cores, merged
    4 even partitions into 3 uneven ones (1/4, 1/4, 1/2 of the rows): on 2 cores the half ran
    alone after the two quarters. Hash partitioning keeps the partitions even, each core runs
    its share, and the stage writes one file per partition and output directory (fewer, larger
    files for the reads after it)."""
    spark = df.sparkSession
    cores = max(1, int(spark.sparkContext.defaultParallelism))
    n = int(spark.conf.get("spark.sql.shuffle.partitions") or cores)
    most = max(cores, -(-n // cores) * cores)
    if input_bytes is None:
        return most
    waves = max(1, -(-input_bytes // (cores * BYTES_PER_PARTITION)))
    return min(most, cores * waves)


def apply_steps(
    df: Any,
    steps: list[Any],
    source: Any,
    stage: str = "transform",
    cluster_by: list[str] | None = None,
    input_bytes: int | None = None,
) -> Any:
    """Apply ``steps`` lazily; ``source(name)`` gives the DataFrame of a joined source.

    ``cluster_by``: columns a later window partitions by (see :func:`cluster_hint`); the last
    dedupe step whose keys include them all shuffles by them, into partitions sized by
    ``input_bytes`` (the input's size on disk, when known)."""
    last = None
    if cluster_by:
        dedupes = [
            i
            for i, s in enumerate(steps)
            if isinstance(s, DedupeStep) and set(cluster_by) <= set(s.keys)
        ]
        last = dedupes[-1] if dedupes else None
    for i, step in enumerate(steps):
        hint = cluster_by if i == last else None
        df = _apply(df, step, f"steps[{i}] ({step.op})", source, hint, input_bytes)
    return df


def cluster_hint(cfg: TransformStage, ctx: RunContext) -> list[str] | None:
    """The columns of the first unique rule of the quality stage right after this transform
    stage, when a dedupe step's keys include them all: deduplicating by a shuffle on those
    columns serves the rule's window too (one shuffle and one sort of the rows instead of two
    each). None otherwise."""
    stages = ctx.spec.stages
    at = next((i for i, s in enumerate(stages) if s is cfg), None)
    after = stages[at + 1] if at is not None and at + 1 < len(stages) else None
    if not isinstance(after, QualityStage):
        return None
    dedupe_keys = [set(s.keys) for s in cfg.steps if isinstance(s, DedupeStep)]
    for rule in after.rules:
        if isinstance(rule, UniqueRule) and any(set(rule.columns) <= k for k in dedupe_keys):
            return list(rule.columns)
    return None


def run(df: Any, cfg: TransformStage, ctx: RunContext) -> tuple[Any, dict[str, Any]]:
    """Apply the stage's steps to its input source (or the previous stage's output)."""
    start = ctx.source(cfg.input) if cfg.input else df
    if start is None:
        raise StageError(ctx.stage, "no input: name an input source")
    try:
        size = source_bytes(ctx.paths(cfg.input)) if cfg.input else None
        out = apply_steps(start, cfg.steps, ctx.source, ctx.stage, cluster_hint(cfg, ctx), size)
        _ = out.schema  # analyse now: a bad expression fails here, naming its step
    except ValueError as e:
        raise StageError(ctx.stage, str(e)) from None
    report = {
        "input": cfg.input or "previous stage",
        "steps": [s.model_dump() for s in cfg.steps],
        "columns": [{"name": f.name, "type": f.dataType.simpleString()} for f in out.schema.fields],
    }
    return out, report
