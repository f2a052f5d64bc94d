"""Training the Keras model with Ray Train's ``TensorflowTrainer``.

Each worker reads its shard of the Ray Datasets once, turns it into arrays with the shared
:class:`~rayline.ml.features.Preprocessor`, and trains from memory (``tf.data`` over tensors):
feeding Keras batch by batch from Ray Data costs more than the model's own step on small MLPs.
With several workers, ``MultiWorkerMirroredStrategy`` all-reduces gradients each step; one worker
trains without a strategy (one replica, same result, no collective overhead).

Every epoch reports its metrics and a checkpoint (model with optimizer state, preprocessor,
history). A run restarted with the same name and storage resumes from its last checkpoint; the
last report is the final model with the best validation weights (early stopping).

:func:`fit_keras` is used both by single training and by every Ray Tune trial.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .features import Preprocessor
from .keras_model import MODEL_FILE, build_model, compile_model, use_tf_keras
from .models import write_model_info
from .spec import MLSpec

__all__ = ["TrainOutcome", "fit_keras", "model_params", "train_loop_per_worker"]

log = logging.getLogger("rayline")

HISTORY_FILE = "history.json"
STATE_FILE = "state.json"


@dataclass
class TrainOutcome:
    checkpoint_dir: Path
    history: list[dict[str, float]]
    metrics: dict[str, Any]
    params: dict[str, Any]
    seconds: float


def model_params(ml: MLSpec, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The model settings of the spec, with tuning overrides applied."""
    p = ml.model.model_dump()
    p.update(overrides or {})
    return p


def _arrays(shard: Any, pre: Preprocessor) -> tuple[dict[str, np.ndarray], np.ndarray]:
    xs: list[dict[str, np.ndarray]] = []
    ys: list[np.ndarray] = []
    cols = pre.feature_columns + [pre.label]
    for batch in shard.iter_batches(batch_size=65536, batch_format="pandas"):
        batch = batch[cols]
        xs.append(pre.transform(batch))
        ys.append(pre.labels(batch))
    if not xs:
        empty = pre.transform(__import__("pandas").DataFrame({c: [] for c in cols}))
        return empty, np.zeros(0, dtype=np.float32)
    x = {k: np.concatenate([b[k] for b in xs]) for k in xs[0]}
    return x, np.concatenate(ys)


def _tf_dataset(
    tf: Any, x: dict[str, np.ndarray], y: np.ndarray, batch: int, seed: int, shuffle: bool
) -> Any:
    ds = tf.data.Dataset.from_tensor_slices((x, y))
    if shuffle:
        ds = ds.shuffle(min(len(y), 200_000), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch, drop_remainder=False).repeat().prefetch(tf.data.AUTOTUNE)
    opts = tf.data.Options()
    opts.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return ds.with_options(opts)


