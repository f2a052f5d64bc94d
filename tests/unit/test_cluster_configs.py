"""The cluster-launcher configs, checked offline against Ray's own schema and defaults."""

import copy
import subprocess
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
