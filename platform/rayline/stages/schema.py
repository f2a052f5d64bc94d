"""Schema stage: infer each source's schema, compare it with the contract in the spec or the
last accepted version, and fail, evolve (record a new version) or warn, per source.

Type changes: data of a narrower type than expected (int where the contract says bigint) is
read with the expected type and is no change. A wider type (double where int was accepted) is
a widening: accepted under ``evolve`` and ``warn``, an error under ``fail``. Incompatible types
(string where int was expected) are always an error. Rows that do not parse against the
accepted schema are kept as malformed and quarantined later, never dropped.
"""

from __future__ import annotations

from typing import Any

from ..config import SchemaStage, normalize_type
from ..context import RunContext, StageError
from ..sources import CORRUPT, infer_schema, source_bytes

__all__ = ["run", "diff_columns", "TYPE_RANK"]

# Numeric widening order; each type can be read losslessly as any type after it.
TYPE_RANK = {"tinyint": 1, "smallint": 2, "int": 3, "bigint": 4, "float": 5, "double": 6}


def _compare_types(expected: str, observed: str) -> str:
    """'same', 'fits' (observed readable as expected), 'widened' or 'incompatible'."""
    if expected == observed:
        return "same"
    if expected == "string":
        return "fits"
    if expected in TYPE_RANK and observed in TYPE_RANK:
        return "fits" if TYPE_RANK[observed] < TYPE_RANK[expected] else "widened"
    if expected.startswith("decimal") and observed in ("tinyint", "smallint", "int", "bigint"):
        return "fits"
    if expected.startswith("decimal") and observed in ("float", "double"):
        return "widened"
    if (expected, observed) in {("timestamp", "date"), ("timestamp_ntz", "date")}:
        return "fits"
    if (expected, observed) in {("date", "timestamp"), ("timestamp", "timestamp_ntz")}:
        return "widened" if expected == "date" else "fits"
    return "incompatible"


