"""Hyper-parameter search with Ray Tune over the shared Ray Train run.

Each trial is a small driver function that calls :func:`~rayline.ml.train.fit_keras` with its
model settings; Ray Train V2 does not accept a trainer as a Tune trainable. The Train run reports
to Tune through ``TuneReportCallback``: one result per epoch (``val_loss`` and a checkpoint),
then the final result (``val_loss`` of the best-weights model, ``final=1``). ASHA compares trials
on ``val_loss`` by report count and stops the weak ones early.

The trial driver holds no CPU (its Ray Train workers hold them), so ``max_concurrent`` trials
need ``max_concurrent x num_workers x cpus_per_worker`` logical CPUs, plus what Ray Data needs
to feed them.

Example:
    >>> outcome = tune_keras(splits, pre, ml, "runs/train", "delay-tune")  # doctest: +SKIP
    >>> outcome.best_params, [t["status"] for t in outcome.trials]  # doctest: +SKIP
    ({'learning_rate': 0.003, 'hidden_units': [64]}, ['terminated', 'stopped', 'terminated'])
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..storage import Loc, ObjectPath, append_text, location
from .features import Preprocessor
from .spec import MLSpec, TuningSpec
from .train import HISTORY_FILE, TrainOutcome, fit_keras, model_params

__all__ = ["TuneOutcome", "search_space", "tune_keras"]

log = logging.getLogger("rayline")

# Tune's bookkeeping keys, dropped from the best trial's metrics (TrainOutcome.metrics holds
# what the training run reported, as fit_keras returns it).
_TUNE_KEYS = frozenset(
    {
        "trial_id",
        "training_iteration",
        "time_total_s",
        "time_this_iter_s",
        "time_since_restore",
        "iterations_since_restore",
        "timestamp",
        "date",
        "pid",
        "hostname",
        "node_ip",
        "done",
        "config",
        "checkpoint_dir_name",
        "should_checkpoint",
        "experiment_tag",
        "checkpoint_path",
    }
)
_STATUSES = ("terminated", "stopped", "error")

# What a trial's driver reserves: no CPU (its Ray Train workers hold them). Tune refuses a
# request whose every amount is 0 ("empty head and zero worker bundles"), so it asks for one
# byte of memory; a token CPU fraction would keep a whole CPU from Ray Data tasks.
_DRIVER_RESOURCES: dict[str, float] = {"cpu": 0.0, "memory": 1.0}


@dataclass
class TuneOutcome:
    """The result of a sweep.

    Attributes:
        best: The best trial's final model, history and metrics, like :func:`fit_keras` returns.
        best_params: The best trial's tuned settings (the keys of the search space).
        trials: One dict per trial: ``id``, ``params``, ``status`` (``terminated``: trained to
            the end; ``stopped``: stopped early by ASHA; ``error``), ``epochs``,
            ``last_val_loss``, ``best_val_loss``, ``checkpoint_path`` and ``error``.
    """

    best: TrainOutcome
    best_params: dict[str, Any]
    trials: list[dict[str, Any]]


def search_space(spec: TuningSpec) -> dict[str, Any]:
    """The spec's search space as Ray Tune sampling domains.

    Example:
        >>> from rayline.ml.spec import TuningSpec
        >>> space = search_space(TuningSpec.model_validate(
        ...     {"search_space": {"learning_rate": {"loguniform": [1e-4, 1e-2]}}}))
        >>> type(space["learning_rate"]).__name__
        'Float'
    """
    from ray import tune

    space: dict[str, Any] = {}
    for key, dim in spec.search_space.items():
        if dim.choice is not None:
            space[key] = tune.choice(dim.choice)
        elif dim.uniform is not None:
            space[key] = tune.uniform(*dim.uniform)
        elif dim.loguniform is not None:
            space[key] = tune.loguniform(*dim.loguniform)
        elif dim.randint is not None:
            space[key] = tune.randint(*dim.randint)
    return space


def tune_keras(
    datasets: dict[str, Any],
    pre: Preprocessor,
    ml: MLSpec,
    storage_path: str | Path,
    name: str,
) -> TuneOutcome:
    """Search the model settings of ``ml.tuning`` with Ray Tune and ASHA.

    Every trial trains with :func:`fit_keras` (run ``<name>-trial-<trial id>`` under
    ``storage_path``, next to the Tune experiment ``<name>``). The best trial is the one with
    the lowest last reported ``val_loss``: for a trial trained to the end, that of its
    best-weights model; for one ASHA stopped, that of its last epoch's checkpoint.

    Args:
        datasets: ``{"train": ds, "validation": ds}`` (materialized Ray Datasets).
        pre: The preprocessor fitted on the train split.
        ml: The ``ml`` section; ``ml.tuning`` must be set.
        storage_path: Where Tune and Ray Train keep runs and checkpoints.
        name: The Tune experiment name.

    Returns:
        The best trial's model (copied to a fresh local directory) and a summary of every trial.

    Raises:
        ValueError: ``ml.tuning`` is not set.
        RuntimeError: every trial failed (names the first error).
    """
    spec = ml.tuning
    if spec is None:
        raise ValueError("ml.tuning is not set: nothing to tune")
    storage = location(storage_path)
    storage.mkdir(parents=True, exist_ok=True)
    tuner = _tuner(datasets, pre, ml, spec, storage, name)
    log.info(
        "tune %s: %d trial(s), %d at a time, over %s",
        name,
        spec.num_samples,
        spec.max_concurrent,
        sorted(spec.search_space),
    )
    t0 = time.perf_counter()
    with _quiet_console():
        grid = tuner.fit()
    seconds = time.perf_counter() - t0
    results = [grid[i] for i in range(len(grid))]
    trials = [_summary(r, list(spec.search_space)) for r in results]
    for t in trials:  # whatever a dying controller made after the last sweep
        if t["id"]:
            _remove_placement_groups(storage / _run_name(name, t["id"]) / _PG_FILE)

    usable = [
        (t, r)
        for t, r in zip(trials, results, strict=True)
        if t["status"] != "error"
        and t["checkpoint_path"]
        and t["last_val_loss"] is not None
        and not math.isnan(t["last_val_loss"])
    ]
    if not usable:
        errors = [t["error"] for t in trials if t["error"]]
        first = errors[0] if errors else "no trial reported a finite val_loss with a checkpoint"
        raise RuntimeError(f"tune {name!r}: all {len(trials)} trial(s) failed; first: {first}")
    best_trial, best_result = min(usable, key=lambda tr: tr[0]["last_val_loss"])
    best = _outcome(best_result, model_params(ml, best_trial["params"]), storage)
    log.info(
        "tune %s: %d trial(s) in %.1fs (%s); best %s val_loss %.4f %s",
        name,
        len(trials),
        seconds,
        ", ".join(f"{s} {sum(t['status'] == s for t in trials)}" for s in _STATUSES),
        best_trial["id"],
        best_trial["last_val_loss"],
        best_trial["params"],
    )
    return TuneOutcome(best, dict(best_trial["params"]), trials)


@contextlib.contextmanager
def _quiet_console() -> Iterator[None]:
    """Tune's default console output prints an experiment table and paths even at verbose=0;
    its legacy reporter prints nothing at verbose=0. Unless the user chose one, use the latter
    while Tune runs (the variable is read when the run starts)."""
    key = "RAY_AIR_NEW_OUTPUT"
    if key in os.environ:
        yield
        return
    os.environ[key] = "0"
    try:
        yield
    finally:
        os.environ.pop(key, None)


def _tuner(
    datasets: dict[str, Any],
    pre: Preprocessor,
    ml: MLSpec,
    spec: TuningSpec,
    storage: Loc,
    name: str,
) -> Any:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    trainable = tune.with_resources(
        tune.with_parameters(
            _trial,
            datasets={"train": datasets["train"], "validation": datasets["validation"]},
            pre=pre.to_dict(),
            ml=ml,
            storage_path=str(storage),
            name=name,
        ),
        _DRIVER_RESOURCES,
    )
    return tune.Tuner(
        trainable,
        param_space=search_space(spec),
        tune_config=tune.TuneConfig(
            metric="val_loss",
            mode="min",
            num_samples=spec.num_samples,
            # The limit goes on the generator: Tune ignores max_concurrent_trials (with only a
            # warning) when it is given a search generator, seeded or not.
            search_alg=BasicVariantGenerator(
                max_concurrent=spec.max_concurrent, random_state=ml.split.seed
            ),
            scheduler=ASHAScheduler(
                time_attr="training_iteration",
                max_t=ml.model.epochs + 1,  # every epoch, then the final report
                grace_period=spec.grace_period,
                reduction_factor=spec.reduction_factor,
            ),
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=str(storage),
            verbose=0,
            callbacks=[_tune_callback(name, storage)],
        ),
    )


def _run_name(name: str, trial_id: str) -> str:
    return f"{name}-trial-{trial_id}"


def _trial(
    config: dict[str, Any],
    datasets: dict[str, Any],
    pre: dict[str, Any],
    ml: MLSpec,
    storage_path: str,
    name: str,
) -> None:
    """One trial's driver: a Ray Train run reporting to Tune."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    run = _run_name(name, tune.get_context().get_trial_id())
    # No worker-group retries inside a trial: when ASHA stops the trial, its workers die before
    # its Ray Train controller does, and a controller that retried started a new worker group
    # (a new placement group, never recorded for the sweep below) that held a CPU the next
    # trial waited for. Tune's own failure handling covers trials.
    trial_ml = ml.model_copy(
        update={"training": ml.training.model_copy(update={"max_failures": 0})}
    )
    outcome = fit_keras(
        datasets,
        Preprocessor.from_dict(pre),
        trial_ml,
        storage_path,
        run,
        params=model_params(ml, config),
        callbacks=[TuneReportCallback(), _pg_recorder(location(storage_path) / run / _PG_FILE)],
    )
    # Tune reads the checkpoint from storage; the local copy fit_keras made is not needed.
    shutil.rmtree(outcome.checkpoint_dir, ignore_errors=True)


