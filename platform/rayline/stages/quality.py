"""Quality stage: evaluate all rules, keep clean rows, quarantine failing rows with reasons.

All row rules are evaluated in one Spark job that writes every row once, partitioned by what
happened to it (``clean``: no rule broken; ``warned``: only non-blocking rules broken;
``quarantined``) and, when the curated table is written from this stage's rows, by the curated
table's partition columns: the files of the clean and warned rows are then the curated table's
files, which publishing links into place instead of writing again. The counts per rule and the
dataset rules' inputs (row count, latest timestamps) are observed in the same job (no second
pass). The rows that broke a rule, a small part of the data, are read back and their rules
evaluated again for their reasons (the quarantine table's reasons and the failing-row samples):
row rules are deterministic functions of the row, the referential sets and, for ``unique``, the
other rows with the same key, all of which broke the rule too and are among them.
"""

from __future__ import annotations

import json
import weakref
from datetime import datetime
from typing import Any

from ..config import (
    AnalyticsStage,
    ExpressionRule,
    FreshnessRule,
    InSetRule,
    NotNullRule,
    QualityStage,
    RangeRule,
    ReferentialRule,
    RegexRule,
    RowCountRule,
    UniqueRule,
)
from ..context import REASONS, RunContext, StageError
from ..sources import source_bytes
from ..storage import location, remove_tree, spark_path

__all__ = ["run", "restore", "written_rows", "QualityFailed"]

# The partition column of the stage's rows: what happened to each row.
KIND = "_rayline_kind"
CLEAN, WARNED, QUARANTINED = "clean", "warned", "quarantined"
BROADCAST_LIMIT_BYTES = 64 * 1024 * 1024

# DataFrame of kept rows -> (directory of the stage's rows, its partition columns after KIND):
# set when the stage's clean and warned files can be published as they are.
_WRITTEN: weakref.WeakKeyDictionary[Any, tuple[str, list[str]]] = weakref.WeakKeyDictionary()


def written_rows(df: Any) -> tuple[list[str], list[str]] | None:
    """For a DataFrame a quality stage returned: the directories holding exactly its rows as
    Parquet files (the ``clean`` and ``warned`` partitions that exist) and the columns they are
    partitioned by below those directories; None for any other DataFrame."""
    try:
        info = _WRITTEN.get(df)
    except TypeError:  # not weakly referenceable: not a DataFrame
        return None
    if info is None:
        return None
    base, part_cols = info
    dirs = [f"{base}/{KIND}={k}" for k in (CLEAN, WARNED)]
    return [d for d in dirs if location(d).is_dir()], part_cols


class QualityFailed(StageError):
    """A ``fail`` rule (or a rule past its tolerance) stopped the run; ``report`` says which."""

    def __init__(self, stage: str, message: str, report: dict[str, Any]) -> None:
        super().__init__(stage, message)
        self.report = report


def _col(name: str) -> Any:
    from pyspark.sql import functions as F

    return F.col(f"`{name}`")


def _need(df: Any, cols: list[str], rule: str) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise ValueError(
            f"rule {rule!r}: unknown column(s) {missing}; available: {sorted(df.columns)}"
        )


