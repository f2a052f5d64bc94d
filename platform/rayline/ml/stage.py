"""The ``train`` stage in a run record: after a pipeline run (in-memory handoff) or on its own
from the warehouse table (``rayline train`` / ``workloads/train.py``).

Both record the stage like any other (status, timings, rows, outputs, error), write its report
and emit lineage events from the curated table to the registered model versions. Resuming a run
whose training failed re-runs the stage under the same Ray Train run name, so training continues
from its last checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from typing import Any

from ..config import PipelineSpec, QualityStage, SpecError
from ..lineage import LineageLog, dataset
from ..outputs import is_delta_table, table_location, table_snapshot, with_version
from ..preflight import check_locations, check_shared
from ..runstore import RunStore, now_iso
from ..storage import location, spark_path
from .pipeline import MLRunInfo, run_ml

__all__ = ["train_after_publish", "train_from_table", "quality_of_run"]

log = logging.getLogger("rayline")


def quality_of_run(store: RunStore, record: dict[str, Any], spec: PipelineSpec) -> dict[str, Any]:
    """The verdict of a run's quality stages: passed only if every one ran and passed."""
    names = [s.name for s in spec.stages if isinstance(s, QualityStage)]
    if not names:
        return {"verdict": None, "run_id": record["run_id"], "note": "no quality stage"}
    failed: list[str] = []
    warned: list[str] = []
    verdict = "passed"
    for name in names:
        rep = store.read_report(record["run_id"], name)
        if rep is None:
            return {"verdict": None, "run_id": record["run_id"], "note": f"no report of {name}"}
        if rep.get("verdict") != "passed":
            verdict = "failed"
        for r in rep.get("rules", []):
            if r.get("verdict") == "failed":
                failed.append(r["rule"])
            elif r.get("verdict") == "warned":
                warned.append(r["rule"])
    return {
        "verdict": verdict,
        "run_id": record["run_id"],
        "failed_rules": failed,
        "warned_rules": warned,
    }


def _stage_rec(run: Any) -> dict[str, Any]:
    return next(s for s in run.record["stages"] if s["type"] == "ml")


@contextlib.contextmanager
def _recorded(
    run: Any, lineage: LineageLog, inputs: list[dict[str, Any]], params: dict[str, Any]
) -> Iterator[dict[str, Any]]:
    rec = _stage_rec(run)
    t0 = time.perf_counter()
    rec.update(status="running", started_at=now_iso())
    run.save()
    lineage.emit("START", "train", stage_type="ml", params=params, inputs=inputs)
    holder: dict[str, Any] = {}
    try:
        yield holder
    except BaseException as e:
        from ..runner import _error

        rec.update(
            status="failed",
            ended_at=now_iso(),
            duration_s=round(time.perf_counter() - t0, 3),
            error=_error("train", e),
        )
        run.save()
        lineage.emit("FAIL", "train", stage_type="ml", params=params, inputs=inputs, error=str(e))
        raise
    report = holder["report"]
    outputs = {
        f"{c['framework']}": f"{params['registry']}/{report['model_name']}@{c['version']}"
        for c in report["candidates"]
    }
    rec.update(
        status="succeeded",
        ended_at=now_iso(),
        duration_s=round(time.perf_counter() - t0, 3),
        rows_in=sum(report["split"][k] for k in ("train", "validation", "test"))
        + report["split"]["without_label"],
        rows_out=report["split"]["train"],
        outputs=outputs,
        report=str(run.store.write_report(run.run_id, "train", report)),
    )
    run.record["models"] = [
        {
            "name": report["model_name"],
            "version": c["version"],
            "framework": c["framework"],
            "promoted": c["gate"]["promoted"],
            "alias": c["gate"]["alias"],
            report["gate_metric"]: c["metrics"].get(report["gate_metric"]),
        }
        for c in report["candidates"]
    ]
    run.save()
    lineage.emit(
        "COMPLETE",
        "train",
        stage_type="ml",
        params=params,
        inputs=inputs,
        outputs=[
            dataset(
                f"rayline-registry://{params['registry']}", f"{report['model_name']}@{c['version']}"
            )
            for c in report["candidates"]
        ],
    )
    log.info(
        "[ml] train: done in %.1fs; %s",
        rec["duration_s"],
        ", ".join(
            f"{m['name']}@{m['version']} ({m['framework']}"
            f"{', ' + m['alias'] if m['promoted'] else ''})"
            for m in run.record["models"]
        ),
    )


