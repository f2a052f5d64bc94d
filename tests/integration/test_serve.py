"""The serving application on a real local Ray: real tf-keras models (Rayline's preprocessor and
model builder) in a registry, Serve on 127.0.0.1, requests over HTTP.

One application with API keys answers the API tests; a second one follows an alias that moves
under load and loses a replica under load."""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import requests

from rayline.ml.registry import ModelRegistry
from rayline.serve.auth import hash_key
from rayline.serve.config import ServeArgs

pytestmark = pytest.mark.integration

ALL_KEY = "rl_test_all_models_key_0123456789abcdef"
REG_KEY = "rl_test_regression_only_key_0123456789"
CARRIERS = ["AA", "B6", "DL", "UA"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def synthetic(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    df = pd.DataFrame(
        {
            "dep_delay": rng.normal(10, 30, n),
            "distance": rng.uniform(100, 3000, n),
            "carrier": rng.choice(CARRIERS, n),
            "dest": rng.choice([f"D{i}" for i in range(30)], n),
        }
    )
    df["arr_delay"] = 0.9 * df["dep_delay"] + (df["carrier"] == "UA") * 5 + rng.normal(0, 3, n)
    df["late"] = np.where(df["arr_delay"] > 15, "yes", "no")
    return df


def train(ds, df: pd.DataFrame, task: str, label: str, out: Path) -> tuple[Path, dict]:
    """Rayline's preprocessor (fitted with Ray Data) and model builder, trained in-process
    (Ray Train's fixed start-up cost is not what these tests are about), saved as a training
    checkpoint is."""
    from rayline.ml.features import fit_preprocessor
    from rayline.ml.keras_model import build_model, compile_model, use_tf_keras
    from rayline.ml.spec import MLSpec
    from rayline.ml.train import _save, model_params

    ml = MLSpec.model_validate(
        {
            "model_name": label,
            "task": task,
            "label": label,
            "features": {
                "numeric": ["dep_delay", "distance"],
                "categorical": [
                    {"name": "carrier"},
                    {"name": "dest", "encoding": "embedding", "embedding_dim": 4},
                ],
            },
            "model": {"hidden_units": [16], "epochs": 2, "batch_size": 128},
        }
    )
    pre = fit_preprocessor(ds, ml)
    keras = use_tf_keras(1)
    keras.utils.set_random_seed(0)
    params = model_params(ml)
    model = build_model(pre, params)
    compile_model(model, task, 0.01)
    x, y = pre.transform(df), pre.labels(df)
    hist = model.fit(x, y, epochs=2, batch_size=128, verbose=0).history
    history = [{k: float(v[i]) for k, v in hist.items()} | {"epoch": i + 1} for i in range(2)]
    out.mkdir(parents=True)
    _save(model, pre, history, 1, params, out)
    meta = {
        "framework": "keras",
        "signature": pre.signature() | {"feature_columns": pre.feature_columns},
        "metrics": {"loss": history[-1]["loss"]},
    }
    return out, meta


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray with Serve's fast path (HAProxy in front of the ingress replicas), or the
    integration session's Ray when it is already up (Serve's default proxy then)."""
    import ray

    from rayline.serve.env import throughput_env

    if ray.is_initialized():  # the integration session's Ray (Spark holds some of its CPUs)
        yield {"haproxy": False}
        return
    mp = pytest.MonkeyPatch()
    env = throughput_env()  # a short /tmp directory: HAProxy's socket path has a length limit
    # Ingress replicas drain 30 s before they stop (for load balancers to notice): not here.
    env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] = "1"
    for key, value in env.items():
        mp.setenv(key, value)
    ray.init(address="local", num_cpus=3, include_dashboard=False, log_to_driver=False)
    try:
        yield {"haproxy": True}
    finally:
        ray.shutdown()
        mp.undo()
        shutil.rmtree(env["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"], ignore_errors=True)


@pytest.fixture(scope="module")
def registry(ray_local, tmp_path_factory):
    """delay (regression) versions 1 and 2 (same weights, for alias moves); late (binary)."""
    import ray.data

    root = tmp_path_factory.mktemp("serve")
    df = synthetic(3000)
    ds = ray.data.from_pandas(df).materialize()
    reg = ModelRegistry(root / "registry")
    d, meta = train(ds, df, "regression", "arr_delay", root / "delay")
    for _ in range(2):
        reg.register("delay", d, meta)
    reg.set_alias("delay", "champion", 1)
    b, meta = train(ds, df, "binary", "late", root / "late")
    reg.register("late", b, meta)
    reg.set_alias("late", "champion", 1)
    return reg


SMALL = {"ray_actor_options": {"num_cpus": 0.1}}


@pytest.fixture(scope="module")
def serve_instance(ray_local):
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


@pytest.fixture(scope="module")
def api(serve_instance, registry):
    """The API application, with keys: ALL_KEY for every model, REG_KEY for delay only."""
    from ray import serve

    from rayline.serve.app import build_app

    keys = [
        {"id": "all", "sha256": hash_key(ALL_KEY), "models": ["*"]},
        {"id": "delay-only", "sha256": hash_key(REG_KEY), "models": ["delay"]},
    ]
    mp = pytest.MonkeyPatch()
    mp.setenv("RAYLINE_TEST_KEYS", json.dumps(keys))
    try:
        args = ServeArgs.model_validate(
            {
                "registry": str(registry.uri),
                "models": [{"name": "delay", "ref": "champion"}, {"name": "late"}],
                "auth": {"enabled": True, "keys_env": "RAYLINE_TEST_KEYS"},
                "limits": {"max_body_bytes": 65536, "max_rows": 200},
                "batching": {"max_batch_size": 32},
            }
        )
        app = build_app(args, model_options=SMALL, ingress_options=SMALL)
    finally:
        mp.undo()
    serve.run(app, name="api", route_prefix="/", blocking=False)
    yield serve_instance
    serve.delete("api")


def auth(key: str = ALL_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def row(**over):
    return {"dep_delay": 20.0, "distance": 800.0, "carrier": "UA", "dest": "D3"} | over


def post(url, name, body, key=ALL_KEY, **kw):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} | (auth(key) if key else {})
    return requests.post(f"{url}/v1/models/{name}/predict", data=data, headers=headers, **kw)


# -- the API -------------------------------------------------------------------------------------


def test_health_readiness_and_docs_are_open(api):
    assert requests.get(f"{api}/healthz").json() == {"status": "ok"}
    ready = requests.get(f"{api}/readyz").json()
    assert ready["status"] == "ready"
    assert {n: s["version"] for n, s in ready["models"].items()} == {"delay": 1, "late": 1}
    spec = requests.get(f"{api}/openapi.json").json()
    assert "/v1/models/{name}/predict" in spec["paths"]
    body = spec["paths"]["/v1/models/{name}/predict"]["post"]["requestBody"]
    assert "oneOf" in body["content"]["application/json"]["schema"]
    assert "422" in spec["paths"]["/v1/models/{name}/predict"]["post"]["responses"]
    assert requests.get(f"{api}/docs").status_code == 200


def test_models_list_and_describe(api):
    models = requests.get(f"{api}/v1/models", headers=auth()).json()["models"]
    by_name = {m["name"]: m for m in models}
    assert set(by_name) == {"delay", "late"}
    assert by_name["delay"]["serving"]["version"] == 1
    assert by_name["delay"]["aliases"] == {"champion": 1}
    assert [v["version"] for v in by_name["delay"]["versions"]] == [1, 2]
    assert "loss" in by_name["delay"]["versions"][0]["metrics"]
    info = requests.get(f"{api}/v1/models/late", headers=auth()).json()
    assert info["version"] == 1 and info["task"] == "binary"
    assert info["signature"]["classes"] == ["no", "yes"]
    assert info["row_schema"]["required"] == ["dep_delay", "distance", "carrier", "dest"]
    assert requests.get(f"{api}/v1/models/nope", headers=auth()).status_code == 404


def test_predictions_match_the_model_loaded_directly(api, registry):
    from rayline.ml.models import load_model

    df = synthetic(20, seed=5)
    rows = df[["dep_delay", "distance", "carrier", "dest"]].to_dict(orient="records")
    r = post(api, "delay", rows)
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["model"] == "delay" and doc["version"] == 1
    assert all(p["model"] == "delay" and p["version"] == 1 for p in doc["predictions"])
    direct = load_model(registry.local_path(registry.get("delay", 1))).predict(df)["prediction"]
    np.testing.assert_allclose(
        [p["prediction"] for p in doc["predictions"]], direct, rtol=1e-4, atol=1e-3
    )
    one = post(api, "delay", rows[0]).json()  # one row, not in a list
    assert one["predictions"][0]["prediction"] == pytest.approx(direct[0], rel=1e-4, abs=1e-3)


def test_binary_answers_class_and_probabilities(api):
    r = post(api, "late", [row(dep_delay=90.0), row(dep_delay=-20.0)])
    assert r.status_code == 200, r.text
    late, early = r.json()["predictions"]
    assert late["prediction"] == "yes" and early["prediction"] == "no"
    assert late["probability"] > 0.5 > early["probability"]
    assert set(late["probabilities"]) == {"no", "yes"}
    assert sum(late["probabilities"].values()) == pytest.approx(1.0)


def test_unknown_category_is_served_and_flagged(api):
    r = post(api, "delay", [row(carrier="ZZ"), row(carrier=None, dest=None)])
    assert r.status_code == 200, r.text
    first, second = r.json()["predictions"]
    assert isinstance(first["prediction"], float)
    assert [(w["field"], w["type"]) for w in first["warnings"]] == [("carrier", "unknown_category")]
    assert "warnings" not in second  # nulls are allowed and not flagged


@pytest.mark.parametrize(
    "body, status, expect",
    [
        ([row(dep_delay="12")], 422, [(0, "dep_delay", "wrong_type")]),
        (
            [row(), {"dep_delay": 1.0, "dest": None}],
            422,
            [(1, "distance", "missing"), (1, "carrier", "missing")],
        ),
        ([row(extra=1)], 422, [(0, "extra", "unexpected_field")]),
        (b'[{"dep_delay": NaN, "distance": 1, "carrier": "UA", "dest": "D1"}]', 422, None),
        (b'{"dep_delay": 1e999, "distance": 1, "carrier": "UA", "dest": "D1"}', 422, None),
        ([row(carrier=["UA"])], 422, [(0, "carrier", "wrong_type")]),
        ([row(), 7], 422, [(1, None, "not_an_object")]),
        (b"{not json", 422, [(None, None, "invalid_json")]),
        (b"\xff\xfe\x00", 422, [(None, None, "invalid_json")]),
        (b"[" * 20000, 422, [(None, None, "invalid_json")]),
        (b"[]", 422, [(None, None, "empty")]),
        ([row()] * 201, 413, [(None, None, "too_many_rows")]),
        (b"[" + b" " * 70000 + b"]", 413, [(None, None, "body_too_large")]),
    ],
)
def test_bad_input_is_answered_per_row_and_field(api, body, status, expect):
    r = post(api, "delay", body)
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    got = [(d["row"], d["field"], d["type"]) for d in detail]
    if expect is None:
        assert [t for _, _, t in got] == ["not_finite"]
    else:
        assert got == expect


def test_api_keys(api):
    assert post(api, "delay", [row()], key=None).status_code == 401
    r = post(api, "delay", [row()], key="rl_wrong")
    assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer"
    assert post(api, "delay", [row()], key=REG_KEY).status_code == 200
    r = post(api, "late", [row()], key=REG_KEY)
    assert r.status_code == 403 and "may not use model 'late'" in r.json()["detail"]
    assert requests.get(f"{api}/v1/models").status_code == 401
    listed = requests.get(f"{api}/v1/models", headers=auth(REG_KEY)).json()["models"]
    assert [m["name"] for m in listed] == ["delay"]
    assert requests.get(f"{api}/v1/models/late", headers=auth(REG_KEY)).status_code == 403


def test_keys_never_reach_the_logs(api):
    import ray

    post(api, "delay", [row()], key=ALL_KEY)
    post(api, "delay", [row()], key="rl_some_wrong_key_value_xyz")
    time.sleep(1.0)  # log files are flushed by the replicas
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    needles = [ALL_KEY.encode(), b"rl_some_wrong_key_value_xyz", hash_key(ALL_KEY).encode()]
    scanned = 0
    for f in logs.rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            scanned += 1
            assert not any(n in data for n in needles), f
    assert scanned > 5


def test_concurrent_requests_share_batches_and_are_measured(api):
    from concurrent.futures import ThreadPoolExecutor

    def one(i):
        return post(api, "delay", [row(dep_delay=float(i))])

    assert post(api, "delay", [{"dep_delay": "x"}]).status_code == 422
    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(one, range(256)))
    assert [a.status_code for a in answers] == [200] * 256
    preds = [a.json()["predictions"][0]["prediction"] for a in answers]
    assert preds[100] > preds[10]  # each answer is its own row's
    # The Ray metrics, as Prometheus scrapes them: fewer model calls than scored requests
    # means requests shared batches.
    deadline = time.time() + 60
    while True:
        text = _scrape()
        served = _sum(text, "ray_rayline_serve_requests_total", model="delay", status="200")
        batches = _sum(text, "ray_rayline_serve_batch_size_count", model="delay")
        rows = _sum(text, "ray_rayline_serve_rows_total", model="delay")
        # Serve's own HTTP metrics too (with the fast path: recorded by the ingress replicas).
        http = _sum(text, "ray_serve_num_http_requests_total")
        if served >= 256 and batches > 0 and rows >= 256 and http >= 256:
            break
        assert time.time() < deadline, (served, batches, rows, http)
        time.sleep(2)
    assert batches < served, (batches, served)
    assert _sum(text, "ray_rayline_serve_request_latency_ms_count", model="delay") >= served
    assert _sum(text, "ray_rayline_serve_errors_total", model="delay", kind="validation") > 0


def _scrape() -> str:
    """The Ray node's Prometheus metrics (exported every few seconds)."""
    import ray

    port = ray._private.worker._global_node.metrics_export_port
    return requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text


def _sum(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        tags, _, value = line[len(name) + 1 :].rpartition("} ")
        if all(f'{k}="{v}"' in tags for k, v in labels.items()):
            total += float(value)
    return total


# -- fuzz: generated bodies never get a 5xx ------------------------------------------------------

hypothesis = pytest.importorskip("hypothesis")
st = pytest.importorskip("hypothesis.strategies")

_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**40), max_value=10**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)
_value = st.recursive(
    _scalar,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=5,
)


