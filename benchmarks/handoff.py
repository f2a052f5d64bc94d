#!/usr/bin/env python3
"""Handoff benchmark: a Spark DataFrame to a materialized Ray Dataset, in memory vs via Parquet.

One invocation starts one Spark-on-Ray session (Rayline's, RayDP: 1 executor x 2 cores, 2g)
in a subprocess and, for each size, times on the same cached DataFrame (N rows x --cols
numeric columns), interleaved within each repeat (the order alternates):

  handoff   ``rayline.ml.handoff.spark_to_ray(df)``: Rayline's in-memory handoff.
  parquet   ``df.write.parquet(dir)`` then ``ray.data.read_parquet(dir).materialize()``.

and, when asked with --paths, references:

  raydp       RayDP's ``from_spark_recoverable(df).materialize()`` + ``release_spark_recoverable``
              (what ``spark_to_ray`` did before it had its own conversion).
  from_spark  ``ray.data.from_spark(df).materialize()`` (RayDP, repartitioned to Ray Data's
              default parallelism).

Each path ends in a materialized dataset whose row count, column names and types are checked
(and the sum of the id column, once per size). The source DataFrame is cached and counted
before any timing, so only the transfer is timed.

Usage:
    python benchmarks/handoff.py                                  # 1M and 5M rows, 3 repeats
    python benchmarks/handoff.py --rows 200000 --repeats 1        # quick check
    python benchmarks/handoff.py --paths handoff,raydp,parquet    # with RayDP's own path

Outputs go to benchmarks/out/ (gitignored): handoff.json, logs/handoff.log, the session's
warehouse and the Parquet files (deleted after each run). See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import _harness
from _harness import Meter, emit, note

ROOT = Path(__file__).resolve().parents[1]
PATHS = ["handoff", "parquet", "raydp", "from_spark"]
WARMUP_ROWS = 100_000


# ---------------------------------------------------------------------------------------------
# Child: one session, every path, every size
# ---------------------------------------------------------------------------------------------

# Column c0 is the id (bigint); column k > 0 cycles through these: random doubles (incompressible),
# ints below 1000, doubles with 2 decimals below 1000, pseudo-random bigints. --cols 10: 2 bigint,
# 2 int, 6 double = 72 bytes a row in Arrow.
_KINDS = ["double", "int", "double2", "bigint", "double", "int", "double", "double2", "double"]


def make_source(spark: Any, rows: int, cols: int, partitions: int) -> Any:
    """N rows x ``cols`` numeric columns (``c0`` = id), cached and counted."""
    from pyspark.sql import functions as F

    exprs = [F.col("id").alias("c0")]
    for k in range(1, cols):
        kind = _KINDS[(k - 1) % len(_KINDS)]
        if kind == "double":
            e = F.rand(k)
        elif kind == "double2":
            e = F.round(F.rand(k) * 1000, 2)
        elif kind == "int":
            e = (F.rand(k) * 1000).cast("int")
        else:
            e = (F.col("id") * F.lit(2654435761) + F.lit(k)) % F.lit(1_000_000_007)
        exprs.append(e.alias(f"c{k}"))
    df = spark.range(0, rows, 1, partitions).select(*exprs).cache()
    assert df.count() == rows
    return df


def run_path(name: str, df: Any, work: Path) -> Any:
    """One transfer; returns the materialized dataset."""
    import ray.data

    if name == "handoff":
        from rayline.ml.handoff import spark_to_ray

        return spark_to_ray(df)
    if name == "raydp":
        from raydp.spark.dataset import from_spark_recoverable, release_spark_recoverable

        ds = from_spark_recoverable(df).materialize()
        release_spark_recoverable(df)
        return ds
    if name == "from_spark":
        from raydp.spark.dataset import release_spark_recoverable

        ds = ray.data.from_spark(df).materialize()
        release_spark_recoverable(df)
        return ds
    if name == "parquet":
        out = work / "parquet"
        df.write.mode("overwrite").parquet(str(out))
        return ray.data.read_parquet(str(out), file_extensions=["parquet"]).materialize()
    raise ValueError(name)


def _schema(ds: Any) -> dict[str, str]:
    s = ds.schema()
    return dict(zip(s.names, map(str, s.types), strict=True))


def root_cause(err: str) -> str:
    """The innermost error line of a (possibly cross-language) traceback text."""
    import re

    found = re.findall(r"(?:Caused by: )?([\w.]+(?:Error|Exception)(?:: [^\n]*)?)", err)
    deep = [f for f in found if not f.startswith(("ray.exceptions", "RayTaskError"))]
    return (deep or found or [err.splitlines()[0] if err else "?"])[-1][:200]


def _free(work: Path) -> None:
    """Outside the timing: drop the dataset's blocks (caller dels it) and the Parquet files."""
    gc.collect()
    shutil.rmtree(work / "parquet", ignore_errors=True)


