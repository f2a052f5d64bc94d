"""Serving metrics as Ray metrics (``ray.util.metrics``), exported with Ray's own to Prometheus
and the dashboard's metrics view. Names carry the ``rayline_serve_`` prefix; Ray adds ``ray_``.

- ``rayline_serve_requests`` (counter; model, status): answered requests by HTTP status.
- ``rayline_serve_request_latency_ms`` (histogram; model): time in the ingress per request.
- ``rayline_serve_errors`` (counter; model, kind): failed requests by kind (``validation``,
  ``too_large``, ``auth``, ``forbidden``, ``not_found``, ``unavailable``, ``timeout``,
  ``internal``).
- ``rayline_serve_batch_size`` (histogram; model): rows per model call in a replica.
- ``rayline_serve_rows`` (counter; model, version): rows scored, by the version that scored them.
- ``rayline_serve_flags`` (counter; model, flag): flagged values served (``unknown_category``,
  ``out_of_range``, ``non_finite_prediction``).

Metrics are created in the replica that records them (never at import). Recorded values are
kept in the replica and handed to Ray every 0.1 s (as Ray Serve does with its own request
metrics): one Ray counter call per tag set per flush instead of one per request.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from functools import cached_property
from typing import Any

__all__ = ["IngressMetrics", "ModelMetrics"]

LATENCY_MS = [1.0, 2, 3, 5, 7.5, 10, 15, 20, 30, 50, 75, 100, 200, 500, 1000, 2000, 5000, 10000]
BATCH_ROWS = [1.0, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192]


FLUSH_S = 0.1


class _Pending:
    """Counter increments and histogram observations held back for up to ``FLUSH_S``.

    A flush is scheduled on the running event loop by the first value after the last flush;
    outside an event loop values go to Ray at once.
    """

    def __init__(self, metrics: dict[str, Any]) -> None:
        self._metrics = metrics
        self._counts: defaultdict[tuple[str, tuple[tuple[str, str], ...]], float] = defaultdict(
            float
        )
        self._values: defaultdict[tuple[str, tuple[tuple[str, str], ...]], list[float]] = (
            defaultdict(list)
        )
        self._scheduled = False

    def inc(self, name: str, tags: tuple[tuple[str, str], ...], value: float = 1.0) -> None:
        self._counts[(name, tags)] += value
        self._schedule()

    def observe(self, name: str, tags: tuple[tuple[str, str], ...], value: float) -> None:
        self._values[(name, tags)].append(value)
        self._schedule()

    def _schedule(self) -> None:
        if self._scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not in an event loop: nothing would flush later
            self.flush()
            return
        self._scheduled = True
        loop.call_later(FLUSH_S, self.flush)

    def flush(self) -> None:
        """Hand everything held to Ray's metrics."""
        self._scheduled = False
        counts, self._counts = self._counts, defaultdict(float)
        values, self._values = self._values, defaultdict(list)
        for (name, tags), n in counts.items():
            self._metrics[name].inc(n, tags=dict(tags))
        for (name, tags), xs in values.items():
            metric, t = self._metrics[name], dict(tags)
            for x in xs:
                metric.observe(x, tags=t)


class IngressMetrics:
    """The ingress's request, latency and error metrics."""

    @cached_property
    def _m(self) -> dict[str, Any]:
        from ray.util.metrics import Counter, Histogram

        return {
            "requests": Counter(
                "rayline_serve_requests",
                description="Requests answered, by model and HTTP status.",
                tag_keys=("model", "status"),
            ),
            "latency": Histogram(
                "rayline_serve_request_latency_ms",
                description="Request latency in the ingress (ms), by model.",
                boundaries=LATENCY_MS,
                tag_keys=("model",),
            ),
            "errors": Counter(
                "rayline_serve_errors",
                description="Failed requests, by model and kind.",
                tag_keys=("model", "kind"),
            ),
        }

    @cached_property
    def _pending(self) -> _Pending:
        return _Pending(self._m)

    def record(self, model: str, status: int, seconds: float, error: str | None) -> None:
        p = self._pending
        p.inc("requests", (("model", model), ("status", str(status))))
        p.observe("latency", (("model", model),), seconds * 1000.0)
        if error:
            p.inc("errors", (("model", model), ("kind", error)))


class ModelMetrics:
    """A model replica's batch-size, row and flag metrics."""

    def __init__(self, model: str) -> None:
        self.model = model

    @cached_property
    def _m(self) -> dict[str, Any]:
        from ray.util.metrics import Counter, Histogram

        return {
            "batch": Histogram(
                "rayline_serve_batch_size",
                description="Rows per model call, by model.",
                boundaries=BATCH_ROWS,
                tag_keys=("model",),
            ),
            "rows": Counter(
                "rayline_serve_rows",
                description="Rows scored, by model and version.",
                tag_keys=("model", "version"),
            ),
            "flags": Counter(
                "rayline_serve_flags",
                description="Flagged values served, by model and flag.",
                tag_keys=("model", "flag"),
            ),
        }

    @cached_property
    def _pending(self) -> _Pending:
        return _Pending(self._m)

    def batch(self, rows: int, version: int) -> None:
        p = self._pending
        p.observe("batch", (("model", self.model),), rows)
        p.inc("rows", (("model", self.model), ("version", str(version))), rows)

    def flags(self, counts: dict[str, int]) -> None:
        for flag, n in counts.items():
            if n:
                self._pending.inc("flags", (("model", self.model), ("flag", flag)), n)
