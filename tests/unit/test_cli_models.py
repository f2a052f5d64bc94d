import json

import pytest

from rayline.cli import main
from rayline.ml.registry import ModelRegistry


@pytest.fixture
def reg(tmp_path):
    art = tmp_path / "artifact"
    art.mkdir()
    (art / "model.bin").write_bytes(b"w")
    reg = ModelRegistry(tmp_path / "registry")
    reg.register(
        "delay",
        art,
        {"metrics": {"auc": 0.81234, "loss": 0.4}, "params": {"depth": 3}, "run_id": "r-1"},
    )
    reg.register(
        "delay",
        art,
        {"metrics": {"auc": 0.83, "loss": 0.3}, "headline_metric": "loss", "run_id": "r-2"},
    )
    reg.register("churn", art, {})
    reg.set_alias("delay", "champion", 1)
    return reg


def run(reg, capsys, *argv):
    code = main(["models", *argv, "--registry", reg.uri])
    out, err = capsys.readouterr()
    return code, out, err


def test_list(reg, capsys):
    code, out, _ = run(reg, capsys, "list")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["MODEL", "VER", "CREATED", "ALIASES", "METRIC"]
    assert lines[1].split()[:2] == ["churn", "1"] and lines[1].endswith("-")
    assert lines[2].split()[:2] == ["delay", "1"]
    assert "champion" in lines[2] and "auc=0.8123" in lines[2]
    assert lines[3].split()[0] == "2" and "loss=0.3" in lines[3]


def test_list_json(reg, capsys):
    code, out, _ = run(reg, capsys, "list", "--json")
    assert code == 0
    doc = {m["name"]: m for m in json.loads(out)}
    assert doc["delay"]["aliases"] == {"champion": 1}
    assert [v["version"] for v in doc["delay"]["versions"]] == [1, 2]
    assert doc["delay"]["versions"][1]["metrics"] == {"auc": 0.83, "loss": 0.3}
    assert doc["churn"]["problems"] == []


def test_list_empty_uses_env(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RAYLINE_REGISTRY", str(tmp_path / "empty"))
    assert main(["models", "list"]) == 0
    assert "no models in" in capsys.readouterr().out


def test_show(reg, capsys):
    code, out, _ = run(reg, capsys, "show", "delay@champion")
    assert code == 0
    assert out.startswith("delay version 1  aliases: champion")
    assert "metrics:\n  auc: 0.81234" in out and "params:\n  depth: 3" in out
    assert "run_id: r-1" in out and "files (1): model.bin" in out
    code, out, _ = run(reg, capsys, "show", "delay", "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["version"] == 2 and doc["metadata"]["run_id"] == "r-2"


def test_promote_and_history(reg, capsys):
    code, out, _ = run(reg, capsys, "promote", "delay", "2", "--reason", "auc up")
    assert (code, out) == (0, "delay: champion 1 -> 2\n")
    code, out, _ = run(reg, capsys, "promote", "delay", "2", "--alias", "prod")
    assert (code, out) == (0, "delay: prod (none) -> 2\n")
    assert reg.alias_history("delay")[-2]["reason"] == "auc up"
    assert reg.aliases("delay") == {"champion": 2, "prod": 2}


def test_alias_set_and_delete(reg, capsys):
    assert run(reg, capsys, "alias", "delay", "canary", "2")[:2] == (
        0,
        "delay: canary (none) -> 2\n",
    )
    code, out, _ = run(reg, capsys, "alias", "delay", "canary", "--delete")
    assert (code, out) == (0, "delay: alias canary removed (was version 2)\n")
    assert "canary" not in reg.aliases("delay")


@pytest.mark.parametrize(
    "argv", [["alias", "delay", "canary"], ["alias", "delay", "x", "2", "--delete"]]
)
def test_alias_needs_version_or_delete(reg, capsys, argv):
    code, _, err = run(reg, capsys, *argv)
    assert code == 2 and "either VERSION or --delete" in err


def test_delete(reg, capsys):
    code, out, err = run(reg, capsys, "delete", "delay", "1")
    assert code == 2 and out == ""
    assert (
        err
        == "error: model 'delay' version 1 holds alias(es) champion: move them first or delete with force\n"
    )
    code, out, _ = run(reg, capsys, "delete", "delay", "1", "--force")
    assert (code, out) == (0, "delay: deleted version 1 (removed aliases: champion)\n")
    assert [v.version for v in reg.versions("delay")] == [2]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["show", "nope"], "error: no model 'nope' in registry"),
        (["show", "delay@7"], "error: model 'delay' version 7 does not exist"),
        (["show", "delay@@"], "error: invalid model reference 'delay@@'"),
        (["promote", "delay", "9"], "error: cannot point alias 'champion' of 'delay' at version 9"),
        (["promote", "delay", "2", "--alias", "latest"], "error: invalid alias 'latest'"),
        (["alias", "delay", "nope", "--delete"], "error: model 'delay' has no alias 'nope'"),
        (["delete", "delay", "5"], "error: model 'delay' has no version 5"),
    ],
)
def test_errors_exit_2_with_one_line(reg, capsys, argv, message):
    code, out, err = run(reg, capsys, *argv)
    assert code == 2 and out == ""
    assert err.startswith(message) and err.count("\n") == 1 and "Traceback" not in err


def test_bad_registry_uri(capsys):
    assert main(["models", "list", "--registry", "nosuchscheme://x"]) == 2
    assert capsys.readouterr().err.startswith("error: cannot open model registry")
