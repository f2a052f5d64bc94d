"""Quality stage: evaluate all rules, keep clean rows, quarantine failing rows with reasons.

All row rules are evaluated in one Spark job that writes every row once, partitioned into clean
and quarantined rows, each row carrying the list of rules it broke. The counts per rule are then
read from that output's small reasons column, and dataset rules (row_count, freshness) from the
same aggregation, so the data is computed once.
"""

from __future__ import annotations

import json
import os
import shutil
from datetime import datetime
from pathlib import Path
from typing import Any

from ..config import (
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

__all__ = ["run", "restore", "QualityFailed"]

FLAG = "_rayline_q"
BROADCAST_LIMIT_BYTES = 64 * 1024 * 1024


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


def _source_bytes(ctx: RunContext, name: str) -> int:
    total = 0
    for p in ctx.paths(name):
        if os.path.isdir(p):
            total += sum(f.stat().st_size for f in Path(p).rglob("*") if f.is_file())
        else:
            total += os.path.getsize(p)
    return total


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
            if _source_bytes(ctx, rule.source) <= BROADCAST_LIMIT_BYTES:
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


def _summarise(
    full: Any, cfg: QualityStage, ctx: RunContext, row_rules: list[str]
) -> dict[str, Any]:
    """One aggregation over the written rows: per-rule failures and dataset-rule inputs."""
    from pyspark.sql import functions as F

    aggs = [F.count(F.lit(1)).alias("_rows"), F.sum(F.col(FLAG).cast("long")).alias("_q")]
    for i, name in enumerate(row_rules):
        aggs.append(F.sum(F.array_contains(F.col(REASONS), name).cast("long")).alias(f"r{i}"))
    fresh = [r for r in cfg.rules if isinstance(r, FreshnessRule)]
    for j, r in enumerate(fresh):
        aggs.append(F.max(_col(r.column)).alias(f"f{j}"))
    row = full.agg(*aggs).first()
    total = int(row["_rows"])
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
            latest = row[f"f{fresh.index(rule)}"]
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
    return {"rows": total, "_quarantined": int(row["_q"] or 0), "rules": rules}


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


def _read_parts(ctx: RunContext, base: str, schema: Any) -> tuple[Any, Any, Any]:
    """(all rows, clean rows, quarantined rows) of the partitioned output at ``base``."""
    from pyspark.sql import functions as F
    from pyspark.sql.types import BooleanType, StructField, StructType

    if any(n.startswith(f"{FLAG}=") for n in os.listdir(base)):
        full = ctx.spark.read.parquet(base).withColumn(FLAG, F.col(FLAG).cast("boolean"))
    else:  # no input rows: Spark wrote no partition
        full = ctx.spark.createDataFrame(
            [], StructType(list(schema.fields) + [StructField(FLAG, BooleanType())])
        )
    return full, full.where(~F.col(FLAG)).drop(FLAG), full.where(F.col(FLAG)).drop(FLAG)


def run(df: Any, cfg: QualityStage, ctx: RunContext) -> tuple[Any, dict[str, Any]]:
    """Evaluate the rules; return the clean rows (read back from disk) and the report."""
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
    if flags:
        # Interpreted (higher-order functions are not code-generated): only for the rows that
        # broke a rule, the empty list otherwise.
        failed = [F.coalesce(cond, F.lit(False)) for cond in flags.values()]
        reasons = F.when(
            _any(failed),
            F.filter(
                F.array(*[F.when(cond, F.lit(name)) for name, cond in flags.items()]),
                lambda x: x.isNotNull(),
            ),
        ).otherwise(F.array().cast("array<string>"))
        # Quarantined when a blocking rule's flag is set (the same as its name in the reasons).
        quarantined = _any([f for name, f in zip(flags, failed, strict=True) if name in blocking])
    else:
        reasons = F.array().cast("array<string>")
        quarantined = F.lit(False)
    annotated = work.select(*map(_col, data_cols), reasons.alias(REASONS), quarantined.alias(FLAG))

    base = str(ctx.stage_dir() / "rows")
    ctx.progress(f"evaluating {len(cfg.rules)} rule(s) in one pass")
    if os.path.exists(base):  # a resumed attempt: never mix in the last attempt's partitions
        shutil.rmtree(base)
    annotated.write.partitionBy(FLAG).parquet(base)
    full, clean, bad = _read_parts(ctx, base, annotated.drop(FLAG).schema)

    report = _summarise(full, cfg, ctx, list(flags))
    sampled = [e["rule"] for e in report["rules"] if e["failed"] and e["rule"] in flags]
    if sampled and cfg.sample_size:
        samples = _samples(full, sampled, cfg.sample_size, data_cols)
        for entry in report["rules"]:
            if entry["rule"] in samples:
                entry["samples"] = samples[entry["rule"]]
    report["quarantined_rows"] = report.pop("_quarantined")
    report["clean_rows"] = report["rows"] - report["quarantined_rows"]
    report["outputs"] = {"rows": base}
    failed = [e for e in report["rules"] if e["verdict"] == "failed"]
    report["verdict"] = "failed" if failed else "passed"
    ctx.quarantine_parts.append((ctx.stage, _as_quarantine(bad, ctx.stage)))
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
    return clean.drop(REASONS), report


def _as_quarantine(bad: Any, stage: str) -> Any:
    from pyspark.sql import functions as F

    return (
        bad.withColumn("_rayline_stage", F.lit(stage))
        .withColumn("_rayline_source", F.lit(None).cast("string"))
        .withColumn("_rayline_raw", F.lit(None).cast("string"))
    )


def restore(cfg: QualityStage, ctx: RunContext, report: dict[str, Any], schema: Any) -> Any:
    """Reload a previous attempt's clean rows and quarantine part (used by --resume)."""
    _, clean, bad = _read_parts(ctx, report["outputs"]["rows"], schema)
    ctx.quarantine_parts.append((ctx.stage, _as_quarantine(bad, ctx.stage)))
    return clean.drop(REASONS)
