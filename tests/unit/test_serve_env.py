"""The fast path's environment (rayline.serve.env)."""

import os

from rayline.serve import env as serve_env


def test_throughput_env_keeps_haproxy_files_in_its_directory(tmp_path):
    env = serve_env.throughput_env(tmp_path, stats_port=18404, metrics_port=19101)
    assert env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    assert env["RAY_SERVE_HAPROXY_CONFIG_FILE_LOC"] == str(tmp_path / "haproxy.cfg")
    assert env["RAY_SERVE_HAPROXY_SOCKET_PATH"] == str(tmp_path / "admin.sock")
    assert (env["RAY_SERVE_HAPROXY_STATS_PORT"], env["RAY_SERVE_HAPROXY_METRICS_PORT"]) == (
        "18404",
        "19101",
    )


def test_haproxy_gets_half_the_cores_between_one_and_four(tmp_path, monkeypatch):
    for cores, threads in [(1, 1), (2, 1), (4, 2), (8, 4), (64, 4)]:
        monkeypatch.setattr(os, "sched_getaffinity", lambda _pid, n=cores: set(range(n)))
        env = serve_env.throughput_env(tmp_path, 1, 2)
        assert env["RAY_SERVE_HAPROXY_NBTHREAD"] == str(threads), cores
    assert (
        serve_env.throughput_env(tmp_path, 1, 2, haproxy_threads=3)["RAY_SERVE_HAPROXY_NBTHREAD"]
        == "3"
    )


def test_main_prints_exports(tmp_path, capsys):
    assert serve_env.main(["--state-dir", str(tmp_path), "--haproxy-threads", "2"]) == 0
    out = capsys.readouterr().out
    assert "export RAY_SERVE_HAPROXY_NBTHREAD=2" in out
    assert f"export RAY_SERVE_HAPROXY_CONFIG_FILE_LOC={tmp_path / 'haproxy.cfg'}" in out


def test_serve_http_metrics_come_from_the_replicas_unless_asked(tmp_path, capsys):
    assert serve_env.throughput_env(tmp_path, 1, 2)["RAY_SERVE_HAPROXY_METRICS_ENABLED"] == "0"
    on = serve_env.throughput_env(tmp_path, 1, 2, haproxy_metrics=True)
    assert on["RAY_SERVE_HAPROXY_METRICS_ENABLED"] == "1"
    assert serve_env.main(["--state-dir", str(tmp_path), "--haproxy-metrics"]) == 0
    assert "export RAY_SERVE_HAPROXY_METRICS_ENABLED=1" in capsys.readouterr().out
