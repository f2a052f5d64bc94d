#!/usr/bin/env bash
# A local Ray cluster that `ray job submit` and `serve deploy` use exactly as a real one.
#   scripts/cluster.sh up|down|status
# Settings (environment): RAYLINE_RAY_PORT (6379), RAYLINE_DASHBOARD_PORT (8265),
# RAYLINE_METRICS_PORT (8080), RAYLINE_AGENT_PORT (52365), RAYLINE_CLUSTER_CPUS (cores + 2: Spark executors hold theirs),
# RAYLINE_RAY_TEMP_DIR (/tmp/ray on the default port, /tmp/ray-<port> on another).
# Token authentication (never turned off here): RAY_AUTH_MODE=token is exported and must be set
# for the job CLI too. `up` creates the cluster's token when none exists (RAY_AUTH_TOKEN, else
# the file RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token, mode 600) and never prints it.
set -euo pipefail
cd "$(dirname "$0")/.."
RAY="${RAY:-.venv/bin/ray}"
PORT="${RAYLINE_RAY_PORT:-6379}"
DPORT="${RAYLINE_DASHBOARD_PORT:-8265}"
MPORT="${RAYLINE_METRICS_PORT:-8080}"
# The job agent's HTTP port: Ray's default (52365) clashes with any other Ray head on the machine.
APORT="${RAYLINE_AGENT_PORT:-52365}"
CPUS="${RAYLINE_CLUSTER_CPUS:-$(( $(nproc) + 2 ))}"
# Ray's temp dir (sessions, logs, and ray_current_cluster: the cluster a job's driver connects
# to). A second cluster on the machine gets its own: with a shared one, jobs of the first
# cluster connect to whichever cluster started last.
if [ "$PORT" = 6379 ]; then TEMP="${RAYLINE_RAY_TEMP_DIR:-/tmp/ray}"; else TEMP="${RAYLINE_RAY_TEMP_DIR:-/tmp/ray-$PORT}"; fi
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
export RAY_USAGE_STATS_ENABLED=0
# Jobs run `python` from the PATH the cluster starts with: make it the project's venv.
[ -x .venv/bin/python ] && export PATH="$PWD/.venv/bin:$PATH"
addr="http://127.0.0.1:$DPORT"
log="${TMPDIR:-/tmp}/rayline-cluster-$DPORT.log"

status() { "$RAY" job list --address "$addr" >/dev/null 2>&1; }

# The token every node and client of this cluster shares. `ray start --head` does not create
# one (Ray 2.60 does so only for a local ray.init()), so on a machine where Ray never ran it
# refused to start: create it here, with Ray's own generator for the default file.
ensure_token() {
  [ "$RAY_AUTH_MODE" = token ] || return 0
  if [ -n "${RAY_AUTH_TOKEN:-}" ]; then echo "cluster: token from RAY_AUTH_TOKEN"; return 0; fi
  local path="${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}"
  if [ ! -s "$path" ]; then
    (
      umask 077
      mkdir -p "$(dirname "$path")"
      if [ -z "${RAY_AUTH_TOKEN_PATH:-}" ]; then
        "$RAY" get-auth-token --generate >/dev/null 2>&1  # prints the token: never to a log
      else  # Ray's generator writes only the default file
        od -An -N32 -tx1 /dev/urandom | tr -d ' \n' >"$path"
      fi
    ) || { echo "cluster: could not create the auth token at $path" >&2; exit 1; }
    [ -s "$path" ] || { echo "cluster: no auth token at $path after generating it" >&2; exit 1; }
    echo "cluster: created the cluster's auth token in $path"
  fi
  chmod 600 "$path"
  echo "cluster: token auth; clients on this machine read $path (elsewhere: copy it to ~/.ray/auth_token, or set RAY_AUTH_TOKEN_PATH), with RAY_AUTH_MODE=token"
}

case "${1:-}" in
  up)
    if status; then echo "cluster: already up; dashboard $addr"; exit 0; fi
    ensure_token
    # Ray's daemons keep the output streams they start with: give them a log file, never a pipe.
    "$RAY" start --head --node-ip-address=127.0.0.1 --port="$PORT" \
      --dashboard-host=127.0.0.1 --dashboard-port="$DPORT" --include-dashboard=true \
      --metrics-export-port="$MPORT" --dashboard-agent-listen-port="$APORT" \
      --num-cpus="$CPUS" --temp-dir="$TEMP" --disable-usage-stats >"$log" 2>&1 </dev/null \
      || { echo "cluster: ray start failed; see $log" >&2; tail -20 "$log" >&2; exit 1; }
    for _ in $(seq 1 60); do status && break; sleep 1; done
    status || { echo "cluster: the dashboard at $addr did not answer within 60 s" >&2; exit 1; }
    echo "cluster: up; dashboard $addr (RAY_AUTH_MODE=$RAY_AUTH_MODE); metrics on 127.0.0.1:$MPORT; logs in $TEMP/session_latest/logs"
    echo "  submit: RAY_AUTH_MODE=$RAY_AUTH_MODE ray job submit --address $addr --working-dir . \\"
    echo "    --runtime-env-json '{\"env_vars\": {\"RAYLINE_DATA_DIR\": \"$PWD/data\", \"RAYLINE_WAREHOUSE\": \"$PWD/warehouse\", \"RAYLINE_RUN_STORE\": \"$PWD/runs\"}}' \\"
    echo "    -- python workloads/batch_pipeline.py --spec pipelines/flights.yaml"
    ;;
  down)
    # Stop this cluster's processes only (those that name its GCS port), not other Ray
    # instances on the machine as `ray stop` would; RAYLINE_STOP_ALL=1 runs `ray stop` instead.
    if [ "${RAYLINE_STOP_ALL:-0}" = 1 ]; then "$RAY" stop --force >/dev/null 2>&1 || true; echo "cluster: down (ray stop)"; exit 0; fi
    pattern="(gcs_server_port=|gcs-address=[^ ]*:|ray\.address=[^ ]*:|--address=[^ ]*:)$PORT( |$)"
    pids=$(pgrep -f -- "$pattern" || true)
    if [ -n "$pids" ]; then
      kill $pids 2>/dev/null || true
      for _ in $(seq 1 20); do pgrep -f -- "$pattern" >/dev/null || break; sleep 0.5; done
      pids=$(pgrep -f -- "$pattern" || true)
      [ -z "$pids" ] || kill -9 $pids 2>/dev/null || true
    fi
    echo "cluster: down"
    ;;
  status)
    if status; then echo "cluster: up; dashboard $addr"; "$RAY" status --address "127.0.0.1:$PORT" 2>/dev/null | sed -n '1,20p'; else echo "cluster: down"; exit 3; fi
    ;;
  *)
    echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
