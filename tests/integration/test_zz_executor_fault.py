"""Fault: a Spark executor (a Ray actor) is killed in the middle of a run.

Runs last in the package: the shared session gets a replacement executor, which is the point.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest

from rayline.config import load_spec
from rayline.runner import RunFailed, run_pipeline

from .conftest import FLIGHTS_DATA, ROOT

pytestmark = pytest.mark.integration


def executor_actors():
    import ray._private.state as state

    return [
        a
        for a in state.actors().values()
        if (a.get("Name") or "").startswith("raydp-executor") and a["State"] == "ALIVE"
    ]


def test_executor_killed_mid_run(spark, tmp_path, monkeypatch):
    monkeypatch.setenv("RAYLINE_WAREHOUSE", str(tmp_path / "warehouse"))
    monkeypatch.setenv("RAYLINE_RUN_STORE", str(tmp_path / "runs"))
    monkeypatch.setenv("RAYLINE_DATA_DIR", str(FLIGHTS_DATA.parent))
    spec = load_spec(ROOT / "pipelines" / "flights.yaml")
    spark.sql("SELECT 1").collect()
    before = executor_actors()
    assert len(before) == 1

    outcome: dict = {}

    def run():
        try:
            outcome["result"] = run_pipeline(spec, spark=spark)
        except RunFailed as e:
            outcome["error"] = e

    t = threading.Thread(target=run)
    t.start()
    # Wait until the quality stage (one big Spark job with a shuffle) is running, then kill.
    deadline = time.time() + 300
    killed = None
    while time.time() < deadline and killed is None:
        for rec_path in (tmp_path / "runs").glob("*/run.json"):
            rec = json.loads(rec_path.read_text())
            if any(s["name"] == "checks" and s["status"] == "running" for s in rec["stages"]):
                time.sleep(1.0)
                killed = executor_actors()[0]
                os.kill(killed["Pid"], signal.SIGKILL)
                break
        time.sleep(0.2)
    assert killed is not None, "the run never reached the quality stage"
    t.join(600)
    assert not t.is_alive()

    # Independent expectation from the raw data.
    raw = (
        spark.read.option("header", "true")
        .option("nullValue", "NA")
        .option("inferSchema", "true")
        .csv(str(FLIGHTS_DATA / "flights.csv"))
    )
    raw.createOrReplaceTempView("raw_flights_fault")
    bad = spark.sql("""SELECT count(*) n FROM raw_flights_fault WHERE dep_delay < -60 OR dep_delay > 1200
        OR arr_delay < -120 OR arr_delay > 1200 OR (distance / (air_time / 60.0)) NOT BETWEEN 50 AND 700""").first()[
        "n"
    ]

    if "result" in outcome:
        # Spark re-ran the lost tasks on the replacement executor: results are exact.
        out = outcome["result"].record["outputs"]
        assert out["curated"]["rows"] == 336_776 - bad
        assert out["quarantine"]["rows"] == bad
        print(
            f"executor {killed['Name']} (pid {killed['Pid']}) killed in 'checks'; run succeeded, "
            f"{out['curated']['rows']:,} curated + {out['quarantine']['rows']:,} quarantined rows"
        )
    else:
        # Otherwise the failure is recorded clearly and the run resumes to the same result.
        err = outcome["error"]
        rec = json.loads((tmp_path / "runs" / err.run_id / "run.json").read_text())
        assert rec["status"] == "failed" and rec["error"]["stage"] == "checks"
        result = run_pipeline(spec, spark=spark, resume=err.run_id)
        assert result.record["outputs"]["curated"]["rows"] == 336_776 - bad

    after = executor_actors()
    assert len(after) == 1 and after[0]["Pid"] != killed["Pid"]
    assert after[0]["NumRestarts"] >= 1
