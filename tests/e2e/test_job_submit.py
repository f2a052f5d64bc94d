"""End to end through the CLIs users run: `scripts/cluster.sh up` (ray start --head), then
`ray job submit` of the batch workload, wait for SUCCEEDED, check the outputs, stop the cluster."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DPORT = os.environ.get("RAYLINE_E2E_DASHBOARD_PORT", "8365")
ADDRESS = f"http://127.0.0.1:{DPORT}"

pytestmark = pytest.mark.e2e


def env():
    e = dict(os.environ)
    e.update(
        RAY_AUTH_MODE="token",
        RAYLINE_DASHBOARD_PORT=DPORT,
        RAYLINE_RAY_PORT=os.environ.get("RAYLINE_E2E_RAY_PORT", "6390"),
        RAYLINE_METRICS_PORT=os.environ.get("RAYLINE_E2E_METRICS_PORT", "8390"),
        RAYLINE_AGENT_PORT=os.environ.get("RAYLINE_E2E_AGENT_PORT", "52390"),
        RAY=str(BIN / "ray"),
        PATH=f"{BIN}:{e.get('PATH', '')}",
    )
    return e


@pytest.fixture(scope="module")
def cluster():
    log = ROOT / "benchmarks" / "out" / "e2e-cluster.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as f:  # a file, not a pipe: Ray's daemons inherit the streams
        # A cluster left on these ports by an interrupted earlier run would be joined, not
        # replaced: stop it first.
        subprocess.run(
            [str(ROOT / "scripts" / "cluster.sh"), "down"],
            env=env(),
            stdout=f,
            stderr=subprocess.STDOUT,
            timeout=120,
        )
        up = subprocess.run(
            [str(ROOT / "scripts" / "cluster.sh"), "up"],
            env=env(),
            stdout=f,
            stderr=subprocess.STDOUT,
            timeout=180,
        )
    assert up.returncode == 0, log.read_text()
    try:
        yield ADDRESS
    finally:
        subprocess.run(
            [str(ROOT / "scripts" / "cluster.sh"), "down"],
            env=env(),
            timeout=120,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )


def ray_job(*args, timeout=120):
    return subprocess.run(
        [str(BIN / "ray"), "job", *args],
        env=env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def submit(address, spec, runtime_env, workload="workloads/batch_pipeline.py"):
    # Right after `ray start` the head may answer before its job agent is ready ("No available
    # agent to submit job, please try again later"): retry that, and only that, for a while.
    for _ in range(30):
        r = _submit_once(address, spec, runtime_env, workload)
        if r.returncode == 0 or "No available agent" not in r.stderr:
            break
        time.sleep(3)
    assert r.returncode == 0, r.stderr
    return next(
        line.split("'")[1]
        for line in (r.stdout + r.stderr).splitlines()
        if "submitted successfully" in line
    )


def _submit_once(address, spec, runtime_env, workload):
    return ray_job(
        "submit",
        "--address",
        address,
        "--no-wait",
        "--working-dir",
        ".",
        "--runtime-env-json",
        json.dumps(runtime_env),
        "--",
        "python",
        workload,
        "--spec",
        spec,
    )


def wait(address, job_id, limit=900):
    deadline = time.time() + limit
    status = ""
    while time.time() < deadline:
        r = ray_job("status", "--address", address, job_id)
        status = re.sub(r"\x1b\[[0-9;]*m", "", r.stdout + r.stderr)
        # `ray job status` prints "Job '...' succeeded" / "... failed" / "... was stopped" when
        # done, "Status for job '...': RUNNING" before.
        m = re.search(r"\b(succeeded|failed|stopped)\b", status, re.IGNORECASE)
        if m:
            return m.group(1).upper()
        time.sleep(3)
    raise AssertionError(f"job {job_id} did not finish in {limit}s: {status}")


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """Warehouse, run store and registry shared by the pipeline job and the training job."""
    return tmp_path_factory.mktemp("e2e-shared")


def shared_env(root):
    return {
        "env_vars": {
            "RAYLINE_DATA_DIR": str(ROOT / "data"),
            "RAYLINE_WAREHOUSE": str(root / "warehouse"),
            "RAYLINE_RUN_STORE": str(root / "runs"),
            "RAYLINE_REGISTRY": str(root / "registry"),
            # Stay up long enough for the metrics agent to collect the job's metrics.
            "RAYLINE_METRICS_FLUSH_SECONDS": "15",
        }
    }


def scrape(port):
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


def metric_value(text, name, **tags):
    """Sum of the samples of ``name`` (with Ray's ``ray_`` prefix) whose labels include
    ``tags``."""
    total = None
    for line in text.splitlines():
        m = re.match(r"^ray_" + name + r"(?:_total)?\{(.*)\}\s+([0-9.eE+-]+)$", line)
        if not m:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        if all(labels.get(k) == v for k, v in tags.items()):
            total = (total or 0) + float(m.group(2))
    return total


def scrape_until(port, want, limit):
    deadline = time.time() + limit
    found = {}
    while time.time() < deadline:
        text = scrape(port)
        found = {
            (name, stage): metric_value(text, name, pipeline="flights", stage=stage)
            for name, stage in want
        }
        if found == {k: float(v) for k, v in want.items()}:
            return want
        time.sleep(5)
    return found


@pytest.fixture(scope="module")
def pipeline_job(cluster, shared):
    """The flights pipeline submitted once as a Ray job; its final status and logs. The training
    job trains on the table it writes."""
    job_id = submit(cluster, "pipelines/flights.yaml", shared_env(shared))
    final = wait(cluster, job_id)
    return final, ray_job("logs", "--address", cluster, job_id).stdout


def test_flights_pipeline_as_a_ray_job(pipeline_job, shared):
    tmp_path = shared
    final, logs = pipeline_job
    assert final == "SUCCEEDED", logs[-4000:]
    assert "[4/4] analytics 'profile': done" in logs and "succeeded" in logs

    runs = list((tmp_path / "runs").glob("flights-*/run.json"))
    assert len(runs) == 1
    rec = json.loads(runs[0].read_text())
    assert rec["status"] == "succeeded"
    cur, q = rec["outputs"]["curated"], rec["outputs"]["quarantine"]
    assert cur["rows"] + q["rows"] == 336_776 and cur["rows"] > 330_000
    assert Path(cur["path"], "_SUCCESS").exists()
    assert Path(runs[0].parent, "report.html").exists()
    assert rec["code_version"].startswith("0.1.0")

    # Rayline's metrics, from the cluster's metrics endpoint (Prometheus format).
    port = env()["RAYLINE_METRICS_PORT"]
    by_stage = {s["name"]: s for s in rec["stages"]}
    want = {
        ("rayline_stage_rows_out", "checks"): by_stage["checks"]["rows_out"],
        ("rayline_stage_rows_in", "prepare"): by_stage["prepare"]["rows_in"],
    }
    found = scrape_until(port, want, limit=90)
    assert found == want, found


def test_training_job_registers_and_promotes_a_classifier(cluster, shared, pipeline_job):
    """`ray job submit ... workloads/train.py`: train on the table the pipeline job wrote
    (Keras on Ray Train + the Spark GBT challenger), evaluate, register, gate."""
    final, logs = pipeline_job
    assert final == "SUCCEEDED", f"the pipeline job that writes the table failed: {logs[-2000:]}"
    job_id = submit(
        cluster, "pipelines/flights_delayed.yaml", shared_env(shared), workload="workloads/train.py"
    )
    final = wait(cluster, job_id)
    logs = ray_job("logs", "--address", cluster, job_id).stdout
    assert final == "SUCCEEDED", logs[-4000:]
    assert "[ml] train: done" in logs

    from rayline.ml.registry import ModelRegistry

    reg = ModelRegistry(str(shared / "registry"))
    versions = reg.versions("flights_delayed")
    assert [v.metadata["framework"] for v in versions] == ["keras", "spark_gbt"]
    champion = reg.get("flights_delayed", "champion")
    m, b = champion.metadata["metrics"], champion.metadata["baseline"]
    assert m["roc_auc"] > 0.8 > b["roc_auc"]
    assert m["accuracy"] > b["accuracy"]
    assert champion.metadata["quality"]["verdict"] == "passed"
    runs = sorted((shared / "runs").glob("flights-*/run.json"))
    train_rec = json.loads(runs[-1].read_text())
    assert [s["name"] for s in train_rec["stages"]] == ["train"]
    assert train_rec["status"] == "succeeded"


def test_invalid_spec_fails_the_job_with_the_key(cluster, tmp_path):
    bad = ROOT / "pipelines" / f".e2e-bad-{os.getpid()}.yaml"
    text = (
        (ROOT / "pipelines" / "flights.yaml").read_text().replace("type: range", "type: ranged", 1)
    )
    bad.write_text(text)
    try:
        job_id = submit(
            cluster,
            f"pipelines/{bad.name}",
            {"env_vars": {"RAYLINE_RUN_STORE": str(tmp_path / "runs")}},
        )
        assert wait(cluster, job_id, limit=300) == "FAILED"
        logs = ray_job("logs", "--address", cluster, job_id).stdout
        assert "unknown type 'ranged'" in logs and "stages.2.quality.rules" in logs
        assert not (tmp_path / "runs").exists()  # failed before Spark, before any run record
    finally:
        bad.unlink()
