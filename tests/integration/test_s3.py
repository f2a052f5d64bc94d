"""Rayline on a real S3 server over HTTP (SeaweedFS from scripts/objectstore.sh; scripts/test.sh
starts it and exports its AWS_* variables before the Spark-on-Ray session starts): the run
store, the registry and the flights-shaped pipeline with every location on S3, the CLI against
S3 locations, and each bad location failing fast with an error that names it.

Skipped (with the reason) when no object store is configured: run them with
`scripts/test.sh tests/integration/test_s3.py` or after `eval "$(scripts/objectstore.sh env)"`.
"""

from __future__ import annotations

import io
import json
import os
import time
import uuid
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from rayline import storage
from rayline.runstore import RunStore
from rayline.storage import ObjectPath, StorageError, check_location, location

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not os.environ.get("AWS_ENDPOINT_URL") or not os.environ.get("RAYLINE_S3_BUCKET"),
        reason="no object store: start scripts/objectstore.sh and eval its `env` (test.sh does)",
    ),
]

BUCKET = os.environ.get("RAYLINE_S3_BUCKET", "rayline")


@pytest.fixture
def prefix():
    """A fresh prefix in the test bucket; removed afterwards."""
    p = location(f"s3://{BUCKET}/tests/{uuid.uuid4().hex[:12]}")
    assert isinstance(p, ObjectPath)
    yield p
    storage.remove_tree(p)


@pytest.fixture
def fresh_fs():
    """Filesystems built from the environment as it is now (credentials changed by a test)."""
    storage._filesystem.cache_clear()
    yield
    storage._filesystem.cache_clear()


def test_run_store_on_s3(prefix):
    store = RunStore(str(prefix / "runs"))
    rid = store.new_run_id("p")
    store.write_record(rid, {"run_id": rid, "status": "running", "started_at": "1"})
    store.write_record(rid, {"run_id": rid, "status": "succeeded", "started_at": "1"})
    store.write_report(rid, "schema", {"rows": 3})
    assert store.read_record(rid)["status"] == "succeeded"
    assert store.read_report(rid, "schema") == {"rows": 3}
    assert [r["run_id"] for r in store.list_runs()] == [rid]
    assert store.accept_schema("p", "s", [{"name": "a"}], rid, "first") == 1
    assert store.accept_schema("p", "s", [{"name": "b"}], rid, "second") == 2
    v, doc = store.latest_schema("p", "s")
    assert (v, doc["columns"]) == (2, [{"name": "b"}])
    with pytest.raises(FileNotFoundError, match="no run 'nope'"):
        store.read_record("nope")

    from rayline.lineage import LineageLog, read_events

    log = LineageLog(store.run_dir(rid), "p", rid, "v")
    log.emit("START", "schema", stage_type="schema")
    log.emit("COMPLETE", "schema", stage_type="schema")
    assert [e["eventType"] for e in read_events(store.run_dir(rid))] == ["START", "COMPLETE"]


def test_registry_on_s3(prefix, tmp_path):
    from rayline.ml.registry import ModelRegistry

    art = tmp_path / "model"
    art.mkdir()
    (art / "weights.bin").write_bytes(os.urandom(4096))
    (art / "preprocessor.json").write_text("{}")
    reg = ModelRegistry(str(prefix / "registry"))
    v1 = reg.register("m", art, {"metrics": {"rmse": 2.0}})
    v2 = reg.register("m", art, {"metrics": {"rmse": 1.0}})
    assert (v1.version, v2.version) == (1, 2)
    assert reg.set_alias("m", "champion", 2) is None
    got = reg.resolve("m@champion")
    assert got.version == 2 and got.metadata["metrics"] == {"rmse": 1.0}
    local = Path(reg.local_path(got))
    assert (local / "weights.bin").read_bytes() == (art / "weights.bin").read_bytes()


def test_bad_locations_fail_fast_and_name_what_to_check(prefix, fresh_fs, monkeypatch):
    t0 = time.monotonic()
    with pytest.raises(StorageError, match=r"warehouse: s3://no-such-bucket-rl/wh: bucket"):
        check_location("s3://no-such-bucket-rl/wh", "warehouse")
    with pytest.raises(StorageError, match=r"does not exist"):
        check_location(str(prefix / "missing.csv"), "source 'x'", must_exist=True)
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-" + secret[:4])
    storage._filesystem.cache_clear()
    with pytest.raises(StorageError, match=r"run_store: s3://.*access denied") as e:
        check_location(str(prefix / "runs"), "run_store")
    assert secret not in str(e.value)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "no-such-key")
    storage._filesystem.cache_clear()
    with pytest.raises(StorageError, match=r"access denied"):
        check_location(str(prefix / "runs"), "run_store")
    assert time.monotonic() - t0 < 60


def _upload_flights_like(prefix: ObjectPath) -> None:
    """Two CSV parts of one source (a glob) and a lookup table, written to S3."""
    rows_a = "id,carrier,dist,delay\n" + "".join(
        f"{i},{'AA' if i % 2 else 'UA'},{100 + i},{i % 7 - 3}\n" for i in range(40)
    )
    rows_b = "id,carrier,dist,delay\n" + "".join(
        f"{i},{'AA' if i % 3 else 'ZZ'},{100 + i},{i % 5}\n" for i in range(40, 70)
    )
    (prefix / "data" / "events" / "part-a.csv").write_text(rows_a)
    (prefix / "data" / "events" / "part-b.csv").write_text(rows_b)
    (prefix / "data" / "carriers.csv").write_text("code,name\nAA,American\nUA,United\n")