def child(args: argparse.Namespace) -> None:
    _harness.setup_child_logging()
    work = Path(args.out) / "handoff"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)

    import ray
    import ray.data

    from rayline.config import SessionConfig
    from rayline.session import spark_on_ray

    paths = args.paths.split(",")
    cfg = SessionConfig(num_executors=1, executor_cores=2, executor_memory="2g")
    result: dict[str, Any] = {"paths": paths, "cols": args.cols, "sizes": []}
    t0 = time.perf_counter()
    try:
        with spark_on_ray(cfg, warehouse=work / "warehouse") as spark:
            result["startup_s"] = time.perf_counter() - t0
            # Ray Data's v2 Parquet reader fails once RayDP's fetch tasks have run in the
            # session (see rayline.ml.handoff.table_to_ray); the v1 reader does not.
            ray.data.DataContext.get_current().use_datasource_v2 = False
            parts = args.partitions or spark.sparkContext.defaultParallelism
            result["partitions"] = parts
            note(
                f"  session up in {result['startup_s']:.1f}s; Ray CPUs "
                f"{ray.cluster_resources().get('CPU')}, Spark partitions {parts}"
            )

            # The first run of each path pays for class loading, JIT and new Ray workers:
            # reported as "cold", not counted in the medians.
            src = make_source(spark, WARMUP_ROWS, args.cols, parts)
            cold: dict[str, Any] = {}
            for p in paths:
                try:
                    with Meter() as m:
                        ds = run_path(p, src, work)
                    cold[p] = m.wall
                    del ds
                except Exception as e:  # noqa: BLE001 - reported, the other paths go on
                    cold[p] = f"failed: {type(e).__name__}: {str(e)[:300]}"
                _free(work)
            src.unpersist()
            result["cold"] = {"rows": WARMUP_ROWS, "s": cold}
            note(
                f"  cold runs ({WARMUP_ROWS:,} rows): "
                + ", ".join(
                    f"{p} {v:.1f}s" if isinstance(v, float) else f"{p} {v}" for p, v in cold.items()
                )
            )

            for rows in args.rows:
                t1 = time.perf_counter()
                src = make_source(spark, rows, args.cols, parts)
                size: dict[str, Any] = {
                    "rows": rows,
                    "source_s": time.perf_counter() - t1,
                    "runs": {p: [] for p in paths},
                    "errors": {},
                    "checks": {},
                }
                note(f"== {rows:,} rows x {args.cols} columns cached in {size['source_s']:.1f}s")
                failed: set[str] = set()
                for i in range(args.repeats):
                    order = paths if i % 2 == 0 else paths[::-1]
                    for p in order:
                        if p in failed:
                            continue
                        try:
                            with Meter() as m:
                                ds = run_path(p, src, work)
                        except Exception as e:  # noqa: BLE001
                            failed.add(p)
                            size["errors"][p] = f"{type(e).__name__}: {str(e)[:2000]}"
                            note(
                                f"  [{p}] repeat {i + 1}: FAILED, {root_cause(size['errors'][p])}; "
                                "skipped from now on"
                            )
                            logging.exception("%s failed", p)
                            _free(work)
                            # A failure may have cost the executor, and with it the cached source:
                            # cache it again (untimed) so the other paths time only the transfer.
                            src.unpersist()
                            src = make_source(spark, rows, args.cols, parts)
                            continue
                        run = {
                            "s": m.wall,
                            "cpu_s": m.cpu,
                            "others_pct": m.other_pct,
                            "rows": ds.count(),
                            "blocks": ds.num_blocks(),
                            "bytes": ds.size_bytes(),
                        }
                        if p not in size["checks"]:  # once per path and size, untimed
                            size["checks"][p] = {
                                "schema": _schema(ds),
                                "sum_c0": ds.sum("c0"),
                            }
                        size["runs"][p].append(run)
                        note(
                            f"  [{p}] repeat {i + 1}/{args.repeats}: {m.wall:.2f}s"
                            + (
                                f", cpu {m.cpu:.1f}s, others {m.other_pct:.0f}%"
                                if m.cpu is not None
                                else ""
                            )
                            + f" ({run['blocks']} blocks, {run['bytes'] / 1e6:.0f} MB)"
                        )
                        del ds
                        _free(work)
                src.unpersist()
                result["sizes"].append(size)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        emit(result)


