"""Running the streaming job as a recorded run (``rayline stream run``,
``workloads/stream_pipeline.py``): a Spark-on-Ray session with the Kafka connector, the
queries, graceful stop on Ctrl-C / SIGTERM, the run record and report."""

from __future__ import annotations

import logging
import signal
import threading
import time
from datetime import datetime
from typing import Any

from ..config import PipelineSpec, SpecError
from ..preflight import check_locations, check_shared

__all__ = ["run_stream", "session_with_kafka"]

log = logging.getLogger("rayline")


def session_with_kafka(spec: PipelineSpec) -> Any:
    """The spec's session settings plus Spark's Kafka connector on driver and executors."""
    from .kafka_io import spark_kafka_jars

    jars = spark_kafka_jars()
    conf = dict(spec.session.spark_conf)
    conf["spark.jars"] = ",".join(filter(None, [conf.get("spark.jars"), jars]))
    conf["raydp.executor.extraClassPath"] = ":".join(
        filter(None, [conf.get("raydp.executor.extraClassPath"), jars.replace(",", ":")])
    )
    return spec.session.model_copy(update={"spark_conf": conf})


def run_stream(
    spec: PipelineSpec,
    *,
    spec_path: str | None = None,
    available_now: bool = False,
    spark: Any = None,
    max_seconds: float | None = None,
) -> Any:
    """Run the spec's streaming section until stopped (or, with ``available_now``, until every
    event already in the topic is processed).

    Args:
        spec: A spec with a ``streaming`` section.
        spec_path: Where the spec came from (recorded).
        available_now: Process what is in the input topic now, then stop.
        spark: An existing SparkSession with the Kafka connector (tests); default: a new one.
        max_seconds: Stop gracefully after this long (demos, tests).

    Returns:
        The :class:`~rayline.runner.RunResult`; its record's ``stream`` holds the counts.
    """
    from ..context import RunContext
    from ..lineage import LineageLog
    from ..runner import RunFailed, RunResult, _error, _Run, _write_html
    from ..runstore import RunStore, now_iso
    from ..session import spark_on_ray
    from .job import StreamJob

    if spec.streaming is None:
        raise SpecError(f"{spec_path or spec.name}: no 'streaming' section in the spec")
    check_locations(spec, sources=False, registry=True, stream=True)
    store = RunStore(spec.run_store)
    run = _Run(spec, store, spec_path, None, [("stream", "streaming")])
    rec = run.record["stages"][0]
    log.info(
        "run %s: streaming %s -> %s (record: %s)",
        run.run_id,
        spec.streaming.input_topic,
        spec.streaming.output_topic,
        run.run_dir / "run.json",
    )
    job: StreamJob | None = None
    queries: list[Any] = []
    stop_requested: list[int] = []

    def request_stop(signum: int, frame: Any) -> None:
        # Only a flag: the loop stops the queries between checks, so no Spark call is
        # interrupted half-way (an interrupt inside py4j surfaces as an unrelated Java error).
        stop_requested.append(signum)

    def body(s: Any) -> None:
        nonlocal job, queries
        ctx = RunContext(
            spark=s,
            spec=spec,
            run_id=run.run_id,
            run_dir=run.run_dir,
            store=store,
            started_at=datetime.fromisoformat(run.record["started_at"]),
            code_version=run.record["code_version"],
            lineage=LineageLog(run.run_dir, spec.name, run.run_id, run.record["code_version"]),
        )
        job = StreamJob(s, spec, ctx, run.run_dir)
        rec.update(status="running", started_at=now_iso())
        run.save()
        queries = job.start(available_now=available_now)
        t0 = time.perf_counter()
        previous = {}
        if threading.current_thread() is threading.main_thread():
            previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
            for sig in previous:
                signal.signal(sig, request_stop)
        try:
            while any(q.isActive for q in queries):
                if stop_requested:
                    log.info(
                        "[stream] stop requested (signal %d): stopping the queries",
                        stop_requested[0],
                    )
                    break
                for q in queries:
                    q.awaitTermination(1)
                    if q.exception() is not None:
                        raise q.exception()  # type: ignore[misc]
                if max_seconds is not None and time.perf_counter() - t0 > max_seconds:
                    log.info("[stream] %.0fs elapsed: stopping", max_seconds)
                    break
                _snapshot(run, rec, job, queries)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            for q in queries:
                if q.isActive:
                    q.stop()
            job.close()
            _snapshot(run, rec, job, queries)
            from .. import metrics

            metrics.flush()

    try:
        if spark is not None:
            body(spark)
        else:
            shared = lambda: check_shared(spec, sources=False, registry=True, stream=True)  # noqa: E731
            with spark_on_ray(session_with_kafka(spec), spec.warehouse, on_connect=shared) as s:
                body(s)
    except (KeyboardInterrupt, SystemExit):
        stop_requested.append(signal.SIGINT)
    except Exception as e:  # noqa: BLE001 - recorded, then re-raised
        if not stop_requested:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            rec.update(status="failed", ended_at=now_iso(), error=_error("stream", e))
            run.finish("failed", _error("stream", e))
            _write_html(run)
            raise RunFailed(run.run_id, f"run {run.run_id} failed in stage 'stream': {msg}") from e
    if stop_requested:
        log.info("[stream] stopped by a signal; the checkpoint keeps its place")
        rec.update(status="stopped", ended_at=now_iso())
        run.finish("stopped")
        _write_html(run)
        return RunResult(run.run_id, "stopped", run.run_dir, run.record)
    rec.update(status="succeeded", ended_at=now_iso())
    run.finish("succeeded")
    _write_html(run)
    return RunResult(run.run_id, "succeeded", run.run_dir, run.record)


def _snapshot(run: Any, rec: dict[str, Any], job: Any, queries: list[Any]) -> None:
    if job is None:
        return
    if len(queries) > 1:
        job.report["late_events"] = job.late_events(queries[1])
    rec["rows_in"] = job.report["events"]
    rec["rows_out"] = job.report["predictions"]
    run.record["stream"] = dict(job.report)
    run.save()
