"""Training the Keras model with Ray Train's ``TensorflowTrainer``.

:func:`fit_keras` splits the (materialized) train and validation Ray Datasets into one equal
shard per worker; each worker reads its shard once, turns it into arrays with the shared
:class:`~rayline.ml.features.Preprocessor`, and trains from memory, batches gathered from
tensors: feeding Keras batch by batch from Ray Data costs more than the model's own step on
small MLPs. With several workers, ``MultiWorkerMirroredStrategy`` sums the gradients across the
workers each step with one collective (and nothing else: metrics are synchronized once per
epoch), an all-gather where it is cheaper than the all-reduce (:func:`_gradient_sum`), and the
workers sharing a node are bound to their own cores (:func:`_pin_cpus`); one worker trains
without a strategy (one replica, same result, no collective overhead). Where the time went, and
what each of these choices gained, is in ``benchmarks/README.md``.

Ray Train's controller runs in the process calling :func:`fit_keras`, not in an actor of its own
(:func:`_in_process_controller`): one process fewer to start before the workers are asked for.

Every epoch reports its metrics and a checkpoint (model with optimizer state, preprocessor,
history). A run restarted with the same name and storage resumes from its last checkpoint; the
last report is the final model with the best validation weights (early stopping).

:func:`fit_keras` is used both by single training and by every Ray Tune trial.
"""

from __future__ import annotations

import contextlib
import functools
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
import pandas as pd

from ..storage import location
from .features import Preprocessor
from .keras_model import MODEL_FILE, build_model, compile_model, use_tf_keras
from .models import write_model_info
from .spec import MLSpec

__all__ = ["TrainOutcome", "fit_keras", "model_params", "train_loop_per_worker"]

log = logging.getLogger("rayline")

HISTORY_FILE = "history.json"
# Keras runs this many steps per call of its compiled train function: one Python -> TensorFlow
# round trip per 32 steps instead of per step (callbacks still run per epoch).
STEPS_PER_EXECUTION = 32
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


def _block_refs(ds: Any) -> list[Any]:
    """The object refs of a materialized dataset's blocks (in the driver, where the dataset
    was materialized; no Ray Data executor runs for a materialized dataset)."""
    try:
        bundles = list(ds.iter_internal_ref_bundles())
    except AttributeError:  # another Ray version
        return list(ds.to_arrow_refs())
    return [e.ref if hasattr(e, "ref") else e[0] for b in bundles for e in b.blocks]


def _arrays(refs: list[Any], pre: Preprocessor) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """A worker's shard, as the blocks fit_keras passed (:func:`_block_refs`), fetched and
    converted here. Neither ``shard.to_pandas()``, which runs Ray Data's executor (its first use
    in a process creates its stats actor and autoscaling coordinator), nor
    ``shard.to_arrow_refs()``, which converts pandas blocks in Ray tasks: tasks submitted from
    the worker inherit its runtime environment, so no idle Ray worker process matches and one
    is started (~1 s of CPU competing with the worker's own start-up)."""
    import pyarrow as pa
    import ray
    from ray.data.block import BlockAccessor

    cols = pre.feature_columns + [pre.label]
    blocks = [b for b in ray.get(list(refs)) if BlockAccessor.for_block(b).num_rows()]
    if not blocks:
        df = pd.DataFrame({c: [] for c in cols})
    elif all(isinstance(b, pa.Table) for b in blocks):
        tables = [b.select(cols) for b in blocks]
        df = pa.concat_tables(tables, promote_options="permissive").to_pandas()
    else:
        frames = [BlockAccessor.for_block(b).to_pandas()[cols] for b in blocks]
        df = frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)
    return pre.transform(df), pre.labels(df)


