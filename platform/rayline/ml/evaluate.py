"""Test-split evaluation with Ray Data aggregations, beside a naive baseline and per slice.

The model scores the split through ``map_batches`` with the same model interface batch scoring
and serving use. Metrics come from sums over per-row terms (``Dataset.aggregate``) and small
group-bys (confusion matrix, score histogram for ROC-AUC, slices); no rows are collected to the
driver except a bounded sample for the predicted-vs-actual chart.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .features import Preprocessor
from .models import load_model

__all__ = ["evaluate", "Scorer", "AUC_BINS"]

AUC_BINS = 1000
_EPS = 1e-15


class Scorer:
    """Ray Data callable: loads a model directory once per actor and scores batches.

    Output columns: ``_y`` (label), ``_pred`` (prediction), ``_p`` (binary: P(positive)),
    ``_logp`` (classification: log-probability of the true class), and the slice columns.
    """

    def __init__(self, model_dir: str, keep: list[str]) -> None:
        self.model = load_model(model_dir)
        self.keep = keep

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        pre = self.model.pre
        out = self.model.predict(batch)
        res = pd.DataFrame({c: batch[c].to_numpy() for c in self.keep})
        if pre.task == "regression":
            res["_y"] = pd.to_numeric(batch[pre.label]).to_numpy(dtype=np.float64)
            res["_pred"] = out["prediction"].astype(np.float64)
        else:
            y = pre.labels(batch).astype(np.int64)
            probs = out["probabilities"]
            res["_y"] = y
            res["_pred"] = np.argmax(probs, axis=1).astype(np.int64)
            res["_logp"] = np.log(np.clip(probs[np.arange(len(y)), y], _EPS, 1.0))
            if pre.task == "binary":
                res["_p"] = probs[:, 1]
        return res


def _regression_terms(b: pd.DataFrame, mean: float) -> pd.DataFrame:
    e = b["_pred"] - b["_y"]
    eb = mean - b["_y"]
    return b.assign(_e=e, _ae=e.abs(), _se=e * e, _y2=b["_y"] ** 2, _abe=eb.abs(), _sbe=eb * eb)


def _regression(scored: Any, pre: Preprocessor, slices: list[str], max_slices: int) -> dict:
    from ray.data.aggregate import Count, Sum

    mean = pre.label_stats["mean"]
    terms = scored.map_batches(_regression_terms, fn_kwargs={"mean": mean}, batch_format="pandas")
    aggs = [
        Count(alias_name="n"),
        Sum("_ae", alias_name="ae"),
        Sum("_se", alias_name="se"),
        Sum("_y", alias_name="y"),
        Sum("_y2", alias_name="y2"),
        Sum("_abe", alias_name="abe"),
        Sum("_sbe", alias_name="sbe"),
    ]
    r = terms.aggregate(*aggs)

    def metrics(n: float, ae: float, se: float, y: float, y2: float) -> dict[str, float]:
        sst = y2 - y * y / n if n else 0.0
        return {
            "rmse": math.sqrt(se / n),
            "mae": ae / n,
            "r2": 1 - se / sst if sst > 0 else float("nan"),
            "rows": int(n),
        }

    out = metrics(r["n"], r["ae"], r["se"], r["y"], r["y2"])
    base = metrics(r["n"], r["abe"], r["sbe"], r["y"], r["y2"])
    sliced: dict[str, list[dict[str, Any]]] = {}
    for col in slices:
        rows = terms.groupby(col).aggregate(*aggs).sort("n", descending=True).take(max_slices)
        sliced[col] = [
            {"value": _plain(g[col])} | metrics(g["n"], g["ae"], g["se"], g["y"], g["y2"])
            for g in rows
        ]
    return {"metrics": out, "baseline": base | {"kind": "train mean"}, "slices": sliced}


def _class_terms(b: pd.DataFrame, bins: int) -> pd.DataFrame:
    b = b.assign(_ok=(b["_y"] == b["_pred"]).astype(np.int64))
    if "_p" in b:
        b = b.assign(_bin=np.minimum((b["_p"] * bins).astype(np.int64), bins - 1))
    return b


def _classification(scored: Any, pre: Preprocessor, slices: list[str], max_slices: int) -> dict:
    from ray.data.aggregate import Count, Sum

    k = len(pre.classes)
    terms = scored.map_batches(_class_terms, fn_kwargs={"bins": AUC_BINS}, batch_format="pandas")
    r = terms.aggregate(
        Count(alias_name="n"), Sum("_ok", alias_name="ok"), Sum("_logp", alias_name="logp")
    )
    n = int(r["n"])
    confusion = np.zeros((k, k), dtype=np.int64)
    for g in terms.groupby(["_y", "_pred"]).count().take_all():  # at most k*k groups
        confusion[int(g["_y"]), int(g["_pred"])] = int(g["count()"])
    out: dict[str, Any] = {
        "accuracy": int(r["ok"]) / n,
        "log_loss": -float(r["logp"]) / n,
        "rows": n,
    }
    priors = np.asarray([pre.label_stats.get(c, 0.0) for c in pre.classes])
    majority = int(np.argmax(priors))
    test_counts = confusion.sum(axis=1)
    base: dict[str, Any] = {
        "kind": f"majority class ({pre.classes[majority]!r})",
        "accuracy": test_counts[majority] / n,
        "log_loss": float(-(test_counts * np.log(np.clip(priors, _EPS, 1))).sum() / n),
    }
    prec, rec, f1 = _prf(confusion)
    if pre.task == "binary":
        out.update(precision=prec[1], recall=rec[1], f1=f1[1])
        pos = np.zeros(AUC_BINS)
        neg = np.zeros(AUC_BINS)
        for g in terms.groupby(["_bin", "_y"]).count().take_all():  # at most 2 * AUC_BINS
            (pos if int(g["_y"]) == 1 else neg)[int(g["_bin"])] += int(g["count()"])
        out["roc_auc"] = _auc(pos, neg)
        out["roc_curve"] = _roc(pos, neg)
        # Always predicting the majority class: all positives (majority 1) or none.
        base.update(
            precision=test_counts[1] / n if majority == 1 else 0.0,
            recall=1.0 if majority == 1 else 0.0,
            roc_auc=0.5,
        )
        base["f1"] = (
            2 * base["precision"] * base["recall"] / (base["precision"] + base["recall"])
            if base["precision"] + base["recall"]
            else 0.0
        )
    else:
        out["macro_f1"] = float(np.mean(f1))
        base["macro_f1"] = float(
            2 * (test_counts[majority] / n) / (1 + test_counts[majority] / n) / k
        )
    out["confusion_matrix"] = confusion.tolist()
    out["classes"] = pre.classes
    sliced: dict[str, list[dict[str, Any]]] = {}
    for col in slices:
        rows = (
            terms.groupby(col)
            .aggregate(
                Count(alias_name="n"), Sum("_ok", alias_name="ok"), Sum("_logp", alias_name="logp")
            )
            .sort("n", descending=True)
            .take(max_slices)
        )
        sliced[col] = [
            {
                "value": _plain(g[col]),
                "rows": int(g["n"]),
                "accuracy": g["ok"] / g["n"],
                "log_loss": -g["logp"] / g["n"],
            }
            for g in rows
        ]
    return {"metrics": out, "baseline": base, "slices": sliced}


def _prf(c: np.ndarray) -> tuple[list[float], list[float], list[float]]:
    tp = np.diag(c).astype(float)
    pred = c.sum(axis=0).astype(float)
    true = c.sum(axis=1).astype(float)
    p = np.divide(tp, pred, out=np.zeros_like(tp), where=pred > 0)
    r = np.divide(tp, true, out=np.zeros_like(tp), where=true > 0)
    f = np.divide(2 * p * r, p + r, out=np.zeros_like(tp), where=(p + r) > 0)
    return p.tolist(), r.tolist(), f.tolist()


def _auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """ROC-AUC from score histograms: P(score_pos > score_neg) + half the ties (same bin)."""
    tp, tn = pos.sum(), neg.sum()
    if tp == 0 or tn == 0:
        return float("nan")
    neg_below = np.cumsum(neg) - neg
    return float((pos * (neg_below + 0.5 * neg)).sum() / (tp * tn))


def _roc(pos: np.ndarray, neg: np.ndarray, points: int = 50) -> list[list[float]]:
    tpr = np.concatenate([[0.0], np.cumsum(pos[::-1]) / max(pos.sum(), 1)])
    fpr = np.concatenate([[0.0], np.cumsum(neg[::-1]) / max(neg.sum(), 1)])
    idx = np.unique(np.linspace(0, len(tpr) - 1, points).astype(int))
    return [[float(fpr[i]), float(tpr[i])] for i in idx]


def _plain(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    return v


def evaluate(
    model_dir: str | Path,
    test: Any,
    slices: list[str],
    max_slices: int = 20,
    sample: int = 2000,
) -> dict[str, Any]:
    """Score the test split and compute the task's metrics, the baseline's and per slice.

    Args:
        model_dir: A model directory (see :mod:`rayline.ml.models`).
        test: The test split (``ray.data.Dataset``).
        slices: Columns to slice metrics by.
        max_slices: Largest slices reported per column.
        sample: Rows of (actual, predicted) kept for the regression chart.

    Returns:
        ``{"metrics": {...}, "baseline": {...}, "slices": {col: [...]}, "sample": [...]}``.
    """
    model = load_model(model_dir)
    pre = model.pre
    missing = [c for c in slices if c not in test.schema().names]
    if missing:
        raise ValueError(f"ml.evaluation.slices: columns {missing} are not in the data")
    scored = test.map_batches(
        Scorer,
        fn_constructor_kwargs={"model_dir": str(model_dir), "keep": slices},
        batch_format="pandas",
        batch_size=8192,
        concurrency=1,
    ).materialize()
    if pre.task == "regression":
        res = _regression(scored, pre, slices, max_slices)
        n = res["metrics"]["rows"]
        frac = min(1.0, sample / n) if n else 1.0
        pts = scored.random_sample(frac, seed=0).select_columns(["_y", "_pred"]).take(sample)
        res["sample"] = [[float(p["_y"]), float(p["_pred"])] for p in pts]
    else:
        res = _classification(scored, pre, slices, max_slices)
    res["framework"] = model.framework
    return res
