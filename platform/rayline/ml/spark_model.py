"""The Spark ML challenger: gradient-boosted trees trained in the Spark-on-Ray session.

The train split is selected in Spark with the same split function Ray Data uses, and the
feature matrix is built by the same :class:`~rayline.ml.features.Preprocessor` (through
``mapInPandas``), so both frameworks learn from identical inputs. The fitted model is saved in
Spark ML's own format and its trees exported to ``trees.json``, from which
:class:`~rayline.ml.models.TreeEnsembleModel` scores without a JVM (serving, Ray Data batch
scoring). An integration test checks the export against Spark's own predictions.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd

from .features import Preprocessor
from .handoff import _SPLIT_COL, _assign, _drop_unlabelled
from .models import tree_matrix, write_model_info
from .spec import MLSpec

__all__ = ["train_spark_gbt", "export_trees", "feature_frame"]

log = logging.getLogger("rayline")

SPARK_MODEL_DIR = "spark_model"


def feature_frame(df: Any, pre: Preprocessor, ml: MLSpec, split: int | None = 0) -> Any:
    """Spark DataFrame of ``f0..fN`` (the tree matrix) and ``label``, for one split.

    Args:
        df: The curated Spark DataFrame.
        pre: The fitted preprocessor.
        ml: The ``ml`` section (split settings).
        split: 0 train, 1 validation, 2 test; None keeps every labelled row.
    """
    from pyspark.sql.types import DoubleType, StructField, StructType

    width = pre.dense_width + len(pre.embedded)
    names = [f"f{i}" for i in range(width)]
    schema = StructType(
        [StructField(n, DoubleType(), False) for n in names]
        + [StructField("label", DoubleType(), False)]
    )
    keys = ml.split.key_columns or ml.features.columns() + [ml.label]
    cols = sorted(
        set(
            keys
            + pre.feature_columns
            + [ml.label]
            + ([ml.split.time_column] if ml.split.time_column else [])
        )
    )

    def to_matrix(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for b in batches:
            b = _drop_unlabelled(b, ml.label)
            if split is not None:
                b = _assign(b, ml, keys)
                b = b[b[_SPLIT_COL] == split]
            m = tree_matrix(pre, b)
            out = pd.DataFrame(m, columns=names)
            y = pre.labels(b)
            out["label"] = (
                pd.to_numeric(b[ml.label]).to_numpy(dtype=float)
                if pre.task == "regression"
                else y.astype(float)
            )
            yield out

    return df.select(*cols).mapInPandas(to_matrix, schema)


def export_trees(model_path: str | Path) -> dict[str, Any]:
    """Read a saved Spark GBT model's trees into arrays (node-indexed, -1 = leaf)."""
    import pyarrow.parquet as pq

    p = Path(model_path)
    nodes = pq.read_table(p / "data").to_pylist()
    meta = pq.read_table(p / "treesMetadata").to_pylist()
    weights = {int(m["treeID"]): float(m["weights"]) for m in meta}
    trees: dict[int, list[dict[str, Any]]] = {}
    for row in nodes:
        trees.setdefault(int(row["treeID"]), []).append(row["nodeData"])
    out = []
    depth = 0
    for tid in sorted(trees):
        nd = sorted(trees[tid], key=lambda n: n["id"])
        if [n["id"] for n in nd] != list(range(len(nd))):
            raise ValueError(f"{p}: tree {tid} has non-contiguous node ids")
        t: dict[str, list[Any]] = {
            k: [] for k in ("feature", "threshold", "left", "right", "value")
        }
        for n in nd:
            s = n["split"]
            leaf = n["leftChild"] < 0
            if not leaf and s["numCategories"] != -1:
                raise ValueError(f"{p}: categorical splits are not supported (tree {tid})")
            t["feature"].append(-1 if leaf else int(s["featureIndex"]))
            t["threshold"].append(0.0 if leaf else float(s["leftCategoriesOrThreshold"][0]))
            t["left"].append(int(n["leftChild"]))
            t["right"].append(int(n["rightChild"]))
            t["value"].append(float(n["prediction"]))
        out.append(t)
        depth = max(depth, _depth(t))
    return {"trees": out, "weights": [weights[t] for t in sorted(trees)], "max_depth": depth}


def _depth(t: dict[str, list[Any]]) -> int:
    best = 0
    stack = [(0, 0)]
    while stack:
        node, d = stack.pop()
        best = max(best, d)
        if t["left"][node] >= 0:
            stack += [(t["left"][node], d + 1), (t["right"][node], d + 1)]
    return best


def train_spark_gbt(df: Any, pre: Preprocessor, ml: MLSpec, out_dir: str | Path) -> Path:
    """Fit a GBT regressor / binary classifier on the train split; write a model directory.

    Args:
        df: The curated Spark DataFrame.
        pre: The preprocessor fitted on the train split (in Ray Data).
        ml: The ``ml`` section; ``ml.spark_model`` holds the GBT settings.
        out_dir: Directory to create (model.json, preprocessor.json, trees.json, spark_model/).

    Returns:
        ``out_dir``.
    """
    from pyspark.ml.classification import GBTClassifier
    from pyspark.ml.feature import VectorAssembler
    from pyspark.ml.regression import GBTRegressor

    if ml.spark_model is None:
        raise ValueError("ml.spark_model is not configured")
    if pre.task == "multiclass":
        raise ValueError("ml.spark_model: Spark's GBT supports regression and binary tasks only")
    s = ml.spark_model
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    train = feature_frame(df, pre, ml, split=0)
    names = [c for c in train.columns if c != "label"]
    vec = VectorAssembler(inputCols=names, outputCol="features").transform(train)
    kw: dict[str, Any] = dict(
        featuresCol="features",
        labelCol="label",
        maxIter=s.max_iter,
        maxDepth=s.max_depth,
        stepSize=s.step_size,
        maxBins=s.max_bins,
        seed=ml.split.seed,
    )
    est = GBTRegressor(**kw) if pre.task == "regression" else GBTClassifier(**kw)
    model = est.fit(vec)
    model.write().overwrite().save(str(out / SPARK_MODEL_DIR))
    trees = export_trees(out / SPARK_MODEL_DIR)
    (out / "trees.json").write_text(json.dumps(trees))
    pre.save(out)
    params = s.model_dump()
    write_model_info(out, "spark_gbt", task=pre.task, params=params)
    (out / "history.json").write_text("[]")
    log.info(
        "Spark GBT challenger: %d trees (depth %d) in %.1fs",
        len(trees["trees"]),
        trees["max_depth"],
        time.perf_counter() - t0,
    )
    return out
