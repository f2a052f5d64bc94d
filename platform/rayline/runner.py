"""Runs a pipeline spec's stages in order, with a run record, lineage, resume and progress.

Example:
    >>> from rayline.config import load_spec
    >>> result = run_pipeline(load_spec("pipelines/flights.yaml"))  # doctest: +SKIP
    >>> result.status  # doctest: +SKIP
    'succeeded'
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from . import __version__, metrics
from .config import (
    JoinStep,
    PipelineSpec,
    QualityStage,
    ReferentialRule,
    SchemaStage,
    SpecError,
    TransformStage,
)
from .context import QUARANTINE_COLUMNS, REASONS, RunContext, StageError
from .lineage import LineageLog, dataset
from .outputs import link_table, txn_version_of, with_version, write_table
from .preflight import check_locations, check_shared
from .runstore import RunStore, now_iso
from .stages import analytics, quality, schema, transform
from .storage import Loc, location, spark_path

__all__ = ["RunResult", "RunFailed", "run_pipeline", "code_version"]

log = logging.getLogger("rayline")

STAGES: dict[str, Any] = {
    "schema": schema,
    "transform": transform,
    "quality": quality,
    "analytics": analytics,
}


class RunFailed(RuntimeError):
    """A run that failed; ``run_id`` names its record (resume it with ``--resume``)."""

    def __init__(self, run_id: str, message: str, interrupted: bool = False) -> None:
        super().__init__(message)
        self.run_id = run_id
        self.interrupted = interrupted


@dataclass
class RunResult:
    run_id: str
    status: str
    run_dir: Loc
    record: dict[str, Any]


def code_version() -> str:
    """The package version plus the git commit of the checkout, when there is one."""
    root = Path(__file__).resolve().parents[2]
    head = root / ".git" / "HEAD"
    commit = ""
    try:
        ref = head.read_text().strip()
        if ref.startswith("ref:"):
            ref_path = root / ".git" / ref.split(" ", 1)[1]
            commit = ref_path.read_text().strip() if ref_path.exists() else ""
        else:
            commit = ref
    except OSError:
        pass
    return f"{__version__}+{commit[:12]}" if commit else __version__


def _stage_sources(st: Any, spec: PipelineSpec) -> list[str]:
    if isinstance(st, SchemaStage):
        return st.sources or list(spec.sources)
    if isinstance(st, TransformStage):
        names = [st.input] if st.input else []
        return names + [s.source for s in st.steps if isinstance(s, JoinStep)]
    if isinstance(st, QualityStage):
        return [r.source for r in st.rules if isinstance(r, ReferentialRule)]
    return []


def _fingerprint(prev: str, st: Any, ctx: RunContext) -> str:
    h = hashlib.sha256(f"{prev}:{__version__}".encode())
    h.update(json.dumps(st.model_dump(), sort_keys=True, default=str).encode())
    for name in _stage_sources(st, ctx.spec):
        ctx.paths(name)
        definition = json.dumps(ctx.spec.sources[name].model_dump(), sort_keys=True)
        h.update(f"{name}:{ctx.source_fingerprints[name]}:{definition}".encode())
    return h.hexdigest()[:16]


def _error(stage: str | None, exc: BaseException) -> dict[str, Any]:
    return {
        "stage": stage,
        "type": type(exc).__name__,
        "message": str(exc) or type(exc).__name__,
        "traceback": "".join(traceback.format_exception(exc)[-8:]),
    }


class _Run:
    """The state of one run attempt; keeps the record on disk current after every change."""

    def __init__(
        self,
        spec: PipelineSpec,
        store: RunStore,
        spec_path: str | None,
        resume: str | None,
        stages: list[tuple[str, str]] | None = None,
    ):
        self.spec = spec
        self.store = store
        self.prev: dict[str, Any] | None = None
        if resume:
            self.prev = store.read_record(resume)
            if self.prev["status"] == "succeeded":
                raise RunFailed(resume, f"run {resume} already succeeded; nothing to resume")
            if self.prev["pipeline"] != spec.name:
                raise RunFailed(
                    resume,
                    f"run {resume} is of pipeline {self.prev['pipeline']!r}, not {spec.name!r}",
                )
            self.run_id = resume
        else:
            self.run_id = store.new_run_id(spec.name)
        self.run_dir = store.run_dir(self.run_id)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        attempts = (self.prev or {}).get("attempts", [])
        self.record: dict[str, Any] = {
            "run_id": self.run_id,
            "pipeline": spec.name,
            "spec_path": spec_path,
            "spec_hash": hashlib.sha256(spec.model_dump_json().encode()).hexdigest()[:16],
            "code_version": code_version(),
            "status": "running",
            "started_at": (self.prev or {}).get("started_at", now_iso()),
            "attempt_started_at": now_iso(),
            "ended_at": None,
            "attempts": attempts + [{"started_at": now_iso(), "status": "running"}],
            "stages": [
                {"name": name, "type": typ, "status": "pending"}
                for name, typ in (
                    stages if stages is not None else [(s.name, s.type) for s in spec.stages]
                )
            ],
            "outputs": {},
            "error": None,
            "run_dir": str(self.run_dir),
        }
        self.save()

    def save(self) -> None:
        self.store.write_record(self.run_id, self.record)

    def finish(self, status: str, error: dict[str, Any] | None = None) -> None:
        self.record["status"] = status
        self.record["ended_at"] = now_iso()
        self.record["error"] = error
        self.record["attempts"][-1].update(status=status, ended_at=self.record["ended_at"])
        try:
            self.save()
        except OSError as e:
            if status == "succeeded":
                raise
            # The run store is unreachable (e.g. the object store went away, taking the publish
            # down with it): the run's own failure is what the caller must see; the record
            # keeps its last state ("running"), which --resume accepts.
            log.error("run %s: could not record its end (%s): %s", self.run_id, status, e)


def _reusable(prev: dict[str, Any] | None, i: int, fp: str) -> dict[str, Any] | None:
    if not prev or i >= len(prev.get("stages", [])):
        return None
    p = prev["stages"][i]
    if p.get("status") not in ("succeeded", "reused") or p.get("fingerprint") != fp:
        return None
    outputs = p.get("outputs") or {}
    if not all(location(v).exists() for v in outputs.values()):  # paths or s3:// URIs
        return None
    return p


def _restore(
    st: Any, ctx: RunContext, df: Any, prev_stage: dict[str, Any], report: dict[str, Any]
) -> Any:
    if isinstance(st, SchemaStage):
        schema.restore(st, ctx, report)
        return df
    if isinstance(st, TransformStage):
        if "data" in (prev_stage.get("outputs") or {}):
            return ctx.spark.read.parquet(spark_path(prev_stage["outputs"]["data"]))
        # Not checkpointed: the same steps on the same inputs (the fingerprint says so), lazily;
        # nothing runs unless a later stage that cannot be reused reads it.
        return transform.run(df, st, ctx)[0]
    if isinstance(st, QualityStage):
        return quality.restore(st, ctx, report, df.schema if df is not None else None)
    return df


def _execute(spark: Any, spec: PipelineSpec, run: _Run, after: Any = None) -> None:
    ctx = RunContext(
        spark=spark,
        spec=spec,
        run_id=run.run_id,
        run_dir=run.run_dir,
        store=run.store,
        started_at=datetime.fromisoformat(run.record["started_at"]),
        code_version=run.record["code_version"],
        lineage=LineageLog(run.run_dir, spec.name, run.run_id, run.record["code_version"]),
    )
    df = None
    prev_fp = ""
    prev_ds: dict[str, Any] | None = None
    rerun = False
    n = len(spec.stages)
    ns = f"rayline://{spec.name}"
    try:
        for i, st in enumerate(spec.stages):
            rec = run.record["stages"][i]
            ctx.stage = st.name
            fp = _fingerprint(prev_fp, st, ctx)
            prev_fp = fp
            inputs = [
                dataset(
                    "file",
                    ctx.paths(s)[0] if len(ctx.paths(s)) == 1 else spec.sources[s].path,
                    fingerprint=ctx.source_fingerprints[s],
                )
                for s in _stage_sources(st, spec)
            ] + ([prev_ds] if prev_ds else [])
            reuse = None if rerun else _reusable(run.prev, i, fp)
            if reuse is not None:
                report = run.store.read_report(run.run_id, st.name) or {}
                df = _restore(st, ctx, df, reuse, report)
                rec.update({**reuse, "status": "reused"})
                run.save()
                log.info(
                    "[%d/%d] %s %r: reused from the previous attempt", i + 1, n, st.type, st.name
                )
                prev_ds = dataset(ns, f"{run.run_id}/{st.name}", rows=rec.get("rows_out"))
                continue
            rerun = True
            log.info("[%d/%d] %s %r: running", i + 1, n, st.type, st.name)
            t0 = time.perf_counter()
            rec.update(status="running", started_at=now_iso(), fingerprint=fp)
            run.save()
            ctx.lineage.emit(
                "START", st.name, stage_type=st.type, params=st.model_dump(), inputs=inputs
            )
            try:
                df, report = STAGES[st.type].run(df, st, ctx)
                outputs: dict[str, str] = dict(report.get("outputs") or {})
                if isinstance(st, TransformStage) and spec.checkpoint_stages:
                    df = ctx.checkpoint(df, "data")
                    outputs["data"] = str(ctx.stage_dir() / "data")
                rows_in, rows_out = _row_counts(
                    st, report, df, outputs, run.record["stages"], i, ctx
                )
            except BaseException as e:
                report_on_fail = getattr(e, "report", None)
                if report_on_fail is not None:
                    rec["report"] = str(run.store.write_report(run.run_id, st.name, report_on_fail))
                rec.update(
                    status="failed",
                    ended_at=now_iso(),
                    duration_s=round(time.perf_counter() - t0, 3),
                    error=_error(st.name, e),
                )
                run.save()
                ctx.lineage.emit(
                    "FAIL",
                    st.name,
                    stage_type=st.type,
                    params=st.model_dump(),
                    inputs=inputs,
                    error=str(e),
                )
                raise
            rec.update(
                status="succeeded",
                ended_at=now_iso(),
                duration_s=round(time.perf_counter() - t0, 3),
                rows_in=rows_in,
                rows_out=rows_out,
                outputs=outputs,
                report=str(run.store.write_report(run.run_id, st.name, report)),
            )
            run.save()
            prev_ds = dataset(
                ns,
                f"{run.run_id}/{st.name}",
                schema=df.schema if df is not None else None,
                rows=rows_out,
            )
            ctx.lineage.emit(
                "COMPLETE",
                st.name,
                stage_type=st.type,
                params=st.model_dump(),
                inputs=inputs,
                outputs=[prev_ds],
            )
            metrics.stage_done(spec.name, st.name, rec["duration_s"], rows_in, rows_out)
            if isinstance(st, QualityStage):
                for r in report.get("rules", []):
                    if r.get("severity") == "quarantine":
                        metrics.quarantined(spec.name, st.name, r["rule"], r.get("failed") or 0)
            log.info(
                "[%d/%d] %s %r: done in %.1fs (rows in %s, out %s)",
                i + 1,
                n,
                st.type,
                st.name,
                rec["duration_s"],
                _fmt(rows_in),
                _fmt(rows_out),
            )
        ctx.stage = "publish"
        _publish(spark, spec, ctx, run, df, prev_ds)
        if after is not None:
            after(ctx, df)
        metrics.flush()
    finally:
        ctx.release()


def _fmt(n: int | None) -> str:
    return f"{n:,}" if isinstance(n, int) else "-"


def _row_counts(
    st: Any,
    report: dict[str, Any],
    df: Any,
    outputs: dict[str, str],
    recs: list[dict[str, Any]],
    i: int,
    ctx: RunContext,
) -> tuple[int | None, int | None]:
    prev_out = recs[i - 1].get("rows_out") if i > 0 else None
    if isinstance(st, SchemaStage):
        return sum(s["rows"] for s in report["sources"].values()), None
    if isinstance(st, TransformStage):
        rows_in = ctx.source_rows.get(st.input) if st.input else prev_out
        return rows_in, (df.count() if "data" in outputs else None)
    if isinstance(st, QualityStage):
        if i > 0 and recs[i - 1].get("rows_out") is None:
            recs[i - 1]["rows_out"] = report["rows"]
        return report["rows"], report["clean_rows"]
    rows = report.get("rows", prev_out)
    if i > 0 and recs[i - 1].get("rows_out") is None:
        recs[i - 1]["rows_out"] = rows
    return rows, rows


def _quarantine_frame(spark: Any, ctx: RunContext, data_schema: Any) -> Any:
    from functools import reduce

    from pyspark.sql.types import ArrayType, StringType, StructField, StructType

    parts = [df for _, df in ctx.quarantine_parts]
    used = sorted({s for st in ctx.spec.stages for s in _stage_sources(st, ctx.spec)})
    parts += [ctx.malformed(name) for name in used if ctx.spec.sources[name].format != "parquet"]
    if not parts:
        meta = [StructField(REASONS, ArrayType(StringType()))] + [
            StructField(c, StringType()) for c in QUARANTINE_COLUMNS[1:]
        ]
        parts = [spark.createDataFrame([], StructType(meta))]
    frame = reduce(lambda a, b: a.unionByName(b, allowMissingColumns=True), parts)
    if data_schema is not None:  # keep the data columns even when no rule quarantined rows
        from pyspark.sql import functions as F

        for f in data_schema.fields:
            if f.name not in frame.columns:
                frame = frame.withColumn(f.name, F.lit(None).cast(f.dataType))
    lead = [f.name for f in data_schema.fields] if data_schema is not None else []
    return frame.select(*lead, *[c for c in frame.columns if c not in lead])


def _publish(
    spark: Any, spec: PipelineSpec, ctx: RunContext, run: _Run, df: Any, prev_ds: Any
) -> None:
    if df is None:
        raise StageError("publish", "the stages produced no DataFrame to write")
    t0 = time.perf_counter()
    log.info("publishing %s and its quarantine table", spec.outputs.curated.table)
    ctx.lineage.emit(
        "START",
        "publish",
        stage_type="publish",
        params=spec.outputs.model_dump(),
        inputs=[prev_ds] if prev_ds else [],
    )
    try:
        q_spec = spec.outputs.quarantine_or_default()
        q = _quarantine_frame(spark, ctx, df.schema)
        q_spec = q_spec.model_copy(
            update={"partition_by": [c for c in q_spec.partition_by if c in q.columns]}
        )
        q_out, cur = _write_both(
            spark,
            (q, q_spec),
            (df, spec.outputs.curated),
            spec.warehouse,
            run.run_id,
            _kept_rows(run),
            txn={"pipeline": spec.name, "txn_version": txn_version_of(run.record["started_at"])},
        )
        reasons = _reason_counts(spark, q_out["path"], q_out.get("version"))
    except BaseException as e:
        ctx.lineage.emit("FAIL", "publish", stage_type="publish", error=str(e))
        raise
    run.record["outputs"] = {"curated": cur, "quarantine": {**q_out, "reasons": reasons}}
    run.record["publish_duration_s"] = round(time.perf_counter() - t0, 3)
    ctx.lineage.emit(
        "COMPLETE",
        "publish",
        stage_type="publish",
        params=spec.outputs.model_dump(),
        inputs=[prev_ds] if prev_ds else [],
        outputs=[
            with_version(
                dataset(
                    "file", cur["path"], schema=df.schema, rows=cur["rows"], table=cur["table"]
                ),
                cur.get("version"),
            ),
            with_version(
                dataset("file", q_out["path"], rows=q_out["rows"], table=q_out["table"]),
                q_out.get("version"),
            ),
        ],
    )
    log.info(
        "published %s (%s rows) and %s (%s rows) in %.1fs",
        cur["table"],
        _fmt(cur["rows"]),
        q_out["table"],
        _fmt(q_out["rows"]),
        run.record["publish_duration_s"],
    )


def _kept_rows(run: _Run) -> int | None:
    """The kept rows of the last quality stage (what the curated table will hold), if any."""
    for st in reversed(run.record["stages"]):
        if st.get("type") == "quality":
            return st.get("rows_out")
    return None


def _publish_table(
    spark: Any, df: Any, out: Any, warehouse: str, run_id: str, rows: int | None, **txn: Any
) -> dict[str, Any]:
    """Write ``df`` as the Delta table ``out``; when ``df`` is a quality stage's kept rows
    already on disk partitioned as the table is, add those files to the table's commit instead
    (no Spark job). ``txn``: ``pipeline`` and ``txn_version`` (idempotent appends)."""
    written = quality.written_rows(df)
    if written is not None and written[1] == list(out.partition_by):
        return link_table(spark, written[0], df.schema, out, warehouse, run_id, rows, df=df, **txn)
    return write_table(spark, df, out, warehouse, run_id, **txn)


def _write_both(
    spark: Any,
    first: tuple[Any, Any],
    second: tuple[Any, Any],
    warehouse: str,
    run_id: str,
    second_rows: int | None = None,
    txn: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Write two tables at once (each atomically, see :func:`write_table`): the small quarantine
    table's jobs and catalog calls then overlap the curated table's write instead of adding to
    it. Raises the first table's error if both fail; Spark's jobs are cancelled if this thread
    is interrupted. ``second_rows``: the second table's rows, when known; ``txn``: keyword
    arguments of :func:`write_table` making appends idempotent (``pipeline``, ``txn_version``)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="rayline-publish") as pool:
        futures = [
            pool.submit(write_table, spark, first[0], first[1], warehouse, run_id, **(txn or {})),
            pool.submit(
                _publish_table,
                spark,
                second[0],
                second[1],
                warehouse,
                run_id,
                second_rows,
                **(txn or {}),
            ),
        ]
        try:
            return futures[0].result(), futures[1].result()
        except BaseException:
            if not all(f.done() for f in futures):
                with contextlib.suppress(Exception):
                    spark.sparkContext.cancelAllJobs()
            raise


def _reason_counts(spark: Any, path: str, version: int | None = None) -> dict[str, int]:
    """Quarantined rows per reason, counted from the written Delta table at ``version`` (the
    one this run published), read with delta-rs batch by batch (only the reasons column; no
    Spark job)."""
    import pyarrow.compute as pc

    from .outputs import delta_table

    counts: dict[str, int] = {}
    dataset = delta_table(path, version).to_pyarrow_dataset()
    for batch in dataset.to_batches(columns=[REASONS]):
        flat = pc.list_flatten(batch.column(0))
        if len(flat):
            for item in pc.value_counts(flat).to_pylist():
                counts[item["values"]] = counts.get(item["values"], 0) + int(item["counts"])
    return counts


@contextlib.contextmanager
def _maybe_session(spark: Any, spec: PipelineSpec) -> Iterator[Any]:
    if spark is not None:
        yield spark
        return
    from .session import spark_on_ray

    with spark_on_ray(spec.session, spec.warehouse, on_connect=lambda: check_shared(spec)) as s:
        yield s


def run_pipeline(
    spec: PipelineSpec,
    *,
    spec_path: str | None = None,
    resume: str | None = None,
    spark: Any = None,
    train: bool = False,
) -> RunResult:
    """Run (or resume) a pipeline and return its result.

    Args:
        spec: The validated pipeline spec.
        spec_path: Where the spec came from (recorded).
        resume: Id of a failed run to continue: stages whose inputs and config are unchanged
            are reused from its persisted outputs; the rest run again.
        spark: An existing SparkSession (tests share one); default: a new Spark-on-Ray session.
        train: Continue into the spec's ``ml`` section after publishing: hand the curated data
            to Ray Data in memory, train, evaluate, register and gate (stage ``train``).

    Returns:
        The :class:`RunResult` of a run that succeeded.

    Raises:
        RunFailed: the run failed; its record (status, failing stage, error) is on disk.
    """
    if train and spec.ml is None:
        raise SpecError(f"{spec_path or spec.name}: --train needs an 'ml' section in the spec")
    check_locations(spec, registry=train)  # before any engine starts: seconds, not minutes
    store = RunStore(spec.run_store)
    stages = [(s.name, s.type) for s in spec.stages] + ([("train", "ml")] if train else [])
    run = _Run(spec, store, spec_path, resume, stages)
    after = None
    if train:
        from .ml.stage import train_after_publish

        def after(ctx: RunContext, df: Any) -> None:
            train_after_publish(run, ctx, df)

    log.info("run %s of pipeline %r (record: %s)", run.run_id, spec.name, run.run_dir / "run.json")
    try:
        with _maybe_session(spark, spec) as s:
            _execute(s, spec, run, after)
    except (KeyboardInterrupt, SystemExit) as e:
        run.finish("interrupted", _error(_failed_stage(run), e))
        _write_html(run)
        raise RunFailed(
            run.run_id,
            f"run {run.run_id} interrupted; resume with --resume {run.run_id}",
            interrupted=True,
        ) from e
    except Exception as e:  # noqa: BLE001 - every failure is recorded, then re-raised
        stage = _failed_stage(run)
        run.finish("failed", _error(stage, e))
        _write_html(run)
        where = f" in stage {stage!r}" if stage else ""
        raise RunFailed(run.run_id, f"run {run.run_id} failed{where}: {e}") from e
    run.finish("succeeded")
    _write_html(run)
    return RunResult(run.run_id, "succeeded", run.run_dir, run.record)


def _failed_stage(run: _Run) -> str | None:
    for s in run.record["stages"]:
        if s["status"] in ("failed", "running"):
            return s["name"]
    if all(
        s["status"] in ("succeeded", "reused") for s in run.record["stages"] if s["type"] != "ml"
    ):
        return "publish"  # every stage done: the failure was in writing the outputs
    return None


def _write_html(run: _Run) -> None:
    from .report import write_html_report

    try:
        path = write_html_report(run.store, run.run_id)
        run.record["report_html"] = str(path)
        run.save()
    except Exception:  # noqa: BLE001 - a report problem must not hide the run's own outcome
        log.exception("could not write the HTML report of run %s", run.run_id)