def _spec(prefix: ObjectPath, table: str, **over):
    from rayline.config import parse_spec

    return parse_spec(
        {
            "name": "s3flights",
            "sources": {
                "events": {"path": str(prefix / "data" / "events" / "*.csv"), "format": "csv"},
                "carriers": {"path": str(prefix / "data" / "carriers.csv"), "format": "csv"},
            },
            "stages": [
                {"name": "schema", "type": "schema"},
                {
                    "name": "prep",
                    "type": "transform",
                    "input": "events",
                    "steps": [{"op": "derive", "columns": {"far": "dist > 120"}}],
                },
                {
                    "name": "checks",
                    "type": "quality",
                    "rules": [
                        {
                            "name": "known_carrier",
                            "type": "referential",
                            "column": "carrier",
                            "source": "carriers",
                            "source_column": "code",
                            "severity": "quarantine",
                        }
                    ],
                },
            ],
            "outputs": {
                "curated": {"table": table},
                "quarantine": {"table": f"{table}_q"},
            },
            "warehouse": str(prefix / "warehouse"),
            "run_store": str(prefix / "runs"),
            **over,
        }
    )


def test_pipeline_with_every_location_on_s3(spark, prefix):
    from rayline.cli import main as cli
    from rayline.runner import run_pipeline

    _upload_flights_like(prefix)
    table = f"s3t_{uuid.uuid4().hex[:8]}"
    spec = _spec(prefix, table)
    result = run_pipeline(spec, spark=spark)
    rec = result.record
    assert rec["status"] == "succeeded"
    cur, q = rec["outputs"]["curated"], rec["outputs"]["quarantine"]
    # 70 events; carrier ZZ (i in 40..69 with i % 3 == 0: 10 rows) is not in carriers.
    assert (cur["rows"], q["rows"]) == (60, 10)
    assert cur["path"].startswith(f"s3://{BUCKET}/") or cur["path"].startswith(f"s3a://{BUCKET}/")
    assert spark.read.table(table).count() == 60

    # The run record, reports, lineage and report.html are objects in the run store.
    run_dir = location(spec.run_store) / result.run_id
    for rel in ("run.json", "reports/checks.json", "lineage/events.jsonl", "report.html"):
        assert (run_dir / rel).is_file(), rel

    # The CLI reads the same locations.
    for argv in (
        ["runs", "list", "--run-store", spec.run_store],
        ["runs", "show", result.run_id, "--run-store", spec.run_store],
        ["lineage", result.run_id, "--run-store", spec.run_store],
    ):
        out = io.StringIO()
        with redirect_stdout(out):
            assert cli(argv) == 0, argv
        assert result.run_id in out.getvalue() or "schema" in out.getvalue(), argv

    # No secret in anything the run wrote.
    secret = os.environ["AWS_SECRET_ACCESS_KEY"].encode()
    root = location(str(prefix))
    assert isinstance(root, ObjectPath)
    for obj in root.rglob("*"):
        if obj.name.endswith((".json", ".jsonl", ".html", ".txt", ".log", ".crc")):
            assert secret not in obj.read_bytes(), str(obj)
    assert secret not in json.dumps(rec).encode()


def _objectstore(action: str) -> None:
    import subprocess

    script = Path(__file__).resolve().parents[2] / "scripts" / "objectstore.sh"
    r = subprocess.run([str(script), action], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.skipif(
    not os.environ.get("RAYLINE_OBJECTSTORE_DIR"),
    reason="stops and restarts the object store: needs the instance scripts/test.sh starts",
)
def test_store_down_mid_publish_then_resume_appends_once(spark, prefix, monkeypatch):
    """The object store stops while the run publishes: the run fails naming 'publish', the
    table stays at its previous version (intact, readable), and --resume after the store is
    back appends the run's rows exactly once."""
    from deltalake import DeltaTable

    from rayline import runner
    from rayline.outputs import storage_options
    from rayline.runner import RunFailed, run_pipeline

    _upload_flights_like(prefix)
    table = f"s3o_{uuid.uuid4().hex[:8]}"
    spec = _spec(
        prefix,
        table,
        outputs={
            "curated": {"table": table, "mode": "append"},
            "quarantine": {"table": f"{table}_q"},
        },
    )
    first = run_pipeline(spec, spark=spark)
    path = first.record["outputs"]["curated"]["path"].replace("s3a://", "s3://")

    def rows() -> int:
        return DeltaTable(path, storage_options=storage_options()).to_pyarrow_table().num_rows

    assert rows() == 60

    real_write, real_link = runner.write_table, runner.link_table
    stopped: list[float] = []

    def store_goes_away(real):
        def publish(*a, **k):
            if not stopped:
                _objectstore("stop")
                stopped.append(time.monotonic())
            return real(*a, **k)

        return publish

    monkeypatch.setattr(runner, "write_table", store_goes_away(real_write))
    monkeypatch.setattr(runner, "link_table", store_goes_away(real_link))
    try:
        with pytest.raises(RunFailed, match="in stage 'publish'") as e:
            run_pipeline(spec, spark=spark)
        failed_after = time.monotonic() - stopped[0]
    finally:
        monkeypatch.setattr(runner, "write_table", real_write)
        monkeypatch.setattr(runner, "link_table", real_link)
        _objectstore("start")
    storage._filesystem.cache_clear()
    print(f"publish failed {failed_after:.0f} s after the store stopped")
    assert rows() == 60  # the previous version, intact

    resumed = run_pipeline(spec, spark=spark, resume=e.value.run_id)
    assert resumed.record["status"] == "succeeded"
    assert rows() == 120  # appended once
    with pytest.raises(RunFailed, match="already succeeded"):
        run_pipeline(spec, spark=spark, resume=e.value.run_id)
    assert rows() == 120
