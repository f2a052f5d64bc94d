#!/usr/bin/env bash
# The whole platform on this machine, as on a cluster: a local Ray cluster (dashboard on
# 127.0.0.1:8265), the flights pipeline as one Ray job, training (Ray Train, a small Ray Tune
# sweep, the Spark GBT challenger) + registration and promotion as a second, `serve deploy` of
# the champion with a few real predictions, then a Kafka broker and a short streaming replay
# scored end to end as a third Ray job: the dashboard's Jobs view shows all three. The cluster, the endpoint and the broker stay up at the end so you can
# look around; the last lines say how to stop them.
#
#   scripts/demo.sh                  (scripts/run_example.sh runs this)
#   scripts/demo.sh --object-store   the same with every location on S3: a local S3 server
#                                    (scripts/objectstore.sh), the example data uploaded to it
# Settings: RAYLINE_DEMO_EVENTS (streamed events, default 2000), RAYLINE_TUNE_SAMPLES (trials, 3).
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
t_start=$(date +%s)
object_store=0
for a in "$@"; do
  case "$a" in
    --object-store) object_store=1 ;;
    *) echo "usage: $0 [--object-store]" >&2; exit 2 ;;
  esac
done
step() { printf '\n== [%s, %ds] %s\n' "$(date +%H:%M:%S)" $(( $(date +%s) - t_start )) "$*"; }

step "set-up (.venv, pinned dependencies, example data)"
scripts/setup.sh dev
[ -f data/nycflights13/flights.csv ] || .venv/bin/python scripts/example_data.py
export PATH="$root/.venv/bin:$PATH"
export RAY_AUTH_MODE=token
addr="http://127.0.0.1:${RAYLINE_DASHBOARD_PORT:-8265}"
events="${RAYLINE_DEMO_EVENTS:-2000}"
# Where data, tables, runs, models and stream checkpoints live: local directories, or prefixes of
# the object store's bucket. The cluster's processes (and so the jobs) get the store's endpoint
# and credentials from the environment the cluster starts with, never from a job's runtime env.
base="$root"
if [ "$object_store" = 1 ]; then
  step "object store (SeaweedFS S3 on 127.0.0.1) and the example data uploaded to it"
  scripts/objectstore.sh start
  eval "$(scripts/objectstore.sh env)"
  base="s3://$RAYLINE_S3_BUCKET/demo"
  python - "$root/data/nycflights13" "$base/data/nycflights13" <<'EOF'
import sys

import pyarrow.fs as pafs

from rayline.storage import location

dst = location(sys.argv[2])
pafs.copy_files(sys.argv[1], dst.fs_path, destination_filesystem=dst.fs)
print("uploaded", sys.argv[1], "->", dst)
EOF
fi

step "local Ray cluster"
scripts/cluster.sh up

env_json=$(python - <<EOF
import json
print(json.dumps({"env_vars": {
    "RAYLINE_DATA_DIR": "$base/data",
    "RAYLINE_WAREHOUSE": "$base/warehouse",
    "RAYLINE_RUN_STORE": "$base/runs",
    "RAYLINE_REGISTRY": "$base/registry",
    "RAYLINE_STREAM_CHECKPOINTS": "$base/checkpoints",
    "RAYLINE_TUNE_SAMPLES": "${RAYLINE_TUNE_SAMPLES:-3}",
    "RAYLINE_METRICS_FLUSH_SECONDS": "12",
}}))
EOF
)

job() {  # job NAME ARGS...: submit a workload as a Ray job and follow its logs until it ends
  local name="$1"; shift
  local out
  for _ in $(seq 1 30); do  # the job agent may need a few seconds after `ray start`
    if out=$(ray job submit --address "$addr" --no-wait --working-dir . \
        --runtime-env-json "$env_json" --submission-id "rayline-$name-$(date +%s)" -- "$@" 2>&1); then
      break
    fi
    grep -q "No available agent" <<<"$out" || { echo "$out" >&2; exit 1; }
    sleep 3
  done
  local id
  id=$(grep -o "rayline-$name-[0-9]*" <<<"$out" | head -1)
  echo "job $id (Jobs view: $addr/#/jobs)"
  ray job logs --address "$addr" --follow "$id" | grep -E --line-buffered \
    "INFO (\[|run |split|preprocessor|training|tuning|trial|evaluated|promoted|published|Spark GBT|handoff)|model:|report:|succeeded|WARNING rayline|error" \
    | grep -v -E --line-buffered "^[IWE][0-9]{4} " || true  # not TensorFlow's absl lines
  local status
  status=$(ray job status --address "$addr" "$id" 2>&1 | tr -d '\033' | grep -oiE "succeeded|failed|stopped" | tail -1)
  [ "${status,,}" = "succeeded" ] || { echo "job $id: $status; see: ray job logs --address $addr $id" >&2; exit 1; }
}

