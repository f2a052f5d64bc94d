"""The cluster-launcher configs, checked offline against Ray's own schema and defaults."""

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rayline.session import JAVA17_OPENS

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["cluster.yaml", "cluster-onprem.yaml"])
def test_cluster_config_is_valid_for_ray_up(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((ROOT / name).read_text())
    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)
    assert config["cluster_name"].startswith("rayline")
    assert config["max_workers"] >= 1
    head = config["head_start_ray_commands"]
    assert any("--dashboard-host=127.0.0.1" in c and "--metrics-export-port" in c for c in head)
    setup = " ".join(config["setup_commands"])
    assert "openjdk-17" in setup and "pip install" in setup and "-e ~/rayline" in setup


def test_cluster_config_rejects_a_typo():
    from jsonschema import ValidationError
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    raw["available_node_types"]["worker"]["max_wrokers"] = 3
    with pytest.raises(ValidationError):
        validate_config(prepare_config(raw))


def test_cluster_env_sets_the_java_flags():
    out = subprocess.run(
        [
            "bash",
            "-c",
            f". {ROOT}/scripts/cluster-env.sh && echo $JDK_JAVA_OPTIONS && echo $RAY_AUTH_MODE",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\n")
    for pkg in JAVA17_OPENS:
        assert f"--add-opens={pkg}=ALL-UNNAMED" in out[0].split()
    assert out[1] == "token"


def _prepared(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(copy.deepcopy(yaml.safe_load((ROOT / name).read_text())))
    validate_config(config)
    return config


@pytest.mark.parametrize("name", ["cluster.yaml", "cluster-onprem.yaml"])
def test_cluster_config_token_is_made_on_the_head_and_synced_to_workers(name):
    config = _prepared(name)
    head, workers = config["head_start_ray_commands"], config["worker_start_ray_commands"]
    # On the head, before `ray start --head`, only when missing, never printed, mode 600.
    start = next(i for i, c in enumerate(head) if "ray start --head" in c)
    steps = [i for i, c in enumerate(head) if "ray get-auth-token --generate" in c]
    assert len(steps) == 1 and steps[0] < start
    step = head[steps[0]]
    assert "test -s ~/.ray/auth_token ||" in step
    assert "--generate >/dev/null" in step
    assert "umask 077" in step and "chmod 600 ~/.ray/auth_token" in step
    # Nowhere else: not on workers, not in commands every node runs, not from the launching
    # machine (no file mount of a token).
    elsewhere = (
        workers
        + config["setup_commands"]
        + config["initialization_commands"]
        + config["worker_setup_commands"]
        + config["head_setup_commands"]
    )
    assert not any("get-auth-token" in c for c in elsewhere)
    assert not any("auth_token" in f"{k} {v}" for k, v in config["file_mounts"].items())
    # Workers get the head's file (the autoscaler on the head syncs cluster_synced_files to
    # each worker before its commands), and refuse to start without it.
    assert config["cluster_synced_files"] == ["~/.ray/auth_token"]
    wstart = next(i for i, c in enumerate(workers) if "ray start --address" in c)
    assert any(c.startswith("test -s ~/.ray/auth_token ||") for c in workers[:wstart])
    # Every `ray start` runs with cluster-env.sh: RAY_AUTH_MODE=token.
    assert all("cluster-env.sh" in c for c in head + workers if "ray start" in c)


@pytest.mark.parametrize("name", ["cluster.yaml", "cluster-onprem.yaml"])
def test_cluster_config_token_step_runs(name, tmp_path):
    """The head's token step and the workers' check, run as written (HOME a temporary
    directory with the checkout at ~/rayline, Ray from this venv)."""
    config = _prepared(name)
    step = next(c for c in config["head_start_ray_commands"] if "get-auth-token" in c)
    check = next(c for c in config["worker_start_ray_commands"] if "auth_token" in c)
    (tmp_path / "rayline").symlink_to(ROOT)
    env = {
        "HOME": str(tmp_path),
        "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
        "RAY_USAGE_STATS_ENABLED": "0",
    }

    def run(cmd):
        return subprocess.run(
            ["bash", "-c", cmd], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120
        )

    missing = run(check)
    assert missing.returncode != 0 and "synced from the head" in missing.stderr
    first = run(step)
    assert first.returncode == 0, first.stderr
    token_file = tmp_path / ".ray" / "auth_token"
    token = token_file.read_text().strip()
    assert len(token) >= 32
    assert token_file.stat().st_mode & 0o777 == 0o600
    assert token not in first.stdout + first.stderr
    again = run(step)  # a restart keeps the cluster's token
    assert again.returncode == 0 and token_file.read_text().strip() == token
    assert run(check).returncode == 0
