"""Request bodies and rows checked against a model's signature, before the model sees them.

A body is a JSON object (one row) or a JSON array of rows. Every row must give every input of
the signature, and nothing else: a number (finite) for ``number`` inputs, a string, integer or
boolean for ``category`` inputs, or ``null``. What is wrong is reported per row and field, in
the shape of FastAPI's own validation errors (``loc``, ``msg``, ``type``) plus ``row`` and
``field``; all rows are checked, so a client sees every problem at once.

Unknown categories and numbers outside the training range are not errors: the model serves them
(the preprocessor maps an unknown category to its reserved bucket) and the answer flags them.

Example:
    >>> sig = {"inputs": [{"name": "x", "type": "number", "min": 0, "max": 1},
    ...                   {"name": "c", "type": "category", "categories": ["a", "b"]}]}
    >>> v = RowValidator(sig)
    >>> checked = v.check([{"x": 0.5, "c": "a"}, {"x": "high", "c": "a", "z": 1}])
    >>> [(e.row, e.field, e.type) for e in checked.errors]
    [(1, 'x', 'wrong_type'), (1, 'z', 'unexpected_field')]
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

__all__ = [
    "BodyError",
    "Checked",
    "Issue",
    "RowValidator",
    "merge",
    "parse_body",
    "row_json_schema",
    "MAX_ISSUES",
]

MAX_ISSUES = 100
_FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclass(frozen=True)
class Issue:
    """One problem (or, in an answer's ``warnings``, one flag) with a request.

    Attributes:
        row: Index of the row in the request (None for the body as a whole).
        field: The input concerned (None for the row or body as a whole).
        type: A stable code: ``missing``, ``unexpected_field``, ``wrong_type``, ``not_finite``,
            ``null_not_allowed``, ``not_an_object``, ``invalid_json``, ``empty``,
            ``too_many_rows``, ``body_too_large``, ``too_many_errors``; flags:
            ``unknown_category``, ``out_of_range``.
        msg: What is wrong, for people.
    """

    row: int | None
    field: str | None
    type: str
    msg: str

    def as_dict(self) -> dict[str, Any]:
        loc: list[Any] = ["body"]
        if self.row is not None:
            loc.append(self.row)
        if self.field is not None:
            loc.append(self.field)
        return {
            "loc": loc,
            "row": self.row,
            "field": self.field,
            "type": self.type,
            "msg": self.msg,
        }


class BodyError(ValueError):
    """A request body that cannot be read as rows at all.

    Attributes:
        status: The HTTP status to answer (413 for an oversized body, 422 otherwise).
        issue: What is wrong.
    """

    def __init__(self, status: int, issue: Issue) -> None:
        super().__init__(issue.msg)
        self.status = status
        self.issue = issue


def _kind(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, int | float):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "an array"
    if isinstance(v, dict):
        return "an object"
    return type(v).__name__


def parse_body(body: bytes, max_rows: int, max_bytes: int | None = None) -> list[Any]:
    """The rows of a request body: a JSON array of rows, or one row (an object).

    Args:
        body: The raw body.
        max_rows: Most rows accepted.
        max_bytes: Largest body accepted (None: no check here).

    Returns:
        The rows, unchecked (each should be an object; see :meth:`RowValidator.check`).

    Raises:
        BodyError: not JSON, not an object or array, empty, or too large.
    """
    if max_bytes is not None and len(body) > max_bytes:
        raise BodyError(
            413,
            Issue(None, None, "body_too_large", f"body of {len(body)} bytes > {max_bytes} bytes"),
        )
    try:
        # NaN, Infinity and 1e999 parse to non-finite floats, which the row check reports.
        doc = json.loads(body)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        msg = str(e) if isinstance(e, ValueError) else "nested too deeply"
        raise BodyError(
            422, Issue(None, None, "invalid_json", f"body is not JSON: {msg}")
        ) from None
    if isinstance(doc, dict):
        return [doc]
    if not isinstance(doc, list):
        raise BodyError(
            422,
            Issue(
                None,
                None,
                "wrong_type",
                f"body must be a row (JSON object) or a list of rows, got {_kind(doc)}",
            ),
        )
    if not doc:
        raise BodyError(422, Issue(None, None, "empty", "body is an empty list: no rows"))
    if len(doc) > max_rows:
        raise BodyError(
            413,
            Issue(None, None, "too_many_rows", f"{len(doc)} rows > {max_rows} rows per request"),
        )
    return doc


@dataclass
class Checked:
    """The outcome of checking rows.

    Attributes:
        errors: Problems that make the request invalid (at most ``MAX_ISSUES`` and a summary).
        warnings: Per row, flags that do not stop it (out of the training range).
        columns: Per input, the values of all rows (None for null), in signature order.
    """

    errors: list[Issue]
    warnings: list[list[Issue]]
    columns: dict[str, list[Any]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def rows(self) -> int:
        return len(self.warnings)

    def arrays(self, numbers: list[str]) -> dict[str, np.ndarray]:
        """The rows as columns for the model (:data:`rayline.ml.features.Columns`): ``numbers``
        as float64 (null -> NaN), the rest as objects (null -> None). No DataFrame: building one
        per batch cost more than the preprocessing itself."""
        data: dict[str, np.ndarray] = {}
        for name, values in self.columns.items():
            if name in numbers:
                data[name] = np.array(
                    [np.nan if v is None else v for v in values], dtype=np.float64
                )
            else:
                col = np.empty(len(values), dtype=object)
                col[:] = values
                data[name] = col
        return data

    def frame(self, numbers: list[str]) -> pd.DataFrame:
        """The rows as a DataFrame (the columns of :meth:`arrays`)."""
        return pd.DataFrame(
            {k: pd.Series(v, dtype=v.dtype) for k, v in self.arrays(numbers).items()}
        )


def merge(batch: list[Checked]) -> Checked:
    """Valid requests as one: columns and warnings concatenated in order."""
    if len(batch) == 1:
        return batch[0]
    columns: dict[str, list[Any]] = {name: [] for name in batch[0].columns}
    warnings: list[list[Issue]] = []
    for c in batch:
        for name, values in c.columns.items():
            columns[name].extend(values)
        warnings.extend(c.warnings)
    return Checked([], warnings, columns)


class RowValidator:
    """Checks rows against a signature (``{"inputs": [{name, type, nullable, ...}]}``).

    Args:
        signature: A model signature, as :meth:`Preprocessor.signature` gives it.
    """

    def __init__(self, signature: dict[str, Any]) -> None:
        self.inputs: list[dict[str, Any]] = list(signature["inputs"])
        self.names = [i["name"] for i in self.inputs]
        self.numbers = [i["name"] for i in self.inputs if i["type"] == "number"]
        self._known = set(self.names)
        self._ranges = {
            i["name"]: (float(i["min"]), float(i["max"]))
            for i in self.inputs
            if i["type"] == "number" and i.get("min") is not None and i.get("max") is not None
        }

    def check(self, rows: list[Any]) -> Checked:
        """Check every row; collect the values of the valid ones column by column.

        Args:
            rows: Parsed rows (anything JSON gives).

        Returns:
            The errors (empty if all rows are valid), per-row warnings and the columns.
        """
        errors: list[Issue] = []
        dropped = 0
        warnings: list[list[Issue]] = [[] for _ in rows]
        columns: dict[str, list[Any]] = {n: [] for n in self.names}

        def err(issue: Issue) -> None:
            nonlocal dropped
            if len(errors) < MAX_ISSUES:
                errors.append(issue)
            else:
                dropped += 1

        for r, row in enumerate(rows):
            if not isinstance(row, dict):
                err(Issue(r, None, "not_an_object", f"a row must be an object, got {_kind(row)}"))
                continue
            for spec in self.inputs:
                name = spec["name"]
                if name not in row:
                    err(Issue(r, name, "missing", f"input {name!r} is missing"))
                    continue
                value, issue = self._value(spec, row[name], r)
                if issue is not None:
                    err(issue)
                    continue
                columns[name].append(value)
                bounds = self._ranges.get(name)
                if bounds is not None and value is not None:
                    lo, hi = bounds
                    if not lo <= value <= hi:
                        warnings[r].append(
                            Issue(
                                r,
                                name,
                                "out_of_range",
                                f"{value!r} is outside the training range [{lo:g}, {hi:g}]",
                            )
                        )
            for extra in row:
                if extra not in self._known:
                    shown = extra if len(extra) <= 64 else extra[:64] + "..."
                    err(Issue(r, shown, "unexpected_field", f"{shown!r} is not an input"))
        if dropped:
            errors.append(
                Issue(None, None, "too_many_errors", f"{dropped} more error(s) not shown")
            )
        return Checked(errors, warnings, columns if not errors else {})

    @staticmethod
    def _value(spec: dict[str, Any], v: Any, r: int) -> tuple[Any, Issue | None]:
        name = spec["name"]
        if v is None:
            if spec.get("nullable", True):
                return None, None
            return None, Issue(r, name, "null_not_allowed", f"input {name!r} cannot be null")
        if spec["type"] == "number":
            if isinstance(v, bool) or not isinstance(v, int | float):
                return None, Issue(
                    r, name, "wrong_type", f"expected a number or null, got {_kind(v)}"
                )
            try:
                x = float(v)
            except OverflowError:
                x = math.inf
            if not math.isfinite(x):
                return None, Issue(r, name, "not_finite", f"{name!r} must be finite, got {x}")
            if abs(x) > _FLOAT32_MAX:
                return None, Issue(
                    r, name, "not_finite", f"{x:g} does not fit the model's 32-bit floats"
                )
            return x, None
        # category: matched as text, as in training (1 -> "1", true -> "true", 2.0 -> "2")
        if isinstance(v, str | bool | int):
            return v, None
        if isinstance(v, float) and math.isfinite(v) and v.is_integer():
            return v, None
        return None, Issue(
            r, name, "wrong_type", f"expected a string, integer, boolean or null, got {_kind(v)}"
        )


def row_json_schema(signature: dict[str, Any]) -> dict[str, Any]:
    """A JSON Schema of one valid row of a model (served in ``GET /v1/models/{name}``)."""
    props: dict[str, Any] = {}
    for spec in signature["inputs"]:
        nullable = spec.get("nullable", True)
        if spec["type"] == "number":
            prop: dict[str, Any] = {"type": ["number", "null"] if nullable else "number"}
            if spec.get("min") is not None:
                prop["description"] = f"training range [{spec['min']:g}, {spec['max']:g}]"
        else:
            types = ["string", "integer", "boolean"] + (["null"] if nullable else [])
            cats = spec.get("categories", [])
            prop = {
                "type": types,
                "description": f"{len(cats)} known categories; others take the unknown bucket",
                "examples": cats[:20],
            }
        props[spec["name"]] = prop
    return {
        "type": "object",
        "properties": props,
        "required": [s["name"] for s in signature["inputs"]],
        "additionalProperties": False,
    }