@st.composite
def _bodies(draw):
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(st.binary(max_size=200))
    if kind == 1:
        return json.dumps(draw(_value)).encode()
    rows = []
    for _ in range(draw(st.integers(1, 4))):
        r = row()
        for _ in range(draw(st.integers(0, 2))):
            name = draw(st.sampled_from(["dep_delay", "distance", "carrier", "dest", "x", ""]))
            if draw(st.booleans()):
                r.pop(name, None)
            else:
                r[name] = draw(_value)
        rows.append(r)
    return json.dumps(rows if draw(st.booleans()) else rows[0]).encode()


@hypothesis.settings(
    max_examples=150, deadline=None, suppress_health_check=list(hypothesis.HealthCheck)
)
@hypothesis.given(
    body=_bodies(),
    name=st.sampled_from(["delay", "late", "nope", "dé lay"]),
    key=st.sampled_from([ALL_KEY, REG_KEY, None, "junk"]),
)
def test_fuzz_never_5xx(api, body, name, key):
    r = post(api, name, body, key=key, timeout=30)
    assert r.status_code in (200, 401, 403, 404, 413, 422), (r.status_code, r.text[:300])
    if r.status_code == 200:
        doc = r.json()
        assert doc["model"] == name and doc["version"] == 1


# -- under change: alias moves and a replica lost, both under load -------------------------------


