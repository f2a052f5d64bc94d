"""The serving config: serve_configs/flights.yaml against Ray Serve's own schema, the app
builder's arguments, and the application it builds (no Ray started)."""

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from rayline.serve.config import ModelArgs, ServeArgs

ROOT = Path(__file__).resolve().parents[2]
FLIGHTS = ROOT / "serve_configs" / "flights.yaml"


def flights_config() -> dict:
    return yaml.safe_load(FLIGHTS.read_text())


def test_flights_config_is_a_valid_serve_deploy_config():
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import ServeDeploySchema

    raw = flights_config()
    schema = ServeDeploySchema.model_validate(raw)
    assert schema.http_options.host == "127.0.0.1"
    (app,) = schema.applications
    assert app.import_path == "rayline.serve:app_builder"
    args = ServeArgs.model_validate(app.args)
    assert [m.name for m in args.models] == ["flights_arr_delay"]
    by_name = {d.name: d for d in app.deployments}
    # every override names a deployment the builder creates
    models = {m.deployment_name for m in args.models} if args.mode == "split" else set()
    assert set(by_name) == {"ingress"} | models
    for name in models or {"ingress"}:
        d = by_name[name]
        # Serve caps a batch at max_ongoing_requests
        assert d.max_ongoing_requests >= args.batching.max_batch_size
        auto = d.autoscaling_config
        # ServeDeploySchema does not reject unknown autoscaling keys: a typo would be ignored
        assert set(auto) <= set(AutoscalingConfig.model_fields), set(auto)
        parsed = AutoscalingConfig.model_validate(auto)
        assert 1 <= parsed.min_replicas <= parsed.max_replicas
        assert parsed.target_ongoing_requests <= d.max_ongoing_requests
        assert d.ray_actor_options.num_cpus > 0
    assert "autoscaling_config" in raw["applications"][0]["deployments"][0]


def test_flights_config_multiplexed_example_is_valid():
    """The commented multiplexed example: its args and its "models" entry, uncommented."""
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import DeploymentSchema

    lines = FLIGHTS.read_text().splitlines()
    start = lines.index("      # - name: models")
    entry = yaml.safe_load("\n".join(line.removeprefix("      # ") for line in lines[start:]))
    (raw,) = entry
    d = DeploymentSchema.model_validate(raw)
    settings = yaml.safe_load(
        "\n".join(
            line.removeprefix("      #     ")
            for line in lines
            if line.startswith("      #     mode:") or "max_models_per_replica: " in line
        )
    )
    assert settings["mode"] == "multiplexed"
    args = ServeArgs.model_validate(flights_config()["applications"][0]["args"] | settings)
    need = 2 * args.batching.max_batch_size * args.max_models_per_replica
    assert d.name == "models" and d.max_ongoing_requests >= need
    parsed = AutoscalingConfig.model_validate(d.autoscaling_config)
    assert set(d.autoscaling_config) <= set(AutoscalingConfig.model_fields)
    assert parsed.target_ongoing_requests <= d.max_ongoing_requests
    # the active config is unchanged: fused
    assert flights_config()["applications"][0]["args"]["mode"] == "fused"


def test_flights_config_serves_the_flights_pipeline_model():
    pipeline = yaml.safe_load((ROOT / "pipelines" / "flights.yaml").read_text())
    args = ServeArgs.model_validate(flights_config()["applications"][0]["args"])
    assert args.models[0].name == pipeline["ml"]["model_name"]
    assert args.models[0].ref == pipeline["ml"]["gate"].get("alias", "champion")


