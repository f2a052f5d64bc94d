"""Recovery of the streaming job as users run it (`python workloads/stream_pipeline.py`, its own
Spark-on-Ray session): killed with SIGKILL mid-stream and restarted, then the broker restarted
under it; in the end every input event has exactly one output record."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from rayline.streaming.kafka_io import replay_frame, tail

from ..conftest import KAFKA_PORT
from .conftest import FLIGHTS_DATA, ROOT
from .test_streaming import flights_rows, register_model, stream_spec_raw

pytestmark = pytest.mark.integration

N = 1500


def start_job(spec_path, log, *extra):
    return subprocess.Popen(
        [sys.executable, "workloads/stream_pipeline.py", "--spec", str(spec_path), *extra],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: SIGKILL takes Spark and Ray with it
        env={**os.environ, "RAYLINE_DATA_DIR": str(FLIGHTS_DATA.parent)},
    )


def kill_group(p, sig=signal.SIGKILL):
    with contextlib.suppress(ProcessLookupError):
        os.killpg(p.pid, sig)
    p.wait(timeout=120)


def outputs(s, bootstrap):
    preds = [json.loads(r["value"]) for r in tail(s["output_topic"], bootstrap, timeout=5)]
    dead = [json.loads(r["value"]) for r in tail(s["dead_letter_topic"], bootstrap, timeout=5)]
    return [p["source_offset"] for p in preds] + [d["source_offset"] for d in dead]


def committed_batches(s):
    """Micro-batches Spark has committed (files in the query's checkpoint `commits/` folder): a
    cheap progress probe, polled often, so a fast machine cannot finish the stream unseen."""
    return len(list(Path(s["checkpoint_location"]).glob("**/commits/[0-9]*")))


def wait_for(cond, limit, what, every=0.2):
    deadline = time.time() + limit
    while time.time() < deadline:
        if cond():
            return
        time.sleep(every)
    raise AssertionError(f"timed out after {limit}s waiting for {what}")


def assert_exactly_once(offsets, n):
    """One output (prediction or dead letter) per input offset 0..n-1."""
    assert sorted(offsets) == list(range(n)), (
        f"{len(offsets)} outputs for {n} inputs; duplicates: "
        f"{sorted({o for o in offsets if offsets.count(o) > 1})[:10]}"
    )


def test_killed_job_and_restarted_broker_lose_and_duplicate_nothing(spark, kafka, tmp_path):
    registry = tmp_path / "registry"
    from rayline.ml.registry import ModelRegistry

    ModelRegistry(str(registry)).set_alias("stream_model", "champion", register_model(registry))
    raw = stream_spec_raw(
        tmp_path,
        kafka,
        registry,
        # 100 events a micro-batch (each takes ~2 s): the stream lasts >= 30 s, so the kill
        # below lands mid-stream even on a quiet machine
        max_offsets_per_trigger=100,
        trigger_seconds=1,
    )
    raw.pop("ml")
    raw["session"]["app_name"] = "rayline-recovery"
    s = raw["streaming"]
    s.pop("window")
    spec_path = tmp_path / "stream.yaml"
    spec_path.write_text(yaml.safe_dump(raw))
    assert replay_frame(iter(flights_rows(0, N)), s["input_topic"], kafka) == N
    log = (tmp_path / "job.log").open("w")

    # 1. Killed mid-stream (SIGKILL: no chance to clean up), then restarted.
    job = start_job(spec_path, log)
    try:
        wait_for(lambda: committed_batches(s) >= 2, 400, "the first micro-batches")
    finally:
        kill_group(job)
    written = len(outputs(s, kafka))
    assert written < N, "the job finished before it could be killed; raise N"

    # 2. Restarted; the broker restarts under it.
    job = start_job(spec_path, log)
    try:
        before = committed_batches(s)
        wait_for(lambda: committed_batches(s) > before, 400, "progress after the restart")
        env = {**os.environ, "RAYLINE_KAFKA_PORT": KAFKA_PORT}
        r = subprocess.run(
            [str(ROOT / "scripts" / "kafka.sh"), "restart"],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        time.sleep(10)
        kill_group(job, signal.SIGTERM)  # a graceful stop (or it already failed clearly)

    # 3. Drain what is left, then count.
    final = start_job(spec_path, log, "--available-now")
    assert final.wait(timeout=600) == 0, (tmp_path / "job.log").read_text()[-3000:]
    assert_exactly_once(outputs(s, kafka), N)


@pytest.mark.skipif(
    not os.environ.get("AWS_ENDPOINT_URL") or not os.environ.get("RAYLINE_S3_BUCKET"),
    reason="no object store: start scripts/objectstore.sh and eval its `env` (test.sh does)",
)
def test_killed_job_with_checkpoints_on_s3_loses_and_duplicates_nothing(spark, kafka, tmp_path):
    """The same kill and restart with the queries' checkpoints (and the job's markers) on the S3
    server, the model in a registry on S3 too: every input event has exactly one output."""
    import uuid

    from rayline.ml.registry import ModelRegistry
    from rayline.storage import location, remove_tree

    base = location(f"s3://{os.environ['RAYLINE_S3_BUCKET']}/tests/stream-{uuid.uuid4().hex[:10]}")
    registry = str(base / "registry")
    ModelRegistry(registry).set_alias(
        "stream_model", "champion", register_model(registry, scratch=tmp_path)
    )
    raw = stream_spec_raw(tmp_path, kafka, registry, max_offsets_per_trigger=100, trigger_seconds=1)
    raw.pop("ml")
    raw["session"]["app_name"] = "rayline-recovery-s3"
    s = raw["streaming"]
    s.pop("window")
    s["checkpoint_location"] = str(base / "checkpoints")
    raw["run_store"] = str(base / "runs")
    spec_path = tmp_path / "stream.yaml"
    spec_path.write_text(yaml.safe_dump(raw))
    n = 800
    assert replay_frame(iter(flights_rows(0, n)), s["input_topic"], kafka) == n

    def commits() -> int:
        root = location(s["checkpoint_location"])
        return sum(1 for p in root.rglob("[0-9]*") if p.parent.name == "commits")

    log = (tmp_path / "job.log").open("w")
    try:
        job = start_job(spec_path, log)
        try:
            wait_for(commits_at_least(commits, 2), 400, "the first micro-batches", every=1)
        finally:
            kill_group(job)
        assert len(outputs(s, kafka)) < n, "the job finished before it could be killed"
        final = start_job(spec_path, log, "--available-now")
        assert final.wait(timeout=600) == 0, (tmp_path / "job.log").read_text()[-3000:]
        assert_exactly_once(outputs(s, kafka), n)
    finally:
        remove_tree(base)


def commits_at_least(count, n):
    return lambda: count() >= n
