"""The profile's numpy passes without Spark: per-partition sums and samples merged on the driver
give the exact count, mean, stddev, min and max, and quantiles within percentile_approx's rank
error (exact on small data, as Spark's are)."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest

from rayline.stages.analytics import _merge_stats, _stats_of_batches

QS = [0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0]


def _partitions(columns: dict[str, list], splits: list[int], batch: int) -> list[list]:
    """The columns cut into partitions at ``splits``, each as Arrow batches of ``batch`` rows."""
    names = list(columns)
    n = len(columns[names[0]])
    bounds = [0, *splits, n]
    parts = []
    for a, b in zip(bounds, bounds[1:], strict=False):
        batches = []
        for s in range(a, b, batch):
            e = min(b, s + batch)
            batches.append(
                pa.RecordBatch.from_arrays(
                    [pa.array(columns[c][s:e], type=pa.float64()) for c in names],
                    names=[f"x{i}" for i in range(len(names))],
                )
            )
        parts.append(batches)
    return parts


def _profile(columns: dict[str, list], accuracy: int, chunk: int, splits: list[int], batch=7):
    fn = _stats_of_batches({"k": len(columns), "accuracy": accuracy, "chunk": chunk})
    rows = []
    for batches in _partitions(columns, splits, batch):
        out = list(fn(iter(batches)))
        assert len(out) == 1  # one row per partition
        rows.append(out[0].to_pylist()[0])
    return _merge_stats(rows, list(columns), QS)


def _spark_quantile(values: np.ndarray, q: float) -> float:
    """What Spark's percentile_approx returns when it is exact: the ceil(q n)-th smallest."""
    x = np.sort(values)
    return float(x[max(1, math.ceil(q * len(x))) - 1])


def test_exact_statistics_and_quantiles_on_small_data():
    rng = np.random.default_rng(7)
    a = rng.normal(10, 3, 200).round(2).tolist()
    b = rng.integers(0, 5, 200).astype(float).tolist()  # heavy ties
    for i in (3, 50, 51, 199):
        a[i] = None
    stats = _profile({"a": a, "b": b}, accuracy=1000, chunk=64, splits=[37, 120])
    for name, col in (("a", a), ("b", b)):
        x = np.array([v for v in col if v is not None])
        s = stats[name]
        assert s["count"] == len(x) and s["nulls"] == 200 - len(x)
        assert s["mean"] == pytest.approx(x.mean(), rel=1e-12)
        assert s["stddev"] == pytest.approx(x.std(ddof=1), rel=1e-12)
        assert (s["min"], s["max"]) == (x.min(), x.max())
        # fewer values per chunk than the accuracy: every value is kept, the answer is exact
        assert s["quantiles"] == {str(q): _spark_quantile(x, q) for q in QS}


def test_quantiles_within_the_rank_error_on_large_data():
    rng = np.random.default_rng(3)
    x = rng.lognormal(3, 1, 50_000)
    accuracy = 100
    stats = _profile({"x": x.tolist()}, accuracy, chunk=6_000, splits=[17_000, 31_000], batch=4096)
    xs = np.sort(x)
    n = len(xs)
    for q, v in stats["x"]["quantiles"].items():
        target = max(1, math.ceil(float(q) * n))
        lo, hi = np.searchsorted(xs, v, "left") + 1, np.searchsorted(xs, v, "right")
        assert lo <= target + n / accuracy and hi >= target - n / accuracy, (q, v, target)
    assert stats["x"]["mean"] == pytest.approx(x.mean(), rel=1e-12)
    assert stats["x"]["stddev"] == pytest.approx(x.std(ddof=1), rel=1e-9)


def test_empty_and_all_null_columns_and_nan():
    stats = _profile(
        {"none": [None, None, None, None], "nan": [1.0, float("nan"), -2.0, None]},
        accuracy=1000,
        chunk=2,
        splits=[2],
        batch=1,
    )
    assert stats["none"] == {
        "count": 0,
        "nulls": 4,
        "mean": None,
        "stddev": None,
        "min": None,
        "max": None,
        "quantiles": {str(q): None for q in QS},
    }
    nan = stats["nan"]
    # Spark orders NaN after every number: the min is a number, the max (and the mean) NaN,
    # reported as missing.
    assert nan["count"] == 3 and nan["min"] == -2.0 and nan["max"] is None and nan["mean"] is None
    assert nan["quantiles"]["0.0"] == -2.0 and nan["quantiles"]["0.5"] == 1.0
