#!/usr/bin/env bash
# Runs the whole test suite (unit, integration on a real local Ray + Spark-on-Ray, end-to-end
# through `ray start` and `ray job submit`). Extra arguments go to pytest, e.g. -m "not e2e".
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh dev
[ -f data/nycflights13/flights.csv ] || .venv/bin/python scripts/example_data.py
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
if [ $# -eq 0 ] || [ "${1:-}" = "-ra" ]; then  # the full run also checks lint and types
  .venv/bin/ruff check platform tests workloads scripts benchmarks
  .venv/bin/mypy
fi
# The streaming tests need a real Kafka broker: start it (fetched from Maven Central on first
# use), stop it when the tests end.
export RAYLINE_KAFKA_PORT="${RAYLINE_KAFKA_PORT:-19192}"
export RAYLINE_KAFKA_DIR="${RAYLINE_KAFKA_DIR:-$PWD/.cache/kafka/test-node-$RAYLINE_KAFKA_PORT}"
rm -rf "$RAYLINE_KAFKA_DIR"  # a fresh broker: no topics or offsets of earlier runs
scripts/kafka.sh start
trap 'scripts/kafka.sh stop' EXIT
# The object-storage tests need a real S3 server (SeaweedFS, built with Go on first use, about 5
# minutes, then cached under .cache/): a fresh one for the tests, its credentials exported as
# the standard AWS variables (for pyarrow, Spark's S3A and delta-rs alike), stopped at the end.
export RAYLINE_S3_PORT="${RAYLINE_S3_PORT:-20433}"
export RAYLINE_OBJECTSTORE_DIR="${RAYLINE_OBJECTSTORE_DIR:-$PWD/.cache/objectstore/test-node-$RAYLINE_S3_PORT}"
rm -rf "$RAYLINE_OBJECTSTORE_DIR"
scripts/objectstore.sh start
trap 'scripts/kafka.sh stop; scripts/objectstore.sh stop' EXIT
eval "$(scripts/objectstore.sh env)"
.venv/bin/python -m pytest "$@"