def _row_flags(df: Any, cfg: QualityStage, ctx: RunContext) -> tuple[Any, dict[str, Any]]:
    """Add what the row rules need to ``df``; return it and rule name -> 'failed' Column."""
    from pyspark.sql import functions as F
    from pyspark.sql.window import Window

    flags: dict[str, Any] = {}
    for i, rule in enumerate(cfg.rules):
        if isinstance(rule, NotNullRule):
            _need(df, rule.columns, rule.name)
            cond = F.lit(False)
            for c in rule.columns:
                cond = cond | _col(c).isNull()
            flags[rule.name] = cond
        elif isinstance(rule, UniqueRule):
            _need(df, rule.columns, rule.name)
            cnt = f"_rayline_u{i}"
            df = df.withColumn(
                cnt, F.count(F.lit(1)).over(Window.partitionBy(*map(_col, rule.columns)))
            )
            keys_present = F.lit(True)
            for c in rule.columns:
                keys_present = keys_present & _col(c).isNotNull()
            flags[rule.name] = keys_present & (F.col(cnt) > 1)
        elif isinstance(rule, RangeRule):
            _need(df, [rule.column], rule.name)
            c = _col(rule.column)
            bad = F.lit(False)
            if rule.min is not None:
                bad = bad | ((c < rule.min) if rule.inclusive else (c <= rule.min))
            if rule.max is not None:
                bad = bad | ((c > rule.max) if rule.inclusive else (c >= rule.max))
            flags[rule.name] = F.coalesce(bad, F.lit(False))
        elif isinstance(rule, RegexRule):
            _need(df, [rule.column], rule.name)
            c = _col(rule.column).cast("string")
            flags[rule.name] = c.isNotNull() & ~c.rlike(f"^(?:{rule.pattern})$")
        elif isinstance(rule, InSetRule):
            _need(df, [rule.column], rule.name)
            c = _col(rule.column)
            flags[rule.name] = c.isNotNull() & ~c.isin(*rule.values)
        elif isinstance(rule, ReferentialRule):
            _need(df, [rule.column], rule.name)
            ref_col = rule.source_column or rule.column
            other = ctx.source(rule.source)
            if ref_col not in other.columns:
                raise ValueError(
                    f"rule {rule.name!r}: source {rule.source!r} has no column {ref_col!r}; "
                    f"available: {sorted(other.columns)}"
                )
            key = f"_rayline_r{i}"
            ref = ctx.keys_of(rule.source, ref_col).select(
                F.col("k").alias(key), F.lit(True).alias(f"{key}_hit")
            )
            if source_bytes(ctx.paths(rule.source)) <= BROADCAST_LIMIT_BYTES:
                ref = F.broadcast(ref)
            df = df.join(ref, _col(rule.column) == F.col(key), "left")
            flags[rule.name] = _col(rule.column).isNotNull() & F.col(f"{key}_hit").isNull()
        elif isinstance(rule, ExpressionRule):
            try:
                expr = F.expr(rule.expression)
                df.select(expr)  # analyse now: name the rule if the expression is wrong
            except Exception as e:  # noqa: BLE001 - Spark's parse/analysis errors
                raise ValueError(
                    f"rule {rule.name!r}: invalid expression {rule.expression!r}: "
                    f"{str(e).splitlines()[0]}"
                ) from None
            flags[rule.name] = ~F.coalesce(expr.cast("boolean"), F.lit(True))
        elif isinstance(rule, FreshnessRule):
            _need(df, [rule.column], rule.name)
        elif isinstance(rule, RowCountRule):
            pass
    return df, flags


def _any(conds: list[Any]) -> Any:
    from functools import reduce

    from pyspark.sql import functions as F

    return reduce(lambda a, b: a | b, conds) if conds else F.lit(False)


def _verdict(rule: Any, failed: int, checked: int) -> tuple[str, float]:
    fraction = failed / checked if checked else 0.0
    if failed == 0:
        return "passed", fraction
    if rule.severity == "warn":
        return "warned", fraction
    if fraction > rule.tolerance():
        return "failed", fraction
    return ("quarantined" if rule.severity == "quarantine" else "tolerated"), fraction


def _observed(cfg: QualityStage, flag_cols: list[str], quarantined: Any) -> list[Any]:
    """What the writing job observes: rows, quarantined rows, failures per row rule (its flag
    column), the latest value of each freshness rule's column."""
    from pyspark.sql import functions as F

    aggs = [F.count(F.lit(1)).alias("_rows"), F.sum(quarantined.cast("long")).alias("_q")]
    for i, c in enumerate(flag_cols):
        aggs.append(F.sum(F.col(c).cast("long")).alias(f"r{i}"))
    fresh = [r for r in cfg.rules if isinstance(r, FreshnessRule)]
    for j, r in enumerate(fresh):  # as microseconds: an observation returns Java objects
        aggs.append(F.max(F.unix_micros(_col(r.column).cast("timestamp"))).alias(f"f{j}"))
    return aggs