class Load:
    """Client threads sending one-row requests until stopped (bounded in count and time)."""

    THREADS = 4

    def __init__(self, url: str, name: str, threads: int = THREADS, limit_s: float = 60.0) -> None:
        self.url, self.name = url, name
        self.answers: list[tuple[float, int, int | None]] = []  # (time, status, version)
        self._stop = threading.Event()
        self._deadline = time.time() + limit_s
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]
        self._lock = threading.Lock()

    def _run(self) -> None:
        s = requests.Session()
        while not self._stop.is_set() and time.time() < self._deadline:
            try:
                r = s.post(
                    f"{self.url}/v1/models/{self.name}/predict",
                    data=json.dumps([row(), row(carrier="AA")]),
                    timeout=10,
                )
                status = r.status_code
                version = None
                if status == 200:
                    doc = r.json()
                    version = doc["version"]
                    if {p["version"] for p in doc["predictions"]} != {version}:
                        status = -2  # one version per answer, or it counts as a failure
            except requests.RequestException:
                status, version = -1, None
            with self._lock:
                self.answers.append((time.time(), status, version))

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)

    def wait_for(self, version: int, timeout: float = 30.0) -> float:
        t0 = time.time()
        while time.time() - t0 < timeout:
            with self._lock:
                if any(v == version and t > t0 for t, _, v in self.answers):
                    return time.time() - t0
            time.sleep(0.05)
        raise AssertionError(f"version {version} not served within {timeout}s")


