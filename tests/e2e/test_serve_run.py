"""End to end through the CLIs users run: `serve run serve_configs/flights.yaml` (on its own
local Ray, on a test port) serving a registered flights_arr_delay model, `rayline predict`
against it, then `rayline models promote` while it runs: the endpoint follows the alias."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import requests
import yaml

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.e2e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def register_flights_stumps(registry: str | Path, scratch: Path) -> None:
    """Two versions of flights_arr_delay over the flights features (one-tree ensembles: the
    Serve path is what is tested here, not TensorFlow): version 1 answers -10/+10 around a
    departure delay of 15 minutes, version 2 -20/+20."""
    from rayline.ml.features import Preprocessor
    from rayline.ml.models import write_model_info
    from rayline.ml.registry import ModelRegistry

    ml = yaml.safe_load((ROOT / "pipelines" / "flights.yaml").read_text())["ml"]
    feats = ml["features"]
    assert feats["numeric"][0] == "dep_delay"
    stats = {"mean": 15.0, "std": 40.0, "min": -40.0, "max": 1000.0, "nulls": 0}
    pre = Preprocessor.from_dict(
        {
            "task": "regression",
            "label": ml["label"],
            "numeric": {n: stats for n in feats["numeric"]},
            "categorical": {
                c["name"]: {
                    "encoding": c.get("encoding", "onehot"),
                    "embedding_dim": c.get("embedding_dim", 8),
                    "vocabulary": ["EWR", "JFK", "LGA", "UA", "AA", "ORD"],
                }
                for c in feats["categorical"]
            },
            "buckets": {},
            "label_stats": {"mean": 0.0, "std": 1.0},
        }
    )
    reg = ModelRegistry(registry)
    for version, value in ((1, 10.0), (2, 20.0)):
        art = scratch / f"model-{version}"
        art.mkdir(parents=True)
        pre.save(art)
        write_model_info(art, "spark_gbt", task="regression")
        tree = {
            "feature": [0, -1, -1],
            "threshold": [0.0, 0.0, 0.0],
            "left": [1, -1, -1],
            "right": [2, -1, -1],
            "value": [0.0, -value, value],
        }
        spec = {"weights": [1.0], "trees": [tree], "max_depth": 1}
        (art / "trees.json").write_text(json.dumps(spec))
        meta = {"framework": "spark_gbt", "signature": pre.signature(), "metrics": {"rmse": 1.0}}
        assert reg.register(ml["model_name"], art, meta).version == version
    reg.set_alias(ml["model_name"], "champion", 1)


def flights_row() -> dict:
    ml = yaml.safe_load((ROOT / "pipelines" / "flights.yaml").read_text())["ml"]
    row: dict = {n: 10.0 for n in ml["features"]["numeric"]}
    row["dep_delay"] = 60.0
    row.update({c["name"]: "JFK" for c in ml["features"]["categorical"]})
    return row


S3 = pytest.mark.skipif(
    not os.environ.get("AWS_ENDPOINT_URL") or not os.environ.get("RAYLINE_S3_BUCKET"),
    reason="no object store: start scripts/objectstore.sh and eval its `env` (test.sh does)",
)


@pytest.mark.parametrize("path", ["default", "fast", pytest.param("s3", marks=S3)])
def test_serve_run_flights_config(tmp_path, path):
    """`serve run` as the docs give it: plain, after `eval "$(python -m rayline.serve.env)"`
    (HAProxy in front of the ingress replicas), and with the registry on S3 (a real server;
    the replicas read the model from it with the standard AWS variables)."""
    registry: str | Path = tmp_path / "registry"
    if path == "s3":
        registry = f"s3://{os.environ['RAYLINE_S3_BUCKET']}/tests/serve-{uuid.uuid4().hex[:10]}"
    register_flights_stumps(registry, tmp_path)
    port = free_port()
    config = yaml.safe_load((ROOT / "serve_configs" / "flights.yaml").read_text())
    config["http_options"]["port"] = port  # the only change: a free port for the test
    cfg = tmp_path / "flights.yaml"
    cfg.write_text(yaml.safe_dump(config))
    env = dict(os.environ, RAYLINE_REGISTRY=str(registry), RAY_AUTH_MODE="token")
    env.pop("RAY_ADDRESS", None)
    if path == "fast":
        exports = subprocess.run(
            [sys.executable, "-m", "rayline.serve.env"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for line in exports.splitlines():
            key, _, value = line.removeprefix("export ").partition("=")
            env[key] = shlex.split(value)[0]
        env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] = "1"  # a quick shutdown
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve-run.log"
    with log.open("w") as out:  # a file, not a pipe: Ray's daemons inherit the streams
        proc = subprocess.Popen(
            [str(BIN / "serve"), "run", "--address", "local", str(cfg)],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.time() + 240
        while True:
            assert proc.poll() is None, log.read_text()[-5000:]
            assert time.time() < deadline, log.read_text()[-5000:]
            try:
                if requests.get(f"{url}/readyz", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(1)
        assert requests.get(f"{url}/docs", timeout=10).status_code == 200

        def predict(rows: str, *extra: str) -> subprocess.CompletedProcess:
            return subprocess.run(
                [str(BIN / "rayline"), "predict", "flights_arr_delay", rows, "--url", url, *extra],
                capture_output=True,
                text=True,
                timeout=60,
                env=env,
            )

        r = predict(json.dumps([flights_row(), flights_row() | {"dest": "XYZ"}]))
        assert r.returncode == 0, r.stderr
        lines = r.stdout.splitlines()
        assert lines[0] == "0\tflights_arr_delay@1\t10.0"
        assert lines[1] == "1\tflights_arr_delay@1\t10.0"
        assert "dest unknown_category" in lines[2]
        bad = predict(json.dumps({"dep_delay": "late"}))
        assert bad.returncode == 1 and "HTTP 422" in bad.stderr

        promote = subprocess.run(
            [
                str(BIN / "rayline"),
                "models",
                "promote",
                "flights_arr_delay",
                "2",
                "--registry",
                str(registry),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert promote.returncode == 0, promote.stderr
        deadline = time.time() + 30  # poll_interval_s: 2 in the config
        while True:
            answer = json.loads(predict(json.dumps(flights_row()), "--json").stdout)
            if answer["version"] == 2:
                assert answer["predictions"][0]["prediction"] == 20.0
                break
            assert time.time() < deadline, answer
            time.sleep(0.5)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # serve run shuts the application and Ray down
            try:
                proc.wait(90)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(30)
        if path == "fast":
            shutil.rmtree(env["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"], ignore_errors=True)