# When ASHA stops a trial (it also stops every trial at its last report, t = max_t), Tune ends
# the trial's driver actor; the Ray Train controller and workers die with it, but the workers'
# placement group belongs to the job and stays, holding their CPUs: the next trial waits for
# ever. Ray Train's own cleaner for this asks the Ray
# state API, which needs the dashboard (local Rayline sessions start none). So each run records
# its placement groups (a Train callback in the controller) and the Tune driver removes those of
# ended trials.
_PG_FILE = "placement_groups.txt"
_SWEEP_EVERY = 2.0  # seconds between sweeps while Tune runs
_SWEEP_FOR = 60.0  # seconds a trial's placement groups are watched after it ended


def _pg_recorder(path: Loc) -> Any:
    """A Ray Train controller callback appending each worker group's placement group id to
    ``path``."""
    from ray.train.v2._internal.execution.callback import WorkerGroupCallback

    class RecordPlacementGroup(WorkerGroupCallback):  # type: ignore[misc]
        def after_worker_group_start(self, worker_group: Any) -> None:
            state = worker_group.get_worker_group_state()
            pg = state.placement_group_handle.placement_group
            append_text(path, pg.id.hex() + "\n")

    return RecordPlacementGroup()


def _remove_placement_groups(path: Loc) -> int:
    """Remove the recorded placement groups that are still there; returns how many."""
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import (
        PlacementGroup,
        placement_group_table,
        remove_placement_group,
    )

    if not path.is_file():
        return 0
    removed = 0
    for pg_id in path.read_text().split():
        try:
            pg = PlacementGroup(PlacementGroupID.from_hex(pg_id))
            if placement_group_table(pg).get("state", "REMOVED") != "REMOVED":
                remove_placement_group(pg)
                removed += 1
        except Exception as e:  # a line being written, or removed meanwhile by Ray Train
            log.debug("placement group %s from %s: %s", pg_id, path, e)
    return removed


