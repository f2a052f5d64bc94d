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


def test_spark_conf_adds_delta_and_micros_timestamps(tmp_path):
    conf = spark_conf(SessionConfig(), tmp_path)
    assert conf["spark.sql.extensions"] == "io.delta.sql.DeltaSparkSessionExtension"
    assert conf["spark.sql.catalog.spark_catalog"] == (
        "org.apache.spark.sql.delta.catalog.DeltaCatalog"
    )
    assert conf["spark.sql.parquet.outputTimestampType"] == "TIMESTAMP_MICROS"
    assert conf["spark.sql.catalogImplementation"] == "hive"  # Delta's catalog wraps Hive's
    # a user's extension is kept beside Delta's
    user = spark_conf(SessionConfig(spark_conf={"spark.sql.extensions": "x.Ext"}), tmp_path)
    assert user["spark.sql.extensions"] == "x.Ext,io.delta.sql.DeltaSparkSessionExtension"


def test_spark_conf_puts_the_jars_on_driver_and_executors_after_the_users(tmp_path):
    jars = ["/c/delta-spark.jar", "/c/hadoop-aws.jar"]
    conf = spark_conf(SessionConfig(), tmp_path, jars)
    assert conf["spark.jars"] == "/c/delta-spark.jar,/c/hadoop-aws.jar"
    assert conf["raydp.executor.extraClassPath"] == "/c/delta-spark.jar:/c/hadoop-aws.jar"
    user = spark_conf(
        SessionConfig(
            spark_conf={
                "spark.jars": "/k/kafka.jar",
                "raydp.executor.extraClassPath": "/k/kafka.jar",
            }
        ),
        tmp_path,
        jars,
    )
    assert user["spark.jars"] == "/k/kafka.jar,/c/delta-spark.jar,/c/hadoop-aws.jar"
    assert (
        user["raydp.executor.extraClassPath"] == "/k/kafka.jar:/c/delta-spark.jar:/c/hadoop-aws.jar"
    )
    assert "spark.jars" not in spark_conf(SessionConfig(), tmp_path)
    # a Ray instance of this process (one node): on the classpaths only, nothing shipped
    local = spark_conf(SessionConfig(), tmp_path, jars, ship_jars=False)
    assert "spark.jars" not in local
    assert local["spark.driver.extraClassPath"] == "/c/delta-spark.jar:/c/hadoop-aws.jar"
    assert local["raydp.executor.extraClassPath"] == "/c/delta-spark.jar:/c/hadoop-aws.jar"


def test_s3a_settings_come_from_the_aws_environment_without_secrets(tmp_path, monkeypatch):
    from rayline.session import s3a_conf

    env = {
        "AWS_ENDPOINT_URL": "http://127.0.0.1:19333",
        "AWS_REGION": "eu-west-3",
        "AWS_ACCESS_KEY_ID": "AKIDEXAMPLE",
        "AWS_SECRET_ACCESS_KEY": "very-secret",
    }
    conf = s3a_conf(env)
    assert conf["spark.hadoop.fs.s3a.endpoint"] == "http://127.0.0.1:19333"
    assert conf["spark.hadoop.fs.s3a.path.style.access"] == "true"
    assert conf["spark.hadoop.fs.s3a.connection.ssl.enabled"] == "false"
    assert conf["spark.hadoop.fs.s3a.endpoint.region"] == "eu-west-3"
    providers = conf["spark.hadoop.fs.s3a.aws.credentials.provider"].split(",")
    assert providers[:2] == [
        "com.amazonaws.auth.EnvironmentVariableCredentialsProvider",
        "com.amazonaws.auth.profile.ProfileCredentialsProvider",
    ]
    # https endpoint; the default region variable; AWS_ENDPOINT_URL_S3 wins
    https = s3a_conf(
        {
            "AWS_ENDPOINT_URL": "http://other",
            "AWS_ENDPOINT_URL_S3": "https://s3.example.com",
            "AWS_DEFAULT_REGION": "us-east-2",
        }
    )
    assert https["spark.hadoop.fs.s3a.endpoint"] == "https://s3.example.com"
    assert https["spark.hadoop.fs.s3a.connection.ssl.enabled"] == "true"
    assert https["spark.hadoop.fs.s3a.endpoint.region"] == "us-east-2"
    # plain AWS: no endpoint, no path-style
    assert "spark.hadoop.fs.s3a.endpoint" not in s3a_conf({})
    # the whole session conf carries no key from the environment
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    whole = spark_conf(SessionConfig(), tmp_path, ["/c/x.jar"])
    text = repr(whole)
    assert "very-secret" not in text and "AKIDEXAMPLE" not in text
    assert whole["spark.hadoop.fs.s3a.endpoint"] == "http://127.0.0.1:19333"


def test_a_warehouse_in_s3_keeps_the_metastore_local(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYLINE_METASTORE_DIR", str(tmp_path / "ms"))
    conf = spark_conf(SessionConfig(), "s3://bucket/wh")
    assert conf["spark.sql.warehouse.dir"] == "s3a://bucket/wh"
    assert str(tmp_path / "ms") in conf["spark.hadoop.javax.jdo.option.ConnectionURL"]
    assert f"-Dderby.system.home={tmp_path / 'ms'}" in conf["spark.driver.extraJavaOptions"]


def test_spark_jars_from_the_environment_or_the_script(monkeypatch, tmp_path):
    from rayline import session

    monkeypatch.setenv("RAYLINE_SPARK_JARS", "/a.jar,/b.jar")
    assert session.spark_jars() == ["/a.jar", "/b.jar"]
    monkeypatch.delenv("RAYLINE_SPARK_JARS")
    monkeypatch.setattr(session, "_jars", None)
    # the script without Maven and without a cache: a clear error naming mvn
    fake_root = tmp_path / "root"
    (fake_root / "scripts").mkdir(parents=True)
    script = session.ROOT / "scripts" / "spark-jars.sh"
    (fake_root / "scripts" / "spark-jars.sh").write_text(script.read_text())
    (fake_root / "scripts" / "spark-jars.sh").chmod(0o755)
    monkeypatch.setattr(session, "ROOT", fake_root)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("bash", "dirname", "mkdir", "sha256sum", "cut", "flock", "cat", "ls", "paste"):
        import shutil

        path = shutil.which(tool)
        if path:
            (bindir / tool).symlink_to(path)
    monkeypatch.setenv("PATH", str(bindir))
    with pytest.raises(RuntimeError, match=r"Maven \(mvn\) is needed"):
        session.spark_jars()
