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
