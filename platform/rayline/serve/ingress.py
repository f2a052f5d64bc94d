"""The HTTP API (FastAPI, OpenAPI docs at ``/docs``), served by the ingress deployment.

- ``POST /v1/models/{name}/predict``: a row (JSON object) or a list of rows; per-row predictions
  with the model name and version that produced them.
- ``GET /v1/models``: the served models, the version each serves, their registry versions,
  aliases and metrics.
- ``GET /v1/models/{name}``: the served version's signature, metrics and a JSON Schema of a row.
- ``GET /healthz`` (the ingress answers) and ``GET /readyz`` (every model has a replica that
  answers; in multiplexed mode, the shared deployment answers: a model not loaded yet is
  reported ``"loaded": false`` and loaded by its next request), both open.

The ingress checks the API key and the body size, then hands the body to the model deployment,
which parses and checks it against the version it serves (so checks and model never disagree),
scores it in a batch and answers the JSON. A replica that dies under a request is retried on
another; when none answers, the client gets 503 with ``Retry-After``.
"""

# No `from __future__ import annotations`: FastAPI reads the route signatures at run time.
import asyncio
import logging
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayTaskError
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    ReplicaUnavailableError,
)
from ray.serve.handle import DeploymentHandle

from ..ml.registry import ModelRegistry, RegistryError
from .auth import ApiKey, KeyRing
from .config import apply_gc_threshold
from .metrics import IngressMetrics
from .model import ModelServer
from .validation import row_json_schema

__all__ = ["Ingress", "api"]

log = logging.getLogger("ray.serve")

_RETRIES = 3
_RETRYABLE = (ActorDiedError, ActorUnavailableError, ReplicaUnavailableError)
_UNAVAILABLE = (BackPressureError, DeploymentUnavailableError)


# -- documentation models (the answers are written as JSON bytes by the model replicas) ------


class Issue(BaseModel):
    """One problem with a request: where (row, field) and what (type, msg)."""

    loc: list[str | int] = Field(..., description='["body", row, field], as FastAPI writes it.')
    row: int | None = Field(None, description="Index of the row in the request.")
    field: str | None = Field(None, description="The input concerned.")
    type: str = Field(..., description="missing, unexpected_field, wrong_type, not_finite, ...")
    msg: str = Field(..., description="What is wrong.")


class Prediction(BaseModel):
    """The answer for one row."""

    model: str = Field(..., description="The model name.")
    version: int = Field(..., description="The version that produced this prediction.")
    prediction: float | str | None = Field(
        ..., description="The value (regression) or the class (classification)."
    )
    probability: float | None = Field(None, description="Binary: P(positive class).")
    probabilities: dict[str, float | None] | None = Field(
        None, description="Classification: probability per class."
    )
    warnings: list[Issue] | None = Field(
        None, description="Values served but flagged: unknown_category, out_of_range."
    )


class PredictAnswer(BaseModel):
    model: str
    version: int = Field(..., description="The version that answered.")
    predictions: list[Prediction]


class InvalidRequest(BaseModel):
    detail: list[Issue] = Field(..., description="Every problem found, per row and field.")
    model: str | None = None
    version: int | None = None


class Message(BaseModel):
    detail: str


_ROW_SCHEMA = {
    "type": "object",
    "description": "Feature values by input name: every input of the model's signature "
    "(GET /v1/models/{name}), nothing else.",
    "additionalProperties": {"type": ["number", "string", "boolean", "null"]},
}
_PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "oneOf": [
                        _ROW_SCHEMA,
                        {"type": "array", "items": _ROW_SCHEMA, "minItems": 1},
                    ]
                }
            }
        },
    }
}


class _Remote:
    """A model served by its own deployment (one actor call per request)."""

    def __init__(self, handle: DeploymentHandle) -> None:
        self._handle = handle

    async def predict(self, body: bytes) -> tuple[int, bytes]:
        result: tuple[int, bytes] = await self._handle.predict.remote(body)
        return result

    async def ready(self) -> dict[str, Any]:
        ready: dict[str, Any] = await self._handle.ready.remote()
        return ready

    async def info(self) -> dict[str, Any]:
        info: dict[str, Any] = await self._handle.info.remote()
        return info


class _Multiplexed:
    """A model loaded on demand by the replicas of the shared deployment (multiplexed mode):
    Serve routes the call to a replica that holds the model when one does."""

    def __init__(self, handle: DeploymentHandle, name: str) -> None:
        self._handle = handle.options(multiplexed_model_id=name)
        self._name = name

    async def predict(self, body: bytes) -> tuple[int, bytes]:
        result: tuple[int, bytes] = await self._handle.predict.remote(body)
        return result

    async def ready(self) -> dict[str, Any]:
        """What the replica asked serves of the model; a model it does not hold (loaded on the
        next request) is ``{"loaded": False}``: readiness never loads or evicts a model."""
        status: dict[str, Any] = await self._handle.status.remote()
        served: dict[str, Any] | None = status["loaded"].get(self._name)
        if served is None:
            return {"name": self._name, "loaded": False}
        return served | {"loaded": True}

    async def info(self) -> dict[str, Any]:
        info: dict[str, Any] = await self._handle.info.remote()
        return info


