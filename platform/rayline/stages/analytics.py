"""Analytics stage: distributed statistics of the current DataFrame, written as JSON and charts.

Three passes over the data (nothing but their small results reaches the driver):
1. count, nulls, mean, stddev, min, max and approximate quantiles of each numeric column, from
   per-partition numpy sums and sorted samples (``mapInArrow``);
2. a count per histogram bucket and the outlier count of every numeric column, the centred sums
   giving the Pearson correlation of each pair, and the first outlier rows of each column, in
   one more ``mapInArrow`` pass;
3. one exploded group-by giving every categorical column's top values, non-null count and
   number of distinct values.
"""

from __future__ import annotations

import math
from typing import Any

from ..config import AnalyticsStage
from ..context import RunContext, StageError
from ..storage import Loc, write_figure

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


def _first_pass(df: Any, numeric: list[str], cfg: AnalyticsStage) -> dict[str, Any]:
    """Count, nulls, mean, stddev, min, max and quantiles of each numeric column in one pass.

    Each partition's Arrow batches are reduced with numpy in the executors' Python workers
    (:func:`_stats_of_batches`): per column the count, sum, centred sum of squares, min, max and
    sorted samples (every ``s``-th value of each chunk of up to a million rows, ``s`` = the
    chunk's values / accuracy). Merging the samples gives quantiles within the rank error
    ``values / accuracy`` that ``percentile_approx`` guarantees (exact when a chunk has fewer
    values than ``accuracy``), without Spark's per-value inserts into its quantile summaries,
    which were most of this pass.
    """
    qs = sorted(set(cfg.quantiles) | {0.25, 0.75})
    k = len(numeric)
    cols = [_c(c).cast("double").alias(f"x{i}") for i, c in enumerate(numeric)]
    fn = _stats_of_batches({"k": k, "accuracy": cfg.quantile_accuracy, "chunk": _CHUNK})
    parts = [r.asDict() for r in df.select(*cols).mapInArrow(fn, _STATS_SCHEMA).collect()]
    return {
        "rows": sum(int(r["rows"]) for r in parts),
        "numeric": _merge_stats(parts, numeric, qs),
        "correlation": None,
        "categorical": {},
    }


def _merge_stats(
    parts: list[dict[str, Any]], numeric: list[str], qs: list[float]
) -> dict[str, Any]:
    """The statistics of each column from the partitions' results of :func:`_stats_of_batches`."""
    import numpy as np

    total = sum(int(r["rows"]) for r in parts)
    samples: list[list[Any]] = [[] for _ in numeric]
    for r in parts:
        for sample in r["q"]:
            samples[int(sample[0])].append(sample[1:])
    stats: dict[str, Any] = {}
    for j, c in enumerate(numeric):
        n = 0
        mean = m2 = 0.0
        lo = hi = None
        for r in parts:
            cnt, sm, pm2, pmin, pmax = r["v"][5 * j : 5 * j + 5]
            cnt = int(cnt)
            if cnt == 0:
                continue
            pmean = sm / cnt
            if n == 0:
                mean, m2 = pmean, pm2
            else:  # Chan et al.: merge two partitions' means and centred sums of squares
                d = pmean - mean
                m2 += pm2 + d * d * n * cnt / (n + cnt)
                mean += d * cnt / (n + cnt)
            n += cnt
            lo = pmin if lo is None or _before(pmin, lo) else lo
            hi = pmax if hi is None or _before(hi, pmax) else hi
        quantiles = _quantiles(samples[j], qs, np)
        stats[c] = {
            "count": n,
            "nulls": total - n,
            "mean": _num(mean) if n else None,
            "stddev": _num(math.sqrt(m2 / (n - 1))) if n > 1 else None,
            "min": _num(lo),
            "max": _num(hi),
            "quantiles": {str(q): _num(v) for q, v in zip(qs, quantiles, strict=True)},
        }
    return stats


# Rows per sorted chunk in a partition (bounds a Python worker's memory: 8 bytes a value).
_CHUNK = 1 << 20
_STATS_SCHEMA = "rows long, v array<double>, q array<array<double>>"


def _before(a: float, b: float) -> bool:
    """Spark's order of doubles: NaN after every number."""
    return (not math.isnan(a) and math.isnan(b)) or a < b


