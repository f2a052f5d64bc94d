"""The Spark-on-Ray session: connect to Ray, start Spark inside it with RayDP, always stop it.

Example:
    >>> from rayline.config import SessionConfig
    >>> with spark_on_ray(SessionConfig(), warehouse="warehouse") as spark:  # doctest: +SKIP
    ...     spark.range(10).count()
    10
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .config import SessionConfig
from .storage import is_uri, location, spark_path

__all__ = [
    "JAVA17_OPENS",
    "jvm_options",
    "spark_conf",
    "spark_jars",
    "s3a_conf",
    "spark_on_ray",
    "ray_session",
    "ensure_java",
]

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]

DELTA_EXTENSION = "io.delta.sql.DeltaSparkSessionExtension"
DELTA_CATALOG = "org.apache.spark.sql.delta.catalog.DeltaCatalog"

# Where S3A finds credentials, in order: the standard variables (AWS_ACCESS_KEY_ID,
# AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN), the shared credentials file (AWS_PROFILE; the file
# from AWS_CREDENTIAL_PROFILES_FILE, set from AWS_SHARED_CREDENTIALS_FILE, else
# ~/.aws/credentials), then an EC2/ECS instance role. Each JVM (driver and every executor)
# resolves them from its own environment: no key is ever put into Spark's configuration.
S3A_CREDENTIAL_PROVIDERS = ",".join(
    [
        "com.amazonaws.auth.EnvironmentVariableCredentialsProvider",
        "com.amazonaws.auth.profile.ProfileCredentialsProvider",
        "org.apache.hadoop.fs.s3a.auth.IAMInstanceCredentialsProvider",
    ]
)

# Packages RayDP's and Spark's JVMs reach into reflectively; Java 17 refuses without these.
JAVA17_OPENS = [
    "java.base/java.lang",
    "java.base/java.lang.invoke",
    "java.base/java.lang.reflect",
    "java.base/java.io",
    "java.base/java.net",
    "java.base/java.nio",
    "java.base/java.math",
    "java.base/java.text",
    "java.base/java.time",
    "java.base/java.util",
    "java.base/java.util.concurrent",
    "java.base/java.util.concurrent.atomic",
    "java.base/java.util.regex",
    "java.base/sun.nio.ch",
    "java.base/sun.nio.cs",
    "java.base/sun.security.action",
    "java.base/sun.util.calendar",
    "java.base/jdk.internal.misc",
    "java.base/jdk.internal.ref",
]


def jvm_options() -> list[str]:
    """The JVM flags every Spark/RayDP JVM needs on Java 17."""
    return [f"--add-opens={p}=ALL-UNNAMED" for p in JAVA17_OPENS] + [
        "-Dio.netty.tryReflectionSetAccessible=true"
    ]


def _merge_java_env(existing: str | None) -> str:
    opts = jvm_options()
    have = existing.split() if existing else []
    return " ".join(have + [o for o in opts if o not in have])


def ensure_java() -> None:
    """Fail early, clearly, when no Java 17+ is on PATH (or JAVA_HOME)."""
    import shutil
    import subprocess

    java = (
        str(Path(os.environ["JAVA_HOME"]) / "bin" / "java")
        if os.environ.get("JAVA_HOME")
        else shutil.which("java")
    )
    if not java or not Path(java).exists():
        raise RuntimeError(
            "Java not found: Spark-on-Ray needs Java 17 (install openjdk-17-jre-headless or set "
            "JAVA_HOME)."
        )
    out = subprocess.run([java, "-version"], capture_output=True, text=True).stderr
    first = out.splitlines()[0] if out else ""
    try:
        version = first.split('"')[1]
        parts = version.split(".")
        major = int(parts[1]) if parts[0] == "1" else int(parts[0])  # "1.8.0_392" is Java 8
    except (IndexError, ValueError):
        return
    if major < 17:
        raise RuntimeError(f"{java} is Java {major}; Spark-on-Ray here needs Java 17 ({first})")


def s3a_conf(environ: Any = None) -> dict[str, str]:
    """Hadoop S3A settings derived from the standard AWS environment (never a secret):

    - endpoint from ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` (an S3-compatible server);
      with one, path-style access, and plain HTTP when it is ``http://``;
    - region from ``AWS_REGION`` or ``AWS_DEFAULT_REGION``;
    - credentials through :data:`S3A_CREDENTIAL_PROVIDERS`, which read the environment and the
      profile files of the JVM that opens the file system.
    """
    env = os.environ if environ is None else environ
    conf = {
        "spark.hadoop.fs.s3a.aws.credentials.provider": S3A_CREDENTIAL_PROVIDERS,
        # s3:// paths (a user's sources) through S3A too; Rayline itself maps them to s3a://.
        "spark.hadoop.fs.s3.impl": "org.apache.hadoop.fs.s3a.S3AFileSystem",
        # An unreachable store fails a call in about a minute, not after Hadoop's defaults (20
        # SDK attempts inside each of 7 S3A retries: a publish hung for over 7 minutes with the
        # store stopped). Throttling (503 SlowDown) keeps its own, longer budget
        # (fs.s3a.retry.throttle.*); every value can be overridden in session.spark_conf.
        "spark.hadoop.fs.s3a.attempts.maximum": "2",
        "spark.hadoop.fs.s3a.retry.limit": "4",
        "spark.hadoop.fs.s3a.retry.interval": "1s",
        "spark.hadoop.fs.s3a.connection.establish.timeout": "5000",
    }
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if endpoint:
        conf["spark.hadoop.fs.s3a.endpoint"] = endpoint
        conf["spark.hadoop.fs.s3a.path.style.access"] = "true"
        secure = not endpoint.lower().startswith("http://")
        conf["spark.hadoop.fs.s3a.connection.ssl.enabled"] = str(secure).lower()
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    if region:
        conf["spark.hadoop.fs.s3a.endpoint.region"] = region
    return conf


_jars: list[str] | None = None


def spark_jars() -> list[str]:
    """The jars every session adds to PySpark's: Delta Lake and Hadoop's S3A connector.

    ``RAYLINE_SPARK_JARS`` (comma-separated paths) if set; else ``scripts/spark-jars.sh``, which
    fetches them from Maven Central once into ``.cache/spark-jars`` (needs ``mvn`` then) and
    prints them. Resolved once per process.
    """
    global _jars
    if os.environ.get("RAYLINE_SPARK_JARS"):
        return [j for j in os.environ["RAYLINE_SPARK_JARS"].split(",") if j]
    if _jars is not None:
        return _jars
    import subprocess

    script = ROOT / "scripts" / "spark-jars.sh"
    if not script.exists():
        script = Path.cwd() / "scripts" / "spark-jars.sh"
    if not script.exists():
        raise FileNotFoundError(
            "scripts/spark-jars.sh not found: run from the Rayline checkout or set "
            "RAYLINE_SPARK_JARS to the Delta Lake and S3A jars (comma-separated)"
        )
    t0 = time.perf_counter()
    out = subprocess.run([str(script)], capture_output=True, text=True, timeout=1200)
    if out.returncode != 0:
        raise RuntimeError(
            f"could not get the Delta Lake and S3A jars ({script}): {out.stderr.strip()[-2000:]}"
        )
    lines = out.stdout.strip().splitlines()
    jars = [j for j in (lines[-1] if lines else "").split(",") if j]
    if not jars:
        raise RuntimeError(f"{script} printed no jars")
    log.debug("spark jars resolved in %.2fs: %s", time.perf_counter() - t0, jars)
    _jars = jars
    return jars


def _joined(sep: str, *parts: str | None) -> str:
    seen: list[str] = []
    for part in parts:
        for item in (part or "").split(sep):
            if item and item not in seen:
                seen.append(item)
    return sep.join(seen)


def _metastore_dir(warehouse: str | os.PathLike[str]) -> Path:
    """Where the embedded Derby metastore lives: under a local warehouse; for a warehouse in
    an object store, ``RAYLINE_METASTORE_DIR`` or ``.rayline/metastore`` (Derby is local)."""
    if not is_uri(warehouse):
        return Path(str(location(warehouse)))
    return Path(os.environ.get("RAYLINE_METASTORE_DIR") or ".rayline/metastore").resolve()


def spark_conf(
    cfg: SessionConfig,
    warehouse: str | os.PathLike[str],
    jars: list[str] | None = None,
    ship_jars: bool = True,
) -> dict[str, str]:
    """Spark settings for a session: JVM flags, resources, adaptive execution, the catalog,
    Delta Lake, S3A from the AWS environment, and ``jars`` (see :func:`spark_jars`) on the
    driver and the executors.

    ``ship_jars``: executors may run on other machines, so they fetch the jars from the driver
    (``spark.jars``: each executor copies them, 290 MB, into its Ray session directory when it
    starts). Without it (a Ray instance this process started: one node) the jars only go on the
    driver's and the executors' classpaths, read where they are."""
    wh = _metastore_dir(warehouse)
    java_opts = " ".join(jvm_options())
    cores = cfg.num_executors * cfg.executor_cores
    conf = {
        "spark.driver.memory": cfg.driver_memory,
        "spark.driver.extraJavaOptions": f"{java_opts} -Dderby.system.home={wh}",
        "spark.executor.extraJavaOptions": java_opts,
        "spark.ray.raydp_app_master.extraJavaOptions": java_opts,
        "spark.ray.raydp_spark_executor.actor.resource.cpu": str(cfg.executor_cpus),
        "spark.sql.shuffle.partitions": str(cfg.shuffle_partitions or max(2, 2 * cores)),
        "spark.sql.adaptive.enabled": "true",
        "spark.sql.adaptive.coalescePartitions.enabled": "true",
        "spark.sql.session.timeZone": "UTC",
        "spark.sql.warehouse.dir": spark_path(warehouse),
        "spark.ui.showConsoleProgress": "false",
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        # PySpark's daemon without Spark's jar on the workers' sys.path: every Python task
        # re-read its 5,200-entry zip directory on Python 3.11 (see rayline.spark_daemon).
        "spark.python.daemon.module": "rayline.spark_daemon",
        # Executors lost mid-run (an actor killed) are replaced; let tasks retry meanwhile.
        "spark.task.maxFailures": "8",
        "spark.stage.maxConsecutiveAttempts": "8",
        # Tables are Delta tables (rayline.outputs); Parquet timestamps as INT64 microseconds,
        # which every reader (pyarrow, delta-rs) reads as a timestamp, not the legacy INT96.
        "spark.sql.extensions": DELTA_EXTENSION,
        "spark.sql.catalog.spark_catalog": DELTA_CATALOG,
        "spark.sql.parquet.outputTimestampType": "TIMESTAMP_MICROS",
        # Delta reconstructs a table version's file list with a Spark job of this many
        # partitions (default 50: most of an overwrite's cost on a few cores, for tables of tens
        # of files).
        "spark.databricks.delta.snapshotPartitions": str(max(2, cores)),
        **s3a_conf(),
    }
    if cfg.enable_hive:
        url = cfg.metastore_url or f"jdbc:derby:;databaseName={wh / '_metastore_db'};create=true"
        conf["spark.sql.catalogImplementation"] = "hive"
        conf["spark.hadoop.javax.jdo.option.ConnectionURL"] = url
        conf["spark.hadoop.datanucleus.schema.autoCreateAll"] = "true"
        conf["spark.hadoop.hive.metastore.schema.verification"] = "false"
    user = dict(cfg.spark_conf)
    conf.update(user)
    # Lists a user's settings add to rather than replace.
    conf["spark.sql.extensions"] = _joined(",", user.get("spark.sql.extensions"), DELTA_EXTENSION)
    if jars:
        # raydp.executor.extraClassPath: the executor JVMs' own classpath when they start, where
        # these paths exist (this machine); spark.jars: the driver's classpath, and executors on
        # any node fetch them from the driver (where the paths do not exist, the fetched copies
        # serve). Without shipping, spark.driver.extraClassPath (RayDP appends its own to it).
        conf["raydp.executor.extraClassPath"] = _joined(
            ":", user.get("raydp.executor.extraClassPath"), ":".join(jars)
        )
        if ship_jars:
            conf["spark.jars"] = _joined(",", user.get("spark.jars"), ",".join(jars))
        else:
            conf["spark.driver.extraClassPath"] = _joined(
                ":", user.get("spark.driver.extraClassPath"), ":".join(jars)
            )
    return conf


class _Interrupted(KeyboardInterrupt):
    """Raised in the main thread on SIGTERM so that cleanup runs (``ray job stop``)."""


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise _Interrupted(f"received signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _connect_ray(cfg: SessionConfig) -> bool:
    """Connect to (or start) Ray. Returns True when this call started/connected it."""
    import ray

    java_env = _merge_java_env(os.environ.get("JDK_JAVA_OPTIONS"))
    if ray.is_initialized():
        os.environ["JDK_JAVA_OPTIONS"] = java_env
        return False
    address = cfg.ray_address or os.environ.get("RAY_ADDRESS")
    # tf-keras (Keras 2) for TensorFlow in every worker: Keras 3 fails under Ray Train's
    # MultiWorkerMirroredStrategy.
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    runtime_env = {"env_vars": {"JDK_JAVA_OPTIONS": java_env, "TF_USE_LEGACY_KERAS": "1"}}
    if address:
        log.info("connecting to Ray at %s", address)
        os.environ["JDK_JAVA_OPTIONS"] = java_env
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=False)
        return True
    # A local instance: its raylet (and so every Java worker) inherits this environment.
    os.environ["JDK_JAVA_OPTIONS"] = java_env
    if cfg.local_ip:
        os.environ.setdefault("SPARK_LOCAL_IP", cfg.local_ip)
    num_cpus = cfg.num_cpus or (
        (os.cpu_count() or 2) + math.ceil(cfg.num_executors * cfg.executor_cpus)
    )
    # address="local": always a new instance, never a cluster that `ray start` left running.
    kwargs: dict[str, Any] = {
        "address": "local",
        "num_cpus": num_cpus,
        "include_dashboard": False,
        "log_to_driver": False,
    }
    if cfg.local_ip:
        kwargs["_node_ip_address"] = cfg.local_ip
    log.info("starting a local Ray instance with %d logical CPUs", num_cpus)
    ray.init(**kwargs)
    return True


@contextlib.contextmanager
def spark_on_ray(
    cfg: SessionConfig,
    warehouse: str | os.PathLike[str] = "warehouse",
    on_connect: Callable[[], None] | None = None,
) -> Iterator[Any]:
    """Start Spark inside Ray with RayDP and yield the SparkSession.

    Spark is always stopped on exit, also on errors, Ctrl-C and SIGTERM; Ray is shut down only
    when this call started it.

    Args:
        cfg: Session settings (executors, cores, memory, Ray address).
        warehouse: Directory of output tables and of the embedded metastore.
        on_connect: Called once Ray is connected, before Spark starts (a check that needs
            the cluster, such as :func:`rayline.preflight.check_shared`).

    Yields:
        A ``pyspark.sql.SparkSession`` whose executors are Ray actors.
    """
    ensure_java()
    if not is_uri(warehouse):
        Path(str(location(warehouse))).mkdir(parents=True, exist_ok=True)
    jars = spark_jars()
    import ray
    import raydp

    t0 = time.perf_counter()
    started_ray = False
    spark = None
    # The executors' Python workers run this interpreter (its venv has pyspark), not whatever
    # `python3` is first on the PATH Ray was started with (PySpark reads PYSPARK_PYTHON).
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    # The AWS SDK for Java v1 (S3A's) names the shared credentials file differently from the
    # CLI and the newer SDKs; a path, not a secret. Set before Ray starts so that its raylet,
    # and so every executor of a local instance, inherits it as it inherits the AWS_* keys.
    if os.environ.get("AWS_SHARED_CREDENTIALS_FILE"):
        os.environ.setdefault(
            "AWS_CREDENTIAL_PROFILES_FILE", os.environ["AWS_SHARED_CREDENTIALS_FILE"]
        )
    try:
        # Executors on other machines only in a cluster this process did not start itself.
        one_node = not ray.is_initialized() and not (
            cfg.ray_address or os.environ.get("RAY_ADDRESS")
        )
        started_ray = _connect_ray(cfg)
        if on_connect is not None:
            on_connect()  # e.g. refuse node-local locations on a multi-node cluster
        t1 = time.perf_counter()
        # After ray.init, which installs a SIGTERM handler of its own that exits at once.
        with _sigterm_as_interrupt():
            spark = raydp.init_spark(
                app_name=cfg.app_name,
                num_executors=cfg.num_executors,
                executor_cores=cfg.executor_cores,
                executor_memory=cfg.executor_memory,
                enable_hive=cfg.enable_hive,
                configs=spark_conf(cfg, warehouse, jars, ship_jars=not one_node),
            )
            spark.sparkContext.setLogLevel("WARN")
            log.info(
                "Spark-on-Ray ready: ray %.1fs, spark %.1fs (%d executor(s) x %d core(s))",
                t1 - t0,
                time.perf_counter() - t1,
                cfg.num_executors,
                cfg.executor_cores,
            )
            yield spark
    finally:
        if spark is not None or started_ray:
            with contextlib.suppress(Exception):
                raydp.stop_spark()
        if started_ray:
            with contextlib.suppress(Exception):
                ray.shutdown()
        sys.stderr.flush()


@contextlib.contextmanager
def ray_session(cfg: SessionConfig, on_connect: Callable[[], None] | None = None) -> Iterator[None]:
    """Connect to (or start) Ray without Spark; shut it down on exit if this call started it.
    ``on_connect`` runs once connected (inside the shutdown guard)."""
    import ray

    started = _connect_ray(cfg)
    try:
        if on_connect is not None:
            on_connect()
        yield
    finally:
        if started:
            with contextlib.suppress(Exception):
                ray.shutdown()
