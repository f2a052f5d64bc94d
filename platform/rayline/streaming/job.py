"""The streaming job: Kafka events through the spec's transform steps and row rules on Spark
Structured Streaming (RayDP), scored by the registered model, with a dead-letter topic, and
event-time window aggregates in the warehouse (a Delta table).

Per micro-batch (``foreachBatch``):

1. events that are not a JSON object of the source's schema are dead letters (``malformed``);
2. the spec's transform steps run on the rest (joins with static sources work as in batch);
3. the row rules of its quality stages are evaluated (the batch stage's own code): ``fail``
   rules stop the query with an error naming the rule; events breaking ``quarantine`` rules are
   dead letters with the rules they broke; ``warn`` rules are counted. Dataset rules (``unique``,
   ``row_count``, ``freshness``) describe a whole table and are skipped here;
4. clean events are scored on the executors by the model interface (the same code as serving and
   batch scoring); the model's alias is resolved again before every micro-batch;
5. predictions and dead letters are written to Kafka.

That is two Spark actions per micro-batch, whatever the rules: one collect of the per-partition
counts beside the rule counts (which caches the batch and the transformed rows; ``fail`` rules
are judged on them before anything is written), and one Kafka write of both outputs (each
record names its topic) in which the executors score the clean events.

No loss, no duplicates: Spark replays a micro-batch that did not commit (same offsets, same
rows). Before writing batch N the job records where the output topics ended; on a replay of N
it reads back what N already wrote from there and writes only the rest. Every output record
carries its source partition and offset and the batch id.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from typing import Any

from .. import metrics as rl_metrics
from ..config import PipelineSpec, QualityStage, SelectStep, TransformStage
from ..context import RunContext
from ..runstore import atomic_write_text
from ..storage import Loc, location, spark_path
from .spec import StreamingSpec

__all__ = ["StreamFailed", "StreamJob", "META"]

log = logging.getLogger("rayline")

META = ["_rayline_key", "_rayline_value", "_rayline_partition", "_rayline_offset"]
CORRUPT = "_rayline_corrupt"
_DATASET_RULES = ("unique", "row_count", "freshness")
_MODELS: dict[str, Any] = {}  # per Python worker: model dir -> loaded model


class StreamFailed(RuntimeError):
    """A ``fail`` rule broke in a micro-batch, or the stream cannot run; names what and where."""


def _score_partition(batches: Any, model_dir: str, columns: list[str]) -> Any:
    """mapInPandas: clean events -> the pass-through ``columns`` plus ``prediction`` (and
    ``probabilities`` for classifiers), on the executors. Only the model call runs in Python:
    the output records' keys and JSON are built by Spark around it."""
    import numpy as np
    import pandas as pd

    from ..ml.models import load_model

    model = _MODELS.get(model_dir)
    if model is None:
        model = _MODELS[model_dir] = load_model(model_dir)
    for pdf in batches:
        if len(pdf) == 0:
            continue
        out = model.predict(pdf)
        res = pdf[columns].copy()
        pred = np.asarray(out["prediction"])
        if pred.dtype.kind == "f":  # regression: a non-finite prediction is written as null
            res["prediction"] = pd.Series(pred, dtype=object).where(np.isfinite(pred), None)
        else:
            res["prediction"] = pred.astype(str)
        if "probabilities" in out:
            classes = [str(c) for c in model.pre.classes]
            res["probabilities"] = [
                dict(zip(classes, row, strict=True))
                for row in np.asarray(out["probabilities"], dtype=np.float64).tolist()
            ]
        yield res


@functools.cache
def _task_of(model_dir: str) -> str:
    """The task of a registered model version (a version's directory never changes)."""
    from ..ml.features import Preprocessor

    return Preprocessor.load(model_dir).task


