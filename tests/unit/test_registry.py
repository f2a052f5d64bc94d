import json
import logging
import multiprocessing as mp
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from rayline.ml import registry as registry_mod
from rayline.ml.registry import ModelRegistry, RegistryError


@pytest.fixture
def artifact(tmp_path):
    d = tmp_path / "artifact"
    (d / "sub").mkdir(parents=True)
    (d / "model.bin").write_bytes(b"weights")
    (d / "preprocessor.json").write_text('{"scale": 2}')
    (d / "sub" / "vocab.txt").write_text("a\nb\n")
    return d


@pytest.fixture
def reg(tmp_path):
    return ModelRegistry(tmp_path / "registry")


def _vdir(reg, name, version):
    return Path(reg.uri) / name / "versions" / str(version)


def test_versions_are_numbered_in_order_with_metadata(reg, artifact):
    for auc in (0.7, 0.8, 0.9):
        reg.register("delay", artifact, {"metrics": {"auc": auc}, "params": {"depth": 3}})
    versions = reg.versions("delay")
    assert [v.version for v in versions] == [1, 2, 3]
    mv = versions[-1]
    assert mv.name == "delay" and mv.aliases == [] and mv.ref == "delay@3"
    assert mv.uri == str(_vdir(reg, "delay", 3))
    meta = mv.metadata
    assert meta["name"] == "delay" and meta["version"] == 3
    assert meta["metrics"] == {"auc": 0.9} and meta["params"] == {"depth": 3}
    assert datetime.fromisoformat(meta["created_at"]).utcoffset() == UTC.utcoffset(None)
    assert "@" in meta["registered_by"]
    assert meta["files"] == ["model.bin", "preprocessor.json", "sub/vocab.txt"]
    assert (Path(mv.uri) / "sub" / "vocab.txt").read_text() == "a\nb\n"
    assert json.loads((Path(mv.uri) / "metadata.json").read_text()) == meta
    assert reg.list_models() == ["delay"]
    assert reg.problems("delay") == []
    assert reg.local_path(mv) == Path(mv.uri)


def test_register_converts_numpy_values(reg, artifact):
    mv = reg.register("m", artifact, {"metrics": {"auc": np.float32(0.5), "n": np.int64(7)}})
    assert reg.get("m").metadata["metrics"] == {"auc": 0.5, "n": 7} == mv.metadata["metrics"]


@pytest.mark.parametrize(
    "name, metadata, match",
    [
        ("bad name", {}, "invalid model name"),
        (".hidden", {}, "invalid model name"),
        ("m", {"version": 7}, "version are set by the registry"),
        ("m", {"blob": object()}, "not JSON"),
    ],
)
def test_register_rejects_bad_input(reg, artifact, name, metadata, match):
    with pytest.raises(RegistryError, match=match):
        reg.register(name, artifact, metadata)
    assert reg.list_models() == []


def test_register_rejects_missing_dir_and_metadata_clash(reg, artifact, tmp_path):
    with pytest.raises(RegistryError, match="is not a directory"):
        reg.register("m", tmp_path / "nope", {})
    (artifact / "metadata.json").write_text("{}")
    with pytest.raises(RegistryError, match="clash"):
        reg.register("m", artifact, {})


def test_failed_copy_leaves_no_version_and_no_staging(reg, artifact, monkeypatch):
    reg.register("m", artifact, {})
    calls = []

    def flaky_copy(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise OSError("disk full")
        return Path(dst).write_bytes(Path(src).read_bytes())

    monkeypatch.setattr(registry_mod.shutil, "copy2", flaky_copy)
    with pytest.raises(OSError, match="disk full"):
        reg.register("m", artifact, {})
    assert [v.version for v in reg.versions("m")] == [1]
    assert reg.problems("m") == []
    assert list((Path(reg.uri) / "m" / ".staging").iterdir()) == []


def test_version_without_metadata_is_invisible_and_reported(reg, artifact, caplog):
    reg.register("m", artifact, {})
    crashed = _vdir(reg, "m", 2)  # a writer that died before metadata.json
    crashed.mkdir()
    (crashed / "model.bin").write_bytes(b"half")
    with caplog.at_level(logging.WARNING):
        assert [v.version for v in reg.versions("m")] == [1]
    assert "version 2" in caplog.text and "metadata.json" in caplog.text
    [problem] = reg.problems("m")
    assert "'m' version 2" in problem and "no metadata.json" in problem
    assert reg.get("m").version == 1
    with pytest.raises(RegistryError, match="version 2 .*no metadata.json"):
        reg.get("m", 2)
    assert reg.register("m", artifact, {}).version == 3  # the broken number is not reused


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda d: (d / "metadata.json").write_text("{not json"), "unreadable"),
        (lambda d: (d / "metadata.json").write_text("[1, 2]"), "not a JSON object"),
        (lambda d: _edit_meta(d, name="other"), "describes 'other' version 1"),
        (lambda d: _edit_meta(d, version=9), "describes 'm' version 9"),
        (lambda d: (d / "sub" / "vocab.txt").unlink(), "1 of 3 files .* missing.*sub/vocab.txt"),
        (lambda d: _edit_meta(d, files="model.bin"), "not a list of paths"),
        (lambda d: _edit_meta(d, files=["../x"]), "missing.*\\.\\./x"),
    ],
)
def test_corrupt_versions_are_skipped(reg, artifact, damage, match):
    reg.register("m", artifact, {})
    reg.register("m", artifact, {})
    damage(_vdir(reg, "m", 1))
    assert [v.version for v in reg.versions("m")] == [2]
    [problem] = reg.problems("m")
    assert "'m' version 1" in problem
    assert __import__("re").search(match, problem), problem
    with pytest.raises(RegistryError, match=match):
        reg.get("m", 1)


