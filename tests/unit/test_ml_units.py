"""Fast tests of the ML pieces that need neither Ray nor TensorFlow: the spec section, the
preprocessor's transform, the split function, the gate, the tree-ensemble scorer."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from rayline.config import SpecError, parse_spec
from rayline.ml.features import Preprocessor, check_columns
from rayline.ml.gate import decide, improvement
from rayline.ml.handoff import _SPLIT_COL, _assign, _drop_unlabelled
from rayline.ml.models import TreeEnsembleModel, tree_matrix
from rayline.ml.spec import MLSpec


def ml(**over):
    raw = {
        "model_name": "m",
        "task": "regression",
        "label": "y",
        "features": {"numeric": ["x"], "categorical": ["c"]},
    }
    raw.update(over)
    return MLSpec.model_validate(raw)


def pre(task="regression", **kw):
    d = {
        "task": task,
        "label": "y",
        "numeric": {"x": {"mean": 10.0, "std": 2.0, "min": 0.0, "max": 20.0, "nulls": 0}},
        "categorical": {
            "c": {"encoding": "onehot", "embedding_dim": 4, "vocabulary": ["a", "b"]},
            "e": {"encoding": "embedding", "embedding_dim": 4, "vocabulary": ["p", "q", "r"]},
        },
        "buckets": {"h": [6.0, 12.0]},
        "label_stats": {"mean": 5.0, "std": 2.0},
        "classes": [],
    }
    d.update(kw)
    return Preprocessor.from_dict(d)


# -- spec ------------------------------------------------------------------------------------


def test_spec_defaults_and_gate_metric():
    m = ml()
    assert m.features.categorical[0].name == "c"
    assert m.gate_metric() == "rmse" and m.higher_is_better() is False
    assert ml(task="binary").gate_metric() == "roc_auc"


@pytest.mark.parametrize(
    "over, needle",
    [
        ({"task": "ranking"}, "task"),
        ({"label": "x"}, "also listed as a feature"),
        ({"gate": {"metric": "roc_auc"}}, "not a regression metric"),
        ({"features": {}}, "at least one feature"),
        ({"split": {"method": "time"}}, "needs ['time_column'"),
        ({"tuning": {"search_space": {"epochs": {"choice": [1, 2]}}}}, "cannot tune ['epochs']"),
        ({"tuning": {"search_space": {"dropout": {"uniform": [0, 1], "choice": [1]}}}}, "exactly"),
        (
            {"features": {"numeric": ["x"], "buckets": [{"name": "h", "boundaries": [3, 1]}]}},
            "ascending",
        ),
    ],
)
def test_spec_errors_name_the_key(over, needle):
    with pytest.raises(Exception, match=r"(?s)" + __import__("re").escape(needle)):
        ml(**over)


def test_pipeline_spec_ml_errors_name_the_path(tmp_path):
    raw = {
        "name": "p",
        "sources": {"s": {"path": "x.csv", "format": "csv"}},
        "stages": [{"name": "q", "type": "quality", "rules": []}],
        "outputs": {"curated": {"table": "t"}},
        "ml": {
            "model_name": "m",
            "task": "regression",
            "label": "y",
            "features": {"numeric": ["a"]},
            "model": {"epochs": 0},
        },
    }
    with pytest.raises(SpecError, match=r"ml\.model\.epochs"):
        parse_spec(raw)


# -- preprocessor ---------------------------------------------------------------------------


def test_transform_layout_unknowns_and_nulls():
    p = pre()
    df = pd.DataFrame(
        {
            "x": [12.0, None, 10.0],
            "c": ["b", "zzz", None],
            "e": ["q", "nope", None],
            "h": [5.0, 12.0, None],
        }
    )
    out = p.transform(df)
    dense = out["dense"]
    # x standardized, null -> 0; c one-hot with slot 0 = unknown; h buckets with slot 0 = null
    assert dense.shape == (3, 1 + 3 + 4) and p.dense_width == 8
    assert dense[:, 0].tolist() == [1.0, 0.0, 0.0]
    assert dense[:, 1:4].tolist() == [[0, 0, 1], [1, 0, 0], [1, 0, 0]]
    assert dense[:, 4:8].tolist() == [[0, 1, 0, 0], [0, 0, 0, 1], [1, 0, 0, 0]]
    assert out["cat_e"].tolist() == [2, 0, 0]
    unknown = p.unknown_categories(df)
    assert unknown["c"].tolist() == [False, True, False]  # null is not an unknown category
    assert unknown["e"].tolist() == [False, True, False]


def test_transform_is_dtype_independent():
    p = pre()
    a = pd.DataFrame({"x": [12, 8], "c": ["a", "b"], "e": ["p", "r"], "h": [1, 20]})
    b = a.astype({"x": "float64", "h": "float32"})
    for k in p.transform(a):
        np.testing.assert_array_equal(p.transform(a)[k], p.transform(b)[k])


def test_labels_regression_and_classes():
    p = pre()
    assert p.labels(pd.DataFrame({"y": [7.0, 5.0]})).tolist() == [1.0, 0.0]
    assert p.decode(np.array([1.0])).tolist() == [7.0]
    b = pre(task="binary", classes=["0", "1"], label_stats={"0": 0.6, "1": 0.4})
    assert b.labels(pd.DataFrame({"y": [1, 0, 1]})).tolist() == [1.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="not one of the classes"):
        b.labels(pd.DataFrame({"y": [2]}))


def test_save_load_roundtrip_keeps_the_input_layout(tmp_path):
    stats = {"mean": 0.0, "std": 1.0, "min": 0.0, "max": 1.0, "nulls": 0}
    p = pre(numeric={"z": stats | {"mean": 5.0}, "a": stats, "m": stats | {"std": 2.0}})
    p.save(tmp_path)
    # Even if the JSON objects come back in another key order (e.g. sorted by a tool)...
    d = json.loads((tmp_path / "preprocessor.json").read_text())
    d["numeric"] = dict(sorted(d["numeric"].items()))
    (tmp_path / "preprocessor.json").write_text(json.dumps(d, sort_keys=True))
    q = Preprocessor.load(tmp_path)
    # ...the model inputs keep the order the model was trained with.
    assert list(q.numeric) == ["z", "a", "m"]
    df = pd.DataFrame({"z": [6.0], "a": [2.0], "m": [4.0], "c": ["a"], "e": ["p"], "h": [1.0]})
    for k, v in p.transform(df).items():
        np.testing.assert_array_equal(q.transform(df)[k], v)
    assert q.signature()["inputs"][0]["name"] == "z"


def test_check_columns_names_the_key():
    import pyarrow as pa

    schema = pa.schema([("x", pa.string()), ("c", pa.string()), ("y", pa.float64())])
    with pytest.raises(ValueError, match=r"ml\.features\.numeric\[0\].*'x'.*not a number"):
        check_columns(schema, ml())
    schema = pa.schema([("x", pa.float64()), ("y", pa.float64())])
    with pytest.raises(ValueError, match=r"ml\.features\.categorical\[0\]\.name.*'c'"):
        check_columns(schema, ml())
    schema = pa.schema([("x", pa.float64()), ("c", pa.string())])
    with pytest.raises(ValueError, match=r"ml\.label.*'y'"):
        check_columns(schema, ml())


# -- split ----------------------------------------------------------------------------------


def _frame(n=20_000, seed=0):
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {"x": rng.normal(size=n), "c": rng.choice(list("abc"), n), "y": rng.normal(size=n)}
    )


def test_random_split_fractions_and_partition_independence():
    spec = ml()
    df = _frame()
    whole = _assign(df.copy(), spec, ["x", "c", "y"])[_SPLIT_COL]
    parts = pd.concat(
        [
            _assign(df.iloc[i : i + 777].copy(), spec, ["x", "c", "y"])
            for i in range(0, len(df), 777)
        ]
    )[_SPLIT_COL]
    assert whole.tolist() == parts.tolist()
    frac = whole.value_counts(normalize=True)
    assert abs(frac[2] - 0.1) < 0.01 and abs(frac[1] - 0.1) < 0.01
    other = _assign(df.copy(), ml(split={"seed": 7}), ["x", "c", "y"])[_SPLIT_COL]
    assert (other != whole).mean() > 0.1  # the seed matters


def test_random_split_ignores_int_vs_float_dtype():
    spec = ml()
    df = pd.DataFrame({"x": [1, 2, 3, 4] * 50, "c": ["a"] * 200, "y": list(range(200))})
    as_float = df.astype({"x": "float64", "y": "float64"})
    assert (
        _assign(df.copy(), spec, ["x", "c", "y"])[_SPLIT_COL].tolist()
        == _assign(as_float, spec, ["x", "c", "y"])[_SPLIT_COL].tolist()
    )


def test_time_split_and_unlabelled_rows():
    spec = ml(
        split={
            "method": "time",
            "time_column": "t",
            "validation_start": "2013-11-01",
            "test_start": "2013-12-01",
        }
    )
    df = pd.DataFrame(
        {
            "t": pd.to_datetime(["2013-01-05", "2013-11-02", "2013-12-24"]),
            "y": [1.0, None, float("inf")],
        }
    )
    assert _assign(df.copy(), spec, ["y"])[_SPLIT_COL].tolist() == [0, 1, 2]
    assert _drop_unlabelled(df, "y")["y"].tolist() == [1.0]


# -- gate -----------------------------------------------------------------------------------


def test_gate_paths():
    ok, why = decide({"rmse": 9}, {"rmse": 12}, None, "rmse", False, 0.0, True)
    assert ok and "no current champion" in why[-1]
    ok, why = decide({"rmse": 9}, {"rmse": 12}, {"rmse": 9.2}, "rmse", False, 0.05, True)
    assert not ok and "needs at least 5.0%" in why[-1]
    ok, why = decide({"rmse": 13}, {"rmse": 12}, None, "rmse", False, 0.0, True)
    assert not ok and "does not beat the baseline" in why[0]
    ok, why = decide(
        {"roc_auc": 0.9}, {"roc_auc": 0.5}, {"roc_auc": 0.8}, "roc_auc", True, 0.1, False
    )
    assert not ok and "quality stage failed" in why[0]
    ok, _ = decide(
        {"roc_auc": 0.9},
        {"roc_auc": 0.5},
        {"roc_auc": 0.8},
        "roc_auc",
        True,
        0.1,
        None,
        require_quality_passed=False,
    )
    assert ok
    assert improvement(8, 10, False) == pytest.approx(0.2)
    assert improvement(0.9, 0.75, True) == pytest.approx(0.2)


# -- tree ensemble ---------------------------------------------------------------------------


def test_tree_ensemble_scoring(tmp_path):
    p = pre(categorical={}, buckets={})
    p.save(tmp_path)
    (tmp_path / "model.json").write_text(json.dumps({"framework": "spark_gbt"}))
    # tree 0: x_std <= 0 ? 1 : (x_std <= 1 ? 2 : 3); tree 1: constant 10
    trees = {
        "trees": [
            {
                "feature": [0, -1, 0, -1, -1],
                "threshold": [0.0, 0, 1.0, 0, 0],
                "left": [1, -1, 3, -1, -1],
                "right": [2, -1, 4, -1, -1],
                "value": [0, 1.0, 0, 2.0, 3.0],
            },
            {"feature": [-1], "threshold": [0.0], "left": [-1], "right": [-1], "value": [10.0]},
        ],
        "weights": [1.0, 0.1],
        "max_depth": 2,
    }
    (tmp_path / "trees.json").write_text(json.dumps(trees))
    m = TreeEnsembleModel(tmp_path)
    df = pd.DataFrame({"x": [8.0, 11.0, 14.0]})  # standardized: -1, 0.5, 2
    assert tree_matrix(p, df)[:, 0].tolist() == [-1.0, 0.5, 2.0]
    assert m.predict(df)["prediction"].tolist() == pytest.approx([2.0, 3.0, 4.0])


@pytest.mark.parametrize("arrow_backed", [False, True])
def test_time_split_on_tz_aware_arrow_timestamps(arrow_backed):
    import pyarrow as pa

    spec = ml(
        split={
            "method": "time",
            "time_column": "t",
            "validation_start": "2013-11-01",
            "test_start": "2013-12-01",
        }
    )
    t = pa.table(
        {
            "t": pa.array(
                pd.to_datetime(
                    ["2013-10-31 23:00", "2013-11-01 00:00", "2013-12-02 00:00"], utc=True
                ),
                pa.timestamp("us", tz="UTC"),
            ),
            "y": [1.0, 2.0, 3.0],
        }
    )
    df = t.to_pandas(types_mapper=pd.ArrowDtype) if arrow_backed else t.to_pandas()
    assert _assign(df, spec, ["y"])[_SPLIT_COL].tolist() == [0, 1, 2]


def test_where_the_train_controller_runs(monkeypatch):
    from rayline.ml.train import _controller_in_driver

    monkeypatch.delenv("RAYLINE_TRAIN_CONTROLLER", raising=False)
    monkeypatch.delenv("RAY_TRAIN_ENABLE_STATE_TRACKING", raising=False)
    assert _controller_in_driver()
    monkeypatch.setenv("RAYLINE_TRAIN_CONTROLLER", " Actor ")
    assert not _controller_in_driver()
    monkeypatch.setenv("RAYLINE_TRAIN_CONTROLLER", "driver")
    monkeypatch.setenv("RAY_TRAIN_ENABLE_STATE_TRACKING", "1")  # it records the actor
    assert not _controller_in_driver()
    monkeypatch.setenv("RAYLINE_TRAIN_CONTROLLER", "thread")
    with pytest.raises(ValueError, match="RAYLINE_TRAIN_CONTROLLER"):
        _controller_in_driver()
