"""The ML stage on real data: the flights pipeline (December 2013) continues into training with
the in-memory handoff; Keras on Ray Train and a Spark GBT challenger are evaluated, registered
and gated. Checked against Spark itself where there is a second way to compute a thing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rayline.config import _read_yaml, parse_spec
from rayline.ml.features import FeatureError
from rayline.ml.registry import ModelRegistry
from rayline.runner import run_pipeline

from .conftest import FLIGHTS_DATA, ROOT

pytestmark = pytest.mark.integration


def flights_ml_raw(tmp: Path) -> dict:
    raw = _read_yaml(ROOT / "pipelines" / "flights.yaml", set())
    raw["stages"] = [s for s in raw["stages"] if s["type"] != "analytics"]
    raw["stages"][1]["steps"].insert(0, {"op": "filter", "condition": "month = 12"})
    raw["outputs"] = {"curated": {"table": "ml_flights"}, "quarantine": {"table": "ml_flights_q"}}
    raw["warehouse"] = str(tmp / "warehouse")
    raw["run_store"] = str(tmp / "runs")
    ml = raw["ml"]
    ml.pop("tuning")
    ml["model"].update(epochs=4, early_stopping_patience=None)
    ml["spark_model"] = {"max_iter": 5, "max_depth": 3}
    ml["registry"] = str(tmp / "registry")
    return raw


@pytest.fixture(scope="module")
def trained(spark, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ml")
    mp = pytest.MonkeyPatch()
    mp.setenv("RAYLINE_DATA_DIR", str(FLIGHTS_DATA.parent))
    try:
        spec = parse_spec(flights_ml_raw(tmp))
    finally:
        mp.undo()
    result = run_pipeline(spec, spark=spark, train=True)
    report = json.loads((result.run_dir / "reports" / "train.json").read_text())
    return spec, result, report, ModelRegistry(spec.ml.registry)


def by_framework(report):
    return {c["framework"]: c for c in report["candidates"]}


def test_training_loss_falls_and_models_beat_the_baseline(trained):
    spec, result, report, _ = trained
    assert result.record["stages"][-1]["name"] == "train"
    assert result.record["stages"][-1]["status"] == "succeeded"
    split = report["split"]
    assert split["train"] > 5 * split["test"] > 0
    assert split["without_label"] > 0  # cancelled flights have no arrival delay
    keras = by_framework(report)["keras"]
    losses = [h["loss"] for h in keras["history"]]
    assert len(losses) == 4 and losses[-1] < 0.8 * losses[0], losses
    for c in report["candidates"]:
        assert c["metrics"]["rmse"] < 0.8 * c["baseline"]["rmse"], c["framework"]
        assert c["metrics"]["r2"] > 0.5
        origins = {s["value"] for s in c["slices"]["origin"]}
        assert origins == {"EWR", "JFK", "LGA"}
        assert sum(s["rows"] for s in c["slices"]["origin"]) == c["metrics"]["rows"]
    charts = result.run_dir / "charts"
    assert (charts / "ml_keras_learning_curve.png").stat().st_size > 1000
    assert (charts / "ml_keras_predicted_vs_actual.png").stat().st_size > 1000


def test_registered_versions_metadata_and_champion(trained):
    spec, result, report, reg = trained
    versions = reg.versions(spec.ml.model_name)
    assert [v.metadata["framework"] for v in versions] == ["keras", "spark_gbt"]
    best = min(report["candidates"], key=lambda c: c["metrics"]["rmse"])
    assert reg.aliases(spec.ml.model_name) == {"champion": best["version"]}
    assert best["gate"]["promoted"] and "no current champion" in best["gate"]["reasons"][-1]
    meta = reg.get(spec.ml.model_name, "champion").metadata
    assert meta["quality"]["verdict"] == "passed"
    assert meta["run_id"] == result.run_id
    assert meta["data"]["table"] == "ml_flights"
    assert meta["data"]["rows"]["test"] == best["metrics"]["rows"]
    assert {i["name"] for i in meta["signature"]["inputs"]} == set(spec.ml.features.columns())
    carrier = next(i for i in meta["signature"]["inputs"] if i["name"] == "carrier")
    assert "UA" in carrier["categories"]
    assert meta["framework_versions"]["ray"] == "2.60.0"
    for v in versions:
        files = set(v.metadata["files"])
        assert {"model.json", "preprocessor.json", "evaluation.json"} <= files


def test_exported_trees_score_like_spark(spark, trained):
    from pyspark.ml.regression import GBTRegressionModel

    from rayline.ml.models import TreeEnsembleModel
    from rayline.ml.spark_model import feature_frame

    spec, result, _, reg = trained
    gbt = next(
        v for v in reg.versions(spec.ml.model_name) if v.metadata["framework"] == "spark_gbt"
    )
    path = reg.local_path(gbt)
    model = TreeEnsembleModel(path)
    curated = spark.read.parquet(result.record["outputs"]["curated"]["path"])
    test = feature_frame(curated, model.pre, spec.ml, split=2).limit(300)
    from pyspark.ml.feature import VectorAssembler

    names = [c for c in test.columns if c != "label"]
    scored = GBTRegressionModel.load(str(path / "spark_model")).transform(
        VectorAssembler(inputCols=names, outputCol="features").transform(test)
    )
    rows = scored.select(*names, "prediction").collect()  # 300 rows
    m = np.asarray([[r[n] for n in names] for r in rows])
    ours = model.margin(m)
    np.testing.assert_allclose(ours, [r["prediction"] for r in rows], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("framework", ["keras", "spark_gbt"])
def test_no_skew_between_batch_scoring_and_single_rows(trained, framework):
    """The same raw row gives the same prediction through the offline batch path (Ray Data
    map_batches) and the serving path (the model interface, one row at a time)."""
    import ray.data

    from rayline.ml.evaluate import Scorer
    from rayline.ml.handoff import table_to_ray
    from rayline.ml.models import load_model

    spec, result, _, reg = trained
    v = next(v for v in reg.versions(spec.ml.model_name) if v.metadata["framework"] == framework)
    path = str(reg.local_path(v))
    rows = table_to_ray(result.record["outputs"]["curated"]["path"]).take(200)
    frame = pd.DataFrame(rows).dropna(subset=["arr_delay"]).head(25).reset_index(drop=True)
    frame.loc[0, "dest"] = "NOT_AN_AIRPORT"  # an unknown category takes the reserved bucket
    frame.loc[1, "temp"] = None  # a null numeric takes the train mean
    batch = (
        ray.data.from_pandas(frame)
        .map_batches(
            Scorer,
            fn_constructor_kwargs={"model_dir": path, "keep": []},
            batch_format="pandas",
            concurrency=1,
        )
        .take_all()
    )
    model = load_model(path)
    single = [float(model.predict(frame.iloc[[i]])["prediction"][0]) for i in range(len(frame))]
    np.testing.assert_allclose([b["_pred"] for b in batch], single, rtol=1e-5, atol=1e-4)


def test_handoff_and_table_give_the_same_dataset(spark, trained):
    from ray.data.aggregate import Count, Sum

    from rayline.ml.handoff import spark_to_ray, table_to_ray

    _, result, _, _ = trained
    path = result.record["outputs"]["curated"]["path"]
    a = spark_to_ray(spark.read.parquet(path))
    b = table_to_ray(path)
    ta = dict(zip(a.schema().names, map(str, a.schema().types), strict=True))
    tb = dict(zip(b.schema().names, map(str, b.schema().types), strict=True))
    assert ta == tb
    aggs = [
        Count(),
        Sum("arr_delay"),
        Sum("dep_delay"),
        Sum("distance"),
        Sum("month"),
        Sum("flight"),
    ]
    assert a.aggregate(*aggs) == pytest.approx(b.aggregate(*aggs))


def test_second_training_from_the_table_must_beat_the_champion(trained, monkeypatch):
    """`rayline train` on the warehouse table (no Spark challenger): the gate asks a 50% margin,
    so the new version is registered without the alias and the report says why."""
    from rayline.ml.stage import train_from_table

    spec, first, report1, reg = trained
    ml = spec.ml.model_copy(
        update={
            "spark_model": None,
            "gate": spec.ml.gate.model_copy(update={"min_improvement": 0.5}),
            "model": spec.ml.model.model_copy(update={"epochs": 1}),
        }
    )
    champion_before = reg.aliases(spec.ml.model_name)["champion"]
    result = train_from_table(spec.model_copy(update={"ml": ml}))
    report = json.loads((result.run_dir / "reports" / "train.json").read_text())
    (cand,) = report["candidates"]
    assert cand["version"] == 3
    assert not cand["gate"]["promoted"]
    assert "needs at least 50.0%" in cand["gate"]["reasons"][-1]
    assert cand["gate"]["champion"]["measured_on"] == "this test split"
    assert reg.aliases(spec.ml.model_name) == {"champion": champion_before}
    meta = reg.get(spec.ml.model_name, 3).metadata
    assert meta["quality"]["run_id"] == first.run_id  # the run that wrote the table
    assert (
        meta["data"]["fingerprint"]
        == reg.get(spec.ml.model_name, 1).metadata["data"]["fingerprint"]
    )


def test_bad_training_input_names_the_column_and_registers_nothing(spark, tmp_path):
    import ray.data

    from rayline.ml.pipeline import MLRunInfo, run_ml
    from rayline.ml.spec import MLSpec

    ds = ray.data.from_pandas(
        pd.DataFrame({"a": ["x", "y"] * 50, "b": np.arange(100.0), "y": np.arange(100.0)})
    )
    info = MLRunInfo("r1", tmp_path, "p", "test")

    def spec(**over):
        raw = {
            "model_name": "bad",
            "task": "regression",
            "label": "y",
            "features": {"numeric": ["b"]},
            "registry": str(tmp_path / "reg"),
        }
        raw.update(over)
        return MLSpec.model_validate(raw)

    with pytest.raises(FeatureError, match=r"ml\.features\.numeric\[0\].*'a'.*not a number"):
        run_ml(ds, spec(features={"numeric": ["a"]}), info)
    with pytest.raises(FeatureError, match=r"ml\.features\.numeric\[0\].*'nope'"):
        run_ml(ds, spec(features={"numeric": ["nope"]}), info)
    with pytest.raises(FeatureError, match=r"ml\.label.*'missing'"):
        run_ml(ds, spec(label="missing"), info)
    inf = ray.data.from_pandas(pd.DataFrame({"b": [1.0, np.inf] * 50, "y": np.arange(100.0)}))
    with pytest.raises(FeatureError, match=r"'b' holds non-finite values"):
        run_ml(inf, spec(), info)
    unlabelled = ray.data.from_pandas(
        pd.DataFrame({"b": np.arange(100.0), "y": np.full(100, np.nan)})
    )
    with pytest.raises(FeatureError, match=r"the train split is empty"):
        run_ml(unlabelled, spec(), info)
    assert ModelRegistry(str(tmp_path / "reg")).list_models() == []


def test_training_resumes_from_its_last_checkpoint(spark, tmp_path):
    """A training run started again under the same name and storage (what `--resume` does)
    continues from its last checkpoint instead of starting over."""
    import ray.data

    from rayline.ml.features import fit_preprocessor
    from rayline.ml.handoff import split_dataset
    from rayline.ml.spec import MLSpec
    from rayline.ml.train import fit_keras

    rng = np.random.default_rng(1)
    n = 6000
    df = pd.DataFrame({"a": rng.normal(size=n), "b": rng.normal(size=n)})
    df["y"] = 2 * df["a"] - df["b"] + rng.normal(scale=0.1, size=n)

    def spec(epochs):
        return MLSpec.model_validate(
            {
                "model_name": "r",
                "task": "regression",
                "label": "y",
                "features": {"numeric": ["a", "b"]},
                "model": {"epochs": epochs, "batch_size": 256, "early_stopping_patience": None},
            }
        )

    splits, _ = split_dataset(ray.data.from_pandas(df), spec(2))
    pre = fit_preprocessor(splits["train"], spec(2))
    first = fit_keras(splits, pre, spec(2), tmp_path, "resume-me")
    assert [h["epoch"] for h in first.history] == [1, 2]
    again = fit_keras(splits, pre, spec(4), tmp_path, "resume-me")
    assert [h["epoch"] for h in again.history] == [1, 2, 3, 4]
    assert again.history[:2] == first.history  # epochs 1-2 were not trained again
    assert again.history[-1]["val_loss"] < first.history[0]["val_loss"]


def test_two_workers_train_together(spark, tmp_path):
    """Two Ray Train workers under MultiWorkerMirroredStrategy: each reads its shard, the loss
    falls, and the saved model predicts like a single-process model should."""
    import ray.data

    from rayline.ml.features import fit_preprocessor
    from rayline.ml.handoff import split_dataset
    from rayline.ml.models import load_model
    from rayline.ml.spec import MLSpec
    from rayline.ml.train import fit_keras

    rng = np.random.default_rng(2)
    n = 8000
    df = pd.DataFrame({"a": rng.normal(size=n), "c": rng.choice(list("xyz"), n)})
    df["y"] = 3 * df["a"] + (df["c"] == "x") * 2 + rng.normal(scale=0.1, size=n)
    ml = MLSpec.model_validate(
        {
            "model_name": "two",
            "task": "regression",
            "label": "y",
            "features": {"numeric": ["a"], "categorical": ["c"]},
            "model": {"epochs": 3, "batch_size": 256, "early_stopping_patience": None},
            "training": {"num_workers": 2, "cpus_per_worker": 0.5, "threads_per_worker": 1},
        }
    )
    splits, _ = split_dataset(ray.data.from_pandas(df), ml)
    pre = fit_preprocessor(splits["train"], ml)
    out = fit_keras(splits, pre, ml, tmp_path, "two-workers")
    losses = [h["loss"] for h in out.history]
    assert len(losses) == 3 and losses[-1] < 0.5 * losses[0], losses
    # Each worker saw half of the train split.
    assert out.history[0]["samples"] == pytest.approx(len(df) * 0.8, rel=0.05)
    pred = load_model(out.checkpoint_dir).predict(df.head(200))["prediction"]
    assert np.sqrt(np.mean((pred - df["y"].head(200).to_numpy()) ** 2)) < 0.6


def _small_regression(seed: int, n: int = 3000):
    import ray.data

    from rayline.ml.features import fit_preprocessor
    from rayline.ml.handoff import split_dataset
    from rayline.ml.spec import MLSpec

    rng = np.random.default_rng(seed)
    df = pd.DataFrame({"a": rng.normal(size=n), "b": rng.normal(size=n)})
    df["y"] = df["a"] - 2 * df["b"] + rng.normal(scale=0.1, size=n)
    ml = MLSpec.model_validate(
        {
            "model_name": "small",
            "task": "regression",
            "label": "y",
            "features": {"numeric": ["a", "b"]},
            "model": {"epochs": 2, "batch_size": 256, "early_stopping_patience": None},
            "training": {"max_failures": 0},
        }
    )
    splits, _ = split_dataset(ray.data.from_pandas(df), ml)
    return splits, fit_preprocessor(splits["train"], ml), ml


def _live_placement_groups() -> list[str]:
    from ray.util.placement_group import placement_group_table

    return [k for k, v in placement_group_table().items() if v.get("state") != "REMOVED"]


def test_failed_training_raises_the_worker_error_and_frees_its_workers(spark, tmp_path):
    """A worker that fails (here: the model cannot be built) fails fit_keras with the worker's
    error, and the run's placement group (its CPUs) is released: Ray Train's controller runs in
    this process by default."""
    from rayline.ml.train import _controller_in_driver, fit_keras, model_params

    assert _controller_in_driver()
    splits, pre, ml = _small_regression(3)
    before = set(_live_placement_groups())
    with pytest.raises(RuntimeError, match=r"(?s)training run 'fails' failed.*no-such-activation"):
        fit_keras(
            splits,
            pre,
            ml,
            tmp_path,
            "fails",
            params=model_params(ml, {"activation": "no-such-activation"}),
        )
    assert set(_live_placement_groups()) <= before
    assert not (tmp_path / "fails").exists() or not list((tmp_path / "fails").glob("checkpoint_*"))


def test_training_with_the_controller_in_an_actor(spark, tmp_path, monkeypatch):
    """RAYLINE_TRAIN_CONTROLLER=actor: Ray Train's own controller actor trains the same way
    (a checkpoint per epoch, the final report)."""
    from rayline.ml.train import HISTORY_FILE, _controller_in_driver, fit_keras

    monkeypatch.setenv("RAYLINE_TRAIN_CONTROLLER", "actor")
    assert not _controller_in_driver()
    splits, pre, ml = _small_regression(4)
    out = fit_keras(splits, pre, ml, tmp_path, "in-actor")
    assert [h["epoch"] for h in out.history] == [1, 2]
    assert out.metrics["final"] == 1 and out.metrics["epochs_run"] == 2
    assert (out.checkpoint_dir / HISTORY_FILE).is_file()
