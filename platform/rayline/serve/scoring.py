"""One model version in memory, and the request path through it: body -> rows -> checks ->
DataFrame -> the model interface -> JSON answer. Nothing here knows Ray Serve.

The model is the registry's artifact loaded with :func:`rayline.ml.models.load_model`, so the
same :class:`~rayline.ml.features.Preprocessor` code that trained it turns rows into inputs.

Answer of a valid request (200)::

    {"model": "flights_arr_delay", "version": 3,
     "predictions": [{"model": "flights_arr_delay", "version": 3, "prediction": 12.5}, ...]}

Classification rows add ``probability`` (binary: of the positive class) and ``probabilities``
(per class). A row served with a flagged value adds ``warnings`` (``unknown_category``,
``out_of_range``). An invalid request answers 422 with ``detail``: one entry per row and field.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..ml.models import Model, load_model
from ..ml.registry import ModelRegistry, ModelVersion
from .validation import BodyError, Checked, Issue, RowValidator, merge, parse_body

__all__ = ["LoadedModel", "Scored", "load_version", "dumps"]

log = logging.getLogger("ray.serve")


def dumps(doc: Any) -> bytes:
    """Compact JSON bytes (non-finite floats are never written)."""
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode("utf-8")


@dataclass
class Scored:
    """Predictions of a batch of rows, ready to be split back per request."""

    outputs: dict[str, np.ndarray]
    unknown: dict[str, np.ndarray]


@dataclass
class LoadedModel:
    """A model version loaded once per replica, with its checks.

    Attributes:
        name: The model name.
        version: The version number.
        model: The loaded model (the shared interface: ``predict(DataFrame)``).
        metadata: The version's registry metadata.
        validator: Row checks from the model's own signature.
        loaded_at: When it was loaded (epoch seconds).
    """

    name: str
    version: int
    model: Model
    metadata: dict[str, Any]
    validator: RowValidator = field(init=False)
    loaded_at: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        self.validator = RowValidator(self.signature)
        self._classes = list(self.model.pre.classes)
        self._task = self.model.pre.task

    @property
    def signature(self) -> dict[str, Any]:
        return self.model.signature()

    def info(self) -> dict[str, Any]:
        """Name, version, task, signature and the registry's metrics of this version."""
        return {
            "name": self.name,
            "version": self.version,
            "framework": self.metadata.get("framework"),
            "task": self._task,
            "created_at": self.metadata.get("created_at"),
            "metrics": self.metadata.get("metrics"),
            "signature": self.signature,
            "loaded_at": self.loaded_at,
        }

    # -- the request path -------------------------------------------------------------------

    def check(self, body: bytes, max_rows: int) -> tuple[Checked | None, Any]:
        """Parse and check a body: ``(checked rows, None)`` if valid, else
        ``(None, (status, error document))``."""
        try:
            rows = parse_body(body, max_rows)
        except BodyError as e:
            return None, (e.status, self._error_doc([e.issue]))
        checked = self.validator.check(rows)
        if not checked.ok:
            return None, (422, self._error_doc(checked.errors))
        return checked, None

    def _error_doc(self, issues: list[Issue]) -> dict[str, Any]:
        return {
            "detail": [i.as_dict() for i in issues],
            "model": self.name,
            "version": self.version,
        }

    def score(self, batch: list[Checked]) -> Scored:
        """The model's predictions for checked requests, in one call of the model."""
        columns = merge(batch).arrays(self.validator.numbers)
        outputs = self.model.predict(columns)
        return Scored(outputs, self.model.pre.unknown_categories(columns))

    def answer(
        self, scored: Scored, start: int, checked: Checked
    ) -> tuple[dict[str, Any], dict[str, int]]:
        """The 200 answer for a request whose rows start at ``start`` in a scored batch, and
        counts of the flags raised."""
        stop = start + checked.rows
        warnings = checked.warnings
        out = scored.outputs
        pred = out["prediction"][start:stop]
        prob = out.get("probability")
        probs = out.get("probabilities")
        flags = {"unknown_category": 0, "out_of_range": 0, "non_finite_prediction": 0}
        rows: list[dict[str, Any]] = []
        for i in range(stop - start):
            j = start + i
            row: dict[str, Any] = {"model": self.name, "version": self.version}
            notes = [w.as_dict() for w in warnings[i]]
            if self._task == "regression":
                value = float(pred[i])
                if math.isfinite(value):
                    row["prediction"] = value
                else:
                    row["prediction"] = None
                    notes.append(
                        _note(i, None, "non_finite_prediction", "the model gave no number")
                    )
            else:
                row["prediction"] = str(pred[i])
                if prob is not None:
                    row["probability"] = _finite(prob[j])
                if probs is not None:
                    row["probabilities"] = {
                        c: _finite(p) for c, p in zip(self._classes, probs[j], strict=True)
                    }
            for col, mask in scored.unknown.items():
                if mask[j]:
                    value = checked.columns[col][i]
                    notes.append(
                        _note(
                            i,
                            col,
                            "unknown_category",
                            f"{value!r} was not seen in training: served with the unknown bucket",
                        )
                    )
            for n in notes:
                flags[n["type"]] = flags.get(n["type"], 0) + 1
            if notes:
                row["warnings"] = notes
            rows.append(row)
        return {"model": self.name, "version": self.version, "predictions": rows}, flags


def _note(row: int, col: str | None, kind: str, msg: str) -> dict[str, Any]:
    return Issue(row, col, kind, msg).as_dict()


def _finite(x: Any) -> float | None:
    v = float(x)
    return v if math.isfinite(v) else None


def _warm_up(loaded: LoadedModel) -> None:
    """Trace the model's compiled function for a few batch shapes before it takes traffic."""
    for n in (1, 2, 3):
        nulls = loaded.validator.check([dict.fromkeys(loaded.validator.names)] * n)
        if nulls.ok:  # (every input of a Rayline preprocessor is nullable)
            loaded.score([nulls])


def load_version(registry: ModelRegistry, mv: ModelVersion) -> LoadedModel:
    """Load a registry version (downloaded once for a remote registry) and warm it up.

    Raises:
        RegistryError: the version is gone or corrupt.
        ValueError: the directory is not a complete model.
    """
    t0 = time.perf_counter()
    path = registry.local_path(mv)
    loaded = LoadedModel(mv.name, mv.version, load_model(path), dict(mv.metadata))
    _warm_up(loaded)
    log.info(
        "loaded model %s version %d (%s) in %.1fs",
        mv.name,
        mv.version,
        loaded.metadata.get("framework"),
        time.perf_counter() - t0,
    )
    return loaded
