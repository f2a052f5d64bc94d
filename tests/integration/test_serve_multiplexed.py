"""``mode: multiplexed`` on a real local Ray: two registered models served from the replicas of
one shared deployment (``models``) that load them on demand with ``@serve.multiplexed``.

With one replica holding at most one model, requests alternating between the two models load
and evict a model every time; with two models per replica both stay loaded. Either way every
request succeeds and is answered by the right model and version, as the model loaded directly
predicts. The fixtures and helpers are those of ``test_serve``."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
import requests

from rayline.serve.config import ServeArgs
from tests.integration import test_serve as base
from tests.integration.test_serve import SMALL, post, synthetic

# test_serve's module fixtures, found by name: a local Ray, the registry of two models, Serve
ray_local = base.ray_local
registry = base.registry
serve_instance = base.serve_instance

pytestmark = pytest.mark.integration

NAMES = ("delay", "late")
FEATURES = ["dep_delay", "distance", "carrier", "dest"]


@pytest.fixture(scope="module")
def expected(registry):
    """Rows and what each model (version 1), loaded directly, predicts for them."""
    from rayline.ml.models import load_model

    df = synthetic(12, seed=7)
    out = {}
    for name in NAMES:
        model = load_model(registry.local_path(registry.get(name, 1)))
        out[name] = model.predict(df)
    return df[FEATURES].to_dict(orient="records"), out


@pytest.fixture(scope="module", params=[1, 2], ids=lambda n: f"max{n}")
def multiplexed(request, serve_instance, registry):
    """The two models behind one shared deployment of one replica holding at most N models."""
    from ray import serve

    from rayline.serve.app import build_app

    per_replica = request.param
    app_name = f"mux-{per_replica}"
    args = ServeArgs.model_validate(
        {
            "registry": str(registry.uri),
            "models": [{"name": "delay", "ref": "champion"}, {"name": "late"}],
            "mode": "multiplexed",
            "max_models_per_replica": per_replica,
            "poll_interval_s": 0.5,
            "batching": {"max_batch_size": 16},
            "limits": {"request_timeout_s": 120},  # a loaded machine: loads take seconds
        }
    )
    app = build_app(args, model_options=SMALL | {"num_replicas": 1}, ingress_options=SMALL)
    serve.run(app, name=app_name, route_prefix=f"/{app_name}", blocking=False)
    yield serve_instance + f"/{app_name}", app_name, per_replica
    serve.delete(app_name)
    registry.set_alias("delay", "champion", 1)


@pytest.fixture(scope="module")
def replica_status(serve_instance):
    """The shared replica's status, asked through a handle in an event loop of the test's own
    (Serve's throughput mode routes a driver's handle in the caller's running loop)."""
    from ray import serve

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def ask(app_name: str) -> dict:
        handle = serve.get_deployment_handle("models", app_name=app_name)
        return await asyncio.wait_for(handle.status.remote(), 60)

    def status(app_name: str) -> dict:
        return asyncio.run_coroutine_threadsafe(ask(app_name), loop).result(90)

    yield status
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def check_answer(r: requests.Response, name: str, version: int, expected) -> None:
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["model"] == name and doc["version"] == version
    assert {(p["model"], p["version"]) for p in doc["predictions"]} == {(name, version)}
    direct = expected[1][name]
    if name == "delay":
        np.testing.assert_allclose(
            [p["prediction"] for p in doc["predictions"]],
            direct["prediction"],
            rtol=1e-4,
            atol=1e-3,
        )
    else:
        assert [p["prediction"] for p in doc["predictions"]] == list(direct["prediction"])
        np.testing.assert_allclose(
            [p["probability"] for p in doc["predictions"]],
            direct["probability"],
            rtol=1e-4,
            atol=1e-4,
        )


def test_one_shared_deployment_serves_both_models(multiplexed, replica_status):
    from ray import serve

    url, app_name, _ = multiplexed
    deployments = serve.status().applications[app_name].deployments
    assert set(deployments) == {"ingress", "models"}
    assert deployments["models"].replica_states.get("RUNNING", 0) == 1
    status = replica_status(app_name)
    assert status["models"] == sorted(NAMES)
    # readiness neither loads nor evicts: models not loaded yet are ready (loaded on demand)
    ready = requests.get(f"{url}/readyz", timeout=60)
    assert ready.status_code == 200, ready.text
    assert set(ready.json()["models"]) == set(NAMES)


def test_alternating_requests_load_evict_and_answer_right(multiplexed, replica_status, expected):
    url, app_name, per_replica = multiplexed
    rows = expected[0]
    loads_before = replica_status(app_name)["loads"]
    sequence = [NAMES[i % 2] for i in range(8)]
    for name in sequence:
        check_answer(post(url, name, rows, key=None, timeout=180), name, 1, expected)
    status = replica_status(app_name)
    loads = status["loads"] - loads_before
    if per_replica == 1:
        assert loads == len(sequence)  # every request loaded its model, evicting the other
        assert set(status["loaded"]) == {sequence[-1]}
    else:
        assert loads <= len(NAMES)  # both stay loaded: each loaded at most once
        assert set(status["loaded"]) == set(NAMES)
    assert all(s["version"] == 1 for s in status["loaded"].values())
    # an evicted model's alias-following thread stops: one per model held, no more
    deadline = time.time() + 30
    while time.time() < deadline:
        followers = replica_status(app_name)["followers"]
        if len(followers) == len(status["loaded"]):
            break
        time.sleep(0.5)
    assert followers == sorted(f"rayline-follow-{n}" for n in status["loaded"])


def test_concurrent_requests_for_both_models_all_succeed(multiplexed, replica_status, expected):
    url, app_name, per_replica = multiplexed
    rows = expected[0]
    failures: list[str] = []
    answers: list[str] = []
    lock = threading.Lock()

    def run(name: str) -> None:
        for _ in range(3):
            try:
                check_answer(post(url, name, rows, key=None, timeout=180), name, 1, expected)
                with lock:
                    answers.append(name)
            except (AssertionError, requests.RequestException) as e:
                with lock:
                    failures.append(f"{name}: {e}"[:300])

    threads = [threading.Thread(target=run, args=(n,)) for n in NAMES for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert failures == []
    assert sorted(answers) == sorted(list(NAMES) * 6)
    assert len(replica_status(app_name)["loaded"]) <= per_replica


def test_models_list_describe_and_unknown_name(multiplexed, replica_status):
    url, app_name, _ = multiplexed
    models = requests.get(f"{url}/v1/models", timeout=60).json()["models"]
    by_name = {m["name"]: m for m in models}
    assert set(by_name) == set(NAMES)
    assert by_name["delay"]["aliases"] == {"champion": 1}
    assert [v["version"] for v in by_name["delay"]["versions"]] == [1, 2]
    for m in models:  # what the replica asked holds, or that it loads the model on demand
        assert m["serving"].get("version") == 1 or m["serving"] == {
            "name": m["name"],
            "loaded": False,
        }
    info = requests.get(f"{url}/v1/models/late", timeout=180).json()
    assert info["version"] == 1 and info["task"] == "binary"
    assert info["row_schema"]["required"] == FEATURES
    assert requests.get(f"{url}/v1/models/nope", timeout=60).status_code == 404
    r = post(url, "nope", [{"dep_delay": 1.0}], key=None, timeout=60)
    assert r.status_code == 404 and "delay, late" in r.json()["detail"]
    bad = post(url, "delay", [{"dep_delay": "x"}], key=None, timeout=180)
    assert bad.status_code == 422
    assert bad.json()["model"] == "delay"
    assert set(replica_status(app_name)["models"]) == set(NAMES)  # only configured names


def test_a_loaded_model_follows_its_alias(multiplexed, registry, expected):
    url, _, _ = multiplexed
    rows = expected[0][:2]
    registry.set_alias("delay", "champion", 2, reason="test")
    try:
        deadline = time.time() + 60
        version = None
        while time.time() < deadline:
            r = post(url, "delay", rows, key=None, timeout=180)
            assert r.status_code == 200, r.text
            version = r.json()["version"]
            if version == 2:
                break
            time.sleep(0.5)
        assert version == 2
    finally:
        registry.set_alias("delay", "champion", 1, reason="test back")
    deadline = time.time() + 60
    while time.time() < deadline:
        if post(url, "delay", rows, key=None, timeout=180).json()["version"] == 1:
            break
        time.sleep(0.5)
    else:
        raise AssertionError("the alias moved back was not followed")