# ---------------------------------------------------------------------------------------------
# Parent: the child process, the table
# ---------------------------------------------------------------------------------------------


def run_child(args: argparse.Namespace, log_path: Path) -> dict[str, Any] | None:
    cmd = [
        str(Path(__file__).resolve()),
        "--child",
        "--rows",
        ",".join(map(str, args.rows)),
        "--cols",
        str(args.cols),
        "--repeats",
        str(args.repeats),
        "--paths",
        args.paths,
        "--partitions",
        str(args.partitions),
        "--out",
        str(args.out),
    ]
    results, _ = _harness.run_child(cmd, log_path, args.timeout, "the benchmark")
    return results[0] if results else None


def summarize(result: dict[str, Any]) -> bool:
    """Print one table per size; returns False when a path failed or the paths disagree."""
    ok = True
    paths = result["paths"]
    for size in result["sizes"]:
        rows, runs = size["rows"], size["runs"]
        med = {p: statistics.median(r["s"] for r in runs[p]) for p in paths if runs[p]}
        nbytes = next((runs[p][0]["bytes"] for p in paths if runs[p]), 0)
        print(
            f"\n{rows:,} rows x {result['cols']} columns = {nbytes / 1e6:,.0f} MB in Arrow; "
            f"source cached in {size['source_s']:.1f}s"
        )
        head = (
            f"{'path':<12}{'median s':>9}{'MB/s':>8}{'rows/s':>12}{'parquet/x':>11}{'paired':>8}"
            f"{'cpu s':>7}{'others':>9}{'blocks':>8}   repeats (s)"
        )
        print(head)
        print("-" * len(head))
        for p in paths:
            if p not in med:
                print(f"{p:<12}{'(failed)':>9}   {root_cause(size['errors'].get(p, ''))}")
                ok = False
                continue
            cpus = [r["cpu_s"] for r in runs[p] if r["cpu_s"] is not None]
            oth = [r["others_pct"] for r in runs[p] if r["others_pct"] is not None]
            ratio = f"{med['parquet'] / med[p]:.2f}x" if "parquet" in med else "-"
            # the same ratio repeat by repeat (the two ran back to back), then the median
            pairs = [
                q["s"] / r["s"] for q, r in zip(runs.get("parquet", []), runs[p], strict=False)
            ]
            paired = f"{statistics.median(pairs):.2f}x" if pairs else "-"
            print(
                f"{p:<12}{med[p]:>9.2f}{nbytes / 1e6 / med[p]:>8.0f}{rows / med[p]:>12,.0f}"
                f"{ratio:>11}{paired:>8}"
                + (f"{statistics.median(cpus):>7.1f}" if cpus else f"{'-':>7}")
                + (f"{min(oth):>5.0f}-{max(oth):.0f}%" if oth else f"{'-':>9}")
                + f"{runs[p][-1]['blocks']:>8}   "
                + ", ".join(f"{r['s']:.2f}" for r in runs[p])
            )
        # the same rows and types on every path
        expect_sum = rows * (rows - 1) // 2
        checks = size["checks"]
        schemas = {json.dumps(c["schema"]) for c in checks.values()}
        bad = [p for p, c in checks.items() if c["sum_c0"] != expect_sum]
        bad += [p for p in paths if any(r["rows"] != rows for r in runs[p])]
        if bad or len(schemas) > 1:
            ok = False
            print(f"!! paths disagree: wrong rows/ids from {sorted(set(bad))}; schemas:")
            for p, c in checks.items():
                print(f"   {p}: {c['schema']}")
        elif checks:
            print(
                f"all paths: {rows:,} rows, ids sum to {expect_sum:,}, same schema "
                f"({', '.join(sorted(set(checks[next(iter(checks))]['schema'].values())))})"
            )
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[2:]),
    )
    ap.add_argument(
        "--rows",
        default="1000000,5000000",
        help="comma list of row counts (default 1000000,5000000)",
    )
    ap.add_argument("--cols", type=int, default=10, help="numeric columns (default 10)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per path and size")
    ap.add_argument(
        "--paths",
        default="handoff,parquet",
        help=f"comma list out of {','.join(PATHS)} (default handoff,parquet)",
    )
    ap.add_argument(
        "--partitions",
        type=int,
        default=0,
        help="Spark partitions of the source (default: Spark's default parallelism, 2 here)",
    )
    ap.add_argument("--timeout", type=float, default=1200, help="seconds allowed in all")
    ap.add_argument(
        "--out",
        default=str(ROOT / "benchmarks" / "out"),
        help="work directory (default benchmarks/out)",
    )
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.rows = [int(float(x)) for x in str(args.rows).split(",") if x.strip()]
    args.out = str(Path(args.out).resolve())
    bad = [p for p in args.paths.split(",") if p not in PATHS]
    if bad:
        ap.error(f"unknown path(s) {bad}; choose from {PATHS}")
    if args.repeats < 1 or args.cols < 1 or not args.rows:
        ap.error("--repeats, --cols and --rows must be positive")

    if args.child:
        os.chdir(ROOT)
        sys.path.insert(0, str(ROOT / "platform"))
        child(args)
        return 0

    out = Path(args.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    log_path = out / "logs" / "handoff.log"
    print(
        f"rows {', '.join(f'{r:,}' for r in args.rows)} x {args.cols} columns; paths "
        f"{args.paths}; repeats {args.repeats}; cpus {os.cpu_count()}; log {log_path}; "
        "load average at start: " + " ".join(f"{x:.2f}" for x in os.getloadavg()),
        flush=True,
    )
    t0 = time.perf_counter()
    result = run_child(args, log_path)
    if result is None:
        print("!! no results")
        return 1
    result["argv"] = sys.argv[1:]
    print(
        f"\n== total {time.perf_counter() - t0:.0f}s (session start-up "
        f"{result.get('startup_s', float('nan')):.1f}s); load average at end: "
        + " ".join(f"{x:.2f}" for x in os.getloadavg())
    )
    if "cold" in result:
        print(
            f"cold first runs ({result['cold']['rows']:,} rows, not in the medians): "
            + ", ".join(
                f"{p} {v:.1f}s" if isinstance(v, float) else f"{p} {v[:80]}"
                for p, v in result["cold"]["s"].items()
            )
        )
    ok = summarize(result)
    print(
        "median s: median wall seconds of one transfer (Spark DataFrame cached -> materialized\n"
        "  Ray Dataset); MB/s: Arrow bytes of the dataset / median; parquet/x: the Parquet round\n"
        "  trip's median / this path's (above 1: faster than Parquet); paired: median over the\n"
        "  repeats of the same ratio within each repeat; cpu s: median CPU seconds of all the\n"
        "  session's processes; others: CPU the rest of the machine used meanwhile, % of all\n"
        "  cores (min-max): noise."
    )
    (out / "handoff.json").write_text(json.dumps(result, indent=2, default=str))
    print(f"results: {out / 'handoff.json'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