def _tune_callback(name: str, storage: Loc) -> Any:
    from ray import tune

    class Callback(tune.Callback):  # type: ignore[misc]
        """Logs trial start/end on the ``rayline`` logger; removes the placement groups of
        ended trials' Train runs (on the trial's end, then every few seconds in case the
        dying controller made another)."""

        def __init__(self) -> None:
            self.ended: dict[str, float] = {}  # trial id -> when it ended
            self.last_sweep = 0.0

        def sweep(self) -> None:
            now = self.last_sweep = time.monotonic()
            for trial_id, ended in list(self.ended.items()):
                n = _remove_placement_groups(storage / _run_name(name, trial_id) / _PG_FILE)
                if n:
                    log.info(
                        "tune %s: removed %d placement group(s) left by trial %s",
                        name,
                        n,
                        trial_id,
                    )
                if now - ended > _SWEEP_FOR:
                    del self.ended[trial_id]

        def end(self, trial_id: str) -> None:
            self.ended[trial_id] = time.monotonic()
            self.sweep()

        def on_step_end(self, iteration: int, trials: list[Any], **info: Any) -> None:
            if self.ended and time.monotonic() - self.last_sweep > _SWEEP_EVERY:
                self.sweep()

        def on_trial_start(
            self, iteration: int, trials: list[Any], trial: Any, **info: Any
        ) -> None:
            log.info("tune %s: trial %s started: %s", name, trial.trial_id, trial.config)

        def on_trial_complete(
            self, iteration: int, trials: list[Any], trial: Any, **info: Any
        ) -> None:
            r = trial.last_result or {}
            how = "finished" if r.get("final") == 1 else "stopped early"
            log.info(
                "tune %s: trial %s %s after %d report(s), val_loss %.4f",
                name,
                trial.trial_id,
                how,
                int(r.get("training_iteration", 0)),
                float(r.get("val_loss", math.nan)),
            )
            self.end(trial.trial_id)

        def on_trial_error(
            self, iteration: int, trials: list[Any], trial: Any, **info: Any
        ) -> None:
            log.warning("tune %s: trial %s failed", name, trial.trial_id)
            self.end(trial.trial_id)

    return Callback()


