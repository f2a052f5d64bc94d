"""Rayline's own metrics through ``ray.util.metrics``, exported by Ray's metrics agent with the
cluster's other metrics (Prometheus format on each node's metrics export port; the dashboard's
metrics view shows them when Prometheus/Grafana are set up). Ray prefixes the names with
``ray_``.

Every function is a no-op when Ray is not initialized, so library code can call them freely.

Metrics (tags in brackets):
- ``rayline_stage_rows_in`` / ``rayline_stage_rows_out`` counters [pipeline, stage]
- ``rayline_stage_seconds`` histogram [pipeline, stage]
- ``rayline_quarantined_rows`` counter [pipeline, stage, rule]
- ``rayline_train_loss`` / ``rayline_train_val_loss`` / ``rayline_train_epoch_seconds`` gauges
  [model, run]; ``rayline_model_metric`` gauge [model, version, metric]
- ``rayline_stream_events`` / ``rayline_stream_predictions`` / ``rayline_stream_dead_letters``
  counters [pipeline] (predictions also [model, version]); ``rayline_stream_input_rate`` and
  ``rayline_stream_lag`` gauges [pipeline]
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

__all__ = ["stage_done", "quarantined", "train_epoch", "model_metric", "stream_batch", "flush"]

log = logging.getLogger("rayline")

SECONDS_BUCKETS = [0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800]
_metrics: dict[str, Any] = {}


def _ray_up() -> bool:
    try:
        import ray

        return bool(ray.is_initialized())
    except Exception:  # noqa: BLE001
        return False


def _get(kind: str, name: str, description: str, tags: tuple[str, ...]) -> Any:
    m = _metrics.get(name)
    if m is None:
        from ray.util import metrics as rm

        cls = {"counter": rm.Counter, "gauge": rm.Gauge, "histogram": rm.Histogram}[kind]
        kw: dict[str, Any] = {"description": description, "tag_keys": tags}
        if kind == "histogram":
            kw["boundaries"] = SECONDS_BUCKETS
        m = _metrics[name] = cls(name, **kw)
    return m


def _safe(fn: Any) -> Any:
    def wrapper(*args: Any, **kwargs: Any) -> None:
        if not _ray_up():
            return
        try:
            fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - metrics must never break a run
            log.debug("metrics: %s", e)

    wrapper.__doc__ = fn.__doc__
    return wrapper


@_safe
def stage_done(
    pipeline: str, stage: str, seconds: float, rows_in: int | None, rows_out: int | None
) -> None:
    """A stage finished."""
    tags = {"pipeline": pipeline, "stage": stage}
    keys = ("pipeline", "stage")
    if rows_in is not None:
        _get("counter", "rayline_stage_rows_in", "Rows into a stage", keys).inc(rows_in, tags)
    if rows_out is not None:
        _get("counter", "rayline_stage_rows_out", "Rows out of a stage", keys).inc(rows_out, tags)
    _get("histogram", "rayline_stage_seconds", "Stage duration", keys).observe(seconds, tags)


@_safe
def quarantined(pipeline: str, stage: str, rule: str, rows: int) -> None:
    """Rows a rule sent to quarantine."""
    if rows:
        _get(
            "counter",
            "rayline_quarantined_rows",
            "Rows quarantined by a rule",
            ("pipeline", "stage", "rule"),
        ).inc(rows, {"pipeline": pipeline, "stage": stage, "rule": rule})


@_safe
def train_epoch(model: str, run: str, loss: float, val_loss: float | None, seconds: float) -> None:
    """One training epoch (recorded in the rank-0 worker)."""
    tags = {"model": model, "run": run}
    keys = ("model", "run")
    _get("gauge", "rayline_train_loss", "Training loss of the last epoch", keys).set(loss, tags)
    if val_loss is not None:
        _get("gauge", "rayline_train_val_loss", "Validation loss of the last epoch", keys).set(
            val_loss, tags
        )
    _get("gauge", "rayline_train_epoch_seconds", "Duration of the last epoch", keys).set(
        seconds, tags
    )


@_safe
def model_metric(model: str, version: int, metrics: dict[str, Any]) -> None:
    """A registered version's test metrics."""
    g = _get(
        "gauge",
        "rayline_model_metric",
        "Test metric of a model version",
        ("model", "version", "metric"),
    )
    for k, v in metrics.items():
        if isinstance(v, int | float):
            g.set(float(v), {"model": model, "version": str(version), "metric": k})


@_safe
def stream_batch(
    pipeline: str,
    events: int,
    predictions: int,
    dead_letters: int,
    model: str,
    version: int,
    seconds: float,
    lag: int | None,
) -> None:
    """One streaming micro-batch."""
    tags = {"pipeline": pipeline}
    _get("counter", "rayline_stream_events", "Events read", ("pipeline",)).inc(events, tags)
    _get(
        "counter",
        "rayline_stream_predictions",
        "Predictions written",
        ("pipeline", "model", "version"),
    ).inc(predictions, {"pipeline": pipeline, "model": model, "version": str(version)})
    _get("counter", "rayline_stream_dead_letters", "Dead letters written", ("pipeline",)).inc(
        dead_letters, tags
    )
    _get(
        "gauge",
        "rayline_stream_input_rate",
        "Events per second of the last micro-batch",
        ("pipeline",),
    ).set(events / seconds if seconds > 0 else 0.0, tags)
    if lag is not None:
        _get("gauge", "rayline_stream_lag", "Input events not yet read", ("pipeline",)).set(
            lag, tags
        )


def flush() -> None:
    """Give Ray's metrics agent time to collect this process's metrics before it exits
    (``RAYLINE_METRICS_FLUSH_SECONDS``, default 0: off)."""
    wait = float(os.environ.get("RAYLINE_METRICS_FLUSH_SECONDS", "0") or 0)
    if wait > 0 and _metrics and _ray_up():
        log.info("waiting %.0fs for the metrics agent to collect this run's metrics", wait)
        time.sleep(wait)
