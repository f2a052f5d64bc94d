"""The streaming job refuses a window table left by a query whose checkpoint is gone."""

import pytest

from rayline.streaming.job import StreamFailed, _check_window_table


def _sink_log(table, ids):
    log = table / "_spark_metadata"
    log.mkdir(parents=True)
    for i in ids:
        (log / str(i)).write_text("v1\n")
        (log / f".{i}.crc").write_text("")


def _commits(cp, ids):
    (cp / "commits").mkdir(parents=True)
    for i in ids:
        (cp / "commits" / str(i)).write_text("v1\n")


def test_new_table_and_new_checkpoint_start(tmp_path):
    _check_window_table(tmp_path / "t", tmp_path / "cp", "t")


def test_table_of_a_lost_checkpoint_is_refused_naming_table_and_checkpoint(tmp_path):
    table, cp = tmp_path / "wh" / "windows", tmp_path / "cp" / "window"
    _sink_log(table, [0, 1, 2])
    with pytest.raises(StreamFailed) as e:
        _check_window_table(table, cp, "windows")
    msg = str(e.value)
    assert "'windows'" in msg and str(cp) in msg and "3 micro-batch log file(s)" in msg


def test_restart_with_its_checkpoint_continues(tmp_path):
    table, cp = tmp_path / "windows", tmp_path / "window"
    _sink_log(table, [0, 1, 2])
    _commits(cp, [0, 1, 2])
    _check_window_table(table, cp, "windows")


def test_an_empty_sink_log_is_no_output(tmp_path):
    table = tmp_path / "windows"
    (table / "_spark_metadata").mkdir(parents=True)
    _check_window_table(table, tmp_path / "window", "windows")
