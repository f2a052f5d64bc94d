"""A model's server: one registered model, loaded once per replica, batched with
``@serve.batch``, following its alias in the registry. In split mode it is a deployment of its
own; in fused mode each ingress replica holds one per model.

In split mode, settings that may change while the deployment runs arrive as its
``user_config`` (:class:`ModelConfig`) and are applied in place by
:meth:`ModelServer.reconfigure`: a new ``ref`` (e.g. pinning a version to roll back) loads that
version without restarting the replica.

Alias moves: a background thread re-reads the alias every ``poll_interval_s`` seconds; when it
points at another version, the replica loads and warms that version, then swaps it in with one
assignment. Requests already admitted finish on the version they were checked against; every
answer names its version. A registry that cannot be read leaves the replica serving what it has.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from ..ml.registry import ModelRegistry
from .metrics import ModelMetrics
from .scoring import LoadedModel, Scored, dumps, load_version
from .validation import Checked

__all__ = ["ModelConfig", "ModelServer"]

log = logging.getLogger("ray.serve")


class ModelConfig(BaseModel):
    """A model deployment's ``user_config`` (applied in place when it changes)."""

    model_config = ConfigDict(extra="forbid")

    ref: str = Field("champion", description="Alias, 'latest' or version number to serve.")
    max_batch_size: int = Field(64, ge=1, le=8192, description="Most rows per model call.")
    batch_wait_timeout_s: float = Field(0.0, ge=0, le=1, description="Wait for a fuller batch.")
    poll_interval_s: float = Field(2.0, ge=0, le=3600, description="Alias re-read period (0: off).")
    max_rows: int = Field(1000, ge=1, le=100_000, description="Most rows in one request.")


def _rows(items: list[tuple[LoadedModel, Checked]]) -> int:
    return sum(checked.rows for _, checked in items)


class ModelServer:
    """Serves one model of a registry (deployed by :func:`rayline.serve.app_builder`).

    Args:
        registry: The registry path or URI.
        name: The model name.
        config: The initial :class:`ModelConfig` (as a dict).
        threads: TensorFlow threads in this replica (None: TensorFlow's default).
    """

    def __init__(
        self, registry: str, name: str, config: dict[str, Any], threads: int | None = 1
    ) -> None:
        self._registry = ModelRegistry(registry)
        self._name = name
        self._metrics = ModelMetrics(name)
        self._base = dict(config)  # a user_config override changes only the keys it sets
        self._cfg = ModelConfig.model_validate(config)
        self._stop = threading.Event()
        self._swap = threading.Lock()
        mv = self._registry.get(name, self._cfg.ref)
        if mv.metadata.get("framework", "keras") == "keras":
            from ..ml.keras_model import use_tf_keras

            use_tf_keras(threads)  # before TensorFlow starts in this process
        self._loaded: LoadedModel = load_version(self._registry, mv)
        # One batch queue per instance (several models may share a process).
        self._score_batch = serve.batch(
            max_batch_size=self._cfg.max_batch_size,
            batch_wait_timeout_s=self._cfg.batch_wait_timeout_s,
            batch_size_fn=_rows,
        )(self._score_items)
        self._poller = threading.Thread(
            target=self._follow, name=f"rayline-follow-{name}", daemon=True
        )
        self._poller.start()

    # -- configuration and alias moves -------------------------------------------------------

    def reconfigure(self, config: dict[str, Any]) -> None:
        """Apply a ``user_config`` over the initial settings: batching, limits, poll period and
        the ref to serve (a new ref loads its version before this returns)."""
        cfg = ModelConfig.model_validate(self._base | dict(config or {}))
        old, self._cfg = self._cfg, cfg
        self._apply_batching()
        if cfg.ref != old.ref:
            log.info("model %s: ref %s -> %s", self._name, old.ref, cfg.ref)
            self._refresh()

    def _apply_batching(self) -> None:
        batch: Any = self._score_batch
        batch.set_max_batch_size(self._cfg.max_batch_size)
        batch.set_batch_wait_timeout_s(self._cfg.batch_wait_timeout_s)

    def _refresh(self) -> bool:
        """Load the version the ref names now, if it is not the one served; True if swapped."""
        with self._swap:
            mv = self._registry.get(self._name, self._cfg.ref)
            if mv.version == self._loaded.version:
                return False
            previous = self._loaded.version
            self._loaded = load_version(self._registry, mv)
        log.info(
            "model %s: now serving version %d (was %d; %s)",
            self._name,
            mv.version,
            previous,
            self._cfg.ref,
        )
        return True

    def _follow(self) -> None:
        while not self._stop.wait(self._cfg.poll_interval_s or 5.0):
            if self._cfg.poll_interval_s == 0 or self._cfg.ref.isdigit():
                continue
            try:
                self._refresh()
            except Exception as e:  # a registry hiccup must not stop serving
                log.warning(
                    "model %s: cannot follow %r (still serving version %d): %s",
                    self._name,
                    self._cfg.ref,
                    self._loaded.version,
                    e,
                )

    def __del__(self) -> None:
        self._stop.set()

    # -- requests ----------------------------------------------------------------------------

    def ready(self) -> dict[str, Any]:
        """What this replica serves: name, version, ref."""
        return {"name": self._name, "version": self._loaded.version, "ref": self._cfg.ref}

    def info(self) -> dict[str, Any]:
        """The served version's name, version, task, metrics and signature."""
        return self._loaded.info() | {"ref": self._cfg.ref}

    async def predict(self, body: bytes) -> tuple[int, bytes]:
        """Answer a predict request body: ``(HTTP status, JSON bytes)``.

        Bad input is answered (413/422), never raised.
        """
        loaded = self._loaded  # the version this request is checked against and scored by
        checked, error = loaded.check(body, self._cfg.max_rows)
        if checked is None:
            status, doc = error
            return status, dumps(doc)
        if checked.rows > self._cfg.max_batch_size:  # already a batch: score it on its own
            scored = await asyncio.to_thread(loaded.score, [checked])
            self._metrics.batch(checked.rows, loaded.version)
            start = 0
        else:
            scored, start = await self._score_batch((loaded, checked))
        doc, flags = loaded.answer(scored, start, checked)
        self._metrics.flags(flags)
        return 200, dumps(doc)

    async def _score_items(
        self, items: list[tuple[LoadedModel, Checked]]
    ) -> list[tuple[Scored, int]]:
        results, sizes = await asyncio.to_thread(_score_groups, items)
        for version, rows in sizes:
            self._metrics.batch(rows, version)
        return results


def _score_groups(
    items: list[tuple[LoadedModel, Checked]],
) -> tuple[list[tuple[Scored, int]], list[tuple[int, int]]]:
    """One model call per version in the batch (one, except right after an alias move)."""
    results: list[Any] = [None] * len(items)
    groups: dict[int, list[int]] = {}
    for k, (loaded, _) in enumerate(items):
        groups.setdefault(id(loaded), []).append(k)
    sizes = []
    for ks in groups.values():
        loaded = items[ks[0]][0]
        batch = [items[k][1] for k in ks]
        scored = loaded.score(batch)
        offset = 0
        for k, checked in zip(ks, batch, strict=True):
            results[k] = (scored, offset)
            offset += checked.rows
        sizes.append((loaded.version, offset))
    return results, sizes