def _summarise(
    row: dict[str, Any], cfg: QualityStage, ctx: RunContext, row_rules: list[str]
) -> dict[str, Any]:
    """The report's rules from the observed metrics: per-rule failures and dataset rules."""
    from pyspark.sql.types import TimestampType

    fresh = [r for r in cfg.rules if isinstance(r, FreshnessRule)]
    total = int(row["_rows"] or 0)
    failed = {name: int(row[f"r{i}"] or 0) for i, name in enumerate(row_rules)}

    rules: list[dict[str, Any]] = []
    for rule in cfg.rules:
        entry: dict[str, Any] = {"rule": rule.name, "type": rule.type, "severity": rule.severity}
        if rule.name in failed:
            n = failed[rule.name]
            verdict, fraction = _verdict(rule, n, total)
            entry.update(checked=total, failed=n, fraction=fraction, verdict=verdict)
        elif isinstance(rule, RowCountRule):
            bad = (rule.min is not None and total < rule.min) or (
                rule.max is not None and total > rule.max
            )
            entry.update(
                checked=1,
                failed=int(bad),
                fraction=float(bad),
                observed=total,
                verdict=("warned" if rule.severity == "warn" else "failed") if bad else "passed",
            )
        elif isinstance(rule, FreshnessRule):
            micros = row.get(f"f{fresh.index(rule)}")
            # the datetime a query's result gives (local wall-clock time, no zone)
            latest = None if micros is None else TimestampType().fromInternal(int(micros))
            ref = datetime.fromisoformat(rule.reference) if rule.reference else ctx.started_at
            if latest is not None and latest.tzinfo is None and ref.tzinfo is not None:
                ref = ref.replace(tzinfo=None)  # Spark returns UTC wall-clock times
            if latest is not None and ref.tzinfo is None and latest.tzinfo is not None:
                latest = latest.replace(tzinfo=None)
            age = (ref - latest).total_seconds() if latest is not None else None
            bad = age is None or age > rule.max_age_seconds()
            entry.update(
                checked=1,
                failed=int(bad),
                fraction=float(bad),
                latest=str(latest),
                reference=ref.isoformat(),
                age_seconds=age,
                max_age_seconds=rule.max_age_seconds(),
                verdict=("warned" if rule.severity == "warn" else "failed") if bad else "passed",
            )
        rules.append(entry)
    return {"rows": total, "_quarantined": int(row.get("_q") or 0), "rules": rules}


def _samples(
    full: Any, names: list[str], n: int, data_cols: list[str]
) -> dict[str, list[dict[str, Any]]]:
    """Up to ``n`` failing rows of each rule in ``names``, in one job: the rows that broke any
    rule, one entry per broken rule, the first ``n`` per rule in the order of the data (as a
    ``limit`` per rule would pick them, without a job per rule)."""
    from pyspark.sql import functions as F
    from pyspark.sql.window import Window

    order = "_rayline_seq"
    failing = (
        full.where(F.size(F.col(REASONS)) > 0)
        .select(
            F.explode(F.col(REASONS)).alias("rule"),
            F.monotonically_increasing_id().alias(order),
            F.to_json(F.struct(*map(_col, data_cols))).alias("j"),
        )
        .where(F.col("rule").isin(*names))
    )
    w = Window.partitionBy("rule").orderBy(order)
    rows = (
        failing.withColumn("_rayline_n", F.row_number().over(w))
        .where(F.col("_rayline_n") <= n)
        .select("rule", order, "j")
        .collect()
    )
    out: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for r in sorted(rows, key=lambda r: r[order]):
        out[r["rule"]].append(json.loads(r["j"]))
    return out


def _rows_partitions(cfg: QualityStage, ctx: RunContext, data_cols: list[str]) -> list[str]:
    """The curated table's partition columns, when the curated table is this stage's rows (only
    analytics stages, which pass their input through, follow it): the rows are then written
    partitioned by them below the kind, as the curated table's files. [] otherwise."""
    stages = ctx.spec.stages
    at = next((i for i, st in enumerate(stages) if st is cfg), None)
    if at is None or any(not isinstance(st, AnalyticsStage) for st in stages[at + 1 :]):
        return []
    cols = list(ctx.spec.outputs.curated.partition_by)
    return cols if all(c in data_cols for c in cols) else []