def test_serve_args_defaults_and_refs(monkeypatch):
    monkeypatch.setenv("RAYLINE_REGISTRY", "/srv/reg")
    args = ServeArgs.model_validate({"models": [{"name": "m"}, {"name": "n", "ref": 3}]})
    assert args.registry == "/srv/reg"
    assert args.models[0].ref == "champion" and not args.models[0].pinned
    assert args.models[1].ref == "3" and args.models[1].pinned
    assert args.batching.batch_wait_timeout_s == 0.0
    assert not args.auth.enabled


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"models": []}, "at least 1"),
        ({"models": [{"name": "m"}, {"name": "m"}]}, "m listed more than once"),
        ({"models": [{"name": "m", "ref": "0"}]}, "not a version number"),
        ({"models": [{"name": "m", "ref": "bad alias"}]}, "not a version number"),
        ({"models": [{"name": "m"}], "batching": {"max_batch_size": 0}}, "greater than or equal"),
        ({"models": [{"name": "m"}], "batching": {"max_batchsize": 8}}, "Extra inputs"),
        ({"models": [{"name": "m"}], "auth": {"enabled": True, "keys_env": None}}, "keys_env"),
        (
            {"models": [{"name": "m"}], "mode": "shared"},
            r"mode\n  Input should be 'fused', 'split' or 'multiplexed'",
        ),
        (
            {"models": [{"name": "m"}], "max_models_per_replica": 0},
            r"max_models_per_replica\n  Input should be greater than or equal to 1",
        ),
        (
            {"models": [{"name": "m"}], "max_models_per_replica": "three"},
            r"max_models_per_replica\n  Input should be a valid integer",
        ),
        (
            {"models": [{"name": "m"}], "max_models_per_replica": 65},
            r"max_models_per_replica\n  Input should be less than or equal to 64",
        ),
        ({"models": [{"name": "m"}], "gc_threshold": [10, 10, 10]}, "generation 0 between 100"),
        ({"models": [{"name": "m"}], "gc_threshold": [1000, 10]}, "gc_threshold"),
    ],
)
def test_serve_args_errors_name_the_key(raw, message):
    with pytest.raises(ValidationError, match=message):
        ServeArgs.model_validate({"registry": "r", **raw})


def _register(tmp_path, name="m"):
    from rayline.ml.registry import ModelRegistry

    art = tmp_path / "art"
    art.mkdir(exist_ok=True)
    (art / "model.json").write_text('{"framework": "keras"}')
    reg = ModelRegistry(tmp_path / "reg")
    mv = reg.register(name, art, {"framework": "keras"})
    reg.set_alias(name, "champion", mv.version)
    return reg


def _built(tmp_path, mode, **more):
    from ray.serve._private.build_app import build_app as serve_build

    from rayline.serve import app_builder

    _register(tmp_path, "a")
    _register(tmp_path, "b")
    app = app_builder(
        {
            "registry": str(tmp_path / "reg"),
            "models": [{"name": "a"}, {"name": "b", "ref": 1}],
            "batching": {"max_batch_size": 32},
            "mode": mode,
            **more,
        }
    )
    built = serve_build(app, name="t")
    assert built.ingress_deployment_name == "ingress"
    return {d.name: d for d in built.deployments}


def test_app_builder_split_builds_one_deployment_per_model(tmp_path):
    deps = _built(tmp_path, "split")
    assert set(deps) == {"ingress", "model-a", "model-b"}
    model_b = deps["model-b"]
    assert model_b._deployment_config.max_ongoing_requests >= 32
    assert model_b._deployment_config.user_config["ref"] == "1"
    assert model_b._deployment_config.user_config["max_batch_size"] == 32


def test_app_builder_fused_loads_the_models_in_the_ingress(tmp_path):
    deps = _built(tmp_path, "fused")
    assert set(deps) == {"ingress"}
    ingress = deps["ingress"]
    assert ingress._deployment_config.max_ongoing_requests >= 32
    models = ingress.init_args[0]
    assert set(models) == {"a", "b"} and models["b"]["config"]["ref"] == "1"
    env = ingress.ray_actor_options["runtime_env"]["env_vars"]
    assert env["TF_USE_LEGACY_KERAS"] == "1"


def test_every_replica_gets_the_gc_threshold(tmp_path):
    deps = _built(tmp_path, "fused", gc_threshold=[5000, 20, 30])
    assert deps["ingress"].init_args[-1] == (5000, 20, 30)
    deps = _built(tmp_path, "split")
    assert deps["ingress"].init_args[-1] == (10_000, 100, 100)  # the default
    assert deps["model-a"].init_args[-1] == (10_000, 100, 100)
    deps = _built(tmp_path, "multiplexed", gc_threshold=None)
    assert deps["models"].init_args[-1] is None and deps["ingress"].init_args[-1] is None


def test_apply_gc_threshold_sets_and_leaves():
    import gc

    from rayline.serve.config import apply_gc_threshold

    before = gc.get_threshold()
    try:
        apply_gc_threshold((12_345, 7, 8))
        assert gc.get_threshold() == (12_345, 7, 8)
        apply_gc_threshold(None)
        assert gc.get_threshold() == (12_345, 7, 8)
    finally:
        gc.set_threshold(*before)


