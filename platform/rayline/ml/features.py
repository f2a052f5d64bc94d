"""Feature preprocessing shared by training, evaluation, batch scoring and serving.

A :class:`Preprocessor` is fitted on the train split with one distributed Ray Data aggregation
(counts, means, standard deviations, ranges and value counts of every feature), saved as JSON
beside the model, and applied by the same :meth:`Preprocessor.transform` everywhere a model sees
rows. That single code path is what keeps training and serving from drifting apart.

Model inputs:
- ``dense``: standardized numeric columns (nulls become the train mean, i.e. 0), then one-hot
  blocks of ``onehot`` categoricals and of bucketized columns. Slot 0 of each one-hot block is
  the reserved 'unknown' bucket (values not in the train vocabulary, and nulls; for buckets,
  nulls).
- ``cat_<name>``: int32 vocabulary indices of ``embedding`` categoricals (0 = unknown).

Example:
    >>> pre = Preprocessor.from_dict({
    ...     "task": "regression", "label": "y",
    ...     "numeric": {"x": {"mean": 1.0, "std": 2.0, "min": -1.0, "max": 3.0, "nulls": 0}},
    ...     "categorical": {}, "buckets": {}, "label_stats": {"mean": 0.0, "std": 1.0},
    ... })
    >>> import pandas as pd
    >>> pre.transform(pd.DataFrame({"x": [3.0, None]}))["dense"].tolist()
    [[1.0], [0.0]]
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
import pandas as pd

from .spec import MLSpec

__all__ = [
    "FeatureError",
    "Preprocessor",
    "fit_preprocessor",
    "check_columns",
    "UNKNOWN",
]

UNKNOWN = "<unknown>"
_FILE = "preprocessor.json"


class FeatureError(ValueError):
    """Training data that cannot be used; the message names the column and the spec key."""


def _is_numeric(arrow_type: Any) -> bool:
    import pyarrow as pa

    return bool(
        pa.types.is_integer(arrow_type)
        or pa.types.is_floating(arrow_type)
        or pa.types.is_decimal(arrow_type)
        or pa.types.is_boolean(arrow_type)
    )


def check_columns(schema: Any, spec: MLSpec) -> None:
    """Check that every feature and the label exist with a usable type.

    Args:
        schema: The dataset's ``pyarrow.Schema`` (or a Ray Data schema with ``base_schema``).
        spec: The ``ml`` section.

    Raises:
        FeatureError: naming the column, the spec key and what was found.
    """
    import pyarrow as pa

    arrow = getattr(schema, "base_schema", schema)
    if not isinstance(arrow, pa.Schema):
        arrow = pa.schema(list(zip(schema.names, schema.types, strict=True)))
    types = {f.name: f.type for f in arrow}
    known = sorted(types)

    def need(col: str, key: str) -> Any:
        if col not in types:
            raise FeatureError(f"{key}: column {col!r} is not in the training data; have {known}")
        return types[col]

    f = spec.features
    for i, c in enumerate(f.numeric):
        t = need(c, f"ml.features.numeric[{i}]")
        if not _is_numeric(t):
            raise FeatureError(
                f"ml.features.numeric[{i}]: column {c!r} has type {t}, not a number; "
                "list it under ml.features.categorical or cast it in a transform"
            )
    for i, b in enumerate(f.buckets):
        t = need(b.name, f"ml.features.buckets[{i}].name")
        if not _is_numeric(t):
            raise FeatureError(
                f"ml.features.buckets[{i}]: column {b.name!r} has type {t}, not a number"
            )
    for i, cat in enumerate(f.categorical):
        t = need(cat.name, f"ml.features.categorical[{i}].name")
        if not (
            pa.types.is_string(t)
            or pa.types.is_large_string(t)
            or pa.types.is_integer(t)
            or pa.types.is_boolean(t)
        ):
            raise FeatureError(
                f"ml.features.categorical[{i}]: column {cat.name!r} has type {t}; "
                "categoricals must be strings, integers or booleans"
            )
    t = need(spec.label, "ml.label")
    if spec.task == "regression" and not _is_numeric(t):
        raise FeatureError(f"ml.label: regression label {spec.label!r} has type {t}, not a number")


Columns: TypeAlias = pd.DataFrame | Mapping[str, Any]
"""A batch of raw rows: a DataFrame, or column name -> 1-d array (the serving path's checked
rows: numbers as float64 with NaN for null, categories as objects with None for null)."""


def num_rows(df: Columns) -> int:
    """Rows of a batch given as a DataFrame or as columns."""
    if isinstance(df, pd.DataFrame):
        return len(df)
    return len(next(iter(df.values()))) if len(df) else 0


def _floats(col: Any) -> np.ndarray:
    """A column as float64 with NaN for nulls (non-numbers too); no conversion when it
    already is one (the serving path's common case)."""
    if col.dtype == np.float64:
        return col.to_numpy() if isinstance(col, pd.Series) else np.asarray(col)
    return pd.to_numeric(pd.Series(col), errors="coerce").to_numpy(
        dtype=np.float64, na_value=np.nan
    )


def _is_null(v: Any) -> bool:
    return v is None or v is pd.NA or v is pd.NaT or (isinstance(v, float) and math.isnan(v))


def _key(v: Any) -> str:
    """Vocabulary key of a categorical value (categories are matched as text)."""
    if isinstance(v, bool | np.bool_):
        return "true" if v else "false"
    if isinstance(v, float | np.floating) and float(v).is_integer():
        return str(int(v))
    return str(v)


@dataclass
class Preprocessor:
    """Fitted feature statistics and vocabularies; see the module docstring for the layout."""

    task: str
    label: str
    numeric: dict[str, dict[str, float]]
    categorical: dict[str, dict[str, Any]]
    buckets: dict[str, list[float]]
    label_stats: dict[str, float] = field(default_factory=dict)
    classes: list[str] = field(default_factory=list)
    train_rows: int = 0
    _lookups: dict[str, dict[str, int]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    # -- persistence ------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "label": self.label,
            "numeric": self.numeric,
            "categorical": self.categorical,
            "buckets": self.buckets,
            "label_stats": self.label_stats,
            "classes": self.classes,
            "train_rows": self.train_rows,
            # The model's input layout follows this order; JSON objects may not keep it.
            "order": {
                "numeric": list(self.numeric),
                "categorical": list(self.categorical),
                "buckets": list(self.buckets),
            },
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessor:
        order = d.get("order") or {}

        def ordered(group: str) -> dict[str, Any]:
            names = order.get(group, list(d[group]))
            return {n: d[group][n] for n in names}

        return cls(
            task=d["task"],
            label=d["label"],
            numeric=ordered("numeric"),
            categorical=ordered("categorical"),
            buckets=ordered("buckets"),
            label_stats=d.get("label_stats", {}),
            classes=d.get("classes", []),
            train_rows=d.get("train_rows", 0),
        )

    def save(self, directory: str | Path) -> Path:
        p = Path(directory) / _FILE
        p.write_text(json.dumps(self.to_dict(), indent=2))
        return p

    @classmethod
    def load(cls, directory: str | Path) -> Preprocessor:
        return cls.from_dict(json.loads((Path(directory) / _FILE).read_text()))

    # -- shape ------------------------------------------------------------------------------

    @property
    def feature_columns(self) -> list[str]:
        return list(self.numeric) + list(self.categorical) + list(self.buckets)

    @property
    def dense_width(self) -> int:
        w = len(self.numeric)
        for c in self.categorical.values():
            if c["encoding"] == "onehot":
                w += len(c["vocabulary"]) + 1
        for b in self.buckets.values():
            w += len(b) + 2  # n boundaries: n + 1 buckets, plus the null slot
        return w

    @property
    def embedded(self) -> dict[str, dict[str, Any]]:
        return {k: v for k, v in self.categorical.items() if v["encoding"] == "embedding"}

    def signature(self) -> dict[str, Any]:
        """The model's input contract: names, types, allowed categories, ranges seen."""
        inputs: list[dict[str, Any]] = []
        for name, s in self.numeric.items():
            inputs.append(
                {
                    "name": name,
                    "type": "number",
                    "min": s["min"],
                    "max": s["max"],
                    "mean": s["mean"],
                    "std": s["std"],
                    "nullable": True,
                }
            )
        for name, c in self.categorical.items():
            inputs.append(
                {
                    "name": name,
                    "type": "category",
                    "categories": c["vocabulary"],
                    "encoding": c["encoding"],
                    "nullable": True,
                }
            )
        for name, b in self.buckets.items():
            inputs.append({"name": name, "type": "number", "boundaries": b, "nullable": True})
        out: dict[str, Any] = {"task": self.task, "label": self.label, "inputs": inputs}
        if self.classes:
            out["classes"] = self.classes
        return out

    # -- the one transform ------------------------------------------------------------------

    def transform(self, df: Columns) -> dict[str, np.ndarray]:
        """Model inputs of a batch of raw rows (columns beyond the features are ignored).

        Args:
            df: Raw feature columns, as in the curated table: a DataFrame, or columns (see
                :data:`Columns`).

        Returns:
            ``{"dense": float32 [n, dense_width], "cat_<name>": int32 [n], ...}``.
        """
        n = num_rows(df)
        dense = np.zeros((n, self.dense_width), dtype=np.float32)
        j = 0
        for name, s in self.numeric.items():
            x = _floats(df[name])
            z = (x - s["mean"]) / (s["std"] or 1.0)
            z[~np.isfinite(z)] = 0.0  # null (or non-finite at serving time) -> the mean
            dense[:, j] = z
            j += 1
        out: dict[str, np.ndarray] = {}
        for name, c in self.categorical.items():
            idx = self._index(df[name], name)
            if c["encoding"] == "onehot":
                dense[np.arange(n), j + idx] = 1.0
                j += len(c["vocabulary"]) + 1
            else:
                out[f"cat_{name}"] = idx.astype(np.int32)
        for name, bounds in self.buckets.items():
            x = _floats(df[name])
            b = np.searchsorted(np.asarray(bounds), x, side="right") + 1
            b[~np.isfinite(x)] = 0  # null -> unknown
            dense[np.arange(n), j + b] = 1.0
            j += len(bounds) + 2
        out["dense"] = dense
        return out

    def _lookup(self, name: str) -> dict[str, int]:
        """Vocabulary key -> index (1-based; 0 is the unknown bucket), built once per column."""
        lookup = self._lookups.get(name)
        if lookup is None:
            vocabulary = self.categorical[name]["vocabulary"]
            lookup = self._lookups[name] = {v: i + 1 for i, v in enumerate(vocabulary)}
        return lookup

    def _index(self, col: Any, name: str) -> np.ndarray:
        """Vocabulary indices of a column's values (0: null or unknown)."""
        lookup = self._lookup(name)
        values = col.tolist() if isinstance(col, pd.Series | np.ndarray) else list(col)
        return np.fromiter(
            (0 if _is_null(v) else lookup.get(_key(v), 0) for v in values),
            dtype=np.int64,
            count=len(values),
        )

    def unknown_categories(self, df: Columns) -> dict[str, np.ndarray]:
        """Per categorical column, a boolean mask of non-null values outside the vocabulary."""
        out = {}
        for name in self.categorical:
            col = df[name]
            values = col.tolist() if isinstance(col, pd.Series | np.ndarray) else list(col)
            notnull = np.fromiter((not _is_null(v) for v in values), dtype=bool, count=len(values))
            out[name] = (self._index(values, name) == 0) & notnull
        return out

    def labels(self, df: pd.DataFrame) -> np.ndarray:
        """Training targets: standardized values (regression) or class indices."""
        y = df[self.label]
        if self.task == "regression":
            v = pd.to_numeric(y, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
            return ((v - self.label_stats["mean"]) / (self.label_stats["std"] or 1.0)).astype(
                np.float32
            )
        lookup = {c: i for i, c in enumerate(self.classes)}
        idx = y.map(lambda v: lookup.get(_key(v), -1)).to_numpy(dtype=np.int64)
        if (idx < 0).any():
            bad = y[idx < 0].iloc[0]
            raise FeatureError(
                f"label {self.label!r}: value {bad!r} is not one of the classes {self.classes}"
            )
        return idx.astype(np.float32 if self.task == "binary" else np.int32)

    def decode(self, raw: np.ndarray) -> np.ndarray:
        """Regression: model output back in the label's units."""
        return raw * (self.label_stats["std"] or 1.0) + self.label_stats["mean"]


def fit_preprocessor(train: Any, spec: MLSpec) -> Preprocessor:
    """Fit on the train split with a single Ray Data aggregation pass.

    Args:
        train: The train split (``ray.data.Dataset``), label nulls already removed.
        spec: The ``ml`` section.

    Returns:
        The fitted :class:`Preprocessor`.

    Raises:
        FeatureError: an empty split, a non-finite value, an all-null feature, or a label with
            the wrong number of classes; naming the column and the spec key.
    """
    from ray.data.aggregate import Count, Max, Mean, Min, Std, ValueCounter

    f = spec.features
    numeric_like = list(f.numeric) + [b.name for b in f.buckets]
    aggs: list[Any] = [Count(alias_name="rows")]
    for c in numeric_like:
        aggs += [
            Count(on=c, ignore_nulls=True, alias_name=f"{c}__n"),
            Mean(c, alias_name=f"{c}__mean"),
            Std(c, ddof=0, alias_name=f"{c}__std"),
            Min(c, alias_name=f"{c}__min"),
            Max(c, alias_name=f"{c}__max"),
        ]
    for cat in f.categorical:
        aggs.append(ValueCounter(cat.name, alias_name=f"{cat.name}__values"))
    if spec.task == "regression":
        aggs += [
            Mean(spec.label, alias_name="__label_mean"),
            Std(spec.label, ddof=0, alias_name="__label_std"),
            Min(spec.label, alias_name="__label_min"),
            Max(spec.label, alias_name="__label_max"),
        ]
    else:
        aggs.append(ValueCounter(spec.label, alias_name="__label_values"))
    r = train.aggregate(*aggs)
    rows = int(r["rows"])
    if rows == 0:
        raise FeatureError("ml.split: the train split is empty")

    numeric: dict[str, dict[str, float]] = {}
    for i, c in enumerate(numeric_like):
        key = f"ml.features.numeric[{i}]" if c in f.numeric else "ml.features.buckets"
        n = int(r[f"{c}__n"] or 0)
        if n == 0:
            raise FeatureError(f"{key}: column {c!r} is null in every train row")
        stats = {k: r[f"{c}__{k}"] for k in ("mean", "std", "min", "max")}
        for k, v in stats.items():
            if v is None or not math.isfinite(float(v)):
                raise FeatureError(
                    f"{key}: column {c!r} holds non-finite values (its {k} is {v}); "
                    "filter or fill them in a transform step"
                )
        if c in f.numeric:
            numeric[c] = {k: float(v) for k, v in stats.items()} | {"nulls": rows - n}

    categorical: dict[str, dict[str, Any]] = {}
    for cat in f.categorical:
        vc = r[f"{cat.name}__values"] or {"values": [], "counts": []}
        counts: dict[str, int] = {}
        for v, k in zip(vc["values"], vc["counts"], strict=True):
            if v is None:
                continue
            counts[_key(v)] = counts.get(_key(v), 0) + int(k)
        kept = sorted(
            (v for v, k in counts.items() if k >= cat.min_frequency),
            key=lambda v: (-counts[v], v),
        )[: cat.max_categories]
        categorical[cat.name] = {
            "encoding": cat.encoding,
            "embedding_dim": cat.embedding_dim,
            "vocabulary": sorted(kept),
            "distinct_in_train": len(counts),
        }

    label_stats: dict[str, float] = {}
    classes: list[str] = []
    if spec.task == "regression":
        for k in ("mean", "std", "min", "max"):
            v = r[f"__label_{k}"]
            if v is None or not math.isfinite(float(v)):
                raise FeatureError(
                    f"ml.label: label {spec.label!r} holds non-finite values (its {k} is {v})"
                )
            label_stats[k] = float(v)
    else:
        vc = r["__label_values"]
        classes = sorted({_key(v) for v in vc["values"] if v is not None})
        if spec.task == "binary" and len(classes) != 2:
            raise FeatureError(
                f"ml.label: a binary task needs exactly 2 label values in the train split; "
                f"{spec.label!r} has {len(classes)}: {classes[:10]}"
            )
        if spec.task == "multiclass" and len(classes) < 2:
            raise FeatureError(f"ml.label: {spec.label!r} has fewer than 2 classes: {classes}")
        label_stats = {
            c: float(
                sum(
                    int(k)
                    for v, k in zip(vc["values"], vc["counts"], strict=True)
                    if v is not None and _key(v) == c
                )
            )
            / rows
            for c in classes
        }
    return Preprocessor(
        task=spec.task,
        label=spec.label,
        numeric=numeric,
        categorical=categorical,
        buckets={b.name: list(b.boundaries) for b in f.buckets},
        label_stats=label_stats,
        classes=classes,
        train_rows=rows,
    )