def _quantiles(samples: list[list[float]], qs: list[float], np: Any) -> list[Any]:
    """Quantiles from sorted samples, each ``[count, step, v0, v1, ...]``: the values at
    positions 0, step, 2 step, ... of a chunk of ``count`` sorted values, then its last value.
    A sampled value stands for the values from its position up to the next sample's. The answer
    is the first value (in Spark's order) whose cumulative weight reaches the rank
    ``ceil(q * n)``, as Spark's quantile summaries answer; each chunk is off by less than its
    step in rank, so the whole by less than ``n / accuracy``."""
    samples = [s for s in samples if s[0] > 0]
    if not samples:
        return [None] * len(qs)
    values: list[Any] = []
    weights: list[Any] = []
    for sample in samples:
        cnt, step = int(sample[0]), int(sample[1])
        vals = np.asarray(sample[2:], dtype=float)
        pos = np.arange(len(vals), dtype=np.int64) * step
        pos[-1] = cnt - 1  # the chunk's last value (it may also fall on a step)
        values.append(vals)
        weights.append(np.diff(np.append(pos, cnt)))
    v = np.concatenate(values)
    w = np.concatenate(weights)
    order = np.argsort(v, kind="stable")  # NaN last, as in Spark
    v, cum = v[order], np.cumsum(w[order])
    n = int(cum[-1])
    out = []
    for q in qs:
        rank = max(1, math.ceil(q * n))
        out.append(float(v[min(int(np.searchsorted(cum, rank)), len(v) - 1)]))
    return out


