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

Metrics are created in the replica that records them (never at import).
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

__all__ = ["IngressMetrics", "ModelMetrics"]

LATENCY_MS = [1.0, 2, 3, 5, 7.5, 10, 15, 20, 30, 50, 75, 100, 200, 500, 1000, 2000, 5000, 10000]
BATCH_ROWS = [1.0, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192]


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

    def record(self, model: str, status: int, seconds: float, error: str | None) -> None:
        m = self._m
        m["requests"].inc(tags={"model": model, "status": str(status)})
        m["latency"].observe(seconds * 1000.0, tags={"model": model})
        if error:
            m["errors"].inc(tags={"model": model, "kind": error})


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

    def batch(self, rows: int, version: int) -> None:
        self._m["batch"].observe(rows, tags={"model": self.model})
        self._m["rows"].inc(rows, tags={"model": self.model, "version": str(version)})

    def flags(self, counts: dict[str, int]) -> None:
        for flag, n in counts.items():
            if n:
                self._m["flags"].inc(n, tags={"model": self.model, "flag": flag})