def _save(
    model: Any,
    pre: Preprocessor,
    history: list[dict[str, float]],
    epoch: int,
    params: dict[str, Any],
    directory: Path,
) -> None:
    model.save(str(directory / MODEL_FILE))
    pre.save(directory)
    write_model_info(directory, "keras", task=pre.task, params=params)
    (directory / HISTORY_FILE).write_text(json.dumps(history))
    (directory / STATE_FILE).write_text(json.dumps({"epoch": epoch}))


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker function (see the module docstring)."""
    import ray.train as rt

    ctx = rt.get_context()
    world, rank = ctx.get_world_size(), ctx.get_world_rank()
    keras = use_tf_keras(config.get("threads"))
    import tensorflow as tf

    pre = Preprocessor.from_dict(config["pre"])
    params = config["params"]
    seed = int(config.get("seed", 0))
    keras.utils.set_random_seed(seed + rank)

    x_tr, y_tr = _arrays(rt.get_dataset_shard("train"), pre)
    x_va, y_va = _arrays(rt.get_dataset_shard("validation"), pre)
    per_worker = max(1, int(params["batch_size"]) // world)
    steps = max(1, -(-len(y_tr) // per_worker))
    val_steps = max(1, -(-len(y_va) // per_worker))
    if world > 1:
        # Every worker must run the same number of steps; shards are equal (Ray Data's
        # equal split), the batch count is agreed from the smallest to be safe.
        steps = max(1, len(y_tr) // per_worker)
        val_steps = max(1, len(y_va) // per_worker)
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    else:
        strategy = tf.distribute.get_strategy()

    history: list[dict[str, float]] = []
    start_epoch = 0
    with strategy.scope():
        ckpt = rt.get_checkpoint()
        if ckpt is not None:
            with ckpt.as_directory() as d:
                model = keras.models.load_model(str(Path(d) / MODEL_FILE))
                history = json.loads((Path(d) / HISTORY_FILE).read_text())
                start_epoch = json.loads((Path(d) / STATE_FILE).read_text())["epoch"] + 1
        else:
            model = build_model(pre, params)
            compile_model(model, pre.task, float(params["learning_rate"]))

    class Report(keras.callbacks.Callback):  # type: ignore[name-defined,misc]
        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            self.t0 = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            metrics = {k: float(v) for k, v in (logs or {}).items()}
            metrics.update(
                epoch=epoch + 1,
                epoch_seconds=time.perf_counter() - self.t0,
                samples=len(y_tr) * world,
            )
            history.append(metrics)
            if rank == 0:
                from .. import metrics as rl_metrics

                rl_metrics.train_epoch(
                    config.get("model_name", "model"),
                    config.get("run_name", ""),
                    metrics.get("loss", float("nan")),
                    metrics.get("val_loss"),
                    metrics["epoch_seconds"],
                )
            with tempfile.TemporaryDirectory() as tmp:
                _save(self.model, pre, history, epoch, params, Path(tmp))
                rt.report(
                    metrics,
                    checkpoint=rt.Checkpoint.from_directory(tmp) if rank == 0 else None,
                )

    callbacks: list[Any] = [Report()]
    patience = params.get("early_stopping_patience")
    if patience:
        callbacks.insert(
            0,
            keras.callbacks.EarlyStopping(
                monitor="val_loss", patience=int(patience), restore_best_weights=True
            ),
        )
    epochs = int(params["epochs"])
    if start_epoch < epochs:
        model.fit(
            _tf_dataset(tf, x_tr, y_tr, per_worker, seed + rank, shuffle=True),
            validation_data=_tf_dataset(tf, x_va, y_va, per_worker, seed, shuffle=False),
            epochs=epochs,
            initial_epoch=start_epoch,
            steps_per_epoch=steps,
            validation_steps=val_steps,
            callbacks=callbacks,
            verbose=0,
        )
    # The final report: the model with the best validation weights.
    best = min(history, key=lambda h: h.get("val_loss", float("inf"))) if history else {}
    final = {f"best_{k}": v for k, v in best.items()} | {
        "val_loss": best.get("val_loss", float("nan")),
        "epochs_run": len(history),
        "final": 1,
    }
    with tempfile.TemporaryDirectory() as tmp:
        _save(model, pre, history, len(history) - 1, params, Path(tmp))
        rt.report(final, checkpoint=rt.Checkpoint.from_directory(tmp) if rank == 0 else None)


def fit_keras(
    datasets: dict[str, Any],
    pre: Preprocessor,
    ml: MLSpec,
    storage_path: str | Path,
    name: str,
    params: dict[str, Any] | None = None,
    callbacks: list[Any] | None = None,
) -> TrainOutcome:
    """Train with Ray Train; a run with the same ``name`` and storage resumes from its last
    checkpoint.

    Args:
        datasets: ``{"train": ds, "validation": ds}`` (materialized Ray Datasets).
        pre: The preprocessor fitted on the train split.
        ml: The ``ml`` section (training settings).
        storage_path: Where Ray Train keeps the run and its checkpoints.
        name: The Ray Train run name.
        params: Model settings (default: the spec's).
        callbacks: Ray Train callbacks (Ray Tune's report callback in a trial).

    Returns:
        The final checkpoint (best weights), the per-epoch history and the final metrics.

    Raises:
        RuntimeError: training failed (the error of the failing worker).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.tensorflow import TensorflowTrainer

    params = params or model_params(ml)
    t = ml.training
    threads = t.threads_per_worker or max(1, int(t.cpus_per_worker))
    storage = Path(storage_path).resolve()
    storage.mkdir(parents=True, exist_ok=True)
    trainer = TensorflowTrainer(
        train_loop_per_worker,
        train_loop_config={
            "pre": pre.to_dict(),
            "params": params,
            "threads": threads,
            "seed": ml.split.seed,
            "model_name": ml.model_name,
            "run_name": name,
        },
        scaling_config=ScalingConfig(
            num_workers=t.num_workers, resources_per_worker={"CPU": t.cpus_per_worker}
        ),
        datasets={"train": datasets["train"], "validation": datasets["validation"]},
        run_config=RunConfig(
            name=name,
            storage_path=str(storage),
            failure_config=FailureConfig(max_failures=t.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=callbacks or [],
        ),
    )
    t0 = time.perf_counter()
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    result = trainer.fit()
    seconds = time.perf_counter() - t0
    if result.error is not None:
        raise RuntimeError(f"training run {name!r} failed: {result.error}") from result.error
    if result.checkpoint is None:
        raise RuntimeError(f"training run {name!r} produced no checkpoint")
    local = Path(tempfile.mkdtemp(prefix="rayline-model-"))
    with result.checkpoint.as_directory() as d:
        shutil.copytree(d, local, dirs_exist_ok=True)
    history = json.loads((local / HISTORY_FILE).read_text())
    metrics = dict(result.metrics or {})
    log.info(
        "training %s: %d epoch(s) in %.1fs, best val_loss %.4f",
        name,
        len(history),
        seconds,
        metrics.get("val_loss", float("nan")),
    )
    return TrainOutcome(local, history, metrics, params, seconds)