step "Ray job 1: the flights pipeline (schema, transform, quality, analytics, curated table)"
job pipeline python workloads/batch_pipeline.py --spec pipelines/flights.yaml

step "Ray job 2: train + tune + Spark challenger on the curated table, evaluate, register, gate"
job train python workloads/train.py --spec pipelines/flights.yaml
rayline models list --registry "$base/registry"

step "serve deploy: the champion behind Ray Serve on 127.0.0.1:8000"
python - <<EOF
import yaml
cfg = yaml.safe_load(open("serve_configs/flights.yaml"))
cfg["applications"][0]["args"]["registry"] = "$base/registry"
open("$root/.cache/serve-flights.yaml", "w").write(yaml.safe_dump(cfg, sort_keys=False))
EOF
serve deploy "$root/.cache/serve-flights.yaml" --address "$addr"
for _ in $(seq 1 120); do
  curl -sf http://127.0.0.1:8000/readyz >/dev/null 2>&1 && break
  sleep 2
done
curl -sf http://127.0.0.1:8000/readyz >/dev/null || { echo "serving did not become ready" >&2; serve status --address "$addr" >&2; exit 1; }
rows=$(python - <<'EOF'
import json
import pandas as pd
df = pd.read_csv("data/nycflights13/flights.csv", na_values=["NA"]).dropna().sample(3, random_state=7)
weather = pd.read_csv("data/nycflights13/weather.csv", na_values=["NA"])
df = df.merge(weather[["origin", "year", "month", "day", "hour", "temp", "humid", "wind_speed", "precip", "visib"]],
              on=["origin", "year", "month", "day", "hour"], how="left")
df["day_of_week"] = pd.to_datetime(df[["year", "month", "day"]]).dt.day_of_week.add(1) % 7 + 1
cols = ["dep_delay", "sched_dep_time", "distance", "hour", "month", "day_of_week", "temp", "humid",
        "wind_speed", "precip", "visib", "carrier", "origin", "dest"]
print(json.dumps([{k: (None if pd.isna(v) else (v.item() if hasattr(v, "item") else v))
                   for k, v in r.items()} for r in df[cols + ["arr_delay"]].to_dict("records")]))
EOF
)
echo "three real flights (arr_delay is the truth, not sent to the model):"
python -c "import json,sys; [print('  ', r) for r in json.loads(sys.argv[1])]" "$rows"
rayline predict flights_arr_delay "$(python -c "import json,sys; print(json.dumps([{k: v for k, v in r.items() if k != 'arr_delay'} for r in json.loads(sys.argv[1])]))" "$rows")"

step "Kafka broker, and $events flights replayed as events"
scripts/kafka.sh start
RAYLINE_DATA_DIR="$base/data" rayline stream replay flights --spec pipelines/flights.yaml \
  --topic flights-events --limit "$events" --rate 2000

step "Ray job 3: the streaming job scores the events with the champion (available-now)"
job stream python workloads/stream_pipeline.py --spec pipelines/flights.yaml --available-now
echo "three predictions from the topic flights-predictions:"
rayline stream tail flights-predictions --limit 3 --timeout 5

step "done in $(( $(date +%s) - t_start ))s"
echo "runs and their HTML reports:  rayline runs list --run-store $base/runs; rayline runs show RUN_ID --run-store $base/runs"
[ "$object_store" = 1 ] || ls -1d "$root"/runs/*/report.html 2>/dev/null | tail -3 | sed 's/^/  file:\/\//'
echo "dashboard (jobs, Serve, metrics):  $addr"
echo "predict:  rayline predict flights_arr_delay ROWS_JSON   (API: http://127.0.0.1:8000/docs)"
if [ "$object_store" = 1 ]; then
  echo "stop:     serve shutdown --address $addr -y; scripts/kafka.sh stop; scripts/cluster.sh down; scripts/objectstore.sh stop"
else
  echo "stop:     serve shutdown --address $addr -y; scripts/kafka.sh stop; scripts/cluster.sh down"
fi
