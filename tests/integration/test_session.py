"""The Spark-on-Ray session's Python workers (real RayDP executors)."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.integration


def _worker_state(batches):  # runs in an executor's Python worker
    import os
    import sys
    import zipimport

    import pandas as pd

    for _ in batches:
        pass
    zips = [k for k, v in sys.path_importer_cache.items() if isinstance(v, zipimport.zipimporter)]
    state = {"zips": zips, "jars": [p for p in sys.path if p.endswith(".jar")]}
    state["pythonpath"] = os.environ.get("PYTHONPATH", "")
    yield pd.DataFrame({"s": [json.dumps(state)]})


def test_python_workers_run_without_spark_jars_on_sys_path(spark):
    rows = spark.range(0, 8, 1, 2).mapInPandas(_worker_state, "s string").collect()
    assert rows
    for r in rows:
        state = json.loads(r["s"])
        # Spark hands the workers its jar on PYTHONPATH; rayline.spark_daemon takes it away, so
        # PySpark's per-task importlib.invalidate_caches() reads no zip directory.
        assert ".jar" in state["pythonpath"]
        assert state["jars"] == [] and state["zips"] == []
