"""Entry point that `ray job submit` runs: train, evaluate, register and gate a model.

    ray job submit --address http://127.0.0.1:8265 --working-dir . \
        --runtime-env-json '{"env_vars": {"RAYLINE_DATA_DIR": "'$PWD'/data",
            "RAYLINE_WAREHOUSE": "'$PWD'/warehouse", "RAYLINE_RUN_STORE": "'$PWD'/runs",
            "RAYLINE_REGISTRY": "'$PWD'/registry"}}' \
        -- python workloads/train.py --spec pipelines/flights.yaml

By default it trains on the curated table the pipeline already wrote to the warehouse (its own
run record, stage ``train``). With ``--with-pipeline`` it runs the batch pipeline first and hands
the curated data to Ray Data in memory (one run: the pipeline's stages, then ``train``).
"""

from __future__ import annotations

import argparse
import sys

from rayline.cli import main


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Train, evaluate and register a Rayline model.")
    ap.add_argument("--spec", required=True, help="pipeline spec (YAML) with an ml section")
    ap.add_argument("--resume", metavar="RUN_ID", help="continue a failed run")
    ap.add_argument(
        "--with-pipeline",
        action="store_true",
        help="run the batch pipeline first, then train on its output in memory",
    )
    return ap.parse_args(argv)


if __name__ == "__main__":
    args = parse()
    cmd = ["run", args.spec, "--train"] if args.with_pipeline else ["train", args.spec]
    sys.exit(main(cmd + (["--resume", args.resume] if args.resume else [])))