def _tf_dataset(
    tf: Any, x: dict[str, np.ndarray], y: np.ndarray, batch: int, seed: int, shuffle: bool
) -> Any:
    """Batches gathered from in-memory tensors, as Keras does for numpy input: one permutation
    of the row indices per pass, cut into batches, rows gathered per batch. (Per-row tf.data
    work, ``from_tensor_slices(...).shuffle(...).batch(...)``, cost 3x the CPU of the model's
    own steps.)"""
    n = len(y)
    data = ({k: tf.constant(v) for k, v in x.items()}, tf.constant(y))
    full = n // batch
    rest = n - full * batch

    def order(_: Any) -> Any:
        idx = tf.range(n, dtype=tf.int64)
        return tf.random.shuffle(idx, seed=seed) if shuffle else idx

    def batches(idx: Any) -> Any:
        ds = tf.data.Dataset.from_tensor_slices(tf.reshape(idx[: full * batch], [full, batch]))
        if rest:
            ds = ds.concatenate(tf.data.Dataset.from_tensors(idx[full * batch :]))
        return ds

    ds = tf.data.Dataset.range(1).repeat().map(order).flat_map(batches)
    ds = ds.map(lambda i: tf.nest.map_structure(lambda d: tf.gather(d, i), data))
    # Infinite, as .repeat() made the previous pipeline: with an unknown cardinality (flat_map)
    # MultiWorkerMirroredStrategy checks every step, with one more collective, that all
    # workers still have data.
    ds = ds.apply(tf.data.experimental.assert_cardinality(tf.data.INFINITE_CARDINALITY))
    ds = ds.prefetch(tf.data.AUTOTUNE)
    opts = tf.data.Options()
    opts.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return ds.with_options(opts)


# Gradients are summed with one all-gather (then added locally) instead of one all-reduce when
# there are 2 workers, or when all workers' gradients together are at most this many bytes.
GATHER_MAX_BYTES = 1 << 20


def _gradient_sum(strategy: Any, tf: Any, world: int) -> Any:
    """Under MultiWorkerMirroredStrategy: a function summing a list of dense gradients across
    the workers with one all-gather collective, or None (then the optimizer all-reduces).

    The strategy's all-reduce (RING, the only CPU implementation) is a reduce-scatter then an
    all-gather: 2 x (workers - 1) rounds of gRPC requests between the workers, where an
    all-gather is workers - 1 rounds. For the latency-bound gradients of a small model this
    halves the step's communication: with 2 workers it moves the same bytes in one round
    instead of two (measured: 0.68 -> 0.35 ms for the MLP's 20 KB). With more workers, an
    all-gather receives workers / 2 times the bytes of a ring all-reduce, so it is used only
    when the gathered gradients are small (``GATHER_MAX_BYTES``).

    Every worker adds the gathered rows in the same (worker) order, so all workers compute the
    same sum, bit for bit, and the mirrored variables stay identical: the same synchronous
    update as the all-reduce. (The strategy's public ``all_gather`` first gathers the shapes,
    one more collective; the launcher's ``_all_gather`` does only the one. Any other TensorFlow
    version, several devices per worker, sparse or mixed-dtype gradients: the all-reduce.)
    """
    launchers = getattr(getattr(strategy.extended, "_cross_device_ops", None), "_launchers", None)
    if not launchers or len(launchers) != 1 or not hasattr(launchers[0], "_all_gather"):
        return None
    gather = launchers[0]._all_gather

    def gradient_sum(grads: list[Any]) -> list[Any] | None:
        if any(not isinstance(g, tf.Tensor) for g in grads) or len({g.dtype for g in grads}) != 1:
            return None  # IndexedSlices (embeddings) or mixed dtypes
        sizes = [g.shape.num_elements() for g in grads]
        if any(n is None for n in sizes):
            return None
        nbytes = sum(sizes) * grads[0].dtype.size * world
        if world != 2 and nbytes > GATHER_MAX_BYTES:
            return None
        flat = tf.concat([tf.reshape(g, [-1]) for g in grads], axis=0)
        total = tf.reduce_sum(gather(flat[tf.newaxis], None), axis=0)
        return [tf.reshape(t, g.shape) for t, g in zip(tf.split(total, sizes), grads, strict=True)]

    return gradient_sum


