import pytest

from rayline.config import SessionConfig
from rayline.session import JAVA17_OPENS, _merge_java_env, jvm_options, spark_conf


def test_jvm_options_open_every_package_raydp_needs():
    opts = jvm_options()
    for pkg in (
        "java.base/java.lang",
        "java.base/java.nio",
        "java.base/sun.nio.ch",
        "java.base/jdk.internal.ref",
    ):
        assert f"--add-opens={pkg}=ALL-UNNAMED" in opts
    assert len([o for o in opts if o.startswith("--add-opens")]) == len(JAVA17_OPENS)


def test_merge_keeps_user_options_and_adds_ours_once():
    merged = _merge_java_env("-Xss4m --add-opens=java.base/java.lang=ALL-UNNAMED")
    assert merged.startswith("-Xss4m")
    assert merged.count("java.base/java.lang=ALL-UNNAMED") == 1
    assert _merge_java_env(merged) == merged


def test_spark_conf_sizes_shuffle_and_applies_flags(tmp_path):
    conf = spark_conf(
        SessionConfig(num_executors=2, executor_cores=2, spark_conf={"spark.x": True}), tmp_path
    )
    assert conf["spark.sql.shuffle.partitions"] == "8"
    assert "--add-opens=java.base/java.lang=ALL-UNNAMED" in conf["spark.executor.extraJavaOptions"]
    assert "--add-opens" in conf["spark.driver.extraJavaOptions"]
    assert conf["spark.sql.adaptive.enabled"] == "true"
    assert conf["spark.x"] == "true"
    assert conf["spark.sql.catalogImplementation"] == "hive"
    assert str(tmp_path) in conf["spark.hadoop.javax.jdo.option.ConnectionURL"]
    assert "spark.sql.catalogImplementation" not in spark_conf(
        SessionConfig(enable_hive=False), tmp_path
    )


def test_spark_conf_uses_the_daemon_without_jars(tmp_path):
    assert spark_conf(SessionConfig(), tmp_path)["spark.python.daemon.module"] == (
        "rayline.spark_daemon"
    )
    # a user's own setting still wins
    conf = spark_conf(SessionConfig(spark_conf={"spark.python.daemon.module": "x.y"}), tmp_path)
    assert conf["spark.python.daemon.module"] == "x.y"


def test_drop_jar_paths_forgets_the_jar_and_what_was_imported_from_it(tmp_path, monkeypatch):
    import importlib
    import sys
    import zipfile
    import zipimport

    from rayline.spark_daemon import drop_jar_paths

    jar = tmp_path / "spark-core.jar"
    with zipfile.ZipFile(jar, "w") as z:
        for d in ("orgx/", "orgx/apache/"):  # jars list their directories
            z.writestr(d, "")
        z.writestr("orgx/apache/Thing.class", b"\xca\xfe")
        z.writestr("META-INF/MANIFEST.MF", "Manifest-Version: 1.0\n")
    monkeypatch.setattr(sys, "path", [*sys.path, str(jar)])
    monkeypatch.setattr(sys, "path_importer_cache", dict(sys.path_importer_cache))
    monkeypatch.setattr(sys, "modules", dict(sys.modules))
    importlib.invalidate_caches()
    importlib.import_module("orgx")  # a namespace package from inside the jar (as copy.py's
    with pytest.raises(ImportError):  # lookup of Jython's org.python.core makes ``org`` one)
        importlib.import_module("orgx.python")
    zips = [k for k, v in sys.path_importer_cache.items() if isinstance(v, zipimport.zipimporter)]
    assert str(jar) in zips and str(jar / "orgx") in zips

    assert drop_jar_paths() == [str(jar)]

    assert str(jar) not in sys.path
    assert "orgx" not in sys.modules
    importlib.invalidate_caches()  # what PySpark's worker calls per task
    assert not [
        k for k, v in sys.path_importer_cache.items() if isinstance(v, zipimport.zipimporter)
    ]
    with pytest.raises(ImportError):
        importlib.import_module("orgx")
    assert drop_jar_paths() == []
