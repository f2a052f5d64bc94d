"""Test ordering: fast unit tests, then integration tests on the shared Spark-on-Ray session,
then end-to-end tests through the CLIs (which start their own Ray cluster)."""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

_ORDER = {"unit": 0, "integration": 1, "e2e": 2}


def pytest_collection_modifyitems(session, config, items):
    def key(item):
        parts = Path(str(item.fspath)).relative_to(ROOT / "tests").parts
        return _ORDER.get(parts[0], 3)

    items.sort(key=key)