def _local_metric_steps(model: Any, tf: Any, gradient_sum: Any = None) -> None:
    """Under MultiWorkerMirroredStrategy: train/test steps that update the metrics without
    reading them, and sum the gradients with ``gradient_sum`` (:func:`_gradient_sum`) when
    given.

    Keras' default steps return ``metric.result()`` every step, and under the strategy each read
    all-reduces the metric's total and count, and Keras then sums the returned values across
    the workers: 6 of the 7 collectives of a step (for a loss plus one metric; the 7th is the
    gradients'), each a gRPC round trip between the workers. Keras reads the metrics itself,
    synchronized, at the end of each epoch, replacing the step's values (same names), so the
    epoch logs are unchanged.
    """
    import types

    def train_step(self: Any, data: Any) -> Any:
        x, y = data
        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            loss = self.compute_loss(x, y, y_pred, None)
        variables = self.trainable_variables
        grads = tape.gradient(loss, variables)
        pairs = [(g, v) for g, v in zip(grads, variables, strict=True) if g is not None]
        summed = gradient_sum([g for g, _ in pairs]) if gradient_sum and pairs else None
        if summed is None:  # the optimizer all-reduces them (as ``minimize`` does)
            self.optimizer.apply_gradients(pairs)
        else:
            self.optimizer.apply_gradients(
                zip(summed, [v for _, v in pairs], strict=True),
                experimental_aggregate_gradients=False,
            )
        self.compiled_metrics.update_state(y, y_pred)
        return {m.name: tf.constant(0.0) for m in self.metrics}

    def test_step(self: Any, data: Any) -> Any:
        x, y = data
        y_pred = self(x, training=False)
        self.compute_loss(x, y, y_pred, None)
        self.compiled_metrics.update_state(y, y_pred)
        return {m.name: tf.constant(0.0) for m in self.metrics}

    model.train_step = types.MethodType(train_step, model)
    model.test_step = types.MethodType(test_step, model)
    # And the steps' returned values taken from the local replica, not summed across the
    # workers (2 more collectives a step); Keras does not use them beyond batch-level logs.
    model.distribute_reduction_method = "first"


def _pin_cpus(local_rank: int, local_world: int) -> list[int] | None:
    """Bind this worker process (all its threads) to its own share of the node's cores when
    several workers of the run share the node; returns the cores, or None (not pinned).

    Synchronous data parallelism waits at every step for the slowest worker, and each step
    hands a gRPC request to the other workers. Unbound, the workers' compute, TensorFlow and
    gRPC threads migrate between the shared cores, and a step often waits for a thread to be
    scheduled on a core the other worker is using. With 2 workers on 2 cores, binding each to
    one core took a steady epoch from about 0.49 s to 0.34 s (benchmarks/README.md). Workers
    share out the cores this process may use, in rank order (more workers than cores: rank
    modulo cores). Concurrent runs on one node (Tune trials) each spread their workers the
    same way, so they stay balanced. ``training.pin_cpus: false`` turns it off.
    """
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return None
    if local_world < 2 or len(cpus) < 2:
        return None
    if local_world >= len(cpus):
        mine = [cpus[local_rank % len(cpus)]]
    else:
        mine = [int(c) for c in np.array_split(np.array(cpus), local_world)[local_rank]]
    # Threads started later inherit their creator's binding; the listing is repeated for
    # threads started during the first pass.
    for _ in range(2):
        for tid in os.listdir("/proc/self/task"):
            with contextlib.suppress(OSError):  # a thread that has exited
                os.sched_setaffinity(int(tid), mine)
    return mine


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
    pre = Preprocessor.from_dict(config["pre"])
    params = config["params"]
    seed = int(config.get("seed", 0))
    if world > 1 and config.get("pin_cpus", True):
        cores = _pin_cpus(ctx.get_local_rank(), ctx.get_local_world_size())
        if cores is not None:
            log.info("training worker %d bound to cores %s", rank, cores)
    # The shards are read and transformed (numpy and pandas) while TensorFlow's import, started
    # by the backend (_prepare_worker), runs in its thread: ~1.3 s of the ~1.6 s import hidden.
    x_tr, y_tr = _arrays(config["shards"]["train"][rank], pre)
    x_va, y_va = _arrays(config["shards"]["validation"][rank], pre)
    keras = use_tf_keras(config.get("threads"))
    import tensorflow as tf

    keras.utils.set_random_seed(seed + rank)
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
            compile_model(
                model,
                pre.task,
                float(params["learning_rate"]),
                steps_per_execution=STEPS_PER_EXECUTION,
            )
        if ckpt is not None:  # a resumed model keeps its compile settings but not this one
            model._configure_steps_per_execution(STEPS_PER_EXECUTION)
        if world > 1:
            _local_metric_steps(model, tf, _gradient_sum(strategy, tf, world))

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


