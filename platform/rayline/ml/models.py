"""One small model interface over the two frameworks: load, predict a batch, signature.

A model directory holds ``model.json`` (framework, task), ``preprocessor.json`` and the
framework's files. :func:`load_model` returns a :class:`KerasModel` or a :class:`TreeEnsembleModel`
(a Spark ML gradient-boosted trees model, scored from its exported trees without a JVM); both
apply the same :class:`~rayline.ml.features.Preprocessor` and answer the same way:

- regression: ``{"prediction": float64 [n]}``
- binary: ``{"prediction": class [n], "probability": P(positive class) [n],
  "probabilities": [n, 2]}``
- multiclass: ``{"prediction": class [n], "probabilities": [n, k]}``
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .features import Columns, Preprocessor, num_rows

__all__ = [
    "Model",
    "KerasModel",
    "TreeEnsembleModel",
    "load_model",
    "write_model_info",
    "tree_matrix",
    "MODEL_INFO",
]

MODEL_INFO = "model.json"


class Model(Protocol):
    framework: str
    pre: Preprocessor

    def predict(self, df: Columns) -> dict[str, np.ndarray]: ...

    def signature(self) -> dict[str, Any]: ...


def write_model_info(directory: str | Path, framework: str, **extra: Any) -> None:
    info = {"framework": framework, **extra}
    (Path(directory) / MODEL_INFO).write_text(json.dumps(info, indent=2, sort_keys=True))


def _answer(pre: Preprocessor, raw: np.ndarray) -> dict[str, np.ndarray]:
    if pre.task == "regression":
        return {"prediction": pre.decode(raw.reshape(-1).astype(np.float64))}
    classes = np.asarray(pre.classes, dtype=object)
    if pre.task == "binary":
        p = np.clip(raw.reshape(-1).astype(np.float64), 0.0, 1.0)
        return {
            "prediction": classes[(p >= 0.5).astype(int)],
            "probability": p,
            "probabilities": np.stack([1 - p, p], axis=1),
        }
    probs = raw.astype(np.float64)
    return {"prediction": classes[np.argmax(probs, axis=1)], "probabilities": probs}


class KerasModel:
    """A tf-keras model with its preprocessor; predicts through a compiled ``tf.function``
    (``model.predict`` costs ~37 ms a call whatever the batch)."""

    framework = "keras"

    def __init__(self, directory: str | Path) -> None:
        from .keras_model import MODEL_FILE, use_tf_keras

        keras = use_tf_keras()
        import tensorflow as tf

        d = Path(directory)
        self.pre = Preprocessor.load(d)
        self.keras_model = keras.models.load_model(str(d / MODEL_FILE), compile=False)
        # One concrete function for any batch size, traced once here from the model's inputs:
        # calling it skips tf.function's per-call dispatch (argument binding, function-cache
        # lookup and input conversion), which cost as much as the forward pass itself on small
        # batches (~230 us -> ~130 us a call at batch 1 for the flights MLP).
        spec = {
            t.name.split(":")[0]: tf.TensorSpec([None, *t.shape[1:]], t.dtype, name=t.name)
            for t in self.keras_model.inputs
        }
        self._inputs = {k: v.dtype for k, v in spec.items()}
        fn = tf.function(lambda x: self.keras_model(x, training=False), input_signature=[spec])
        self._fn = fn.get_concrete_function()
        self._tf = tf

    def predict(self, df: Columns) -> dict[str, np.ndarray]:
        if num_rows(df) == 0:
            return _answer(self.pre, np.zeros((0, max(1, len(self.pre.classes)))))
        x = self.pre.transform(df)
        tensors = {k: self._tf.constant(x[k], dtype=dt) for k, dt in self._inputs.items()}
        raw = self._fn(tensors).numpy()
        return _answer(self.pre, raw)

    def signature(self) -> dict[str, Any]:
        return self.pre.signature()


def tree_matrix(pre: Preprocessor, df: Columns) -> np.ndarray:
    """The feature matrix tree models see: the dense block, then embedded categoricals' indices.

    Spark training (through ``mapInPandas``) and scoring use this same function.
    """
    x = pre.transform(df)
    cols = [x["dense"].astype(np.float64)]
    cols += [x[f"cat_{n}"].astype(np.float64)[:, None] for n in pre.embedded]
    return np.concatenate(cols, axis=1)


class TreeEnsembleModel:
    """A Spark ML GBT model, scored in NumPy from its exported trees (no JVM needed)."""

    framework = "spark_gbt"

    def __init__(self, directory: str | Path) -> None:
        d = Path(directory)
        self.pre = Preprocessor.load(d)
        spec = json.loads((d / "trees.json").read_text())
        self.weights = np.asarray(spec["weights"], dtype=np.float64)
        self.trees = [
            {k: np.asarray(t[k]) for k in ("feature", "threshold", "left", "right", "value")}
            for t in spec["trees"]
        ]
        self.depth = int(spec["max_depth"])

    def margin(self, m: np.ndarray) -> np.ndarray:
        n = m.shape[0]
        total = np.zeros(n, dtype=np.float64)
        rows = np.arange(n)
        for w, t in zip(self.weights, self.trees, strict=True):
            node = np.zeros(n, dtype=np.int64)
            for _ in range(self.depth + 1):
                leaf = t["left"][node] < 0
                if leaf.all():
                    break
                f = np.where(leaf, 0, t["feature"][node])
                go_left = m[rows, f] <= t["threshold"][node]
                node = np.where(leaf, node, np.where(go_left, t["left"][node], t["right"][node]))
            total += w * t["value"][node]
        return total

    def predict(self, df: Columns) -> dict[str, np.ndarray]:
        margin = self.margin(tree_matrix(self.pre, df))
        if self.pre.task == "regression":
            return {"prediction": margin}  # trained on the raw label
        # Spark's GBT classifier: P(y=1) = 1 / (1 + exp(-2 * margin)).
        return _answer(self.pre, 1.0 / (1.0 + np.exp(-2.0 * margin)))

    def signature(self) -> dict[str, Any]:
        return self.pre.signature()


def load_model(directory: str | Path) -> Model:
    """Load a model directory (as the registry stores it) into the common interface.

    Raises:
        ValueError: the directory is not a complete model (names the missing file).
    """
    d = Path(directory)
    for f in (MODEL_INFO, "preprocessor.json"):
        if not (d / f).is_file():
            raise ValueError(f"{d}: not a complete model directory (missing {f})")
    framework = json.loads((d / MODEL_INFO).read_text())["framework"]
    if framework == "keras":
        return KerasModel(d)
    if framework == "spark_gbt":
        return TreeEnsembleModel(d)
    raise ValueError(f"{d}: unknown model framework {framework!r}")
