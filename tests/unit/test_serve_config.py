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


def _built(tmp_path, mode):
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