def test_serve_args_multiplexed_mode():
    args = ServeArgs.model_validate({"registry": "r", "models": [{"name": "m"}]})
    assert args.mode == "fused" and args.max_models_per_replica == 3
    args = ServeArgs.model_validate(
        {
            "registry": "r",
            "models": [{"name": "m"}, {"name": "n"}],
            "mode": "multiplexed",
            "max_models_per_replica": "1",
        }
    )
    assert args.mode == "multiplexed" and args.max_models_per_replica == 1


@pytest.mark.parametrize("per_replica", [1, 3])
def test_app_builder_multiplexed_builds_one_shared_deployment(tmp_path, per_replica):
    import inspect

    from ray.serve._private.utils import _callable_uses_multiplexing

    from rayline.ml.registry import ModelRegistry

    deps = _built(tmp_path, "multiplexed", max_models_per_replica=per_replica)
    assert set(deps) == {"ingress", "models"}
    shared = deps["models"]
    # every model a replica holds may have a batch in flight
    assert shared._deployment_config.max_ongoing_requests >= 32 * per_replica
    assert shared.ray_actor_options["runtime_env"]["env_vars"]["TF_USE_LEGACY_KERAS"] == "1"
    registry, configs, threads, _gc = shared.init_args
    assert registry == str(ModelRegistry(tmp_path / "reg").uri)
    assert set(configs) == {"a", "b"} and configs["b"]["ref"] == "1"
    assert configs["a"]["max_batch_size"] == 32 and threads == 1
    cls = shared.func_or_class
    assert _callable_uses_multiplexing(cls)
    bound = inspect.getclosurevars(cls.get_model).nonlocals["max_num_models_per_replica"]
    assert bound == per_replica
    models = deps["ingress"].init_args[0]
    assert models == {"a": None, "b": None}  # served through the shared deployment


def test_build_app_multiplexed_options_override_the_shared_deployment(tmp_path):
    from ray.serve._private.build_app import build_app as serve_build

    from rayline.serve.app import build_app

    _register(tmp_path, "a")
    args = ServeArgs.model_validate(
        {"registry": str(tmp_path / "reg"), "models": [{"name": "a"}], "mode": "multiplexed"}
    )
    over = {"num_replicas": 3, "ray_actor_options": {"num_cpus": 0.25}}
    app = build_app(args, model_options=over)
    deps = {d.name: d for d in serve_build(app, name="t").deployments}
    assert deps["models"]._deployment_config.num_replicas == 3
    actor = deps["models"].ray_actor_options
    assert actor["num_cpus"] == 0.25 and "runtime_env" in actor  # merged, not replaced


def test_shared_models_user_config_is_checked_by_model_name():
    import asyncio

    from rayline.serve.model import ModelConfig, SharedModels

    cfg = ModelConfig().model_dump()
    shared = SharedModels("reg", {"a": cfg, "b": cfg})
    with pytest.raises(ValueError, match="no model nope is served here"):
        shared.reconfigure({"nope": {"ref": "2"}})
    with pytest.raises(ValidationError, match="max_batch_size"):
        shared.reconfigure({"a": {"max_batch_size": 0}})
    shared.reconfigure({"a": {"ref": "2"}})  # nothing loaded: applied at the next load
    status = asyncio.run(shared.status())
    assert status["loaded"] == {} and status["models"] == ["a", "b"] and status["loads"] == 0


def test_app_builder_fails_fast_on_an_unknown_model_or_alias(tmp_path):
    from rayline.serve import app_builder

    _register(tmp_path, "a")
    with pytest.raises(ValueError, match=r"models\[nope\]: no model 'nope'"):
        app_builder({"registry": str(tmp_path / "reg"), "models": [{"name": "nope"}]})
    with pytest.raises(ValueError, match=r"no alias 'staging'.*champion"):
        app_builder(
            {"registry": str(tmp_path / "reg"), "models": [{"name": "a", "ref": "staging"}]}
        )


def test_app_builder_with_auth_needs_keys(tmp_path, monkeypatch):
    from rayline.serve import app_builder
    from rayline.serve.auth import KeyConfigError

    _register(tmp_path, "a")
    monkeypatch.delenv("RAYLINE_SERVE_API_KEYS", raising=False)
    raw = {"registry": str(tmp_path / "reg"), "models": [{"name": "a"}], "auth": {"enabled": True}}
    with pytest.raises(KeyConfigError, match=r"no API key is configured.*RAYLINE_SERVE_API_KEYS"):
        app_builder(raw)


def test_model_args_deployment_name():
    assert ModelArgs(name="x.y").deployment_name == "model-x.y"
