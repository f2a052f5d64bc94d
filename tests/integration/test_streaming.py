"""The streaming job against a real Kafka broker (scripts/kafka.sh) on the shared Spark-on-Ray
session: the flights spec's own transform steps and row rules, a registered model, dead letters,
alias moves between micro-batches, window aggregates, and restarts without loss or duplicates."""

from __future__ import annotations

import json
import uuid

import numpy as np
import pandas as pd
import pytest

from rayline.config import _read_yaml, parse_spec
from rayline.ml.registry import ModelRegistry
from rayline.streaming.kafka_io import replay_frame, tail

from .conftest import FLIGHTS_DATA, ROOT

pytestmark = pytest.mark.integration


def stream_spec_raw(tmp, kafka, registry, **streaming):
    """The flights spec (without its analytics stage) streaming between fresh topics, its
    warehouse, run store and checkpoints under ``tmp``, scoring with stream_model@champion of
    ``registry``; ``streaming`` overrides more of the streaming section."""
    tag = uuid.uuid4().hex[:8]
    raw = _read_yaml(ROOT / "pipelines" / "flights.yaml", set())
    raw["stages"] = [s for s in raw["stages"] if s["type"] != "analytics"]
    raw["warehouse"] = str(tmp / "warehouse")
    raw["run_store"] = str(tmp / "runs")
    raw["streaming"].update(
        bootstrap_servers=kafka,
        input_topic=f"in-{tag}",
        output_topic=f"out-{tag}",
        dead_letter_topic=f"dlq-{tag}",
        checkpoint_location=str(tmp / "checkpoints"),
        model="stream_model@champion",
        registry=str(registry),
        **streaming,
    )
    return raw


def register_model(registry, version_epochs=1, scratch=None):
    """A small real model on flights columns, registered (Keras on Ray Train) in ``registry``
    (a directory, or a URI with ``scratch`` a local directory for the training run)."""
    import ray.data

    from rayline.ml.features import fit_preprocessor
    from rayline.ml.handoff import split_dataset
    from rayline.ml.spec import MLSpec
    from rayline.ml.train import fit_keras

    df = pd.read_csv(FLIGHTS_DATA / "flights.csv", na_values=["NA"], nrows=4000)
    ml = MLSpec.model_validate(
        {
            "model_name": "stream_model",
            "task": "regression",
            "label": "arr_delay",
            "features": {"numeric": ["dep_delay", "distance"], "categorical": ["carrier"]},
            "model": {"epochs": version_epochs, "batch_size": 256},
            "registry": str(registry),
        }
    )
    splits, _ = split_dataset(ray.data.from_pandas(df), ml)
    pre = fit_preprocessor(splits["train"], ml)
    train_dir = (scratch or registry.parent) / "train"
    out = fit_keras(splits, pre, ml, train_dir, f"m-{uuid.uuid4().hex[:6]}")
    reg = ModelRegistry(str(registry))
    return reg.register(
        "stream_model",
        out.checkpoint_dir,
        {"framework": "keras", "signature": pre.signature(), "metrics": {}},
    ).version