def train_after_publish(run: Any, ctx: Any, df: Any) -> None:
    """The ``train`` stage of ``rayline run --train``: the curated DataFrame is handed to Ray
    Data through RayDP (no Parquet round trip) and the ML section runs on it."""
    from .handoff import spark_to_ray

    spec = ctx.spec
    ml = spec.ml
    cur = run.record["outputs"]["curated"]
    inputs = [
        with_version(
            dataset("file", cur["path"], rows=cur["rows"], table=cur["table"]), cur.get("version")
        )
    ]
    log.info("[ml] train: handing %s to Ray Data", cur["table"])
    with _recorded(run, ctx.lineage, inputs, ml.model_dump()) as holder:
        ds = spark_to_ray(df)
        info = MLRunInfo(
            run_id=run.run_id,
            run_dir=run.run_dir,
            pipeline=spec.name,
            code_version=run.record["code_version"],
            table=cur["table"],
            table_path=cur["path"],
            table_version=cur.get("version"),
            data_fingerprint=table_snapshot(cur["path"], cur.get("version"))[1],
            quality=quality_of_run(run.store, run.record, spec),
        )
        holder["report"] = run_ml(ds, ml, info, spark_df=df if ml.spark_model else None)


def _latest_producer(store: RunStore, spec: PipelineSpec, path: str) -> dict[str, Any] | None:
    for rec in store.list_runs():
        out = (rec.get("outputs") or {}).get("curated") or {}
        if (
            rec.get("status") == "succeeded"
            and rec.get("pipeline") == spec.name
            and out.get("path")
            and str(location(out["path"])) == str(location(path))
        ):
            return rec
    return None


def train_from_table(
    spec: PipelineSpec, spec_path: str | None = None, resume: str | None = None
) -> Any:
    """Train on the curated table in the warehouse as its own run (``rayline train``).

    The quality verdict comes from the latest succeeded run of the pipeline that wrote the table.
    The Spark challenger (``ml.spark_model``) starts a Spark-on-Ray session; the Keras model
    needs Ray only.

    Returns:
        The :class:`~rayline.runner.RunResult`.
    """
    from ..runner import RunFailed, RunResult, _error, _failed_stage, _Run, _write_html
    from ..session import ray_session, spark_on_ray
    from .handoff import table_to_ray

    if spec.ml is None:
        raise SpecError(f"{spec_path or spec.name}: no 'ml' section in the spec")
    check_locations(spec, sources=False, registry=True)
    ml = spec.ml
    table = ml.input_table or spec.outputs.curated.table
    path = table_location(spec.warehouse, table)
    if not is_delta_table(path):
        raise SpecError(
            f"ml.input_table: no Delta table {table!r} at {path}; run the pipeline first "
            "(a table written before Rayline's tables were Delta tables is replaced by the next "
            "run)"
        )
    # One version for everything this run reads (Ray Data and the Spark challenger), recorded.
    version, fingerprint = table_snapshot(path)
    store = RunStore(spec.run_store)
    run = _Run(spec, store, spec_path, resume, [("train", "ml")])
    producer = _latest_producer(store, spec, path)
    lineage = LineageLog(run.run_dir, spec.name, run.run_id, run.record["code_version"])
    inputs = [with_version(dataset("file", path, table=table, fingerprint=fingerprint), version)]
    log.info("run %s: training on %s (record: %s)", run.run_id, table, run.run_dir / "run.json")
    try:
        shared = lambda: check_shared(spec, sources=False, registry=True)  # noqa: E731
        with (
            ray_session(spec.session, on_connect=shared),
            _recorded(run, lineage, inputs, ml.model_dump()) as holder,
        ):
            info = MLRunInfo(
                run_id=run.run_id,
                run_dir=run.run_dir,
                pipeline=spec.name,
                code_version=run.record["code_version"],
                table=table,
                table_path=path,
                table_version=version,
                data_fingerprint=fingerprint,
                quality=quality_of_run(store, producer, spec)
                if producer
                else {"verdict": None, "note": "no succeeded run of this pipeline wrote the table"},
            )
            ds = table_to_ray(path, version)
            if ml.spark_model is not None:
                with spark_on_ray(spec.session, spec.warehouse) as spark:
                    table_df = (
                        spark.read.format("delta")
                        .option("versionAsOf", version)
                        .load(spark_path(path))
                    )
                    holder["report"] = run_ml(ds, ml, info, spark_df=table_df)
            else:
                holder["report"] = run_ml(ds, ml, info)
            from .. import metrics

            metrics.flush()
    except (KeyboardInterrupt, SystemExit) as e:
        run.finish("interrupted", _error("train", e))
        _write_html(run)
        raise RunFailed(
            run.run_id,
            f"run {run.run_id} interrupted; resume with --resume {run.run_id}",
            interrupted=True,
        ) from e
    except Exception as e:  # noqa: BLE001 - recorded, then re-raised
        run.finish("failed", _error(_failed_stage(run) or "train", e))
        _write_html(run)
        raise RunFailed(run.run_id, f"run {run.run_id} failed in stage 'train': {e}") from e
    run.finish("succeeded")
    _write_html(run)
    return RunResult(run.run_id, "succeeded", run.run_dir, run.record)
