"""The application builder ``rayline.serve:app_builder``, referenced from a Serve config.

It binds the :class:`~rayline.serve.ingress.Ingress` deployment (named ``ingress``) with each
model's :class:`~rayline.serve.model.ModelServer` loaded in it (``mode: fused``, the default),
or bound as a deployment of its own named ``model-<name>`` (``mode: split``), or loaded on
demand by the replicas of one shared deployment named ``models`` (``mode: multiplexed``,
``@serve.multiplexed``; the ingress passes the model name as the multiplexed model id).
Deployment options set here are defaults; a config's ``deployments:`` entries (autoscaling,
resources, ``max_ongoing_requests``, ``user_config``) override them by name.
"""

# No `from __future__ import annotations`: Serve reads app_builder's annotation at run time to
# turn the config's `args:` into a ServeArgs.
from typing import Any

from ray import serve
from ray.serve import Application

from ..ml.registry import ModelRegistry, RegistryError
from .auth import load_keys
from .config import ServeArgs
from .ingress import Ingress
from .model import ModelConfig, ModelServer, shared_models_class

__all__ = ["app_builder", "build_app"]

INGRESS_NAME = "ingress"
SHARED_NAME = "models"  # the shared model deployment of multiplexed mode
_ENV = {"TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}


def _check_models(args: ServeArgs) -> None:
    """Fail at build time, with the registry's message, if a model or ref does not resolve."""
    registry = ModelRegistry(args.registry)
    for m in args.models:
        try:
            registry.get(m.name, m.ref)
        except RegistryError as e:
            raise ValueError(f"models[{m.name}]: {e}") from None


def _options(defaults: dict[str, Any], override: dict[str, Any] | None) -> dict[str, Any]:
    """Deployment options: ``override`` over ``defaults`` (``ray_actor_options`` merged)."""
    out = dict(defaults) | dict(override or {})
    if override and "ray_actor_options" in override:
        out["ray_actor_options"] = defaults.get("ray_actor_options", {}) | dict(
            override["ray_actor_options"]
        )
    return out


def build_app(
    args: ServeArgs,
    check: bool = True,
    model_options: dict[str, Any] | None = None,
    ingress_options: dict[str, Any] | None = None,
) -> Application:
    """The Serve application for validated arguments.

    Args:
        args: The application arguments.
        check: Resolve every model's ref in the registry first (fail fast on a typo).
        model_options: Deployment options for every model deployment over the defaults (e.g.
            ``{"num_replicas": 2}``; split mode; in multiplexed mode, the shared deployment); a
            Serve config's ``deployments:`` does the same by name.
        ingress_options: Deployment options for the ingress over the defaults.

    Returns:
        The application: the ingress, with the models loaded in it (fused), bound to one
        deployment per model (split) or to the shared deployment (multiplexed).

    Raises:
        ValueError: a model or ref does not resolve.
        KeyConfigError: auth is enabled but the keys are missing or malformed.
    """
    registry = str(ModelRegistry(args.registry).uri)  # absolute: replicas run elsewhere
    if check:
        _check_models(args)
    keyring = load_keys(args.auth)
    keys = (
        None if keyring is None else [k.__dict__ | {"models": list(k.models)} for k in keyring.keys]
    )
    models: dict[str, Any] = {}
    configs: dict[str, dict[str, Any]] = {}
    model_defaults = {
        # Serve caps a batch at max_ongoing_requests; leave room for the next batch.
        "max_ongoing_requests": 2 * args.batching.max_batch_size,
        "ray_actor_options": {"num_cpus": 0.5, "runtime_env": {"env_vars": _ENV}},
        "health_check_period_s": 5,
        "graceful_shutdown_timeout_s": 10,
    }
    for m in args.models:
        cfg = ModelConfig(
            ref=m.ref,
            max_batch_size=args.batching.max_batch_size,
            batch_wait_timeout_s=args.batching.batch_wait_timeout_s,
            poll_interval_s=args.poll_interval_s,
            max_rows=args.limits.max_rows,
        ).model_dump()
        if args.mode == "fused":  # loaded by each ingress replica
            models[m.name] = {
                "registry": registry,
                "name": m.name,
                "config": cfg,
                "threads": args.threads,
            }
            continue
        if args.mode == "multiplexed":  # loaded on demand by the shared deployment's replicas
            configs[m.name] = cfg
            models[m.name] = None
            continue
        options = _options(model_defaults, model_options)
        deployment = serve.deployment(name=m.deployment_name, user_config=cfg, **options)(
            ModelServer
        )
        models[m.name] = deployment.bind(registry, m.name, cfg, args.threads, args.gc_threshold)
    shared = None
    if args.mode == "multiplexed":
        cls = shared_models_class(args.max_models_per_replica)
        # Every model of a replica may have a batch in flight.
        defaults = model_defaults | {
            "max_ongoing_requests": 2 * args.batching.max_batch_size * args.max_models_per_replica
        }
        options = _options(defaults, model_options)
        shared = serve.deployment(name=SHARED_NAME, **options)(cls).bind(
            registry, configs, args.threads, args.gc_threshold
        )
    actor: dict[str, Any] = {"num_cpus": 0.25}
    if args.mode == "fused":
        actor = {"num_cpus": 0.5, "runtime_env": {"env_vars": _ENV}}
    options = _options(
        {"max_ongoing_requests": 512, "ray_actor_options": actor, "health_check_period_s": 5},
        ingress_options,
    )
    ingress = serve.deployment(name=INGRESS_NAME, **options)(Ingress)
    return ingress.bind(
        models,
        registry,
        keys,
        args.limits.max_body_bytes,
        args.limits.request_timeout_s,
        shared,
        args.gc_threshold,
    )


def app_builder(args: ServeArgs) -> Application:
    """Build the serving application from a Serve config's ``args:`` block.

    Args:
        args: The arguments (Serve validates the ``args:`` mapping into :class:`ServeArgs`; a
            plain dict is validated here).

    Returns:
        The application for ``serve run`` / ``serve deploy``.

    Example:
        ``serve_configs/flights.yaml``::

            applications:
              - name: flights
                route_prefix: /
                import_path: rayline.serve:app_builder
                args:
                  registry: /srv/registry
                  models: [{name: flights_arr_delay, ref: champion}]
    """
    if not isinstance(args, ServeArgs):
        raw: Any = args
        args = ServeArgs.model_validate(raw)
    return build_app(args)
