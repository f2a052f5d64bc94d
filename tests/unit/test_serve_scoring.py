"""The request path of a model replica without Ray: a registered model (a one-tree ensemble, so
no TensorFlow) loaded from the registry, bodies checked, scored and answered."""

import json

import numpy as np
import pytest

from rayline.ml.features import Preprocessor
from rayline.ml.models import write_model_info
from rayline.ml.registry import ModelRegistry
from rayline.serve.scoring import load_version
from rayline.serve.validation import Issue


def pre(task):
    return Preprocessor.from_dict(
        {
            "task": task,
            "label": "y",
            "numeric": {"x": {"mean": 0.0, "std": 1.0, "min": -2.0, "max": 2.0, "nulls": 0}},
            "categorical": {
                "c": {"encoding": "onehot", "embedding_dim": 8, "vocabulary": ["a", "b"]}
            },
            "buckets": {},
            "classes": ["neg", "pos"] if task == "binary" else [],
            "label_stats": {"mean": 0.0, "std": 1.0} if task == "regression" else {},
        }
    )


def register_tree_model(root, name, task):
    """One stump on x (the first dense column): margin -1 if x <= 0.5 else +1."""
    art = root / f"art-{name}"
    art.mkdir(parents=True)
    p = pre(task)
    p.save(art)
    write_model_info(art, "spark_gbt", task=task)
    tree = {
        "feature": [0, -1, -1],
        "threshold": [0.5, 0.0, 0.0],
        "left": [1, -1, -1],
        "right": [2, -1, -1],
        "value": [0.0, -1.0, 1.0],
    }
    (art / "trees.json").write_text(json.dumps({"weights": [1.0], "trees": [tree], "max_depth": 1}))
    reg = ModelRegistry(root / "reg")
    meta = {"framework": "spark_gbt", "signature": p.signature(), "metrics": {"rmse": 1.0}}
    mv = reg.register(name, art, meta)
    reg.set_alias(name, "champion", mv.version)
    return reg


@pytest.fixture
def regression(tmp_path):
    reg = register_tree_model(tmp_path, "r", "regression")
    return load_version(reg, reg.get("r", "champion"))


@pytest.fixture
def binary(tmp_path):
    reg = register_tree_model(tmp_path, "b", "binary")
    return load_version(reg, reg.get("b", "champion"))


def serve(loaded, body, max_rows=100):
    """What the replica does for one request (no batching)."""
    checked, error = loaded.check(json.dumps(body).encode(), max_rows)
    if checked is None:
        return error
    scored = loaded.score([checked])
    doc, flags = loaded.answer(scored, 0, checked)
    return 200, doc


def test_regression_answer_names_model_and_version(regression):
    status, doc = serve(regression, [{"x": 1.0, "c": "a"}, {"x": -1.0, "c": None}])
    assert status == 200
    assert doc["model"] == "r" and doc["version"] == 1
    assert [p["prediction"] for p in doc["predictions"]] == [1.0, -1.0]
    assert all(p["model"] == "r" and p["version"] == 1 for p in doc["predictions"])
    assert "warnings" not in doc["predictions"][0]


def test_one_row_body(regression):
    status, doc = serve(regression, {"x": 1.0, "c": "b"})
    assert status == 200 and len(doc["predictions"]) == 1


def test_binary_answer_has_class_and_probabilities(binary):
    status, doc = serve(binary, [{"x": 1.0, "c": "a"}, {"x": 0.0, "c": "b"}])
    assert status == 200
    hi, lo = doc["predictions"]
    p = 1 / (1 + np.exp(-2.0))
    assert hi["prediction"] == "pos" and hi["probability"] == pytest.approx(p)
    assert hi["probabilities"] == pytest.approx({"neg": 1 - p, "pos": p})
    assert lo["prediction"] == "neg" and lo["probability"] == pytest.approx(1 - p)


def test_unknown_category_is_served_and_flagged(regression):
    status, doc = serve(regression, [{"x": 1.0, "c": "zzz"}, {"x": 9.0, "c": "a"}])
    assert status == 200
    first, second = doc["predictions"]
    assert first["prediction"] == 1.0
    assert [(w["row"], w["field"], w["type"]) for w in first["warnings"]] == [
        (0, "c", "unknown_category")
    ]
    assert "'zzz' was not seen in training" in first["warnings"][0]["msg"]
    assert [(w["row"], w["field"], w["type"]) for w in second["warnings"]] == [
        (1, "x", "out_of_range")
    ]


def test_invalid_rows_answer_422_with_every_problem(regression):
    status, doc = serve(regression, [{"x": "1", "c": "a"}, {"c": "a", "y": 1}])
    assert status == 422
    assert doc["model"] == "r" and doc["version"] == 1
    assert [(d["row"], d["field"], d["type"]) for d in doc["detail"]] == [
        (0, "x", "wrong_type"),
        (1, "x", "missing"),
        (1, "y", "unexpected_field"),
    ]


def test_too_many_rows_is_413(regression):
    status, doc = serve(regression, [{"x": 1.0, "c": "a"}] * 3, max_rows=2)
    assert status == 413 and doc["detail"][0]["type"] == "too_many_rows"


def test_rows_split_back_from_a_batch(regression):
    """The replica scores several requests in one model call and answers each its slice."""
    c1, _ = regression.check(b'[{"x": 1, "c": "a"}]', 10)
    c2, _ = regression.check(b'[{"x": -1, "c": "a"}, {"x": 1, "c": "zz"}]', 10)
    scored = regression.score([c1, c2])
    assert len(scored.outputs["prediction"]) == 3
    a, _ = regression.answer(scored, 0, c1)
    b, flags = regression.answer(scored, 1, c2)
    assert [p["prediction"] for p in a["predictions"]] == [1.0]
    assert [p["prediction"] for p in b["predictions"]] == [-1.0, 1.0]
    assert b["predictions"][1]["warnings"][0]["row"] == 1  # the row within its own request
    assert "'zz' was not seen" in b["predictions"][1]["warnings"][0]["msg"]
    assert flags["unknown_category"] == 1


def test_a_non_finite_prediction_is_null_and_flagged(regression):
    from rayline.serve.scoring import Scored

    checked, _ = regression.check(b'{"x": 1, "c": "a"}', 10)
    scored = Scored({"prediction": np.array([np.nan])}, {"c": np.array([False])})
    doc, flags = regression.answer(scored, 0, checked)
    assert doc["predictions"][0]["prediction"] is None
    assert doc["predictions"][0]["warnings"][0]["type"] == "non_finite_prediction"
    assert flags["non_finite_prediction"] == 1


def test_info_has_signature_and_metrics(regression):
    info = regression.info()
    assert info["version"] == 1 and info["task"] == "regression"
    assert info["metrics"] == {"rmse": 1.0}
    assert [i["name"] for i in info["signature"]["inputs"]] == ["x", "c"]


def test_issue_as_dict_loc():
    assert Issue(None, None, "empty", "m").as_dict()["loc"] == ["body"]
    assert Issue(2, "f", "missing", "m").as_dict()["loc"] == ["body", 2, "f"]