@pytest.fixture(scope="module", params=["fused", "split"])
def follower(request, serve_instance, registry):
    """The delay model following 'champion', re-read every 0.5 s, on two replicas: of the
    ingress (fused) or of the model deployment (split)."""
    from ray import serve

    from rayline.serve.app import build_app

    mode = request.param
    args = ServeArgs.model_validate(
        {
            "registry": str(registry.uri),
            "models": [{"name": "delay", "ref": "champion"}],
            "poll_interval_s": 0.5,
            "mode": mode,
        }
    )
    two = SMALL | {"num_replicas": 2}
    if mode == "fused":
        app = build_app(args, ingress_options=two)
    else:
        app = build_app(args, model_options=two, ingress_options=SMALL)
    serve.run(app, name=f"follow-{mode}", route_prefix=f"/follow-{mode}", blocking=False)
    yield (
        serve_instance + f"/follow-{mode}",
        f"follow-{mode}",
        ("ingress" if mode == "fused" else "model-delay"),
    )
    serve.delete(f"follow-{mode}")
    registry.set_alias("delay", "champion", 1)


def test_alias_moves_under_load_without_failures(follower, registry):
    url, _, _ = follower
    registry.set_alias("delay", "champion", 1)
    with Load(url, "delay") as load:
        load.wait_for(1)
        time.sleep(1.0)
        registry.set_alias("delay", "champion", 2, reason="test")
        took = load.wait_for(2)
        time.sleep(1.5)  # both replicas have moved
        moved_at = time.time()
        time.sleep(1.0)
        registry.set_alias("delay", "champion", 1, reason="test back")
        load.wait_for(1)
        time.sleep(1.5)
        back_at = time.time()
        time.sleep(1.0)
    statuses = Counter(s for _, s, _ in load.answers)
    assert set(statuses) == {200}, statuses
    versions = Counter(v for _, _, v in load.answers)
    assert versions[1] > 0 and versions[2] > 0, versions
    assert took < 5.0  # alias re-read every 0.5 s, plus load and warm-up
    between = {v for t, _, v in load.answers if moved_at < t < moved_at + 1.0}
    assert between == {2}
    after = {v for t, _, v in load.answers if t > back_at}
    assert after == {1}
    print(f"\nalias moves under load: {dict(versions)} answers, {statuses}")