@pytest.fixture(scope="module")
def setup(spark, kafka, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stream")
    registry = tmp / "registry"
    v1 = register_model(registry)
    ModelRegistry(str(registry)).set_alias("stream_model", "champion", v1)
    raw = stream_spec_raw(tmp, kafka, registry, max_offsets_per_trigger=400)
    mp = pytest.MonkeyPatch()
    mp.setenv("RAYLINE_DATA_DIR", str(FLIGHTS_DATA.parent))
    try:
        spec = parse_spec(raw)
    finally:
        mp.undo()
    return spec, registry, kafka


def flights_rows(start, n):
    df = pd.read_csv(
        FLIGHTS_DATA / "flights.csv", na_values=["NA"], skiprows=range(1, start + 1), nrows=n
    )
    rows = []
    for r in df.to_dict(orient="records"):
        rows.append(
            {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in r.items()}
        )
    return rows


def produce_raw(bootstrap, topic, values):
    from confluent_kafka import Producer

    p = Producer({"bootstrap.servers": bootstrap})
    for v in values:
        p.produce(topic, v)
    assert p.flush(30) == 0


def read(topic, bootstrap):
    return [json.loads(r["value"]) for r in tail(topic, bootstrap, timeout=6)]


def test_good_events_predicted_bad_events_dead_lettered_exactly(spark, setup):
    from rayline.streaming.run import run_stream

    spec, registry, bootstrap = setup
    s = spec.streaming
    good = flights_rows(0, 500)
    too_late = dict(good[0], dep_delay=5000.0, flight=99001)  # breaks dep_delay_sane
    unknown_carrier = dict(good[1], carrier="ZZ", flight=99002)  # breaks carrier_known
    no_carrier = dict(good[2], carrier=None, flight=99003)  # breaks keys_present
    assert replay_frame(iter(good), s.input_topic, bootstrap) == 500
    assert (
        replay_frame(iter([too_late, unknown_carrier, no_carrier]), s.input_topic, bootstrap) == 3
    )
    produce_raw(
        bootstrap,
        s.input_topic,
        [
            b"not json at all",
            b"[1, 2, 3]",
            json.dumps(dict(good[3], dep_delay="abc")).encode(),  # wrong type
        ],
    )
    result = run_stream(spec, available_now=True, spark=spark)
    assert result.status == "succeeded"

    preds = read(s.output_topic, bootstrap)
    offsets = sorted(p["source_offset"] for p in preds)
    assert offsets == list(range(500))  # every good event exactly once, nothing else
    assert {(p["model"], p["version"]) for p in preds} == {("stream_model", 1)}
    assert all(np.isfinite(p["prediction"]) for p in preds)
    first = next(p for p in preds if p["source_offset"] == 0)
    assert first["key"] == "|".join(str(good[0][k]) for k in s.key_columns)
    assert first["event_time"].startswith("2013-01-01")

    dead = {d["source_offset"]: d for d in read(s.dead_letter_topic, bootstrap)}
    assert sorted(dead) == list(range(500, 506))
    assert dead[500]["reasons"] == ["dep_delay_sane"]
    assert dead[501]["reasons"] == ["carrier_known"]
    assert dead[502]["reasons"] == ["keys_present"]
    assert [dead[i]["reasons"] for i in (503, 504, 505)] == [["malformed"]] * 3
    assert dead[503]["original"] == "not json at all"
    assert json.loads(dead[505]["original"])["dep_delay"] == "abc"
    st = result.record["stream"]
    assert st["events"] == 506 and st["predictions"] == 500 and st["dead_letters"] == 6
    assert st["batches"] >= 2  # max_offsets_per_trigger 400: several micro-batches


def test_model_alias_moves_between_micro_batches_and_windows_count_late_events(spark, setup):
    """A second run: champion moved to version 2; the new events are scored by it. An event far
    behind the watermark is counted late by the window query."""
    from rayline.streaming.run import run_stream

    spec, registry, bootstrap = setup
    s = spec.streaming
    v2 = register_model(registry)
    ModelRegistry(str(registry)).set_alias("stream_model", "champion", v2)
    later = flights_rows(20_000, 100)  # days after the first run's events
    old = dict(flights_rows(0, 1)[0], flight=99004)  # 1 January again: behind the watermark
    replay_frame(iter(later), s.input_topic, bootstrap)
    replay_frame(iter([old]), s.input_topic, bootstrap)
    result = run_stream(spec, available_now=True, spark=spark)

    preds = read(s.output_topic, bootstrap)
    new = [p for p in preds if p["source_offset"] >= 506]
    assert len(new) == 101 and {p["version"] for p in new} == {v2}
    assert len(preds) == 500 + 101  # the first run's outputs were not written again
    assert result.record["stream"]["late_events"] >= 1

    windows = spark.read.parquet(str(spec.warehouse) + f"/{s.window.table}")
    assert windows.count() > 0
    assert set(windows.columns) >= {"window_start", "origin", "events", "dep_delay_mean"}