def _edit_meta(vdir, **fields):
    meta = json.loads((vdir / "metadata.json").read_text())
    meta.update(fields)
    (vdir / "metadata.json").write_text(json.dumps(meta))


def _register_at_once(root, artifact, barrier, i):
    barrier.wait()
    return ModelRegistry(root).register("m", artifact, {"worker": i}).version


def test_concurrent_registration_gets_distinct_versions(reg, artifact):
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        barrier = manager.Barrier(8)
        with ctx.Pool(8) as pool:
            got = pool.starmap(
                _register_at_once, [(reg.uri, str(artifact), barrier, i) for i in range(8)]
            )
    assert sorted(got) == list(range(1, 9))
    versions = reg.versions("m")
    assert [v.version for v in versions] == list(range(1, 9))
    assert sorted(v.metadata["worker"] for v in versions) == list(range(8))
    assert reg.problems("m") == []


def test_aliases_set_move_and_history(reg, artifact):
    for _ in range(3):
        reg.register("m", artifact, {})
    assert reg.set_alias("m", "champion", 1, reason="first") is None
    assert reg.set_alias("m", "challenger", 3) is None
    assert reg.set_alias("m", "champion", 2, reason="auc up") == 1
    assert reg.set_alias("m", "champion", 2) == 2  # unchanged: no history line
    assert reg.aliases("m") == {"challenger": 3, "champion": 2}
    assert reg.get("m", 2).aliases == ["champion"]
    assert [(v.version, v.aliases) for v in reg.versions("m")] == [
        (1, []),
        (2, ["champion"]),
        (3, ["challenger"]),
    ]
    reg.delete_alias("m", "challenger", reason="retired")
    assert reg.aliases("m") == {"champion": 2}
    history = reg.alias_history("m")
    assert [(h["alias"], h["from"], h["to"], h["reason"]) for h in history] == [
        ("champion", None, 1, "first"),
        ("challenger", None, 3, None),
        ("champion", 1, 2, "auc up"),
        ("challenger", 3, None, "retired"),
    ]
    assert all(datetime.fromisoformat(h["at"]) for h in history)
    with pytest.raises(RegistryError, match="no alias 'challenger'"):
        reg.delete_alias("m", "challenger")


@pytest.mark.parametrize("alias", ["123", "latest", "Latest", "has space", "-x", "a.b", ""])
def test_invalid_alias_names(reg, artifact, alias):
    reg.register("m", artifact, {})
    with pytest.raises(RegistryError, match="invalid alias"):
        reg.set_alias("m", alias, 1)


def test_alias_needs_a_valid_version(reg, artifact):
    reg.register("m", artifact, {})
    reg.register("m", artifact, {})
    with pytest.raises(
        RegistryError, match="alias 'champion' of 'm' at version 7: .*version 7 does not exist"
    ):
        reg.set_alias("m", "champion", 7)
    (_vdir(reg, "m", 2) / "metadata.json").unlink()
    with pytest.raises(RegistryError, match="alias 'champion' .*version 2 .*no metadata.json"):
        reg.set_alias("m", "champion", 2)
    assert reg.aliases("m") == {}


def test_dangling_alias_is_reported_and_never_resolved(reg, artifact):
    reg.register("m", artifact, {})
    reg.register("m", artifact, {})
    reg.set_alias("m", "champion", 2)
    (_vdir(reg, "m", 2) / "metadata.json").write_text("garbage")
    assert any("alias 'champion' points at version 2" in p for p in reg.problems("m"))
    with pytest.raises(RegistryError, match="alias 'champion' of 'm'"):
        reg.get("m", "champion")


def test_delete_version(reg, artifact):
    for _ in range(3):
        reg.register("m", artifact, {})
    reg.set_alias("m", "champion", 2)
    reg.set_alias("m", "staging", 2)
    with pytest.raises(RegistryError, match="version 2 holds alias\\(es\\) champion, staging"):
        reg.delete_version("m", 2)
    assert [v.version for v in reg.versions("m")] == [1, 2, 3]
    reg.delete_version("m", 2, force=True)
    assert [v.version for v in reg.versions("m")] == [1, 3]
    assert reg.aliases("m") == {}
    assert reg.alias_history("m")[-1]["reason"] == "version 2 deleted"
    assert reg.problems("m") == []
    with pytest.raises(RegistryError, match="has no version 2"):
        reg.delete_version("m", 2)
    with pytest.raises(RegistryError, match="version 2 does not exist|version 2 was deleted"):
        reg.get("m", 2)
    reg.delete_version("m", 3)
    assert reg.register("m", artifact, {}).version == 4  # numbers are never reused