def _stats_of_batches(params: dict[str, Any]) -> Any:
    """The ``mapInArrow`` function of :func:`_first_pass` (runs in the executors' Python
    workers; self-contained). Yields one row per partition: its number of rows; per column the
    count, sum, centred sum of squares, min and max of the non-null values (``v``); the sorted
    samples of each chunk of rows (``q``: ``[column, count, step, values...]``)."""

    def stats(batches: Any) -> Any:
        import numpy as np
        import pyarrow as pa

        k, accuracy, chunk = params["k"], params["accuracy"], params["chunk"]
        acc = np.zeros((k, 5))  # count, sum, centred sum of squares, min, max

        def before(a: float, b: float) -> bool:  # Spark's order of doubles: NaN last
            return bool((not np.isnan(a) and np.isnan(b)) or a < b)

        pending: list[list[Any]] = [[] for _ in range(k)]
        held = 0
        rows = 0
        q: list[list[float]] = []

        def flush() -> None:
            for j in range(k):
                if not pending[j]:
                    continue
                x = np.sort(np.concatenate(pending[j]))
                pending[j] = []
                n = len(x)
                s = float(x.sum())
                m2 = float(np.square(x - s / n).sum())
                cnt, tot = acc[j, 0], acc[j, 1]
                # np.sort puts NaN last, as Spark orders doubles: the ends are its min and max.
                lo, hi = float(x[0]), float(x[-1])
                if cnt:  # merge with the earlier chunks (Chan et al.)
                    d = s / n - tot / cnt
                    m2 += d * d * cnt * n / (cnt + n)
                    lo = lo if before(lo, acc[j, 3]) else acc[j, 3]
                    hi = acc[j, 4] if before(hi, acc[j, 4]) else hi
                acc[j] = [cnt + n, tot + s, acc[j, 2] + m2, lo, hi]
                step = max(1, n // accuracy)
                sample = x[::step]
                if (n - 1) % step:
                    sample = np.append(sample, x[-1])
                q.append([float(j), float(n), float(step)] + sample.tolist())

        for b in batches:
            rows += b.num_rows
            held += b.num_rows
            for j in range(k):
                col = b.column(j)
                if col.null_count:
                    col = col.drop_null()
                if len(col):
                    pending[j].append(col.to_numpy(zero_copy_only=False))
            if held >= chunk:
                flush()
                held = 0
        flush()
        v = [float(a) for a in acc.ravel()]
        yield pa.RecordBatch.from_pydict(
            {"rows": [rows], "v": [v], "q": [q]},
            schema=pa.schema(
                [
                    ("rows", pa.int64()),
                    ("v", pa.list_(pa.float64())),
                    ("q", pa.list_(pa.list_(pa.float64()))),
                ]
            ),
        )

    return stats


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
    """Histograms, outlier counts and correlations in one pass (:func:`_moments`), then the
    top values, non-null counts and numbers of distinct values of the categorical columns in
    one exploded group-by."""
    from pyspark.sql import functions as F
    from pyspark.sql.window import Window

    fences: dict[str, tuple[float, float]] = {}
    widths: dict[str, tuple[float, float]] = {}
    bins = cfg.histogram_bins
    for c in numeric:
        s = first["numeric"][c]
        if s["min"] is None:
            continue
        lo, hi = s["min"], s["max"]
        widths[c] = (lo, (hi - lo) / bins if hi > lo else 1.0)
        f = _fences(s, cfg)
        if f:
            fences[c] = f
    # Pearson correlation of each pair over the rows where both are present, from sums of
    # values centred on the means of pass 1 (numerically stable).
    pairs: list[tuple[str, str]] = []
    if cfg.correlation:
        for i, col_a in enumerate(numeric):
            for col_b in numeric[i + 1 :]:
                ma, mb = first["numeric"][col_a]["mean"], first["numeric"][col_b]["mean"]
                if ma is not None and mb is not None:
                    pairs.append((col_a, col_b))
    hist: dict[str, Any] = {}
    outliers: dict[str, int] = {}
    corr: dict[str, Any] | None = None
    if widths or pairs:
        sums = _moments(df, numeric, first, widths, fences, bins)
        if cfg.correlation:
            corr = {c: {c2: (1.0 if c == c2 else None) for c2 in numeric} for c in numeric}
            for col_a, col_b in pairs:
                a, b = numeric.index(col_a), numeric.index(col_b)
                corr[col_a][col_b] = corr[col_b][col_a] = _pearson(sums, a, b)
        for k, c in enumerate(numeric):
            if c in widths:
                lo, width = widths[c]
                hist[c] = {
                    "edges": [lo + i * width for i in range(bins + 1)],
                    "counts": [int(n) for n in sums["hist"][k]],
                }
            if c in fences:
                outliers[c] = int(sums["outliers"][k])

    top: dict[str, Any] = {c: [] for c in categorical}
    cats: dict[str, Any] = {}
    if categorical:
        items = [
            F.struct(F.lit(j).alias("k"), _c(c).cast("string").alias("v"))
            for j, c in enumerate(categorical)
        ]
        w = Window.partitionBy("k").orderBy(F.col("n").desc(), F.col("v"))
        per_column = Window.partitionBy("k")
        ranked = (
            df.select(F.explode(F.array(*items)).alias("e"))
            .where(F.col("e.v").isNotNull())
            .groupBy(F.col("e.k").alias("k"), F.col("e.v").alias("v"))
            .agg(F.count(F.lit(1)).alias("n"))
            .withColumn("rank", F.row_number().over(w))
            .withColumn("values", F.sum("n").over(per_column))
            .withColumn("distinct", F.count(F.lit(1)).over(per_column))
            .where(F.col("rank") <= cfg.top_k)
        )
        for r in ranked.collect():
            c = categorical[int(r["k"])]
            top[c].append({"value": r["v"], "count": int(r["n"])})
            cats[c] = {"count": int(r["values"]), "cardinality": int(r["distinct"])}
        for c in top:
            top[c].sort(key=lambda e: (-e["count"], e["value"]))
    rows = first["rows"]
    categorical_stats = {
        c: {
            "count": cats.get(c, {}).get("count", 0),
            "nulls": rows - cats.get(c, {}).get("count", 0),
            "cardinality": cats.get(c, {}).get("cardinality", 0),
        }
        for c in categorical
    }
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
    return {
        "histograms": hist,
        "top_values": top,
        "correlation": corr,
        "categorical": categorical_stats,
    }, found


def _pearson(sums: dict[str, Any], a: int, b: int) -> float | None:
    n = sums["n"][a, b]
    if n < 2:
        return None
    sa, sb = sums["s1"][a, b], sums["s1"][b, a]
    va = sums["s2"][a, b] - sa * sa / n
    vb = sums["s2"][b, a] - sb * sb / n
    if va <= 0 or vb <= 0:
        return None  # a constant column has no correlation
    return _num((sums["cross"][a, b] - sa * sb / n) / math.sqrt(va * vb))


def _moments(
    df: Any,
    numeric: list[str],
    first: dict[str, Any],
    widths: dict[str, tuple[float, float]],
    fences: dict[str, tuple[float, float]],
    bins: int,
) -> dict[str, Any]:
    """Histogram counts, outlier counts and the pairwise centred sums of the numeric columns,
    in one pass: each partition's Arrow batches are summed with numpy in the executors' Python
    workers (one aggregation with hundreds of Spark aggregates was the profile's slowest job:
    too many fields for whole-stage code generation), and the partitions' sums added here.

    Returns:
        ``hist`` (columns x bins), ``outliers`` (columns), and columns x columns matrices over
        the rows where both columns are present: ``n`` (rows), ``s1`` (``[a, b]``: sum of a's
        centred values), ``s2`` (the same of their squares) and ``cross`` (sum of products).
    """
    import numpy as np

    k = len(numeric)
    means = [first["numeric"][c]["mean"] for c in numeric]
    params = {
        "k": k,
        "bins": bins,
        "means": [m if m is not None else 0.0 for m in means],
        "widths": [widths.get(c) for c in numeric],
        "fences": [fences.get(c) for c in numeric],
    }
    cols = [_c(c).cast("double").alias(f"x{i}") for i, c in enumerate(numeric)]
    parts = df.select(*cols).mapInArrow(_moments_of_batches(params), "v array<double>").collect()
    total = np.zeros(k * bins + k + 4 * k * k)
    for r in parts:
        total += np.asarray(r["v"], dtype=float)
    hist, rest = total[: k * bins].reshape(k, bins), total[k * bins :]
    outl, mats = rest[:k], rest[k:].reshape(4, k, k)
    return {
        "hist": hist,
        "outliers": outl,
        "n": mats[0],
        "s1": mats[1],
        "s2": mats[2],
        "cross": mats[3],
    }


def _moments_of_batches(params: dict[str, Any]) -> Any:
    """The ``mapInArrow`` function of :func:`_moments` (runs in the executors' Python workers;
    self-contained, so that they need not import Rayline). Bucket and fence arithmetic is
    Spark's: ``least(floor((x - lo) / width), bins - 1)``, nulls in no bucket."""

    def sums(batches: Any) -> Any:
        import numpy as np
        import pyarrow as pa

        k, bins = params["k"], params["bins"]
        mu = np.asarray(params["means"], dtype=float)
        hist = np.zeros((k, bins))
        outl = np.zeros(k)
        mats = np.zeros((4, k, k))
        for b in batches:
            n = b.num_rows
            if n == 0:
                continue
            x = np.empty((n, k))
            m = np.empty((n, k))
            for j in range(k):
                col = b.column(j)
                x[:, j] = col.to_numpy(zero_copy_only=False)
                m[:, j] = col.is_valid().to_numpy(zero_copy_only=False)
            present = m.astype(bool)
            for j in range(k):
                v = x[present[:, j], j]
                if params["widths"][j] is not None:
                    lo, width = params["widths"][j]
                    idx = np.minimum(np.floor((v - lo) / width), bins - 1)
                    idx = idx[(idx >= 0) & ~np.isnan(idx)].astype(np.int64)
                    hist[j] += np.bincount(idx, minlength=bins)[:bins]
                if params["fences"][j] is not None:
                    f_lo, f_hi = params["fences"][j]
                    outl[j] += np.count_nonzero((v < f_lo) | (v > f_hi))
            z = np.where(present, x - mu, 0.0)
            mats[0] += m.T @ m
            mats[1] += z.T @ m
            mats[2] += (z * z).T @ m
            mats[3] += z.T @ z
        v = np.concatenate([hist.ravel(), outl, mats.ravel()])
        yield pa.RecordBatch.from_pydict({"v": [v.tolist()]})

    return sums


def render_charts(report: dict[str, Any], out_dir: Loc, prefix: str) -> dict[str, str]:
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
        write_figure(fig, p, dpi=80)
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
        write_figure(fig, p, dpi=80)
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
    report = _first_pass(df, numeric, cfg)
    extra, outliers = _second_pass(df, numeric, categorical, report, cfg)
    report.update(extra)
    wanted = [c for c, o in outliers.items() if o["count"] and cfg.sample_size]
    if wanted:
        import json
        from concurrent.futures import ThreadPoolExecutor

        row = F.to_json(F.struct(*[_c(x) for x in df.columns])).alias("j")

        def sample(c: str) -> list[Any]:
            o = outliers[c]
            cond = (_c(c) < o["low"]) | (_c(c) > o["high"])
            return df.where(cond).select(row).limit(cfg.sample_size).collect()

        # Small jobs (a limit each, reading only the first rows): submitted together, so that
        # their scheduling overlaps instead of adding up.
        with ThreadPoolExecutor(max_workers=min(4, len(wanted))) as pool:
            for c, rows in zip(wanted, pool.map(sample, wanted), strict=True):
                outliers[c]["samples"] = [json.loads(r["j"]) for r in rows]
    report["outliers"] = outliers
    report["charts"] = render_charts(report, ctx.run_dir / "charts", ctx.stage)
    return df, report
