"""Test ordering: fast unit tests, then integration tests on the shared Spark-on-Ray session,
then end-to-end tests through the CLIs (which start their own Ray cluster)."""

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

_ORDER = {"unit": 0, "integration": 1, "e2e": 2}


def pytest_collection_modifyitems(session, config, items):
    def key(item):
        parts = Path(str(item.fspath)).relative_to(ROOT / "tests").parts
        return _ORDER.get(parts[0], 3)

    items.sort(key=key)


KAFKA_PORT = os.environ.get("RAYLINE_KAFKA_PORT", "19192")


@pytest.fixture(scope="session")
def kafka():
    """A real Kafka broker (scripts/kafka.sh): the one scripts/test.sh started, or one started
    (and stopped) here. Yields its bootstrap address."""
    env = {**os.environ, "RAYLINE_KAFKA_PORT": KAFKA_PORT}
    script = str(ROOT / "scripts" / "kafka.sh")
    was_running = subprocess.run([script, "status"], env=env, capture_output=True).returncode == 0
    up = subprocess.run([script, "start"], env=env, capture_output=True, text=True, timeout=300)
    assert up.returncode == 0, up.stdout + up.stderr
    try:
        yield f"127.0.0.1:{KAFKA_PORT}"
    finally:
        if not was_running:
            subprocess.run([script, "stop"], env=env, capture_output=True, timeout=120)
