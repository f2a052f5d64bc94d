"""Publishing writes the quarantine and curated tables at once (no Spark: write_table faked)."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest

from rayline import runner


def test_both_tables_are_written_at_once_and_returned_in_order(monkeypatch):
    started = {"q": threading.Event(), "c": threading.Event()}

    def fake_write(spark, df, out, warehouse, run_id):
        started[df].set()
        other = "c" if df == "q" else "q"
        # each write waits for the other to have started: only concurrent writes get past this
        assert started[other].wait(5), "the writes did not overlap"
        return {"table": out, "rows": len(df), "run": run_id}

    monkeypatch.setattr(runner, "write_table", fake_write)
    q, c = runner._write_both(None, ("q", "quarantine"), ("c", "curated"), "wh", "r1")
    assert q["table"] == "quarantine" and c["table"] == "curated" and c["run"] == "r1"


def test_a_failed_write_raises_and_cancels_the_other(monkeypatch):
    release = threading.Event()
    cancelled = []

    def fake_write(spark, df, out, warehouse, run_id):
        if df == "q":
            raise OSError("disk full")
        release.wait(5)  # a long curated write, until its jobs are cancelled
        raise RuntimeError("cancelled")

    def cancel():
        cancelled.append(True)
        release.set()

    spark = SimpleNamespace(sparkContext=SimpleNamespace(cancelAllJobs=cancel))
    monkeypatch.setattr(runner, "write_table", fake_write)
    with pytest.raises(OSError, match="disk full"):
        runner._write_both(spark, ("q", "quarantine"), ("c", "curated"), "wh", "r1")
    assert cancelled == [True]
