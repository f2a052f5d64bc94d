"""Unit tests never start Ray or Spark (as in Ray's own unit-test conftest)."""

import pytest


@pytest.fixture(autouse=True)
def _no_ray(monkeypatch):
    import ray

    def refuse(*a, **k):
        raise RuntimeError("unit tests must not start Ray; use an integration test")

    monkeypatch.setattr(ray, "init", refuse)
