"""Row checks against a model signature, and bodies, without Ray: every problem is reported per
row and field, and whatever passes the checks goes through the real preprocessor."""

import json
import math

import numpy as np
import pytest

from rayline.ml.features import Preprocessor
from rayline.serve.validation import (
    MAX_ISSUES,
    BodyError,
    RowValidator,
    parse_body,
    row_json_schema,
)

PRE = Preprocessor.from_dict(
    {
        "task": "binary",
        "label": "y",
        "numeric": {
            "x": {"mean": 1.0, "std": 2.0, "min": -3.0, "max": 5.0, "nulls": 0},
            "z": {"mean": 0.0, "std": 1.0, "min": -1.0, "max": 1.0, "nulls": 0},
        },
        "categorical": {
            "c": {"encoding": "onehot", "embedding_dim": 8, "vocabulary": ["a", "b"]},
            "d": {"encoding": "embedding", "embedding_dim": 4, "vocabulary": ["1", "2", "true"]},
        },
        "buckets": {"b": [0.0, 10.0]},
        "classes": ["no", "yes"],
    }
)
SIG = PRE.signature()
GOOD = {"x": 1.5, "z": 0, "c": "a", "d": 2, "b": 3.0}


def check(rows):
    return RowValidator(SIG).check(rows)


def kinds(checked):
    return [(e.row, e.field, e.type) for e in checked.errors]


def test_valid_rows_become_a_frame_the_preprocessor_takes():
    checked = check([GOOD, dict(GOOD, x=None, c=None, d=True, b=None)])
    assert checked.ok and checked.warnings == [[], []]
    frame = checked.frame(RowValidator(SIG).numbers)
    assert frame["x"].dtype == np.float64 and math.isnan(frame["x"][1])
    x = PRE.transform(frame)
    assert x["dense"].shape == (2, PRE.dense_width)
    assert x["cat_d"].tolist() == [2, 3]  # 2 -> "2" (index 2), True -> "true" (index 3)


def test_every_problem_is_reported_per_row_and_field():
    rows = [
        {"x": "1", "z": True, "c": 1.5, "d": [1], "b": {}},
        {"z": 0, "c": "a", "d": "1", "b": 1, "extra": 1, "x ": 2},
        "not a row",
        dict(GOOD, x=float("nan"), z=float("inf"), b=10**400),
        dict(GOOD, x=1e39),
    ]
    assert kinds(check(rows)) == [
        (0, "x", "wrong_type"),
        (0, "z", "wrong_type"),
        (0, "c", "wrong_type"),
        (0, "d", "wrong_type"),
        (0, "b", "wrong_type"),
        (1, "x", "missing"),
        (1, "extra", "unexpected_field"),
        (1, "x ", "unexpected_field"),
        (2, None, "not_an_object"),
        (3, "x", "not_finite"),
        (3, "z", "not_finite"),
        (3, "b", "not_finite"),
        (4, "x", "not_finite"),  # beyond float32: the model computes in 32-bit floats
    ]
    e = check(rows).errors[0].as_dict()
    assert e == {
        "loc": ["body", 0, "x"],
        "row": 0,
        "field": "x",
        "type": "wrong_type",
        "msg": "expected a number or null, got a string",
    }


def test_out_of_range_is_a_warning_not_an_error():
    checked = check([dict(GOOD, x=50.0), GOOD])
    assert checked.ok
    assert [(w.row, w.field, w.type) for w in checked.warnings[0]] == [(0, "x", "out_of_range")]
    assert checked.warnings[1] == []


def test_errors_are_capped():
    checked = check([{"nope": 1}] * 100)
    assert len(checked.errors) == MAX_ISSUES + 1
    assert checked.errors[-1].type == "too_many_errors"
    assert "more error(s) not shown" in checked.errors[-1].msg


def test_null_not_allowed_when_the_signature_says_so():
    sig = {"inputs": [{"name": "x", "type": "number", "nullable": False}]}
    assert kinds(RowValidator(sig).check([{"x": None}])) == [(0, "x", "null_not_allowed")]


@pytest.mark.parametrize(
    "body, status, kind",
    [
        (b"{nope", 422, "invalid_json"),
        (b"\xff\xfe", 422, "invalid_json"),
        (b"[" * 100_000, 422, "invalid_json"),  # nested too deeply: RecursionError, not a 500
        (b"3", 422, "wrong_type"),
        (b'"row"', 422, "wrong_type"),
        (b"[]", 422, "empty"),
        (b"[{}, {}, {}]", 413, "too_many_rows"),
        (b"{}" + b" " * 5000, 413, "body_too_large"),
    ],
)
def test_bodies_that_are_not_rows(body, status, kind):
    with pytest.raises(BodyError) as e:
        parse_body(body, max_rows=2, max_bytes=4096 if kind == "body_too_large" else None)
    assert (e.value.status, e.value.issue.type) == (status, kind)


def test_a_body_is_one_row_or_a_list():
    assert parse_body(b'{"a": 1}', 10) == [{"a": 1}]
    assert parse_body(b'[{"a": 1}, 2]', 10) == [{"a": 1}, 2]
    assert parse_body(b'{"a": NaN}', 10)[0]["a"] != 0  # parsed; the row check reports it


def test_row_json_schema_lists_every_input():
    schema = row_json_schema(SIG)
    assert schema["required"] == ["x", "z", "c", "d", "b"]
    assert schema["additionalProperties"] is False
    assert schema["properties"]["x"]["type"] == ["number", "null"]
    assert schema["properties"]["c"]["examples"] == ["a", "b"]


# -- fuzz: whatever the checks accept, the real preprocessor turns into finite inputs ----------

hypothesis = pytest.importorskip("hypothesis")
st = pytest.importorskip("hypothesis.strategies")

_json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
)
_json_values = st.recursive(
    _json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)
_names = st.sampled_from(["x", "z", "c", "d", "b", "extra", ""])


@st.composite
def rows(draw):
    """Mostly near-valid rows: some fields dropped, retyped or added."""
    if draw(st.integers(0, 9)) == 0:
        return draw(_json_values)
    row = dict(GOOD)
    for _ in range(draw(st.integers(0, 3))):
        name = draw(_names)
        action = draw(st.sampled_from(["drop", "set"]))
        if action == "drop":
            row.pop(name, None)
        else:
            row[name] = draw(_json_values)
    return row


@hypothesis.settings(max_examples=400, deadline=None)
@hypothesis.given(st.lists(rows(), min_size=1, max_size=5))
def test_fuzz_checks_never_raise_and_accepted_rows_transform_to_finite_inputs(batch):
    body = json.dumps(batch).encode()  # NaN and Infinity as Python's json writes them
    parsed = parse_body(body, max_rows=100)
    validator = RowValidator(SIG)
    checked = validator.check(parsed)
    if not checked.ok:
        assert all(e.type for e in checked.errors)
        return
    x = PRE.transform(checked.frame(validator.numbers))
    assert np.isfinite(x["dense"]).all()
    assert len(x["dense"]) == len(batch)
    PRE.unknown_categories(checked.frame(validator.numbers))
