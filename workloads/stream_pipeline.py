"""Entry point that `ray job submit` runs: the spec's streaming section on Spark-on-Ray.

    scripts/kafka.sh start
    rayline stream replay flights --spec pipelines/flights.yaml --topic flights-events --rate 500
    ray job submit --address http://127.0.0.1:8265 --working-dir . \
        --runtime-env-json '{"env_vars": {"RAYLINE_DATA_DIR": "'$PWD'/data",
            "RAYLINE_WAREHOUSE": "'$PWD'/warehouse", "RAYLINE_RUN_STORE": "'$PWD'/runs",
            "RAYLINE_REGISTRY": "'$PWD'/registry", "RAYLINE_STREAM_CHECKPOINTS": "'$PWD'/checkpoints"}}' \
        -- python workloads/stream_pipeline.py --spec pipelines/flights.yaml

Runs until stopped (`ray job stop`, Ctrl-C, SIGTERM: a graceful stop; the checkpoint keeps
its place and a restart resumes with no lost and no duplicated output).
"""

from __future__ import annotations

import argparse
import sys

from rayline.cli import main


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Run a Rayline spec's streaming section.")
    ap.add_argument("--spec", required=True, help="pipeline spec (YAML) with a streaming section")
    ap.add_argument(
        "--available-now",
        action="store_true",
        help="process the events in the topic now, then stop",
    )
    ap.add_argument("--max-seconds", type=float, help="stop gracefully after this long")
    return ap.parse_args(argv)


if __name__ == "__main__":
    args = parse()
    cmd = ["stream", "run", args.spec]
    if args.available_now:
        cmd.append("--available-now")
    if args.max_seconds:
        cmd += ["--max-seconds", str(args.max_seconds)]
    sys.exit(main(cmd))