def diff_columns(
    expected: list[dict[str, Any]], observed: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Compare two column lists ({name, type, nullable}).

    Returns:
        (changes, merged): each change has ``kind`` (added, removed, widened, incompatible,
        nullability) and ``column``; ``merged`` is the schema to read the data with if the
        changes are accepted, in the observed column order.
    """
    exp = {c["name"]: c for c in expected}
    changes: list[dict[str, Any]] = []
    merged: list[dict[str, Any]] = []
    for o in observed:
        e = exp.get(o["name"])
        if e is None:
            changes.append({"kind": "added", "column": o["name"], "type": o["type"]})
            merged.append(dict(o))
            continue
        verdict = _compare_types(e["type"], o["type"])
        if verdict in ("same", "fits"):
            merged.append({**o, "type": e["type"], "nullable": e["nullable"]})
        elif verdict == "widened":
            changes.append(
                {"kind": "widened", "column": o["name"], "from": e["type"], "to": o["type"]}
            )
            merged.append({**o, "nullable": e["nullable"]})
        else:
            changes.append(
                {"kind": "incompatible", "column": o["name"], "from": e["type"], "to": o["type"]}
            )
            merged.append({**o, "type": e["type"], "nullable": e["nullable"]})
    obs_names = {o["name"] for o in observed}
    for e in expected:
        if e["name"] not in obs_names:
            changes.append({"kind": "removed", "column": e["name"], "type": e["type"]})
    return changes, merged


def _columns_of(schema: Any) -> list[dict[str, Any]]:
    return [
        {"name": f.name, "type": normalize_type(f.dataType.simpleString()), "nullable": f.nullable}
        for f in schema.fields
    ]


def _struct(columns: list[dict[str, Any]]) -> Any:
    from pyspark.sql.types import _parse_datatype_string

    return _parse_datatype_string(", ".join(f"`{c['name']}` {c['type']}" for c in columns))


def _describe(ch: dict[str, Any]) -> str:
    if ch["kind"] == "incompatible" and "bad_values" in ch:
        return (
            f"column {ch['column']!r} incompatible: expected {ch['from']}, found {ch['to']} "
            f"({ch['bad_values']:,} of {ch['values']:,} values are not {ch['from']}, "
            f"e.g. {ch['sample']!r})"
        )
    if ch["kind"] in ("widened", "incompatible"):
        return f"column {ch['column']!r} {ch['kind']}: expected {ch['from']}, found {ch['to']}"
    if ch["kind"] == "stray_values":
        return f"column {ch['column']!r}: {ch['bad_values']:,} value(s) not {ch['from']}"
    if ch["kind"] == "nullability":
        return f"column {ch['column']!r} declared not nullable has {ch['nulls']:,} null(s)"
    if ch["kind"] == "added":
        return f"column {ch['column']!r} added ({ch['type']})"
    return f"column {ch['column']!r} ({ch['type']}) removed"


def _forgive_stray_values(
    ctx: RunContext, name: str, changes: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Tell a column of the wrong type from a few malformed values in a text source.

    Inference calls a column string if any sampled value does not parse. When at most
    ``max_malformed_fraction`` of its values fail to cast to the expected type, the column keeps
    its expected type and those rows are quarantined as malformed; otherwise it stays an
    incompatible change (an error naming the column and a bad value).
    """
    from pyspark.sql import functions as F
    from pyspark.sql.types import StringType, StructField, StructType

    spec = ctx.spec.sources[name]
    bad = [c for c in changes if c["kind"] == "incompatible"]
    if not bad or spec.format == "parquet":
        return changes
    names = [f.name for f in infer_schema(ctx.spark, name, spec, ctx.paths(name)).fields]
    r = ctx.spark.read.format(spec.format).schema(
        StructType([StructField(n, StringType()) for n in names])
    )
    for k, v in {"header": "true", **spec.options}.items():
        r = r.option(k, v)
    text = r.load(ctx.paths(name))
    aggs = []
    for i, c in enumerate(bad):
        col = F.col(f"`{c['column']}`")
        fails = col.isNotNull() & col.cast(c["from"]).isNull()
        aggs += [
            F.count(col).alias(f"n{i}"),
            F.sum(fails.cast("long")).alias(f"b{i}"),
            F.first(F.when(fails, col), ignorenulls=True).alias(f"s{i}"),
        ]
    row = text.agg(*aggs).first()
    out = [c for c in changes if c["kind"] != "incompatible"]
    for i, c in enumerate(bad):
        n, b = int(row[f"n{i}"] or 0), int(row[f"b{i}"] or 0)
        c = {**c, "values": n, "bad_values": b, "sample": row[f"s{i}"]}
        if n and b / n <= spec.max_malformed_fraction:
            c["kind"] = "stray_values"
            ctx.progress(
                f"source {name!r}: {b:,} of {n:,} values of {c['column']!r} are not {c['from']}; "
                "their rows will be quarantined as malformed"
            )
        out.append(c)
    return out


def _check_source(name: str, ctx: RunContext) -> dict[str, Any]:
    spec = ctx.spec.sources[name]
    paths = ctx.paths(name)
    observed = _columns_of(infer_schema(ctx.spark, name, spec, paths))
    latest = ctx.store.latest_schema(ctx.spec.name, name)
    if spec.columns:
        expected = [c.model_dump() for c in spec.columns]
        basis = "contract"
    elif latest:
        expected = latest[1]["columns"]
        basis = f"v{latest[0]}"
    else:
        expected, basis = observed, "inferred"

    changes, merged = diff_columns(expected, observed)
    changes = _forgive_stray_values(ctx, name, changes)
    policy = spec.on_schema_change
    errors = [c for c in changes if c["kind"] == "incompatible"]
    if policy == "fail":
        errors = [c for c in changes if c["kind"] != "stray_values"]
    if errors:
        detail = "; ".join(_describe(c) for c in errors)
        raise StageError(
            ctx.stage,
            f"source {name!r} ({spec.path}): schema differs from the {basis} schema "
            f"(on_schema_change={policy}): {detail}",
        )
    drop: list[str] = []
    missing: list[dict[str, Any]] = []
    accepted = merged
    if policy == "warn":
        # Keep the expected shape: extra columns are ignored, missing ones read as null.
        exp_names = {c["name"] for c in expected}
        drop = [c["name"] for c in merged if c["name"] not in exp_names]
        accepted = [c for c in merged if c["name"] in exp_names]
        missing = [c for c in expected if c["name"] not in {m["name"] for m in merged}]
        accepted = accepted + missing
        for ch in (c for c in changes if c["kind"] != "stray_values"):
            ctx.progress(f"WARNING source {name!r}: {_describe(ch)} (on_schema_change=warn)")

    version = latest[0] if latest else None
    latest_cols = latest[1]["columns"] if latest else None
    strip = [{k: c[k] for k in ("name", "type", "nullable")} for c in accepted]
    if policy != "warn" and latest_cols != strip:
        note = (
            "first accepted schema"
            if latest is None
            else ("; ".join(_describe(c) for c in changes) or f"{basis} schema changed")
        )
        version = ctx.store.accept_schema(ctx.spec.name, name, strip, ctx.run_id, note)
        ctx.progress(f"source {name!r}: accepted schema v{version} ({note})")

    read = [{k: c[k] for k in ("name", "type", "nullable")} for c in merged]
    _apply(ctx, name, read, drop, missing)
    from pyspark.sql import functions as F

    raw = ctx.raw(name)
    # Nullability: columns the accepted schema declares NOT NULL are counted in the same pass.
    required = [c["name"] for c in strip if not c["nullable"] and c["name"] in raw.columns]
    parsed = F.col(CORRUPT).isNull()
    row = raw.agg(
        F.count(F.lit(1)).alias("rows"),
        F.count(F.col(CORRUPT)).alias("bad"),
        *[
            F.count(F.when(parsed & F.col(f"`{c}`").isNull(), 1)).alias(f"n{i}")
            for i, c in enumerate(required)
        ],
    ).first()
    rows, malformed = int(row["rows"]), int(row["bad"])
    null_counts = {c: int(row[f"n{i}"]) for i, c in enumerate(required) if row[f"n{i}"]}
    for c, n in null_counts.items():
        changes.append({"kind": "nullability", "column": c, "nulls": n})
        message = f"column {c!r} is declared not nullable but has {n:,} null(s)"
        if policy == "fail":
            raise StageError(
                ctx.stage, f"source {name!r} ({spec.path}): {message} (on_schema_change=fail)"
            )
        ctx.progress(f"WARNING source {name!r}: {message}")
    ctx.source_rows[name] = rows
    if rows == 0:
        raise StageError(ctx.stage, f"source {name!r} ({spec.path}) is empty: no rows")
    ctx.progress(f"source {name!r}: {rows:,} rows, {malformed:,} malformed, schema v{version}")
    if malformed / rows > spec.max_malformed_fraction:
        raise StageError(
            ctx.stage,
            f"source {name!r} ({spec.path}): {malformed:,} of {rows:,} rows "
            f"({malformed / rows:.1%}) do not parse against the accepted schema, above "
            f"max_malformed_fraction={spec.max_malformed_fraction}",
        )
    return {
        "paths": paths,
        "fingerprint": ctx.source_fingerprints[name],
        "basis": basis,
        "policy": policy,
        "observed": observed,
        "accepted": strip,
        "read": read,
        "drop": drop,
        "missing": missing,
        "version": version,
        "changes": changes,
        "rows": rows,
        "malformed": malformed,
    }


def run(df: Any, cfg: SchemaStage, ctx: RunContext) -> tuple[Any, dict[str, Any]]:
    """Check the schema of each source; the pipeline's DataFrame passes through unchanged."""
    from concurrent.futures import ThreadPoolExecutor

    names = cfg.sources or list(ctx.spec.sources)
    size = {name: source_bytes(ctx.paths(name)) for name in names}
    largest = max(names, key=lambda n: size[n])
    # The smaller sources are checked at once, then the largest: a small source's Spark jobs
    # (inference, the counting pass) are mostly driver-side scheduling, which then overlaps the
    # other small sources' instead of adding up. (Beside the largest source's pass they would
    # wait: its tasks hold every core until it ends.) Each source has its own entries in the
    # context and its own schema versions; the report keeps the sources' order.
    small = [n for n in names if n != largest]
    results: dict[str, Any] = {}
    with ThreadPoolExecutor(max_workers=min(4, len(small)) or 1) as pool:
        futures = {n: pool.submit(_check_source, n, ctx) for n in small}
        for n in names:
            if n != largest:
                results[n] = futures[n].result()
    results[largest] = _check_source(largest, ctx)
    report = {"sources": {name: results[name] for name in names}}
    return df, report


def restore(cfg: SchemaStage, ctx: RunContext, report: dict[str, Any]) -> None:
    """Re-apply the schemas a previous attempt accepted (used by --resume)."""
    for name, info in report["sources"].items():
        _apply(ctx, name, info["read"], info["drop"], info["missing"])
        ctx.source_rows[name] = info["rows"]


def _apply(
    ctx: RunContext,
    name: str,
    read: list[dict[str, Any]],
    drop: list[str],
    missing: list[dict[str, Any]],
) -> None:
    ctx.accepted[name] = _struct(read)
    ctx.reshape[name] = (drop, [(m["name"], m["type"]) for m in missing])
    ctx._raw.pop(name, None)
