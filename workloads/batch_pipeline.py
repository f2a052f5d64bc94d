"""Entry point that `ray job submit` runs: one batch pipeline spec on the cluster.

    ray job submit --address http://127.0.0.1:8265 --working-dir . \
        --runtime-env-json '{"env_vars": {"RAYLINE_DATA_DIR": "'$PWD'/data",
            "RAYLINE_WAREHOUSE": "'$PWD'/warehouse", "RAYLINE_RUN_STORE": "'$PWD'/runs"}}' \
        -- python workloads/batch_pipeline.py --spec pipelines/flights.yaml

Also runs with plain `python` (then on a new local Ray instance). Relative paths in the spec
resolve against the job's working directory, a temporary copy on the cluster: point data,
warehouse and run store at shared absolute paths with RAYLINE_DATA_DIR, RAYLINE_WAREHOUSE and
RAYLINE_RUN_STORE (see docs/operations.md).
"""

from __future__ import annotations

import argparse
import sys

from rayline.cli import main


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Run a Rayline batch pipeline spec.")
    ap.add_argument("--spec", required=True, help="pipeline spec (YAML)")
    ap.add_argument("--resume", metavar="RUN_ID", help="continue a failed run")
    return ap.parse_args(argv)


if __name__ == "__main__":
    args = parse()
    sys.exit(main(["run", args.spec] + (["--resume", args.resume] if args.resume else [])))
