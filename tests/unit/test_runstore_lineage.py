import json
import threading

from rayline.lineage import LineageLog, dataset, format_graph, read_events
from rayline.runstore import RunStore, atomic_write_text


def test_schema_versions_increment_and_read_back(tmp_path):
    store = RunStore(tmp_path)
    assert store.latest_schema("p", "s") is None
    v1 = store.accept_schema(
        "p", "s", [{"name": "a", "type": "int", "nullable": True}], "r1", "first"
    )
    v2 = store.accept_schema(
        "p", "s", [{"name": "a", "type": "bigint", "nullable": True}], "r2", "widened"
    )
    assert (v1, v2) == (1, 2)
    version, doc = store.latest_schema("p", "s")
    assert version == 2 and doc["columns"][0]["type"] == "bigint" and doc["run_id"] == "r2"


def test_concurrent_schema_acceptance_gets_distinct_versions(tmp_path):
    store = RunStore(tmp_path)
    got = []
    threads = [
        threading.Thread(
            target=lambda i=i: got.append(store.accept_schema("p", "s", [], f"r{i}", "x"))
        )
        for i in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == list(range(1, 9))


def test_atomic_write_leaves_no_temp_files(tmp_path):
    p = tmp_path / "d" / "f.json"
    atomic_write_text(p, "1")
    atomic_write_text(p, "2")
    assert p.read_text() == "2"
    assert [x.name for x in p.parent.iterdir()] == ["f.json"]


def test_runs_listed_newest_first(tmp_path):
    store = RunStore(tmp_path)
    store.write_record(
        "a", {"run_id": "a", "started_at": "2026-01-01", "status": "failed", "pipeline": "p"}
    )
    store.write_record(
        "b", {"run_id": "b", "started_at": "2026-02-01", "status": "succeeded", "pipeline": "p"}
    )
    assert [r["run_id"] for r in store.list_runs()] == ["b", "a"]
    try:
        store.read_record("zzz")
    except FileNotFoundError as e:
        assert "zzz" in str(e) and "b" in str(e)
    else:
        raise AssertionError("expected FileNotFoundError")


def test_lineage_events_are_openlineage_shaped(tmp_path):
    log = LineageLog(tmp_path, "pipe", "run-1", "0.1.0")
    src = dataset("file", "/data/a.csv", fingerprint="abc")
    log.emit("START", "prep", stage_type="transform", inputs=[src])
    log.emit(
        "COMPLETE",
        "prep",
        stage_type="transform",
        inputs=[src],
        outputs=[dataset("rayline://pipe", "run-1/prep", rows=42)],
    )
    log.emit("FAIL", "checks", stage_type="quality", error="rule x failed")
    events = read_events(tmp_path)
    assert [e["eventType"] for e in events] == ["START", "COMPLETE", "FAIL"]
    for e in events:
        assert {
            "eventType",
            "eventTime",
            "run",
            "job",
            "inputs",
            "outputs",
            "producer",
            "schemaURL",
        } <= set(e)
        assert len(e["run"]["runId"]) == 36  # a UUID
        assert e["job"]["name"].startswith("pipe.")
    # START and COMPLETE of one stage share a runId
    assert events[0]["run"]["runId"] == events[1]["run"]["runId"]
    assert events[1]["outputs"][0]["outputFacets"]["outputStatistics"]["rowCount"] == 42
    graph = format_graph(events)
    assert "pipe.prep [transform] COMPLETE" in graph
    assert "<- file:/data/a.csv #abc" in graph
    assert "(42 rows)" in graph
    assert "!! rule x failed" in graph
    json.dumps(events)
