"""A model's server: one registered model, loaded once per replica, batched with
``@serve.batch``, following its alias in the registry. In split mode it is a deployment of its
own; in fused mode each ingress replica holds one per model; in multiplexed mode the replicas of
one shared deployment (:class:`SharedModels`) load them on demand with ``@serve.multiplexed``.

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
import contextlib
import logging
import threading
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from ..ml.registry import ModelRegistry
from .config import apply_gc_threshold
from .metrics import ModelMetrics
from .scoring import LoadedModel, Scored, dumps, load_version
from .validation import Checked

__all__ = ["ModelConfig", "ModelServer", "SharedModels", "shared_models_class"]

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
        gc_threshold: Garbage-collection thresholds of this replica (None: Python's).
    """

    def __init__(
        self,
        registry: str,
        name: str,
        config: dict[str, Any],
        threads: int | None = 1,
        gc_threshold: tuple[int, int, int] | None = None,
    ) -> None:
        apply_gc_threshold(gc_threshold)
        self._registry = ModelRegistry(registry)
        self._name = name
        self._metrics = ModelMetrics(name)
        self._base = dict(config)  # a user_config override changes only the keys it sets
        self._cfg = ModelConfig.model_validate(config)
        self._stop = threading.Event()
        self._swap = threading.Lock()
        self._inflight = 0
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

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran (the model was evicted or its replica stops)."""
        return self._stop.is_set()

    def close(self) -> None:
        """Stop following the alias; release the batch queue once no request is in flight.

        Serve's multiplexer calls ``__del__`` (hence this) when it evicts the model; it may run
        in a worker thread. The batch queue's task would otherwise keep the model in memory.
        """
        if self._stop.is_set():
            return
        self._stop.set()
        batch = getattr(self, "_score_batch", None)  # (absent if __init__ failed)
        lazy = getattr(getattr(batch, "set_max_batch_size", None), "__self__", None)
        queue = getattr(lazy, "_queue", None)  # created on the first batched request
        task = getattr(queue, "_handle_batch_task", None)
        loop = getattr(queue, "_loop", None)
        if task is None or loop is None or task.done():
            return

        async def release() -> None:
            while self._inflight:  # requests admitted before the eviction finish first
                await asyncio.sleep(0.1)
            task.cancel()

        with contextlib.suppress(RuntimeError):  # a closed loop: nothing left to release
            loop.call_soon_threadsafe(lambda: loop.create_task(release()))

    def __del__(self) -> None:
        if hasattr(self, "_stop"):
            self.close()

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
        self._inflight += 1
        try:
            return await self._predict(body)
        finally:
            self._inflight -= 1

    async def _predict(self, body: bytes) -> tuple[int, bytes]:
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


class SharedModels:
    """The shared model deployment of ``mode: multiplexed`` (named ``models``).

    Each replica loads the models it is asked for on demand, at most ``max_models_per_replica``
    at a time (least recently used evicted): a :class:`ModelServer` per model, so validation,
    batching, alias following and metrics are those of the other modes. The model is the
    request's multiplexed model id (the name in the path), which the ingress sets with
    ``handle.options(multiplexed_model_id=name)`` so Serve routes a request to a replica that
    holds its model. Build the deployable class with :func:`shared_models_class`.

    ``user_config`` (optional): by model name, :class:`ModelConfig` keys over that model's
    settings, applied to the loaded copies and to later loads.

    Args:
        registry: The registry path or URI.
        models: By model name, its initial :class:`ModelConfig` (as a dict): the models served.
        threads: TensorFlow threads in this replica (None: TensorFlow's default).
        gc_threshold: Garbage-collection thresholds of this replica (None: Python's).
    """

    def __init__(
        self,
        registry: str,
        models: dict[str, dict[str, Any]],
        threads: int | None = 1,
        gc_threshold: tuple[int, int, int] | None = None,
    ) -> None:
        apply_gc_threshold(gc_threshold)
        self._registry = registry
        self._configs = {name: dict(cfg) for name, cfg in models.items()}
        self._threads = threads
        self._overrides: dict[str, dict[str, Any]] = {}
        self._servers: dict[str, ModelServer] = {}  # what the multiplexer holds (and closed ones)
        self._loads = 0

    def reconfigure(self, config: dict[str, Any]) -> None:
        """Apply a ``user_config``: per model name, settings over its initial ones."""
        config = dict(config or {})
        unknown = sorted(set(config) - set(self._configs))
        if unknown:
            raise ValueError(f"user_config: no model {', '.join(unknown)} is served here")
        for name, over in config.items():
            ModelConfig.model_validate(self._configs[name] | dict(over or {}))  # fail early
        self._overrides = {name: dict(over or {}) for name, over in config.items()}
        for name, server in self._live().items():
            server.reconfigure(self._overrides.get(name, {}))

    def _live(self) -> dict[str, ModelServer]:
        self._servers = {n: s for n, s in self._servers.items() if not s.closed}
        return dict(self._servers)

    async def get_model(self, name: str) -> ModelServer:
        """The model's server, loaded if needed (``@serve.multiplexed`` in the subclass)."""
        return await self._load(name)

    async def _load(self, name: str) -> ModelServer:
        cfg = self._configs[name] | self._overrides.get(name, {})
        server = await asyncio.to_thread(ModelServer, self._registry, name, cfg, self._threads)
        self._live()
        self._servers[name] = server
        self._loads += 1
        return server

    async def _model(self) -> ModelServer:
        name = serve.get_multiplexed_model_id()
        if name not in self._configs:
            raise ValueError(f"model {name!r} is not served here")
        return await self.get_model(name)

    async def predict(self, body: bytes) -> tuple[int, bytes]:
        """:meth:`ModelServer.predict` of the request's model."""
        return await (await self._model()).predict(body)

    async def info(self) -> dict[str, Any]:
        """:meth:`ModelServer.info` of the request's model (loaded if needed)."""
        return (await self._model()).info()

    async def status(self) -> dict[str, Any]:
        """What this replica holds (nothing is loaded): per model loaded, what it serves; the
        alias-following threads running; how many loads it made; the models it may load."""
        return {
            "loads": self._loads,
            "loaded": {name: s.ready() for name, s in self._live().items()},
            "followers": sorted(
                t.name
                for t in threading.enumerate()
                if t.name.startswith("rayline-follow-") and t.is_alive()
            ),
            "models": sorted(self._configs),
        }

    def __del__(self) -> None:
        for server in list(getattr(self, "_servers", {}).values()):
            server.close()


def shared_models_class(max_models_per_replica: int) -> type[SharedModels]:
    """:class:`SharedModels` whose ``get_model`` is ``@serve.multiplexed`` with this bound
    (the decorator's bound is fixed when a class is defined, so the class is made here)."""

    class MultiplexedModels(SharedModels):
        @serve.multiplexed(max_num_models_per_replica=max_models_per_replica)
        async def get_model(self, name: str) -> ModelServer:
            return await self._load(name)

    MultiplexedModels.__qualname__ = MultiplexedModels.__name__
    return MultiplexedModels


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
