"""The arguments of the serving application: the ``args:`` block of a ``serve run`` config.

Nothing here imports Ray or TensorFlow; a config is validated before anything starts, and a
bad one fails with pydantic's message naming the key.

Example:
    >>> args = ServeArgs.model_validate({
    ...     "registry": "/srv/registry",
    ...     "models": [{"name": "flights_arr_delay", "ref": "champion"}],
    ... })
    >>> args.models[0].deployment_name
    'model-flights_arr_delay'
    >>> args.batching.max_batch_size
    64
"""

from __future__ import annotations

import gc
import os
import re
from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "AuthArgs",
    "BatchingArgs",
    "LimitsArgs",
    "ModelArgs",
    "ServeArgs",
    "DEFAULT_KEYS_ENV",
    "apply_gc_threshold",
]

DEFAULT_KEYS_ENV = "RAYLINE_SERVE_API_KEYS"

_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
_REF = re.compile(r"^([1-9][0-9]*|latest|[A-Za-z][A-Za-z0-9_-]*)$")


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelArgs(_Args):
    """One registered model to serve, under ``/v1/models/{name}``."""

    name: str = Field(..., pattern=_NAME, description="The model's name in the registry.")
    ref: str = Field(
        "champion",
        description="What to serve: an alias (followed when it moves), 'latest', or a version "
        "number (pinned).",
    )

    @field_validator("ref", mode="before")
    @classmethod
    def _ref_text(cls, v: object) -> object:
        return str(v) if isinstance(v, int) and not isinstance(v, bool) else v

    @field_validator("ref")
    @classmethod
    def _ref_shape(cls, v: str) -> str:
        if not _REF.match(v):
            raise ValueError(
                f"{v!r} is not a version number, 'latest' or an alias (letters, digits, '_', "
                "'-', starting with a letter)"
            )
        return v

    @property
    def deployment_name(self) -> str:
        """The Serve deployment serving this model (the key for ``deployments:`` overrides)."""
        return f"model-{self.name}"

    @property
    def pinned(self) -> bool:
        """True for a version number: nothing to follow."""
        return self.ref.isdigit()


class BatchingArgs(_Args):
    """How model replicas batch concurrent requests (``@serve.batch``)."""

    max_batch_size: int = Field(
        64,
        ge=1,
        le=8192,
        description="Most rows in one model call. A request with more rows is scored on its own. "
        "Set the model deployment's max_ongoing_requests to at least this, or Serve caps the "
        "batch at max_ongoing_requests.",
    )
    batch_wait_timeout_s: float = Field(
        0.0,
        ge=0,
        le=1,
        description="How long a batch waits for more rows after its first. 0 takes what is "
        "queued: requests that arrive while the model computes form the next batch, so a lone "
        "request pays no wait and a busy replica still batches.",
    )


class AuthArgs(_Args):
    """API keys: ``Authorization: Bearer <key>`` on the predict and model endpoints.

    Keys are configured as SHA-256 hashes (``python -m rayline.serve.auth new-key`` prints a
    key and its entry), read from an environment variable or a file when the application is
    built; the keys themselves are never stored or logged.
    """

    enabled: bool = Field(False, description="Require a key (health endpoints stay open).")
    keys_env: str | None = Field(
        DEFAULT_KEYS_ENV,
        description="Environment variable holding the key entries (YAML or JSON).",
    )
    keys_file: str | None = Field(
        None, description="A YAML or JSON file of key entries (kept out of the repository)."
    )

    @model_validator(mode="after")
    def _somewhere(self) -> AuthArgs:
        if self.enabled and not (self.keys_env or self.keys_file):
            raise ValueError("auth.enabled needs keys_env or keys_file")
        return self


class LimitsArgs(_Args):
    """Bounds on a request, checked before any row is read."""

    max_body_bytes: int = Field(
        1 << 20, ge=1024, le=64 << 20, description="Largest request body (bytes); larger is 413."
    )
    max_rows: int = Field(
        1000, ge=1, le=100_000, description="Most rows in one request; more is 413."
    )
    request_timeout_s: float = Field(
        30.0, gt=0, le=600, description="How long the ingress waits for a model replica (504)."
    )


class ServeArgs(_Args):
    """Everything ``rayline.serve:app_builder`` needs; the ``args:`` block of a Serve config."""

    registry: str = Field(
        default_factory=lambda: os.environ.get("RAYLINE_REGISTRY", "registry"),
        description="Registry path or URI (default: $RAYLINE_REGISTRY or ./registry). Use an "
        "absolute path or a URI every node can read when deploying to a cluster.",
    )
    models: list[ModelArgs] = Field(..., min_length=1, description="The models to serve.")
    batching: BatchingArgs = Field(default_factory=BatchingArgs, description="Batching.")
    auth: AuthArgs = Field(default_factory=AuthArgs, description="API keys.")
    limits: LimitsArgs = Field(default_factory=LimitsArgs, description="Request bounds.")
    mode: Literal["fused", "split", "multiplexed"] = Field(
        "fused",
        description="fused: the models are loaded in the ingress replicas (one deployment, no "
        "actor call between HTTP and the model: the fast path). split: one deployment per "
        "model behind the ingress (models scale and are placed apart from the HTTP layer; one "
        "more actor call per request). multiplexed: one shared deployment, 'models', whose "
        "replicas load models on demand (@serve.multiplexed), at most max_models_per_replica "
        "each; requests go to a replica that holds their model (many models, few replicas).",
    )
    max_models_per_replica: int = Field(
        3,
        ge=1,
        le=64,
        description="multiplexed mode: most models loaded in one replica of the shared "
        "deployment; loading another evicts the least recently used. Ignored by other modes.",
    )
    poll_interval_s: float = Field(
        2.0,
        ge=0,
        le=3600,
        description="How often a replica re-reads its alias in the registry and loads the "
        "version it points at (0: never; the version loaded at start is served).",
    )
    threads: int | None = Field(
        1,
        ge=1,
        le=256,
        description="TensorFlow threads per model replica (None: TensorFlow's default, one "
        "per core). One thread per replica scales out by replicas without oversubscribing.",
    )
    gc_threshold: tuple[int, int, int] | None = Field(
        (10_000, 100, 100),
        description="Python's garbage-collection thresholds in each replica "
        "(gc.set_threshold: generations 0, 1, 2; None: Python's default 700, 10, 10). A request "
        "allocates many short-lived objects that reference counting frees; at Python's default "
        "a collection ran every few requests and found nothing to free, and the pauses showed "
        "in the p99 latency under load (docs/serving.md).",
    )

    @field_validator("gc_threshold")
    @classmethod
    def _gc_bounds(cls, v: tuple[int, int, int] | None) -> tuple[int, int, int] | None:
        if v is not None and not (
            100 <= v[0] <= 1_000_000 and 1 <= v[1] <= 1000 and 1 <= v[2] <= 1000
        ):
            raise ValueError(
                "gc_threshold: generation 0 between 100 and 1000000, generations 1 and 2 "
                f"between 1 and 1000 (got {list(v)})"
            )
        return v

    @model_validator(mode="after")
    def _unique(self) -> ServeArgs:
        names = [m.name for m in self.models]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"models: {', '.join(dupes)} listed more than once")
        return self


def apply_gc_threshold(threshold: Sequence[int] | None) -> None:
    """Set this process's garbage-collection thresholds (:attr:`ServeArgs.gc_threshold`).

    Args:
        threshold: Generations 0, 1 and 2 for :func:`gc.set_threshold`; None leaves them.
    """
    if threshold is not None:
        gc.set_threshold(*threshold)
