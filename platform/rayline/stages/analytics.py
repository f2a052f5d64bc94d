"""Analytics stage: distributed statistics of the current DataFrame, written as JSON and charts.

Three Spark aggregations (nothing but their small results reaches the driver):
1. count, nulls, mean, stddev, min, max and approximate quantiles of each numeric column, and
   the approximate cardinality of each categorical one;
2. a count per histogram bucket and the outlier count of every numeric column, and the centred
   sums giving the Pearson correlation of each pair;
3. one exploded group-by giving every categorical column's top values.
A few outlier rows per column are then sampled with a limit.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..config import AnalyticsStage
from ..context import RunContext, StageError

__all__ = ["run", "render_charts"]

NUMERIC = ("tinyint", "smallint", "int", "bigint", "float", "double")


def _c(name: str) -> Any:
    from pyspark.sql import functions as F

    return F.col(f"`{name}`")


def _num(x: Any) -> float | None:
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) or math.isinf(x) else x


def _pick_columns(df: Any, cfg: AnalyticsStage) -> tuple[list[str], list[str]]:
    types = {f.name: f.dataType.simpleString() for f in df.schema.fields}
    for given in (cfg.numeric_columns or []) + (cfg.categorical_columns or []):
        if given not in types:
            raise StageError("analytics", f"unknown column {given!r}; available: {sorted(types)}")
    numeric = cfg.numeric_columns or [
        n for n, t in types.items() if t in NUMERIC or t.startswith("decimal")
    ]
    categorical = cfg.categorical_columns or [n for n, t in types.items() if t == "string"]
    return numeric, categorical


def _first_pass(
    df: Any, numeric: list[str], categorical: list[str], cfg: AnalyticsStage
) -> dict[str, Any]:
    from pyspark.sql import functions as F

    qs = sorted(set(cfg.quantiles) | {0.25, 0.75})
    aggs = [F.count(F.lit(1)).alias("_n")]
    for i, c in enumerate(numeric):
        x = _c(c).cast("double")
        aggs += [
            F.count(x).alias(f"n{i}"),
            F.mean(x).alias(f"mean{i}"),
            F.stddev_samp(x).alias(f"sd{i}"),
            F.min(x).alias(f"min{i}"),
            F.max(x).alias(f"max{i}"),
            F.percentile_approx(x, qs, cfg.quantile_accuracy).alias(f"q{i}"),
        ]
    for j, c in enumerate(categorical):
        aggs += [F.count(_c(c)).alias(f"cn{j}"), F.approx_count_distinct(_c(c)).alias(f"cd{j}")]
    row = df.agg(*aggs).first().asDict()
    total = int(row["_n"])
    stats: dict[str, Any] = {}
    for i, c in enumerate(numeric):
        qv = row[f"q{i}"] or [None] * len(qs)
        stats[c] = {
            "count": int(row[f"n{i}"]),
            "nulls": total - int(row[f"n{i}"]),
            "mean": _num(row[f"mean{i}"]),
            "stddev": _num(row[f"sd{i}"]),
            "min": _num(row[f"min{i}"]),
            "max": _num(row[f"max{i}"]),
            "quantiles": {str(q): _num(v) for q, v in zip(qs, qv, strict=True)},
        }
    cats = {
        c: {
            "count": int(row[f"cn{j}"]),
            "nulls": total - int(row[f"cn{j}"]),
            "cardinality": int(row[f"cd{j}"]),
        }
        for j, c in enumerate(categorical)
    }
    return {
        "rows": total,
        "numeric": stats,
        "correlation": None,
        "categorical": cats,
    }


def _fences(s: dict[str, Any], cfg: AnalyticsStage) -> tuple[float, float] | None:
    if cfg.outlier_method == "iqr":
        q1, q3 = s["quantiles"].get("0.25"), s["quantiles"].get("0.75")
        if q1 is None or q3 is None:
            return None
        iqr = q3 - q1
        return q1 - cfg.outlier_threshold * iqr, q3 + cfg.outlier_threshold * iqr
    if s["mean"] is None or not s["stddev"]:
        return None
    return s["mean"] - cfg.outlier_threshold * s["stddev"], s["mean"] + cfg.outlier_threshold * s[
        "stddev"
    ]


def _second_pass(
    df: Any, numeric: list[str], categorical: list[str], first: dict[str, Any], cfg: AnalyticsStage
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Histograms and outlier counts in one aggregation (a count per bucket: no shuffle of
    rows), then the top values of the categorical columns in one exploded group-by."""
    from pyspark.sql import functions as F
    from pyspark.sql.window import Window

    aggs = []
    fences: dict[str, tuple[float, float]] = {}
    widths: dict[str, tuple[float, float]] = {}
    bins = cfg.histogram_bins
    for k, c in enumerate(numeric):
        s = first["numeric"][c]
        if s["min"] is None:
            continue
        lo, hi = s["min"], s["max"]
        width = (hi - lo) / bins if hi > lo else 1.0
        widths[c] = (lo, width)
        x = _c(c).cast("double")
        # A null value belongs to no bucket; the maximum falls in the last one.
        # (least() skips nulls, hence the guard.)
        bucket = F.when(
            x.isNotNull(), F.least(F.floor((x - F.lit(lo)) / F.lit(width)), F.lit(bins - 1))
        )
        for b in range(bins):
            aggs.append(F.count(F.when(bucket == b, 1)).alias(f"h{k}_{b}"))
        f = _fences(s, cfg)
        if f:
            fences[c] = f
            aggs.append(F.count(F.when((x < f[0]) | (x > f[1]), 1)).alias(f"o{k}"))
    # Pearson correlation of each pair over the rows where both are present, from sums of
    # values centred on the means of pass 1 (numerically stable; plain sums codegen well,
    # Spark's corr() aggregate was ~2x slower here).
    pairs: list[tuple[str, str]] = []
    if cfg.correlation:
        for i, col_a in enumerate(numeric):
            for col_b in numeric[i + 1 :]:
                ma, mb = first["numeric"][col_a]["mean"], first["numeric"][col_b]["mean"]
                if ma is None or mb is None:
                    continue
                k = len(pairs)
                pairs.append((col_a, col_b))
                xa = _c(col_a).cast("double") - F.lit(ma)
                xb = _c(col_b).cast("double") - F.lit(mb)
                both = xa.isNotNull() & xb.isNotNull()
                aggs += [
                    F.count(F.when(both, 1)).alias(f"cn{k}"),
                    F.sum(F.when(both, xa)).alias(f"ca{k}"),
                    F.sum(F.when(both, xb)).alias(f"cb{k}"),
                    F.sum(F.when(both, xa * xa)).alias(f"caa{k}"),
                    F.sum(F.when(both, xb * xb)).alias(f"cbb{k}"),
                    F.sum(xa * xb).alias(f"cab{k}"),
                ]
    hist: dict[str, Any] = {}
    outliers: dict[str, int] = {}
    corr: dict[str, Any] | None = None
    if aggs:
        row = df.agg(*aggs).first().asDict()
        if cfg.correlation:
            corr = {c: {c2: (1.0 if c == c2 else None) for c2 in numeric} for c in numeric}
            for k, (col_a, col_b) in enumerate(pairs):
                corr[col_a][col_b] = corr[col_b][col_a] = _pearson(row, k)
        for k, c in enumerate(numeric):
            if c in widths:
                lo, width = widths[c]
                hist[c] = {
                    "edges": [lo + i * width for i in range(bins + 1)],
                    "counts": [int(row[f"h{k}_{b}"]) for b in range(bins)],
                }
            if c in fences:
                outliers[c] = int(row[f"o{k}"])

    top: dict[str, Any] = {c: [] for c in categorical}
    if categorical:
        items = [
            F.struct(F.lit(j).alias("k"), _c(c).cast("string").alias("v"))
            for j, c in enumerate(categorical)
        ]
        w = Window.partitionBy("k").orderBy(F.col("n").desc(), F.col("v"))
        ranked = (
            df.select(F.explode(F.array(*items)).alias("e"))
            .where(F.col("e.v").isNotNull())
            .groupBy(F.col("e.k").alias("k"), F.col("e.v").alias("v"))
            .agg(F.count(F.lit(1)).alias("n"))
            .withColumn("rank", F.row_number().over(w))
            .where(F.col("rank") <= cfg.top_k)
        )
        for r in ranked.collect():
            top[categorical[int(r["k"])]].append({"value": r["v"], "count": int(r["n"])})
        for c in top:
            top[c].sort(key=lambda e: (-e["count"], e["value"]))
    found = {
        c: {
            "method": cfg.outlier_method,
            "threshold": cfg.outlier_threshold,
            "low": f[0],
            "high": f[1],
            "count": outliers[c],
        }
        for c, f in fences.items()
    }
    return {"histograms": hist, "top_values": top, "correlation": corr}, found