def _set_tf_config(addresses: list[str], index: int) -> None:
    os.environ["TF_CONFIG"] = json.dumps(
        {"cluster": {"worker": addresses}, "task": {"type": "worker", "index": index}}
    )


def _worker_address() -> str:
    from ray.train._internal.utils import get_address_and_port

    address, port = get_address_and_port()
    return f"{address}:{port}"


_PREPARED = False  # _prepare_worker ran in this process


def _prepare_worker() -> None:
    """On each worker once the worker group is up: tf-keras, and TensorFlow's import (~2 s)
    started in the background so that it overlaps the rest of Ray Train's start-up (the train
    loop's own import waits for it; thread settings still apply: importing does not start
    TensorFlow's runtime)."""
    import importlib
    import threading

    global _PREPARED
    if _PREPARED:
        return
    _PREPARED = True
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    threading.Thread(
        target=lambda: [importlib.import_module(m) for m in ("tensorflow", "tf_keras")],
        name="rayline-tf-import",
        daemon=True,
    ).start()


# Where Ray Train's controller runs: "driver" (default: in the process calling fit_keras) or
# "actor" (Ray Train's own way: an actor, a process of its own).
CONTROLLER_ENV = "RAYLINE_TRAIN_CONTROLLER"


def _controller_in_driver() -> bool:
    """Whether Ray Train's controller runs in the process calling fit_keras
    (``RAYLINE_TRAIN_CONTROLLER``, default ``driver``) and not in an actor (``actor``, also
    when Ray Train's state tracking is on: it records the controller's actor)."""
    mode = os.environ.get(CONTROLLER_ENV, "driver").strip().lower()
    if mode not in ("driver", "actor"):
        raise ValueError(f"{CONTROLLER_ENV} must be 'driver' or 'actor', not {mode!r}")
    tracking = os.environ.get("RAY_TRAIN_ENABLE_STATE_TRACKING", "0").strip().lower()
    return mode == "driver" and tracking not in ("1", "true")


def _run_controller(controller: Any) -> None:
    """Run an in-process controller's control loop to its end. In a thread of its own when
    this thread already runs an event loop (a notebook); if the call is interrupted (Ctrl-C,
    SIGTERM), the worker group is stopped before the exception goes on."""
    import asyncio
    import threading

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        in_loop = False
    else:
        in_loop = True
    try:
        if not in_loop:
            asyncio.run(controller.run())
            return
        failed: list[BaseException] = []

        def target() -> None:
            try:
                asyncio.run(controller.run())
            except BaseException as e:  # noqa: BLE001 (re-raised in the caller's thread)
                failed.append(e)

        thread = threading.Thread(target=target, name="rayline-train-controller", daemon=True)
        thread.start()
        thread.join()
        if failed:
            raise failed[0]
    except BaseException:
        group = controller.get_worker_group()
        if group is not None:
            with contextlib.suppress(Exception):
                group.abort()
        raise