def test_delete_a_broken_version_clears_the_problem(reg, artifact):
    reg.register("m", artifact, {})
    (_vdir(reg, "m", 1) / "metadata.json").unlink()
    assert reg.problems("m")
    reg.delete_version("m", 1)
    assert reg.problems("m") == [] and reg.versions("m") == []


def test_get_by_number_alias_and_latest(reg, artifact):
    for _ in range(3):
        reg.register("m", artifact, {})
    reg.set_alias("m", "champion", 2)
    assert reg.get("m").version == 3
    assert reg.get("m", "latest").version == 3
    assert reg.get("m", 1).version == 1
    assert reg.get("m", "1").version == 1
    assert reg.get("m", "champion").version == 2
    with pytest.raises(RegistryError, match="no alias 'nope' \\(aliases: champion\\)"):
        reg.get("m", "nope")
    with pytest.raises(RegistryError, match="'m' version 9 does not exist"):
        reg.get("m", 9)
    with pytest.raises(RegistryError, match="invalid version"):
        reg.get("m", 0)
    with pytest.raises(RegistryError, match="no model 'other' .*models: m"):
        reg.get("other")
    with pytest.raises(RegistryError, match="no model 'other'"):
        reg.get("other", 1)
    assert reg.versions("other") == [] and reg.aliases("other") == {}


def test_model_with_only_broken_versions(reg, artifact):
    reg.register("m", artifact, {})
    (_vdir(reg, "m", 1) / "metadata.json").unlink()
    with pytest.raises(RegistryError, match="no valid versions.*version 1"):
        reg.get("m")


def test_resolve(reg, artifact):
    reg.register("m.v2", artifact, {})
    reg.register("m.v2", artifact, {})
    reg.set_alias("m.v2", "champion", 1)
    assert reg.resolve("m.v2").version == 2
    assert reg.resolve("m.v2@1").version == 1
    assert reg.resolve("m.v2@champion").version == 1
    assert reg.resolve("m.v2@latest").version == 2


@pytest.mark.parametrize("ref", ["", "@1", "m@", "m@1@2", "m@bad alias", "bad name", "m@0", "m@-1"])
def test_resolve_rejects_malformed_references(reg, ref):
    with pytest.raises(RegistryError, match="invalid model reference"):
        reg.resolve(ref)


def test_file_uri_and_plain_path_share_storage(tmp_path, artifact):
    via_uri = ModelRegistry(f"file://{tmp_path}/reg")
    mv = via_uri.register("m", artifact, {"metrics": {"auc": 0.5}})
    assert mv.uri == str(tmp_path / "reg" / "m" / "versions" / "1")
    via_uri.set_alias("m", "champion", 1)
    plain = ModelRegistry(tmp_path / "reg")
    assert plain.resolve("m@champion").metadata["metrics"] == {"auc": 0.5}
    plain.register("m", artifact, {})
    assert [v.version for v in via_uri.versions("m")] == [1, 2]  # no in-memory state
    assert via_uri.local_path(mv) == Path(mv.uri)


def test_relative_path_is_resolved(tmp_path, artifact, monkeypatch):
    monkeypatch.chdir(tmp_path)
    reg = ModelRegistry("registry")
    assert reg.uri == str(tmp_path / "registry")
    reg.register("m", artifact, {})
    assert (tmp_path / "registry" / "m" / "versions" / "1" / "model.bin").is_file()


def test_remote_filesystem(tmp_path, artifact):
    reg = ModelRegistry("mock:///models")  # an in-memory pyarrow filesystem: the non-local path
    assert reg.register("m", artifact, {}).version == 1
    mv = reg.register("m", artifact, {"metrics": {"auc": 0.9}})
    assert mv.version == 2 and mv.uri == "mock:///models/m/versions/2"
    reg.set_alias("m", "champion", 2, reason="better")
    assert reg.resolve("m@champion").metadata["metrics"] == {"auc": 0.9}
    assert reg.alias_history("m")[0]["reason"] == "better"
    local = reg.local_path(mv, cache_dir=tmp_path / "cache")
    assert local.is_relative_to(tmp_path / "cache")
    assert (local / "sub" / "vocab.txt").read_text() == "a\nb\n"
    assert json.loads((local / "metadata.json").read_text())["version"] == 2
    assert reg.local_path(mv, cache_dir=tmp_path / "cache") == local  # cached
    reg.delete_version("m", 2, force=True)
    assert [v.version for v in reg.versions("m")] == [1]
    assert reg.register("m", artifact, {}).version == 3
    assert reg.problems("m") == []


def test_unopenable_uri():
    with pytest.raises(RegistryError, match="cannot open model registry 'nosuchscheme://x'"):
        ModelRegistry("nosuchscheme://x")