def _read_rows(ctx: RunContext, base: str, schema: Any, part_cols: list[str]) -> Any:
    """Every row of the stage's output at ``base``: the data columns (``schema``, with their own
    types, the partition columns' too) and the kind."""
    from pyspark.sql.types import StringType, StructField, StructType

    fields = [f for f in schema.fields if f.name not in part_cols]
    parts = [StructField(KIND, StringType())] + [schema[c] for c in part_cols]
    if not any(p.name.startswith(f"{KIND}=") for p in location(base).iterdir()):  # no rows
        return ctx.spark.createDataFrame([], StructType(fields + parts))
    return ctx.spark.read.schema(StructType(fields + parts)).parquet(base)


def _with_reasons(failing: Any, cfg: QualityStage, ctx: RunContext, data_cols: list[str]) -> Any:
    """The rows that broke a rule, each with the names of the rules it broke: the rules
    evaluated again on these rows alone (see the module's docstring for why that is exact)."""
    from pyspark.sql import functions as F

    work, flags = _row_flags(failing, cfg, ctx)
    if flags:
        reasons = F.filter(
            F.array(
                *[F.when(F.coalesce(cond, F.lit(False)), F.lit(n)) for n, cond in flags.items()]
            ),
            lambda x: x.isNotNull(),
        )
    else:
        reasons = F.array().cast("array<string>")
    return work.select(*map(_col, data_cols), F.col(KIND), reasons.alias(REASONS))


def _legacy_parts(ctx: RunContext, base: str, data_cols: list[str]) -> tuple[Any, Any]:
    """(clean rows, quarantined rows with reasons) of a stage output written before the kinds
    (partitioned by a boolean ``_rayline_q``, every row with its reasons): --resume of a run
    that an earlier version of Rayline started."""
    from pyspark.sql import functions as F

    full = ctx.spark.read.parquet(base).withColumn(
        "_rayline_q", F.col("_rayline_q").cast("boolean")
    )
    clean = full.where(~F.col("_rayline_q")).select(*map(_col, data_cols))
    bad = full.where(F.col("_rayline_q")).select(*map(_col, data_cols), F.col(REASONS))
    return clean, bad


def _kept_and_failing(
    cfg: QualityStage, ctx: RunContext, base: str, schema: Any, part_cols: list[str]
) -> tuple[Any, Any]:
    """From the stage's rows at ``base``: the kept rows (clean and warned; registered for
    :func:`written_rows`) and the rows that broke a rule, with their reasons and kind. The
    quarantined ones go to ``ctx.quarantine_parts``."""
    from pyspark.sql import functions as F

    data_cols = [f.name for f in schema.fields]
    full = _read_rows(ctx, base, schema, part_cols)
    clean = full.where(F.col(KIND) != QUARANTINED).select(*map(_col, data_cols))
    failing = _with_reasons(full.where(F.col(KIND) != CLEAN), cfg, ctx, data_cols)
    bad = failing.where(F.col(KIND) == QUARANTINED).drop(KIND)
    ctx.quarantine_parts.append((ctx.stage, _as_quarantine(bad, ctx.stage)))
    _WRITTEN[clean] = (base, part_cols)
    return clean, failing