def _check_window_table(path: Loc, checkpoint: Loc, table: str) -> None:
    """A window table written by a query whose checkpoint is gone cannot be appended to.

    Spark's file sink skips every micro-batch id its ``_spark_metadata`` log already holds. A new
    checkpoint restarts the ids at 0, so the window query would skip those batches without
    running them (its aggregation state never written) and then fail on the first batch it does
    run, reading state files that do not exist.
    """
    log_dir = path / "_spark_metadata"
    written = [f for f in log_dir.glob("*") if f.name.split(".")[0].isdigit()]
    commits = checkpoint / "commits"
    started = commits.is_dir() and any(f.name.isdigit() for f in commits.iterdir())
    if written and not started:
        raise StreamFailed(
            f"window table {table!r} ({path}) holds the output of an earlier window query "
            f"({len(written)} micro-batch log file(s) in {log_dir}), but its checkpoint "
            f"{checkpoint} is new: appending would skip micro-batches. Restore that checkpoint, "
            "or move the table away (or set a new window.table) to start it afresh"
        )


def _window_table_to_delta(spark: Any, path: Loc, table: str) -> None:
    """A window table written by an earlier Rayline with Spark's Parquet file sink (and whose
    checkpoint is still there, see :func:`_check_window_table`) becomes a Delta table in place
    before the query continues into it: ``CONVERT TO DELTA`` takes the files the sink's
    ``_spark_metadata`` log lists. The sink log is removed afterwards so that no reader takes it
    for the table's file list."""
    from ..storage import remove_tree

    sink_log = path / "_spark_metadata"
    if not sink_log.is_dir() or (path / "_delta_log").is_dir():
        return
    if not any(f.name.split(".")[0].isdigit() for f in sink_log.glob("*")):
        remove_tree(sink_log)  # no output yet
        return
    log.warning(
        "window table %r (%s) was written as plain Parquet by an earlier Rayline: converting it "
        "to a Delta table in place",
        table,
        path,
    )
    spark.sql(f"CONVERT TO DELTA parquet.`{spark_path(path)}`")
    remove_tree(sink_log)