@functools.cache
def _ray_train() -> Any:
    """Ray Train's ``TensorflowTrainer`` and the backend config Rayline gives it (Ray Train
    imported on first use)."""
    from ray.train.backend import Backend, BackendConfig

    try:  # the class itself: ``ray.train.tensorflow`` (the package) imports TensorFlow
        from ray.train.v2.tensorflow.tensorflow_trainer import TensorflowTrainer
    except ImportError:  # another Ray version
        from ray.train.tensorflow import TensorflowTrainer  # type: ignore[assignment]

    class KerasBackend(Backend):  # type: ignore[misc]
        """Sets ``TF_CONFIG`` for ``MultiWorkerMirroredStrategy`` on each worker, as Ray's own
        ``TensorflowConfig`` does, and tf-keras; unlike it, never imports TensorFlow in the
        driver or in the Ray Train controller (importing ``ray.train.tensorflow`` does: ~2 s of
        CPU in each, competing with the workers' start-up)."""

        def on_start(self, worker_group: Any, backend_config: Any) -> None:
            import ray

            worker_group.execute(_prepare_worker)
            if len(worker_group) > 1:
                urls = worker_group.execute(_worker_address)
                ray.get(
                    [
                        worker_group.execute_single_async(
                            i, _set_tf_config, addresses=urls, index=i
                        )
                        for i in range(len(worker_group))
                    ]
                )

    callback_base: Any
    try:
        from ray.train.v2._internal.execution.callback import (
            WorkerGroupCallback as callback_base,
        )
    except ImportError:  # another Ray version: the backend starts the import
        callback_base = None

    class EarlyTensorFlow(callback_base or object):  # type: ignore[misc]
        """Starts TensorFlow's import on each worker as soon as the worker actors exist,
        before Ray Train initializes their train context and runs the backend's set-up
        (~0.5 s earlier)."""

        def before_init_train_context(self, workers: list[Any]) -> dict[str, list[Any]]:
            for w in workers:
                w.execute_async(_prepare_worker)  # not waited for: ordered before the loop
            return {}

    class KerasBackendConfig(BackendConfig):  # type: ignore[misc]
        @property
        def backend_cls(self) -> Any:
            return KerasBackend

    local_controller = _in_process_controller()

    class Trainer(TensorflowTrainer):  # type: ignore[misc]
        """Ray Train's ``TensorflowTrainer`` with four changes.

        - Its backend is :class:`KerasBackend`: ``TensorflowTrainer.__init__`` itself imports
          ``ray.train.tensorflow`` for its default config, so it is bypassed (it does nothing
          else: the class is a ``DataParallelTrainer`` with a TensorFlow backend).
        - No PlacementGroupCleaner. That detached actor asks the state API whether the
          controller is alive, and the state API finds its cluster from RAY_ADDRESS or
          /tmp/ray/ray_current_cluster, not from the Ray instance it runs in: on a machine where
          a (stale) cluster was started with ``ray start`` the query hangs, and every run's
          shutdown waited out the cleaner's 12 s stop timeout. (Placement groups of trials
          that Tune stops are removed by rayline.ml.tune.)
        - No DatasetsCallback when no datasets are given (fit_keras passes the shards in the
          loop's config): it would start a DatasetManager actor (a process) for nothing.
        - Its controller runs in this process, not in an actor (see
          :func:`_in_process_controller`).
        """

        def __init__(self, train_loop_per_worker: Any, **kwargs: Any) -> None:
            kwargs["backend_config"] = KerasBackendConfig()
            super(TensorflowTrainer, self).__init__(train_loop_per_worker, **kwargs)

        def _initialize_and_run_controller(self, **kwargs: Any) -> Any:
            """The controller in this process (:func:`_in_process_controller`), unless
            :func:`_controller_in_driver` says otherwise or this Ray version lacks what it
            needs."""
            if local_controller is None or not _controller_in_driver():
                return super()._initialize_and_run_controller(**kwargs)
            controller_cls, policy_cls = local_controller
            policy: Any = kwargs.get("scaling_policy")
            if policy_cls is not None and type(policy) is policy_cls.__base__:
                kwargs["scaling_policy"] = policy_cls(scaling_config=policy.scaling_config)
            # Its log records go to this process's logging (see _in_process_controller).
            key = "RAY_TRAIN_ENABLE_CONTROLLER_STRUCTURED_LOGGING"
            unset = key not in os.environ
            if unset:
                os.environ[key] = "0"
            try:
                controller = controller_cls(**kwargs)
            finally:
                if unset:
                    os.environ.pop(key, None)
            _run_controller(controller)
            return controller.get_result()

        def _create_default_callbacks(self) -> list[Any]:
            callbacks = super()._create_default_callbacks()
            try:
                from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
                from ray.train.v2._internal.callbacks.placement_group_callback import (
                    PlacementGroupCleanerCallback,
                )
            except ImportError:  # another Ray version: keep its defaults
                return list(callbacks)
            drop: tuple[type, ...] = (PlacementGroupCleanerCallback,)
            if not self.datasets:  # shards come in the loop config: no DatasetManager actor
                drop += (DatasetsCallback,)
            kept = [c for c in callbacks if not isinstance(c, drop)]
            return kept + ([EarlyTensorFlow()] if callback_base is not None else [])

    return Trainer