def run(df: Any, cfg: QualityStage, ctx: RunContext) -> tuple[Any, dict[str, Any]]:
    """Evaluate the rules; return the kept rows (read back from disk) and the report."""
    import uuid

    from pyspark.sql import Observation
    from pyspark.sql import functions as F

    if df is None:
        raise StageError(ctx.stage, "no input: a quality stage needs a previous transform")
    data_cols = list(df.columns)
    try:
        work, flags = _row_flags(df, cfg, ctx)
    except ValueError as e:
        raise StageError(ctx.stage, str(e)) from None

    blocking = [
        r.name for r in cfg.rules if r.severity in ("quarantine", "fail") and r.name in flags
    ]
    # Each rule's flag is computed once, as a column: the observed counts and the kind read it.
    flag_cols = [f"_rayline_f{i}" for i in range(len(flags))]
    flagged = work.select(
        *map(_col, data_cols),
        *[
            F.coalesce(cond, F.lit(False)).alias(c)
            for c, cond in zip(flag_cols, flags.values(), strict=True)
        ],
    )
    by_name = dict(zip(flags, (F.col(c) for c in flag_cols), strict=True))
    quarantined = _any([f for name, f in by_name.items() if name in blocking])
    warned = _any([f for name, f in by_name.items() if name not in blocking])
    kind = F.when(quarantined, F.lit(QUARANTINED)).when(warned, F.lit(WARNED))
    part_cols = _rows_partitions(cfg, ctx, data_cols)
    obs = Observation(f"rayline-{ctx.stage}-{uuid.uuid4().hex[:8]}")
    rows = flagged.observe(obs, *_observed(cfg, flag_cols, quarantined)).select(
        *map(_col, data_cols), kind.otherwise(F.lit(CLEAN)).alias(KIND)
    )

    base = spark_path(ctx.stage_dir() / "rows")
    ctx.progress(f"evaluating {len(cfg.rules)} rule(s) in one pass")
    # A resumed attempt: never mix in the last attempt's parts (overwrite too: an object store
    # may keep an emptied prefix as a directory).
    remove_tree(location(base))
    rows.write.mode("overwrite").partitionBy(KIND, *part_cols).parquet(base)
    report = _summarise(obs.get, cfg, ctx, list(flags))

    clean, failing = _kept_and_failing(cfg, ctx, base, df.schema, part_cols)
    sampled = [e["rule"] for e in report["rules"] if e["failed"] and e["rule"] in flags]
    if sampled and cfg.sample_size:
        samples = _samples(failing, sampled, cfg.sample_size, data_cols)
        for entry in report["rules"]:
            if entry["rule"] in samples:
                entry["samples"] = samples[entry["rule"]]
    report["quarantined_rows"] = report.pop("_quarantined")
    report["clean_rows"] = report["rows"] - report["quarantined_rows"]
    report["outputs"] = {"rows": base}
    report["rows_partition_by"] = [KIND, *part_cols]
    failed = [e for e in report["rules"] if e["verdict"] == "failed"]
    report["verdict"] = "failed" if failed else "passed"
    ctx.progress(
        f"{report['rows']:,} rows checked: {report['clean_rows']:,} clean, "
        f"{report['quarantined_rows']:,} quarantined"
    )
    if failed:
        detail = "; ".join(
            f"{e['rule']} ({e['type']}, severity {e['severity']}): {e['failed']:,} failing"
            + (f" of {e['checked']:,} ({e['fraction']:.2%})" if e["checked"] > 1 else "")
            for e in failed
        )
        raise QualityFailed(ctx.stage, f"quality rules failed: {detail}", report)
    return clean, report


def _as_quarantine(bad: Any, stage: str) -> Any:
    from pyspark.sql import functions as F

    return (
        bad.withColumn("_rayline_stage", F.lit(stage))
        .withColumn("_rayline_source", F.lit(None).cast("string"))
        .withColumn("_rayline_raw", F.lit(None).cast("string"))
    )


def restore(cfg: QualityStage, ctx: RunContext, report: dict[str, Any], schema: Any) -> Any:
    """Reload a previous attempt's kept rows and quarantine part (used by --resume)."""
    base = report["outputs"]["rows"]
    data_cols = [f.name for f in schema.fields]
    layout = report.get("rows_partition_by")
    if layout is None:
        clean, bad = _legacy_parts(ctx, base, data_cols)
        ctx.quarantine_parts.append((ctx.stage, _as_quarantine(bad, ctx.stage)))
        return clean
    clean, _ = _kept_and_failing(cfg, ctx, base, schema, list(layout[1:]))
    return clean