class StreamJob:
    """One streaming run of a spec (see the module docstring)."""

    def __init__(self, spark: Any, spec: PipelineSpec, ctx: RunContext, run_dir: Loc) -> None:
        if spec.streaming is None:
            raise StreamFailed(f"spec {spec.name!r} has no 'streaming' section")
        self.spark = spark
        self.spec = spec
        self.s: StreamingSpec = spec.streaming
        self.ctx = ctx
        self.run_dir = run_dir
        self.cp = location(self.s.checkpoint_location) / spec.name  # a directory or a URI
        self.sink_dir = self.cp / "rayline_sink"
        self.stages = self._stages()
        self.report: dict[str, Any] = {
            "batches": 0,
            "events": 0,
            "malformed": 0,
            "quarantined": 0,
            "predictions": 0,
            "replayed_records_skipped": 0,
            "rules": {},
            "models": {},
            "late_events": 0,
        }
        self.model_ref: dict[str, Any] | None = None
        self._offsets_consumer: Any = None

    # -- set-up ------------------------------------------------------------------------------

    def _stages(self) -> list[Any]:
        chosen = [st for st in self.spec.stages if isinstance(st, TransformStage | QualityStage)]
        if self.s.stages is not None:
            names = {st.name for st in chosen}
            unknown = sorted(set(self.s.stages) - names)
            if unknown:
                raise StreamFailed(
                    f"streaming.stages: unknown transform/quality stage(s) {unknown}; "
                    f"known: {sorted(names)}"
                )
            chosen = [st for st in chosen if st.name in self.s.stages]
        out: list[Any] = []
        for st in chosen:
            if isinstance(st, TransformStage):
                steps = [
                    s.model_copy(update={"columns": list(s.columns) + META})
                    if isinstance(s, SelectStep)
                    else s
                    for s in st.steps
                ]
                out.append(st.model_copy(update={"steps": steps}))
            else:
                rules = [r for r in st.rules if r.type not in _DATASET_RULES]
                out.append(st.model_copy(update={"rules": rules}))
        return out

    def _resolve_model(self) -> tuple[str, dict[str, Any]]:
        from ..ml.registry import ModelRegistry

        ml = self.spec.ml
        ref = self.s.model or (f"{ml.model_name}@{ml.gate.alias}" if ml else None)
        registry = self.s.registry or (ml.registry if ml else None)
        if ref is None or registry is None:
            raise StreamFailed("streaming.model (or an ml section) is needed to score events")
        reg = ModelRegistry(registry)
        mv = reg.resolve(ref)
        path = str(reg.local_path(mv))
        info = {"name": mv.name, "version": mv.version, "ref": ref}
        if self.model_ref is None or self.model_ref["version"] != mv.version:
            log.info("[stream] scoring with %s@%d (%s)", mv.name, mv.version, ref)
        self.model_ref = info
        return path, info

    def _min_partitions(self) -> int:
        if self.s.min_partitions is not None:
            return self.s.min_partitions
        return max(1, int(self.spark.sparkContext.defaultParallelism))

    def _parsed(self) -> Any:
        from pyspark.sql import functions as F
        from pyspark.sql.types import StringType, StructField, StructType

        schema = self.ctx.schema_of(self.s.source)
        with_corrupt = StructType(list(schema.fields) + [StructField(CORRUPT, StringType())])
        raw = (
            self.spark.readStream.format("kafka")
            .option("kafka.bootstrap.servers", self.s.bootstrap_servers)
            .option("subscribe", self.s.input_topic)
            .option("startingOffsets", self.s.starting_offsets)
            .option("maxOffsetsPerTrigger", str(self.s.max_offsets_per_trigger))
            .option("minPartitions", str(self._min_partitions()))
            .option("failOnDataLoss", "true")
            .load()
        )
        value = F.col("value").cast("string")
        parsed = F.from_json(
            value, with_corrupt, {"mode": "PERMISSIVE", "columnNameOfCorruptRecord": CORRUPT}
        )
        return raw.select(
            parsed.alias("e"),
            F.col("key").cast("string").alias("_rayline_key"),
            value.alias("_rayline_value"),
            F.col("partition").alias("_rayline_partition"),
            F.col("offset").alias("_rayline_offset"),
        )

    # -- one micro-batch ---------------------------------------------------------------------

    def _already_written(self, batch_id: int) -> set[tuple[int, int]]:
        """(partition, offset) of source events batch ``batch_id`` already wrote (a replay)."""
        from pyspark.sql import functions as F

        marker = self.sink_dir / f"{batch_id}.json"
        if not marker.exists():
            return set()
        starts = json.loads(marker.read_text())
        done: set[tuple[int, int]] = set()
        for topic, offsets in starts.items():
            df = (
                self.spark.read.format("kafka")
                .option("kafka.bootstrap.servers", self.s.bootstrap_servers)
                .option("subscribe", topic)
                .option("startingOffsets", json.dumps({topic: offsets}))
                .option("endingOffsets", "latest")
                .load()
            )
            v = F.col("value").cast("string")
            rows = (
                df.select(
                    F.get_json_object(v, "$.batch_id").cast("long").alias("b"),
                    F.get_json_object(v, "$.source_partition").cast("int").alias("p"),
                    F.get_json_object(v, "$.source_offset").cast("long").alias("o"),
                )
                .where(F.col("b") == batch_id)
                .select("p", "o")
                .collect()  # at most one micro-batch's worth of pairs
            )
            done |= {(int(r["p"]), int(r["o"])) for r in rows}
        return done

    def _mark_start(self, batch_id: int) -> None:
        """Record where the output topics end before batch ``batch_id`` writes (once)."""
        from confluent_kafka import TopicPartition

        marker = self.sink_dir / f"{batch_id}.json"
        if marker.exists():
            return
        c = self._consumer()
        starts: dict[str, dict[str, int]] = {}
        for topic in (self.s.output_topic, self.s.dead_letter_topic):
            meta = c.list_topics(topic, timeout=30).topics[topic]
            starts[topic] = {}
            for p in meta.partitions:
                _, high = c.get_watermark_offsets(TopicPartition(topic, p), timeout=30)
                starts[topic][str(p)] = int(high)
        atomic_write_text(marker, json.dumps(starts))
        # Markers of batches Spark has committed are no longer needed.
        for old in self.sink_dir.glob("*.json"):
            if old.stem.isdigit() and int(old.stem) < batch_id - 2:
                old.unlink(missing_ok=True)

    def _lag(self, read_to: dict[int, int]) -> int | None:
        """Input events behind the end of the topic after this micro-batch."""
        from confluent_kafka import TopicPartition

        try:
            c = self._consumer()
            total = 0
            for p, pos in read_to.items():
                _, high = c.get_watermark_offsets(TopicPartition(self.s.input_topic, p), timeout=10)
                total += max(0, int(high) - pos)
            return total
        except Exception:  # noqa: BLE001 - lag is informative only
            return None

    def _consumer(self) -> Any:
        """The job's one Kafka consumer for offset look-ups (never subscribes or commits)."""
        if self._offsets_consumer is None:
            from confluent_kafka import Consumer

            self._offsets_consumer = Consumer(
                {
                    "bootstrap.servers": self.s.bootstrap_servers,
                    "group.id": "rayline-offsets",
                    "enable.auto.commit": False,
                }
            )
        return self._offsets_consumer

    def close(self) -> None:
        """Release the job's Kafka consumer (the queries are stopped by their caller)."""
        c, self._offsets_consumer = self._offsets_consumer, None
        if c is not None:
            c.close()

    def _predictions(self, clean: Any, model_dir: str, ref: dict[str, Any], batch_id: int) -> Any:
        """Clean events -> prediction records ``(topic, key, value)``: the model scores on the
        executors (mapInPandas); the key and the JSON value are Spark expressions."""
        from pyspark.sql import functions as F
        from pyspark.sql.types import (
            DoubleType,
            IntegerType,
            LongType,
            MapType,
            StringType,
            StructField,
            StructType,
        )

        task = _task_of(model_dir)
        key = (
            F.concat_ws(
                "|",
                *[
                    F.coalesce(F.col(f"`{c}`").cast("string"), F.lit("None"))
                    for c in self.s.key_columns
                ],
            )
            if self.s.key_columns
            else F.col("_rayline_key")
        )
        time_col = self.s.event_time_column
        event_time = (
            F.date_format(F.col(f"`{time_col}`"), "yyyy-MM-dd'T'HH:mm:ss")
            if time_col
            else F.lit(None).cast("string")
        )
        passed = [
            "_rayline_out_key",
            "_rayline_event_time",
            "_rayline_partition",
            "_rayline_offset",
        ]
        fields = [
            StructField("_rayline_out_key", StringType()),
            StructField("_rayline_event_time", StringType()),
            StructField("_rayline_partition", IntegerType()),
            StructField("_rayline_offset", LongType()),
            StructField("prediction", DoubleType() if task == "regression" else StringType()),
        ]
        if task != "regression":
            fields.append(StructField("probabilities", MapType(StringType(), DoubleType())))
        # Plain values only: a closure over self would drag the SparkSession along.
        score = functools.partial(_score_partition, model_dir=model_dir, columns=passed)
        scored = (
            clean.withColumn("_rayline_out_key", key)
            .withColumn("_rayline_event_time", event_time)
            .mapInPandas(score, StructType(fields))
        )
        record = [
            F.col("_rayline_out_key").alias("key"),
            F.col("prediction"),
            F.lit(ref["name"]).alias("model"),
            F.lit(ref["version"]).alias("version"),
            F.lit(batch_id).alias("batch_id"),
            F.col("_rayline_partition").alias("source_partition"),
            F.col("_rayline_offset").alias("source_offset"),
        ]
        if task != "regression":
            record.append(F.col("probabilities"))
        if time_col:
            record.append(F.col("_rayline_event_time").alias("event_time"))
        return scored.select(
            F.lit(self.s.output_topic).alias("topic"),
            F.col("_rayline_out_key").alias("key"),
            F.to_json(F.struct(*record), {"ignoreNullFields": "false"}).alias("value"),
        )

    def process(self, batch: Any, batch_id: int) -> None:
        from pyspark.sql import functions as F

        from ..stages import quality as q
        from ..stages.transform import apply_steps

        t0 = time.perf_counter()
        phases: dict[str, float] = {}

        clock = [t0]

        def phase(name: str) -> None:
            """Seconds since the previous phase ended, under ``name``."""
            now = time.perf_counter()
            phases[name] = round(now - clock[0], 2)
            clock[0] = now

        model_dir, ref = self._resolve_model()
        phase("model")
        batch = batch.persist()
        data: Any = None
        try:
            # Events, malformed events and the last offset read, per input partition (counted
            # in job 1, below, with the rules).
            bad = F.col("e." + CORRUPT).isNotNull() | F.col("e").isNull()
            per_partition = batch.groupBy(F.col("_rayline_partition").alias("_p")).agg(
                F.count(F.lit(1)).alias("_n"),
                F.sum(F.when(bad, 1).otherwise(0)).alias("_bad"),
                F.max("_rayline_offset").alias("_o"),
            )
            done = self._already_written(batch_id)
            phase("replay")
            malformed = batch.where(bad)
            events = batch.where(~bad).select("e.*", *META).drop(CORRUPT)

            data = events
            fail_flags: list[tuple[Any, Any]] = []
            quarantine_flags: list[tuple[str, Any]] = []
            warn_flags: list[tuple[str, Any]] = []
            for st in self.stages:
                self.ctx.stage = st.name
                if isinstance(st, TransformStage):
                    data = apply_steps(data, st.steps, self.ctx.source, st.name)
                    continue
                data, flags = q._row_flags(data, st, self.ctx)
                for rule in st.rules:
                    if rule.name not in flags:
                        continue
                    if rule.severity == "fail":
                        fail_flags.append(((st.name, rule), flags[rule.name]))
                    elif rule.severity == "quarantine":
                        quarantine_flags.append((rule.name, flags[rule.name]))
                    elif rule.severity == "warn":
                        warn_flags.append((rule.name, flags[rule.name]))
            reasons = (
                F.array_compact(F.array(*[F.when(c, F.lit(n)) for n, c in quarantine_flags]))
                if quarantine_flags
                else F.array().cast("array<string>")
            )
            # Computed once: the counts, the dead letters and the predictions all read it.
            data = data.withColumn("_rayline_reasons", reasons).persist()

            # Action 1 (and the caches of the batch and of data): the per-partition counts beside
            # the rows left after the transforms, rows quarantined and rows breaking each rule,
            # in one action; fail rules are judged here, before anything is written.
            counted = [(f"_f{i}", c) for i, (_, c) in enumerate(fail_flags)]
            counted += [(f"_q{i}", c) for i, (_, c) in enumerate(quarantine_flags)]
            counted += [(f"_w{i}", c) for i, (_, c) in enumerate(warn_flags)]
            rule_counts = data.agg(
                F.count(F.lit(1)).alias("_rows"),
                F.sum(F.when(F.size("_rayline_reasons") > 0, 1).otherwise(0)).alias("_rej"),
                *[F.sum(F.when(c, 1).otherwise(0)).alias(a) for a, c in counted],
            )
            rows = per_partition.unionByName(rule_counts, allowMissingColumns=True).collect()
            phase("count")
            partitions = [r for r in rows if r["_p"] is not None]  # one per input partition
            agg = next(r for r in rows if r["_p"] is None)
            total = sum(int(r["_n"]) for r in partitions)
            if total == 0:
                return
            n_malformed = sum(int(r["_bad"]) for r in partitions)
            read_to = {int(r["_p"]): int(r["_o"]) + 1 for r in partitions}
            for i, ((stage_name, rule), _) in enumerate(fail_flags):
                failed = int(agg[f"_f{i}"] or 0)
                if failed > (rule.max_failed_fraction or 0.0) * total:
                    raise StreamFailed(
                        f"stage {stage_name!r}, rule {rule.name!r} (severity fail): "
                        f"{failed} of {total} event(s) in micro-batch {batch_id} "
                        "broke it; the query stops"
                    )
            n_rows = int(agg["_rows"] or 0)
            n_rejected = int(agg["_rej"] or 0)
            counts = {n: int(agg[f"_q{i}"] or 0) for i, (n, _) in enumerate(quarantine_flags)}
            for i, (n, _) in enumerate(warn_flags):
                counts[n] = counts.get(n, 0) + int(agg[f"_w{i}"] or 0)

            rejected = data.where(F.size("_rayline_reasons") > 0)
            clean = data.where(F.size("_rayline_reasons") == 0).drop("_rayline_reasons")
            dead = malformed.select(
                F.array(F.lit("malformed")).alias("_rayline_reasons"), *META
            ).unionByName(rejected.select("_rayline_reasons", *META))
            dead_out = dead.select(
                F.lit(self.s.dead_letter_topic).alias("topic"),
                F.col("_rayline_key").alias("key"),
                F.to_json(
                    F.struct(
                        F.col("_rayline_reasons").alias("reasons"),
                        F.col("_rayline_value").alias("original"),
                        F.col("_rayline_key").alias("key"),
                        F.lit(self.s.input_topic).alias("topic"),
                        F.col("_rayline_partition").alias("source_partition"),
                        F.col("_rayline_offset").alias("source_offset"),
                        F.lit(batch_id).alias("batch_id"),
                    )
                ).alias("value"),
                "_rayline_partition",
                "_rayline_offset",
            )
            preds = self._predictions(clean, model_dir, ref, batch_id)
            n_dead, n_pred = n_malformed + n_rejected, n_rows - n_rejected
            if done:  # a replay: write only what the first attempt did not
                pairs = self.spark.createDataFrame(sorted(done), "_p int, _o long").withColumn(
                    "_done", F.lit(True)
                )
                dead_out = dead_out.join(
                    F.broadcast(pairs),
                    (F.col("_rayline_partition") == F.col("_p"))
                    & (F.col("_rayline_offset") == F.col("_o")),
                    "left_anti",
                )
                v = F.col("value")
                preds = preds.join(
                    F.broadcast(pairs),
                    (F.get_json_object(v, "$.source_partition").cast("int") == F.col("_p"))
                    & (F.get_json_object(v, "$.source_offset").cast("long") == F.col("_o")),
                    "left_anti",
                ).persist()
                dead_out = dead_out.persist()
                n_dead, n_pred = dead_out.count(), preds.count()
            self._mark_start(batch_id)
            phase("mark")
            # Action 2: the predictions (scored on the executors) and the dead letters, written
            # in one Kafka write: each record names its topic.
            (
                preds.unionByName(dead_out.select("topic", "key", "value"))
                .write.format("kafka")
                .option("kafka.bootstrap.servers", self.s.bootstrap_servers)
                .option("kafka.acks", "all")
                .option("kafka.enable.idempotence", "true")
                .save()
            )
            phase("write")
            if done:
                preds.unpersist()
                dead_out.unpersist()
        finally:
            if data is not None:
                data.unpersist()
            batch.unpersist()
        lag = self._lag(read_to)
        phase("lag")
        rep = self.report
        rep["batches"] += 1
        rep["events"] += total
        rep["malformed"] += n_malformed
        rep["quarantined"] += n_rejected
        for rule_name, n_rule in counts.items():
            rep["rules"][rule_name] = rep["rules"].get(rule_name, 0) + n_rule
        rep["predictions"] += n_pred
        rep["dead_letters"] = rep.get("dead_letters", 0) + n_dead
        rep["replayed_records_skipped"] += len(done)
        key = f"{ref['name']}@{ref['version']}"
        rep["models"][key] = rep["models"].get(key, 0) + n_pred
        rep["lag"] = lag
        rl_metrics.stream_batch(
            self.spec.name,
            total,
            n_pred,
            n_dead,
            ref["name"],
            ref["version"],
            time.perf_counter() - t0,
            lag,
        )
        rep["last_batch"] = {
            "id": batch_id,
            "events": total,
            "predictions": n_pred,
            "dead_letters": n_dead,
            "seconds": round(time.perf_counter() - t0, 2),
            "phases_s": phases,
        }
        log.info(
            "[stream] batch %d: %d event(s) -> %d prediction(s) (%s), %d dead letter(s)%s in "
            "%.1fs (%s)",
            batch_id,
            total,
            n_pred,
            key,
            n_dead,
            f", {len(done)} already written before a restart" if done else "",
            time.perf_counter() - t0,
            " ".join(f"{k} {v:.1f}" for k, v in phases.items()),
        )
        atomic_write_text(self.run_dir / "reports" / "stream.json", json.dumps(rep, indent=2))

    # -- queries -----------------------------------------------------------------------------

    def start(self, available_now: bool = False) -> list[Any]:
        """Start the scoring query (and the window query); returns the StreamingQuery objects."""
        from .kafka_io import ensure_topics

        ensure_topics(
            self.s.bootstrap_servers,
            [self.s.input_topic, self.s.output_topic, self.s.dead_letter_topic],
        )
        self._resolve_model()
        parsed = self._parsed()
        w = parsed.writeStream.foreachBatch(self.process).option(
            "checkpointLocation", spark_path(self.cp / "score")
        )
        w = (
            w.trigger(availableNow=True)
            if available_now
            else w.trigger(processingTime=f"{self.s.trigger_seconds} seconds")
        )
        queries = [w.queryName(f"rayline-{self.spec.name}-score").start()]
        if self.s.window is not None:
            queries.append(self._window_query(parsed, available_now))
        return queries

    def _window_query(self, parsed: Any, available_now: bool) -> Any:
        from pyspark.sql import functions as F

        from ..outputs import table_location

        win = self.s.window
        assert win is not None
        events = parsed.where(F.col("e").isNotNull() & F.col("e." + CORRUPT).isNull()).select("e.*")
        aggs = [F.count(F.lit(1)).alias("events")]
        for m in win.metrics:
            aggs += [F.avg(m).alias(f"{m}_mean"), F.max(m).alias(f"{m}_max")]
        out = (
            events.withWatermark(win.time_column, win.watermark)
            .groupBy(F.window(win.time_column, win.duration).alias("window"), *win.group_by)
            .agg(*aggs)
            .select(
                F.col("window.start").alias("window_start"),
                F.col("window.end").alias("window_end"),
                *win.group_by,
                *[
                    c
                    for c in ["events"] + [f"{m}_{s}" for m in win.metrics for s in ("mean", "max")]
                ],
            )
        )
        path = table_location(self.spec.warehouse, win.table)
        _check_window_table(location(path), self.cp / "window", win.table)
        _window_table_to_delta(self.spark, location(path), win.table)
        # A Delta table: each micro-batch one commit, exactly once (Delta's sink records the
        # query id and batch id in the commit); readers read the table's log, never a file of a
        # batch that failed.
        w = (
            out.writeStream.format("delta")
            .outputMode("append")
            .option("path", spark_path(path))
            .option("checkpointLocation", spark_path(self.cp / "window"))
        )
        every = max(win.trigger_seconds, self.s.trigger_seconds)
        w = (
            w.trigger(availableNow=True)
            if available_now
            else w.trigger(processingTime=f"{every} seconds")
        )
        return w.queryName(f"rayline-{self.spec.name}-window").start()

    def late_events(self, query: Any) -> int:
        """Events the window query dropped for arriving after the watermark (so far)."""
        total = 0
        for p in query.recentProgress or []:
            for op in p.get("stateOperators", []):
                total += int(op.get("numRowsDroppedByWatermark", 0))
        return total