@functools.cache
def _in_process_controller() -> tuple[Any, Any] | None:
    """Ray Train's controller class, to run in the process calling ``fit_keras``, and a scaling
    policy that sends its resource requests from a thread; None if this Ray version lacks what
    they need.

    Ray Train runs its controller in an actor: a process started for each run, which imports
    Ray Train (~1 s of CPU) before it can even ask for the workers, so on 2 cores the workers
    started about 1.3 s after ``fit_keras`` was called, and the controller's start competed with
    theirs. In this process the controller starts at once: the same class, the same control
    loop, callbacks, checkpoint bookkeeping and failure handling (retries), its worker actors
    owned by this process (they end with it, as they ended with the controller actor, which
    this process owned). Two things differ:

    - the workers' train context gets no handle to a controller actor: only
      ``ray.train.get_all_reported_checkpoints`` uses it, and Rayline does not;
    - the controller's log records go to this process's ``ray.train`` logger (Ray Train's
      structured controller log files are off unless
      ``RAY_TRAIN_ENABLE_CONTROLLER_STRUCTURED_LOGGING`` is set: Ray configures them with
      ``logging.config.dictConfig``, which would reset this process's logging handlers).

    The controller's first act is a resource request to Ray's autoscaling coordinator (a
    detached actor, created by the first request in a cluster), waited for before the workers
    are started. The policy returned sends it once the worker group runs, and its requests and
    their cancellation from one thread, in order: the coordinator's process, when it has to be
    started, no longer starts with the worker's and Ray Train's synchronization actor's (three
    processes starting on 2 cores took the worker's start from ~1.0 s to ~2.2 s), and the
    workers do not wait for it. On a fixed-size cluster the request only informs Ray Data's
    resource budgets; an autoscaler sees the workers' placement group anyway.
    """
    import concurrent.futures

    try:
        from ray.train.v2._internal.execution.controller import TrainController
        from ray.train.v2._internal.execution.scaling_policy import FixedScalingPolicy
        from ray.train.v2._internal.execution.worker_group import WorkerGroup
    except ImportError:
        return None
    if not (
        hasattr(TrainController, "worker_group_cls")
        and hasattr(TrainController, "get_worker_group")
        and hasattr(WorkerGroup, "_init_train_context_on_workers")
        and hasattr(WorkerGroup, "_decorate_worker_log_file_paths")
    ):
        return None

    class LocalWorkerGroup(WorkerGroup):  # type: ignore[misc]
        def _init_train_context_on_workers(
            self, workers: list[Any], sync_actor: Any, train_context_args: dict[str, list[Any]]
        ) -> None:
            # As Ray Train does, but without a controller actor to hand the workers.
            import ray

            ray.get(
                [
                    w.actor.init_train_context.remote(
                        train_run_context=self._train_run_context,
                        distributed_context=w.distributed_context,
                        synchronization_actor=sync_actor,
                        storage_context=self._storage_context,
                        worker_callbacks=self._worker_callbacks_to_propagate,
                        controller_actor=None,
                        **{k: v[i] for k, v in train_context_args.items()},
                    )
                    for i, w in enumerate(workers)
                ]
            )
            self._decorate_worker_log_file_paths(workers)

    class LocalController(TrainController):  # type: ignore[misc]
        worker_group_cls = LocalWorkerGroup

    policy_cls: Any = None
    needed = ("_send_resource_request", "_maybe_send_resource_request", "_cancel_resource_request")
    if all(hasattr(FixedScalingPolicy, m) for m in needed):

        class BackgroundRequests(FixedScalingPolicy):  # type: ignore[misc]
            """Resource requests sent once the worker group runs (at its first poll), from one
            thread, in order; the cancellation at shutdown waits for them."""

            def __init__(self, scaling_config: Any) -> None:
                super().__init__(scaling_config=scaling_config)
                self._requests = concurrent.futures.ThreadPoolExecutor(
                    1, thread_name_prefix="rayline-train-resources"
                )
                self._running = False
                self._sent = False

            def _submit(self, fn: Any) -> Any:
                self._sent = True
                try:
                    return self._requests.submit(fn)
                except RuntimeError:  # after the cancellation: send it from here
                    fn()
                    return None

            def _send_resource_request(self) -> None:
                if self._running:  # else at the first poll of the running worker group
                    self._submit(super()._send_resource_request)

            def _maybe_send_resource_request(self) -> None:
                if self._running:
                    self._submit(super()._maybe_send_resource_request)

            def make_decision_for_running_worker_group(self, *args: Any, **kwargs: Any) -> Any:
                self._running = True
                return super().make_decision_for_running_worker_group(*args, **kwargs)

            def _cancel_resource_request(self) -> None:
                if self._sent:
                    done = self._submit(super()._cancel_resource_request)
                    if done is not None:
                        done.result()
                self._requests.shutdown(wait=False)

        policy_cls = BackgroundRequests
    return LocalController, policy_cls


