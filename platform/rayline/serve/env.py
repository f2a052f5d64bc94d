"""The Ray Serve settings of Rayline's fast path, as environment variables of the Ray cluster.

Ray Serve reads these when its controller, proxies and replicas start, so they belong in the
environment of whatever starts Ray (``serve run`` on a local Ray, ``ray start`` on a cluster),
not in a Serve config:

- ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1``: direct ingress (each ingress replica serves HTTP itself:
  no proxy actor between the client and the replica), gRPC between deployments, user code on
  the replica's event loop, buffered request logs.
- ``RAY_SERVE_ENABLE_HA_PROXY=1``: HAProxy on ``http_options`` host and port balances over the
  ingress replicas' own ports (and health-checks them).
- ``RAY_SERVE_HAPROXY_RETRY_ON=conn-failure empty-response``: a request whose replica died
  before answering is sent again to another replica (predictions are idempotent).
- ``RAY_SERVE_HAPROXY_NBTHREAD``: HAProxy's threads, half the machine's cores (1 to 4; Serve's
  default is 4). HAProxy shares the cores with the replicas it feeds: on 2 cores its 4 threads
  cost the replicas CPU, and one thread gave 1.2x the requests/s and a 20-35% lower p99 at 64
  concurrent clients (docs/serving.md).
- ``RAY_SERVE_HAPROXY_METRICS_ENABLED=0``: Serve's HTTP request metrics
  (``serve_num_http_requests``, ``serve_http_request_latency_ms``) are recorded by the ingress
  replicas as they answer, instead of HAProxy logging every request to a socket that Serve's
  HAProxyManager parses. Same metrics, less CPU per request: on 2 cores 4-25% more requests/s
  at 64 concurrent clients in 4 of 4 interleaved A/B pairs (docs/serving.md). What HAProxy
  answers itself (no route, no replica up) is then not counted; ``haproxy_metrics=True``
  (``--haproxy-metrics``) keeps Serve's default.
- HAProxy's files (config, admin socket, server state) in a directory of this instance, and its
  stats and metrics ports: the defaults (``/tmp/haproxy-serve``, 8404, 9101) are shared by every
  Ray instance on the machine. HAProxy binds those two ports on all interfaces.

Usage::

    eval "$(python -m rayline.serve.env)"
    serve run serve_configs/flights.yaml

Example:
    >>> env = throughput_env("/tmp/rl-serve", stats_port=18404, metrics_port=19101)
    >>> env["RAY_SERVE_HAPROXY_CONFIG_FILE_LOC"]
    '/tmp/rl-serve/haproxy.cfg'
"""

from __future__ import annotations

import argparse
import os
import shlex
import socket
import sys
import tempfile
from pathlib import Path

__all__ = ["throughput_env"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def throughput_env(
    state_dir: str | os.PathLike[str] | None = None,
    stats_port: int | None = None,
    metrics_port: int | None = None,
    haproxy_threads: int | None = None,
    haproxy_metrics: bool = False,
) -> dict[str, str]:
    """The environment of the fast path (see the module docstring).

    Args:
        state_dir: HAProxy's directory (default: a new temporary one). Keep its path short:
            HAProxy's admin socket goes in a subdirectory and a socket path has at most 107
            characters.
        stats_port: HAProxy's stats port (default: a free one).
        metrics_port: HAProxy's Prometheus port (default: a free one).
        haproxy_threads: HAProxy's threads (default: half the cores, 1 to 4).
        haproxy_metrics: Serve's HTTP metrics from HAProxy's request log (Serve's default)
            instead of from the ingress replicas.

    Returns:
        Variable -> value, to merge into ``os.environ`` before Ray starts.
    """
    d = Path(state_dir) if state_dir else Path(tempfile.mkdtemp(prefix="rayline-haproxy-"))
    return {
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_HAPROXY_RETRY_ON": "conn-failure empty-response",
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(d / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(d / "admin.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(d),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(d / "server-state"),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(stats_port or _free_port()),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(metrics_port or _free_port()),
        "RAY_SERVE_HAPROXY_NBTHREAD": str(haproxy_threads or _haproxy_threads()),
        "RAY_SERVE_HAPROXY_METRICS_ENABLED": "1" if haproxy_metrics else "0",
    }


def _haproxy_threads() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(4, (cores or 2) // 2))


def main(argv: list[str] | None = None) -> int:
    """Print ``export`` lines of :func:`throughput_env` for a shell's ``eval``."""
    p = argparse.ArgumentParser(prog="python -m rayline.serve.env", description=__doc__)
    p.add_argument("--state-dir", help="HAProxy's directory (default: a new temporary one)")
    p.add_argument("--stats-port", type=int, help="HAProxy's stats port (default: a free one)")
    p.add_argument("--metrics-port", type=int, help="HAProxy's metrics port (default: a free one)")
    p.add_argument(
        "--haproxy-threads", type=int, help="HAProxy's threads (default: half the cores, 1 to 4)"
    )
    p.add_argument(
        "--haproxy-metrics",
        action="store_true",
        help="Serve's HTTP metrics from HAProxy's request log (Serve's default) instead of from "
        "the ingress replicas",
    )
    args = p.parse_args(argv)
    env = throughput_env(
        args.state_dir,
        args.stats_port,
        args.metrics_port,
        args.haproxy_threads,
        args.haproxy_metrics,
    )
    for key, value in env.items():
        print(f"export {key}={shlex.quote(value)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
