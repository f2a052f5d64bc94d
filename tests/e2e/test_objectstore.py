"""End to end through scripts/objectstore.sh: a private SeaweedFS S3 store on a free port with its
own directory; pyarrow round trip with the credentials `env` prints, wrong or missing credentials
refused, and `stop` leaves no process."""

from __future__ import annotations

import contextlib
import os
import random
import shlex
import socket
import subprocess
import uuid
from pathlib import Path

import pytest
from pyarrow import fs

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = str(ROOT / "scripts" / "objectstore.sh")

# The first run builds the binary (5 minutes on 2 idle cores, 15+ on busy ones): above the
# suite's 900 s default.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_base_port() -> int:
    """An S3 port whose derived ports (+1..+3 and their gRPC ports at +10000) are all free; below
    the kernel's ephemeral range so none is taken by an outgoing connection meanwhile."""
    for _ in range(200):
        base = random.randrange(20000, 22000, 4)
        if all(_free(p) for b in (base, base + 10000) for p in range(b, b + 4)):
            return base
    raise RuntimeError("no free port range for the object store")


def run(env: dict, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([SCRIPT, *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    node = tmp_path_factory.mktemp("objectstore") / "node"
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AWS_", "RAYLINE_S3_", "RAYLINE_OBJECTSTORE_"))
    }
    env.update(RAYLINE_S3_PORT=str(free_base_port()), RAYLINE_OBJECTSTORE_DIR=str(node))
    try:
        up = run(env, "start", timeout=1200)  # builds the binary if it is not cached yet
        assert up.returncode == 0, up.stdout + up.stderr
        exports = run(env, "env")
        assert exports.returncode == 0, exports.stderr
        creds = {}
        for line in exports.stdout.splitlines():
            key, _, value = line.removeprefix("export ").partition("=")
            creds[key] = shlex.split(value)[0]
        yield {"env": env, "node": node, "creds": creds, "log": node / "weed.log"}
    finally:
        run(env, "stop")


def s3fs(creds: dict, **overrides) -> fs.S3FileSystem:
    kwargs = dict(
        access_key=creds["AWS_ACCESS_KEY_ID"],
        secret_key=creds["AWS_SECRET_ACCESS_KEY"],
        endpoint_override=creds["AWS_ENDPOINT_URL"].removeprefix("http://"),
        scheme="http",
        region=creds["AWS_REGION"],
        retry_strategy=fs.AwsStandardS3RetryStrategy(max_attempts=1),
    )
    kwargs.update(overrides)
    if kwargs.get("anonymous"):
        kwargs.pop("access_key")
        kwargs.pop("secret_key")
    return fs.S3FileSystem(**kwargs)


def test_env_and_status(store):
    creds = store["creds"]
    port = store["env"]["RAYLINE_S3_PORT"]
    assert creds["AWS_ENDPOINT_URL"] == f"http://127.0.0.1:{port}"
    assert creds["RAYLINE_S3_BUCKET"] == "rayline"
    assert creds["AWS_REGION"] == "us-east-1"
    assert (store["node"] / "credentials").stat().st_mode & 0o777 == 0o600
    status = run(store["env"], "status")
    assert status.returncode == 0, status.stdout + status.stderr
    assert creds["AWS_SECRET_ACCESS_KEY"] not in status.stdout + status.stderr
    again = run(store["env"], "start")  # running: a no-op
    assert again.returncode == 0 and "already running" in again.stdout
    assert creds["AWS_SECRET_ACCESS_KEY"] not in store["log"].read_text()


def test_round_trip(store):
    creds = store["creds"]
    s3 = s3fs(creds)
    bucket = creds["RAYLINE_S3_BUCKET"]
    key = f"{bucket}/e2e/{uuid.uuid4().hex}/object.bin"
    data = os.urandom(3 * 1024 * 1024 + 17)  # under and over SeaweedFS's 4 MB chunks alike
    with s3.open_output_stream(key) as f:
        f.write(data)
    listed = s3.get_file_info(fs.FileSelector(key.rsplit("/", 1)[0]))
    assert [(i.path, i.size) for i in listed] == [(key, len(data))]
    with s3.open_input_stream(key) as f:
        assert f.read() == data
    s3.delete_file(key)
    assert s3.get_file_info(key).type == fs.FileType.NotFound


@pytest.mark.parametrize("who", ["wrong secret", "unknown key", "anonymous"])
def test_refused(store, who):
    creds = store["creds"]
    bucket = creds["RAYLINE_S3_BUCKET"]
    good = s3fs(creds)
    existing = f"{bucket}/e2e/refused-{uuid.uuid4().hex}"
    with good.open_output_stream(existing) as f:
        f.write(b"secret data")
    bad = {
        "wrong secret": lambda: s3fs(creds, secret_key="x" * 40),
        "unknown key": lambda: s3fs(creds, access_key="RLNOSUCHKEY000000000"),
        "anonymous": lambda: s3fs(creds, anonymous=True),
    }[who]()
    written = f"{bucket}/e2e/refused-{uuid.uuid4().hex}"
    try:
        with pytest.raises(OSError), bad.open_input_stream(existing) as f:
            f.read()
        with pytest.raises(OSError):
            bad.get_file_info(fs.FileSelector(f"{bucket}/e2e"))
        with pytest.raises(OSError), bad.open_output_stream(written) as f:
            f.write(b"should not land")
        assert good.get_file_info(written).type == fs.FileType.NotFound
    finally:
        good.delete_file(existing)
        with contextlib.suppress(OSError):
            good.delete_file(written)


def test_stop_leaves_no_process(store):
    env = store["env"]
    pid = int((store["node"] / "weed.pid").read_text())
    os.kill(pid, 0)  # running now
    stopped = run(env, "stop")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert run(env, "status").returncode == 3
    assert run(env, "stop").returncode == 0  # stopped: a no-op
