"""Locations without a server: parsing, path arithmetic, pattern matching, errors that name the
location, and the checks that run before any engine starts (tests/integration/test_s3.py runs
the same code against a real S3 server)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from rayline.config import parse_spec
from rayline.preflight import check_locations
from rayline.runner import run_pipeline
from rayline.storage import (
    ObjectPath,
    StorageError,
    check_location,
    location,
    spark_path,
)


def test_local_paths_stay_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert location("runs") == tmp_path / "runs"
    assert location(f"file://{tmp_path}/x") == tmp_path / "x"
    assert spark_path("runs") == str(tmp_path / "runs")


def test_object_paths():
    p = location("s3://bkt/runs/") / "r1" / "run.json"
    assert isinstance(p, ObjectPath)
    assert str(p) == "s3://bkt/runs/r1/run.json"
    assert p.fs_path == "bkt/runs/r1/run.json"
    assert (p.name, p.stem, p.suffix) == ("run.json", "run", ".json")
    assert str(p.parent.parent) == "s3://bkt/runs"
    assert p.relative_to(location("s3://bkt/runs")) == Path("r1/run.json")
    assert spark_path(p) == "s3a://bkt/runs/r1/run.json"
    assert location("s3a://bkt/x") == location("s3://bkt/x")  # Spark's name, same object
    with pytest.raises(ValueError):
        p.relative_to(location("s3://other/runs"))


@pytest.mark.parametrize(
    "uri, message",
    [
        ("ftp://host/x", "unknown scheme 'ftp'"),
        ("s3:///no-bucket", "no bucket"),
    ],
)
def test_bad_uris_name_the_location(uri, message):
    with pytest.raises(StorageError, match=message):
        check_location(uri, "warehouse")


def test_unreachable_endpoint_fails_fast_naming_it(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # discard port: refused
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    from rayline import storage

    storage._filesystem.cache_clear()
    t0 = time.monotonic()
    with pytest.raises(StorageError) as e:
        check_location("s3://bkt/runs", "run_store")
    assert time.monotonic() - t0 < 30
    msg = str(e.value)
    assert "run_store: s3://bkt/runs" in msg and "cannot reach endpoint http://127.0.0.1:9" in msg
    assert "AWS_ENDPOINT_URL" in msg
    assert "s\n" not in msg and "secret" not in msg.lower()
    storage._filesystem.cache_clear()


def test_glob_patterns():
    from rayline.storage import _match

    assert _match("r1/run.json", "*/run.json")
    assert not _match("r1/stages/x/run.json", "*/run.json")
    assert _match("v12.json", "v*.json")
    assert _match("2024/01/a.csv", "**/*.csv")
    assert not _match("2024/01/a.json", "**/*.csv")


def _spec(tmp_path, source_path, **over):
    return parse_spec(
        {
            "name": "p",
            "sources": {"s": {"path": source_path, "format": "csv"}},
            "stages": [{"name": "schema", "type": "schema"}],
            "outputs": {"curated": {"table": "t"}},
            "warehouse": str(tmp_path / "wh"),
            "run_store": str(tmp_path / "runs"),
            **over,
        }
    )


def test_missing_source_is_reported_before_ray(tmp_path):
    # The unit tier refuses ray.init: reaching Spark would fail differently.
    spec = _spec(tmp_path, str(tmp_path / "nope" / "*.csv"))
    with pytest.raises(StorageError, match=r"sources\.s: source 's': no file matches"):
        run_pipeline(spec)
    assert not (tmp_path / "runs").exists()  # no run record for a run that never started


def test_unknown_scheme_in_a_spec_names_the_key(tmp_path):
    (tmp_path / "a.csv").write_text("x\n1\n")
    spec = _spec(tmp_path, str(tmp_path / "a.csv"), warehouse="hdfx://nn/wh")
    with pytest.raises(StorageError, match=r"^warehouse: .*unknown scheme 'hdfx'"):
        check_locations(spec)


def test_node_local_locations_refused_on_a_multi_node_cluster(tmp_path, monkeypatch):
    import ray

    from rayline.preflight import check_shared

    spec = _spec(tmp_path, "s3://bkt/data/a.csv", warehouse="s3://bkt/wh")
    nodes = [{"Alive": True}] * 3
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    with pytest.raises(StorageError) as e:
        check_shared(spec)
    msg = str(e.value)
    assert "3 nodes" in msg and "run_store: " in msg and str(tmp_path / "runs") in msg
    assert "warehouse" not in msg and "sources.s" not in msg  # those are on S3
    assert "s3://bucket/prefix" in msg

    shared = _spec(tmp_path, "s3://bkt/data/a.csv", warehouse="s3://bkt/wh", run_store="s3://b/r")
    check_shared(shared)  # every location shared: fine
    nodes[1:] = [{"Alive": False}, {"Alive": False}]
    check_shared(spec)  # one live node: local paths are fine
