"""Ray Tune over the shared Ray Train run: ASHA, the best trial's model, every trial reported."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

pytestmark = pytest.mark.integration

LR = (3e-3, 3e-2)
HIDDEN = [[16], [32, 16]]


def synthetic(n: int = 6000, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    df = pd.DataFrame(
        {
            "x1": rng.normal(size=n),
            "x2": rng.normal(size=n),
            "c": rng.choice(["a", "b", "c"], n),
        }
    )
    df["y"] = 3 * df.x1 - 2 * df.x2 + 2 * (df.c == "a") + rng.normal(scale=0.1, size=n)
    return df


def test_tune_keras_picks_the_best_trial(spark, tmp_path):
    import ray

    from rayline.ml.features import fit_preprocessor
    from rayline.ml.handoff import split_dataset
    from rayline.ml.models import load_model
    from rayline.ml.spec import MLSpec
    from rayline.ml.tune import tune_keras

    df = synthetic()
    ml = MLSpec.model_validate(
        {
            "model_name": "t",
            "task": "regression",
            "label": "y",
            "features": {"numeric": ["x1", "x2"], "categorical": ["c"]},
            "model": {"epochs": 3, "batch_size": 128, "early_stopping_patience": None},
            "training": {"num_workers": 1, "cpus_per_worker": 1},
            "tuning": {
                "num_samples": 3,
                "max_concurrent": 1,
                "search_space": {
                    "learning_rate": {"loguniform": list(LR)},
                    "hidden_units": {"choice": HIDDEN},
                },
            },
        }
    )
    splits, _ = split_dataset(ray.data.from_pandas(df), ml)
    pre = fit_preprocessor(splits["train"], ml)

    out = tune_keras(splits, pre, ml, tmp_path / "storage", "tune-test")

    assert len(out.trials) == 3
    assert len({t["id"] for t in out.trials}) == 3
    assert all(t["status"] in ("terminated", "stopped") for t in out.trials), out.trials
    assert LR[0] <= out.best_params["learning_rate"] <= LR[1]
    assert out.best_params["hidden_units"] in HIDDEN
    assert out.best.params["hidden_units"] == out.best_params["hidden_units"]

    completed = [t for t in out.trials if t["status"] == "terminated"]
    assert completed, out.trials
    best_val = out.best.metrics["val_loss"]
    assert best_val == pytest.approx(min(t["last_val_loss"] for t in completed))
    assert out.best.metrics["final"] == 1
    assert len(out.best.history) == 3

    model = load_model(out.best.checkpoint_dir)
    test = splits["test"].to_pandas()
    pred = model.predict(test)["prediction"].reshape(-1)
    assert np.isfinite(pred).all()
    mse = float(np.mean((pred - test["y"].to_numpy()) ** 2))
    assert mse < 0.2 * float(test["y"].var()), (mse, float(test["y"].var()))
    assert math.isclose(best_val, min(h["val_loss"] for h in out.best.history), rel_tol=1e-6)
