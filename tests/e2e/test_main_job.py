"""The README's main job (`scripts/run_example.sh`) end to end, as on a machine where Ray has
never run: an empty HOME (no ~/.ray/auth_token, no caches), no RAY_AUTH_TOKEN(_PATH), a fresh
Ray temp directory. Checks what it promises: the three Ray jobs succeeded, a champion in the
registry, predictions from the endpoint and from the streaming job's topic, and a succeeded
stream run; then stops what the job leaves running (Serve, the broker, the cluster).

It takes 10-15 minutes on 2 cores, so it runs only when RAYLINE_TEST_MAIN_JOB=1 (.ci/run sets
it and runs this file once after the test suite). It uses the main job's own ports (6379, 8265,
8000, Kafka 19092): run it where no other cluster holds them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        os.environ.get("RAYLINE_TEST_MAIN_JOB") != "1",
        reason="the main job takes 10-15 minutes: set RAYLINE_TEST_MAIN_JOB=1 (.ci/run does)",
    ),
]


def _fresh_env(home: Path, ray_tmp: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS")
        and not k.startswith(("RAYLINE_", "AWS_"))
    }
    env.update(
        HOME=str(home),
        RAYLINE_RAY_TEMP_DIR=str(ray_tmp),
        RAYLINE_DEMO_EVENTS="600",
        RAYLINE_TUNE_SAMPLES="2",
        PATH=f"{BIN}:{os.environ.get('PATH', '')}",
    )
    env.pop("RAY_AUTH_MODE", None)  # the scripts set it themselves
    return env


def _stop_all(env: dict[str, str]) -> None:
    for cmd in (
        [str(BIN / "serve"), "shutdown", "--address", "http://127.0.0.1:8265", "-y"],
        [str(ROOT / "scripts" / "kafka.sh"), "stop"],
        [str(ROOT / "scripts" / "cluster.sh"), "down"],
    ):
        subprocess.run(
            cmd,
            env={**env, "RAY_AUTH_MODE": "token"},
            cwd=ROOT,
            timeout=180,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )


def test_main_job_from_nothing(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    ray_tmp = Path(tempfile.mkdtemp(prefix="rl-main-", dir="/tmp"))  # short: socket paths
    env = _fresh_env(home, ray_tmp)
    log = ROOT / "benchmarks" / "out" / "main-job.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    started = (
        {p.name for p in (ROOT / "runs").iterdir() if p.is_dir()}
        if (ROOT / "runs").is_dir()
        else set()
    )
    try:
        with log.open("w") as f:  # a file, not a pipe: Ray's daemons inherit the streams
            done = subprocess.run(
                [str(ROOT / "scripts" / "run_example.sh")],
                env=env,
                cwd=ROOT,
                stdout=f,
                stderr=subprocess.STDOUT,
                timeout=2400,
            )
        out = log.read_text()
        assert done.returncode == 0, out[-6000:]

        # The token was created by the cluster script, in the empty HOME, readable by root only.
        token = home / ".ray" / "auth_token"
        assert token.is_file() and token.stat().st_mode & 0o077 == 0
        assert token.read_text().strip() not in out, "the token was printed"

        # Three Ray jobs, each followed to SUCCEEDED (demo.sh exits 1 otherwise).
        for name in ("pipeline", "train", "stream"):
            assert f"job rayline-{name}-" in out

        # A champion in the registry.
        models = subprocess.run(
            [str(BIN / "rayline"), "models", "list", "--registry", str(ROOT / "registry")],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert models.returncode == 0, models.stderr
        assert "champion" in models.stdout, models.stdout

        # Predictions from the endpoint (three flights) and from the streaming job's topic.
        section = out.split("three predictions from the topic", 1)
        assert len(section) == 2, out[-3000:]
        tail = [ln for ln in section[1].splitlines() if re.match(r"\s*\d+:\d+ ", ln)]
        assert len(tail) >= 3, section[1][:2000]
        value = json.loads(tail[0].split(" ", 2)[2])
        assert isinstance(value.get("prediction"), float), value

        # The runs this job made: a batch run, a training run and a stream run, all succeeded.
        new = [
            json.loads((p / "run.json").read_text())
            for p in (ROOT / "runs").iterdir()
            if p.name not in started and (p / "run.json").is_file()
        ]
        assert {r.get("status") for r in new} == {"succeeded"}, [
            (r.get("run_id"), r.get("status")) for r in new
        ]
        types = {s["type"] for r in new for s in r["stages"]}
        assert len(new) >= 3 and {"ml", "streaming"} <= types, sorted(types)
    finally:
        _stop_all(env)
        shutil.rmtree(ray_tmp, ignore_errors=True)