def test_replica_killed_under_load(follower, ray_local, capsys):
    import ray
    from ray import serve

    url, app, deployment = follower
    names = [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith(f"SERVE_REPLICA::{app}#{deployment}#")
    ]
    assert len(names) == 2, names
    with Load(url, "delay") as load:
        time.sleep(2.0)
        killed_at = time.time()
        ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
        time.sleep(6.0)
    failures = [(t - killed_at, s) for t, s, _ in load.answers if s != 200]
    total = len(load.answers)
    with capsys.disabled():
        print(
            f"\n{app}: {deployment} replica killed under load: {len(failures)} failed of "
            f"{total} requests "
            f"(statuses {Counter(s for _, s in failures)})"
        )
    assert total > 20
    if deployment == "model-delay":
        # split: the ingress retries on another model replica
        assert failures == [], failures
    elif ray_local["haproxy"]:
        # fused behind HAProxy: HAProxy sends a request whose replica died without answering to
        # another one. Seen once in about 10,000 requests over 3 runs: one request at the
        # moment of the kill ended in a closed client connection (requests' ConnectionError;
        # HAProxy also reloads its configuration then, without the dead replica). Never an
        # error status.
        assert all(s == -1 for _, s in failures), failures
        assert len(failures) <= 1, failures
    else:
        # fused behind Serve's default proxy: the requests the killed replica held are lost
        # (a 500 from the proxy, or no answer before the client's timeout); the others go to
        # the replica left
        assert len(failures) <= Load.THREADS, failures
    deadline = time.time() + 60
    while time.time() < deadline:  # Serve replaces the replica
        dep = serve.status().applications[app].deployments[deployment]
        if dep.replica_states.get("RUNNING", 0) == 2:
            break
        time.sleep(1)
    else:
        raise AssertionError(f"replica not replaced: {dep.replica_states}")