def _summary(result: Any, keys: list[str]) -> dict[str, Any]:
    """One trial of a ResultGrid as a plain dict (see :class:`TuneOutcome`)."""
    m = dict(result.metrics or {})
    df = result.metrics_dataframe
    losses = []
    epochs = 0
    if df is not None and "val_loss" in df:
        per_epoch = df[df["final"] != 1] if "final" in df else df
        epochs = len(per_epoch)
        losses = [float(v) for v in df["val_loss"] if not math.isnan(float(v))]
    if result.error is not None:
        status = "error"
    elif m.get("final") == 1:
        status = "terminated"
    else:
        status = "stopped"
    return {
        "id": m.get("trial_id"),
        "params": {k: result.config.get(k) for k in keys if k in (result.config or {})},
        "status": status,
        "epochs": epochs,
        "last_val_loss": float(m["val_loss"]) if "val_loss" in m else None,
        "best_val_loss": min(losses) if losses else None,
        "checkpoint_path": m.get("checkpoint_path"),
        "error": None if result.error is None else str(result.error),
    }


def _outcome(result: Any, params: dict[str, Any], storage: Loc) -> TrainOutcome:
    """Rebuild a TrainOutcome from a trial's last checkpoint, copied to a fresh local dir.
    The reported path is within the storage's filesystem (``bucket/key`` on S3)."""
    from ray.train import Checkpoint

    local = Path(tempfile.mkdtemp(prefix="rayline-model-"))
    fs = storage.fs if isinstance(storage, ObjectPath) else None
    Checkpoint(result.metrics["checkpoint_path"], filesystem=fs).to_directory(str(local))
    history = json.loads((local / HISTORY_FILE).read_text())
    metrics = {k: v for k, v in result.metrics.items() if k not in _TUNE_KEYS}
    seconds = float(result.metrics.get("time_total_s", math.nan))
    return TrainOutcome(local, history, metrics, params, seconds)