class _Local:
    """A model loaded in the ingress replica itself (no actor call per request)."""

    def __init__(self, server: ModelServer) -> None:
        self._server = server

    async def predict(self, body: bytes) -> tuple[int, bytes]:
        return await self._server.predict(body)

    async def ready(self) -> dict[str, Any]:
        return self._server.ready()

    async def info(self) -> dict[str, Any]:
        return self._server.info()


api = FastAPI(
    title="Rayline model serving",
    version="1",
    description="Registered Rayline models behind Ray Serve: batched, validated against each "
    "model's signature, authenticated with API keys (Authorization: Bearer).",
)


def _json(status: int, doc: Any, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(doc, status_code=status, headers=headers)


@serve.ingress(api)
class Ingress:
    """The HTTP front of the application (deployed by :func:`rayline.serve.app_builder`).

    Args:
        models: By model name, the model's deployment (a handle), the arguments of a
            :class:`~rayline.serve.model.ModelServer` to load it in this replica ("fused"), or
            None for a model of the ``shared`` deployment ("multiplexed").
        registry: The registry path or URI (for ``GET /v1/models``).
        keys: API key entries (``id``, ``sha256``, ``models``); None: no auth.
        max_body_bytes: Largest body accepted.
        request_timeout_s: How long to wait for a model replica.
        shared: The shared model deployment (multiplexed mode), whose replicas load the models
            on demand; the model name is the multiplexed model id.
        gc_threshold: Garbage-collection thresholds of this replica (None: Python's).
    """

    def __init__(
        self,
        models: dict[str, DeploymentHandle | dict[str, Any] | None],
        registry: str,
        keys: list[dict[str, Any]] | None,
        max_body_bytes: int,
        request_timeout_s: float,
        shared: DeploymentHandle | None = None,
        gc_threshold: tuple[int, int, int] | None = None,
    ) -> None:
        apply_gc_threshold(gc_threshold)
        self._models: dict[str, _Remote | _Local | _Multiplexed] = {}
        for name, m in models.items():
            if m is None:
                if shared is None:
                    raise ValueError(f"model {name!r}: no shared deployment to serve it")
                self._models[name] = _Multiplexed(shared, name)
            elif isinstance(m, DeploymentHandle):
                self._models[name] = _Remote(m)
            else:
                self._models[name] = _Local(ModelServer(**m))
        self._registry = registry
        self._keys = None if keys is None else KeyRing([ApiKey(**k) for k in keys])
        self._max_body = max_body_bytes
        self._timeout = request_timeout_s
        self._metrics = IngressMetrics()

    # -- access --------------------------------------------------------------------------------

    def _deny(self, request: Request, model: str | None) -> tuple[JSONResponse, str] | None:
        """401/403 answer (and error kind) when the request may not go on; None if it may."""
        if self._keys is None:
            return None
        key = self._keys.identify(request.headers.get("authorization"))
        if key is None:
            return (
                _json(
                    401,
                    {"detail": "missing or unknown API key: send Authorization: Bearer <key>"},
                    {"WWW-Authenticate": "Bearer"},
                ),
                "auth",
            )
        if model is not None and not key.allows(model):
            return _json(
                403, {"detail": f"key {key.id!r} may not use model {model!r}"}
            ), "forbidden"
        return None

    def _visible(self, request: Request) -> list[str]:
        if self._keys is None:
            return list(self._models)
        key = self._keys.identify(request.headers.get("authorization"))
        return [m for m in self._models if key is not None and key.allows(m)]

    def _unknown(self, name: str) -> JSONResponse:
        served = ", ".join(sorted(self._models))
        return _json(404, {"detail": f"no model {name!r} is served here (served: {served})"})

    # -- predict -------------------------------------------------------------------------------

    @api.post(
        "/v1/models/{name}/predict",
        summary="Predict one row or a list of rows",
        response_model=PredictAnswer,
        responses={
            401: {"model": Message, "description": "No or unknown API key."},
            403: {"model": Message, "description": "The key may not use this model."},
            404: {"model": Message, "description": "No such model served."},
            413: {"model": InvalidRequest, "description": "Body or row count over the limit."},
            422: {"model": InvalidRequest, "description": "Invalid rows: reasons per field."},
            503: {"model": Message, "description": "No replica available; retry later."},
            504: {"model": Message, "description": "The model did not answer in time."},
        },
        openapi_extra=_PREDICT_BODY,
    )
    async def predict(self, name: str, request: Request) -> Response:
        t0 = time.perf_counter()
        response, error = await self._predict(name, request)
        self._metrics.record(
            name if name in self._models else "<unknown>",
            response.status_code,
            time.perf_counter() - t0,
            error,
        )
        return response

    async def _predict(self, name: str, request: Request) -> tuple[Response, str | None]:
        denied = self._deny(request, name)
        if denied is not None:
            return denied
        model = self._models.get(name)
        if model is None:
            return self._unknown(name), "not_found"
        body = await self._read_body(request)
        if body is None:
            detail = {
                "loc": ["body"],
                "row": None,
                "field": None,
                "type": "body_too_large",
                "msg": f"body larger than {self._max_body} bytes",
            }
            return _json(413, {"detail": [detail]}), "too_large"
        try:
            status, payload = await self._call(model, body)
        except TimeoutError:
            msg = f"model {name!r} did not answer within {self._timeout:g}s"
            return _json(504, {"detail": msg}), "timeout"
        except (*_RETRYABLE, *_UNAVAILABLE) as e:
            log.warning("model %s unavailable: %s", name, type(e).__name__)
            return (
                _json(
                    503,
                    {"detail": f"model {name!r} is unavailable; retry shortly"},
                    {"Retry-After": "1"},
                ),
                "unavailable",
            )
        except RayTaskError as e:
            log.error("model %s failed on a request: %s", name, e)
            return _json(500, {"detail": f"model {name!r} failed; see the replica's log"}), (
                "internal"
            )
        error = None if status == 200 else ("too_large" if status == 413 else "validation")
        return Response(payload, status_code=status, media_type="application/json"), error

    async def _read_body(self, request: Request) -> bytes | None:
        """The body, or None if it is over the limit (by its header or by what arrives)."""
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self._max_body:
            return None
        chunks = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self._max_body:
                return None
            chunks.append(chunk)
        return b"".join(chunks)

    async def _call(self, model: _Remote | _Local | _Multiplexed, body: bytes) -> tuple[int, bytes]:
        """The model replica's answer; a replica that dies under the request is retried."""
        deadline = time.monotonic() + self._timeout
        for attempt in range(1, _RETRIES + 1):
            try:
                # asyncio.timeout, not wait_for: no task per request (3.11's wait_for makes one).
                async with asyncio.timeout(max(0.001, deadline - time.monotonic())):
                    result: tuple[int, bytes] = await model.predict(body)
                return result
            except _RETRYABLE:
                if attempt == _RETRIES or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05 * attempt)
        raise AssertionError("unreachable")

    # -- models --------------------------------------------------------------------------------

    @api.get(
        "/v1/models",
        summary="Served models: the version each serves, registry versions, aliases, metrics",
        responses={401: {"model": Message}},
    )
    async def list_models(self, request: Request) -> Response:
        denied = self._deny(request, None)
        if denied is not None:
            return denied[0]
        names = self._visible(request)
        serving = await asyncio.gather(*(self._ready(n) for n in names))
        listing = await asyncio.to_thread(self._registry_listing, names)
        out = [
            {"name": n, "serving": s, **listing.get(n, {})}
            for n, s in zip(names, serving, strict=True)
        ]
        return _json(200, {"models": out})

    def _registry_listing(self, names: list[str]) -> dict[str, dict[str, Any]]:
        reg = ModelRegistry(self._registry)
        out: dict[str, dict[str, Any]] = {}
        for n in names:
            try:
                out[n] = {
                    "aliases": reg.aliases(n),
                    "versions": [
                        {
                            "version": mv.version,
                            "created_at": mv.metadata.get("created_at"),
                            "framework": mv.metadata.get("framework"),
                            "aliases": mv.aliases,
                            "metrics": mv.metadata.get("metrics"),
                        }
                        for mv in reg.versions(n)
                    ],
                }
            except (RegistryError, OSError) as e:
                out[n] = {"registry_error": str(e)}
        return out

    @api.get(
        "/v1/models/{name}",
        summary="The served version of a model: signature, metrics, JSON Schema of a row",
        responses={401: {"model": Message}, 403: {"model": Message}, 404: {"model": Message}},
    )
    async def describe_model(self, name: str, request: Request) -> Response:
        denied = self._deny(request, name)
        if denied is not None:
            return denied[0]
        model = self._models.get(name)
        if model is None:
            return self._unknown(name)
        try:
            info = await asyncio.wait_for(model.info(), self._timeout)
        except (TimeoutError, *_RETRYABLE, *_UNAVAILABLE):
            return _json(503, {"detail": f"model {name!r} is unavailable"}, {"Retry-After": "1"})
        info["row_schema"] = row_json_schema(info["signature"])
        return _json(200, info)

    # -- health --------------------------------------------------------------------------------

    @api.get("/healthz", summary="Liveness: the ingress answers (no key needed)")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get(
        "/readyz",
        summary="Readiness: every model has a replica that answers (no key needed)",
        responses={503: {"description": "A model has no replica answering."}},
    )
    async def readyz(self) -> Response:
        names = list(self._models)
        states = await asyncio.gather(*(self._ready(n) for n in names))
        models = dict(zip(names, states, strict=True))
        # multiplexed: a model no replica holds yet is ready (loaded on its first request)
        ok = all("version" in s or s.get("loaded") is False for s in states)
        return _json(
            200 if ok else 503, {"status": "ready" if ok else "not_ready", "models": models}
        )

    async def _ready(self, name: str) -> dict[str, Any]:
        try:
            ready: dict[str, Any] = await asyncio.wait_for(
                self._models[name].ready(), min(5.0, self._timeout)
            )
            return ready
        except Exception as e:  # any failure means not ready; the answer says which
            return {"error": f"{type(e).__name__}: {e}"[:300]}