def _pearson(row: dict[str, Any], k: int) -> float | None:
    n = row[f"cn{k}"] or 0
    if n < 2:
        return None
    sa, sb = row[f"ca{k}"], row[f"cb{k}"]
    va = row[f"caa{k}"] - sa * sa / n
    vb = row[f"cbb{k}"] - sb * sb / n
    if va <= 0 or vb <= 0:
        return None  # a constant column has no correlation
    return _num((row[f"cab{k}"] - sa * sb / n) / math.sqrt(va * vb))


def render_charts(report: dict[str, Any], out_dir: Path, prefix: str) -> dict[str, str]:
    """Histogram grid and correlation heatmap as PNG files; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    charts: dict[str, str] = {}
    hist = report.get("histograms") or {}
    if hist:
        n = len(hist)
        cols = min(4, n)
        rows = math.ceil(n / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), squeeze=False)
        for ax, (c, h) in zip(axes.flat, hist.items(), strict=False):
            e = h["edges"]
            ax.bar(
                e[:-1],
                h["counts"],
                width=(e[1] - e[0]) if len(e) > 1 else 1,
                align="edge",
                color="#4C72B0",
            )
            ax.set_title(c, fontsize=9)
            ax.tick_params(labelsize=7)
        for ax in list(axes.flat)[n:]:
            ax.axis("off")
        fig.tight_layout()
        p = out_dir / f"{prefix}_histograms.png"
        fig.savefig(p, dpi=80)
        plt.close(fig)
        charts["histograms"] = str(p)
    corr = report.get("correlation")
    if corr and len(corr) > 1:
        names = list(corr)
        m = [
            [(corr[a][b] if corr[a][b] is not None else float("nan")) for b in names] for a in names
        ]
        fig, ax = plt.subplots(figsize=(1 + 0.5 * len(names), 0.8 + 0.5 * len(names)))
        im = ax.imshow(m, cmap="RdBu_r", vmin=-1, vmax=1)
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        fig.colorbar(im, ax=ax, shrink=0.8)
        ax.set_title("Pearson correlation", fontsize=9)
        fig.tight_layout()
        p = out_dir / f"{prefix}_correlation.png"
        fig.savefig(p, dpi=80)
        plt.close(fig)
        charts["correlation"] = str(p)
    return charts


def run(df: Any, cfg: AnalyticsStage, ctx: RunContext) -> tuple[Any, dict[str, Any]]:
    """Profile the DataFrame; it passes through unchanged."""
    from pyspark.sql import functions as F

    if df is None:
        raise StageError(ctx.stage, "no input: an analytics stage needs a previous transform")
    try:
        numeric, categorical = _pick_columns(df, cfg)
    except StageError as e:
        raise StageError(ctx.stage, str(e).split(": ", 1)[1]) from None
    ctx.progress(f"profiling {len(numeric)} numeric and {len(categorical)} categorical column(s)")
    report = _first_pass(df, numeric, categorical, cfg)
    extra, outliers = _second_pass(df, numeric, categorical, report, cfg)
    report.update(extra)
    for c, o in outliers.items():
        if o["count"] and cfg.sample_size:
            rows = (
                df.where((_c(c) < o["low"]) | (_c(c) > o["high"]))
                .select(F.to_json(F.struct(*[_c(x) for x in df.columns])).alias("j"))
                .limit(cfg.sample_size)
                .collect()
            )
            import json

            o["samples"] = [json.loads(r["j"]) for r in rows]
    report["outliers"] = outliers
    report["charts"] = render_charts(report, ctx.run_dir / "charts", ctx.stage)
    return df, report