def _before_fit() -> None:
    """Start-up work that can overlap the controller's own start.

    - On a one-node cluster, no preemption watcher: it is an actor (a process) that polls
      Ray for nodes being drained so that workers on them stop early; with one node there is
      no other node to move to. Set ``RAY_TRAIN_ENABLE_PREEMPTION_WATCHER`` to choose.
    - With the controller in an actor (``RAYLINE_TRAIN_CONTROLLER=actor``): the cluster's
      autoscaling coordinator (a detached actor Ray Train's controller sends its resource
      request to, and waits for) is created now, so that its process starts alongside the
      controller's instead of after it. It is created once per cluster. (In this process, the
      controller sends the request later and does not wait: _in_process_controller.)
    """
    import ray

    single_node = sum(1 for n in ray.nodes() if n.get("Alive")) <= 1
    if single_node and "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER" not in os.environ:
        os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = "0"
    if _controller_in_driver() and _in_process_controller() is not None:
        return
    try:
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            get_or_create_autoscaling_coordinator,
        )
    except ImportError:  # another Ray version: the controller creates it
        return
    get_or_create_autoscaling_coordinator()


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
    from ray.train import (
        CheckpointConfig,
        FailureConfig,
        RunConfig,
        ScalingConfig,
        TrainingFailedError,
    )

    params = params or model_params(ml)
    t = ml.training
    threads = t.threads_per_worker or max(1, int(t.cpus_per_worker))
    storage = location(storage_path)  # a directory, or a URI every node reaches
    storage.mkdir(parents=True, exist_ok=True)
    n = t.num_workers
    # Each worker's shard, split here: splitting a materialized dataset regroups its blocks,
    # where passing the datasets to Ray Train starts a DatasetManager actor and a
    # SplitCoordinator actor per dataset (a new process each: ~3.5 s for 1 worker).
    # The workers get the shards' block refs (see _arrays).
    shards = {
        k: [_block_refs(s) for s in (datasets[k].split(n, equal=True) if n > 1 else [datasets[k]])]
        for k in ("train", "validation")
    }
    # The controller polls the workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (default 2 s) and
    # takes one report per poll, and a worker's report waits until the previous one was taken
    # (a queue of one): with epochs shorter than the interval, the reports queue up, and the
    # last report, then the end of the run, waited up to an interval each. A poll is one actor
    # call per worker. 0.1 s, with the controller in this process (session 6: the tail of a
    # 1-worker run 0.4 -> 0.2 s); 0.2 s with the controller in an actor, as before.
    os.environ.setdefault(
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1" if _controller_in_driver() else "0.2"
    )
    _before_fit()
    trainer_cls = _ray_train()
    trainer = trainer_cls(
        train_loop_per_worker,
        train_loop_config={
            "pre": pre.to_dict(),
            "params": params,
            "threads": threads,
            "pin_cpus": t.pin_cpus,
            "seed": ml.split.seed,
            "model_name": ml.model_name,
            "run_name": name,
            "shards": shards,
        },
        scaling_config=ScalingConfig(
            num_workers=n, resources_per_worker={"CPU": t.cpus_per_worker}
        ),
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
    try:
        result = trainer.fit()
    except TrainingFailedError as e:  # Ray Train raises the run's error itself
        raise RuntimeError(f"training run {name!r} failed: {e}") from e
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
