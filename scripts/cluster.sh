#!/usr/bin/env bash
# A local Ray cluster that `ray job submit` and `serve deploy` use exactly as a real one.
#   scripts/cluster.sh up [--workers N] | down | status
# Settings (environment): RAYLINE_RAY_PORT (6379), RAYLINE_DASHBOARD_PORT (8265),
# RAYLINE_METRICS_PORT (8080), RAYLINE_AGENT_PORT (52365), RAYLINE_CLUSTER_CPUS (cores + 2: Spark executors hold theirs),
# RAYLINE_RAY_TEMP_DIR (/tmp/ray on the default port, /tmp/ray-<port> on another).
# Token authentication (never turned off here): RAY_AUTH_MODE=token is exported and must be set
# for the job CLI too. `up` creates the cluster's token when none exists (RAY_AUTH_TOKEN, else
# the file RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token, mode 600) and never prints it.
#
# Multi-node (`up --workers N`, N >= 1; root, Linux): a head and N worker nodes on this machine,
# each its own `ray start --block` process tree, started with `setsid` (one process group per
# node) inside its own mount namespace (`unshare --mount --propagation private`) and on its own
# loopback address: workers 127.0.0.2, 127.0.0.3, ..., the head 127.0.0.254 (see node_ip: Ray
# will not keep 127.0.0.1 as a node's address); clients keep using 127.0.0.1 (the dashboard and
# job API on 127.0.0.1:<dashboard port>, Serve's proxy, the GCS at 127.0.0.1:<port>). Each node gets private tmpfs mounts over /tmp, /dev/shm and the
# checkout's data/, warehouse/, runs/, registry/ and checkpoints/: a file one node writes there
# is invisible to the others, as on separate machines. Shared: the network, the object store
# (S3; give every location as s3://...), and the installed software (.venv, the checkout's code,
# .cache/ with Spark's jars). Every node starts with the environment `up` ran with (AWS_* for
# S3A and pyarrow: secrets stay out of jobs' runtime envs) and the cluster's token, copied into
# its private /tmp (RAY_AUTH_TOKEN_PATH), or RAY_AUTH_TOKEN when that is how `up` got it.
#   Sizing: the head advertises RAYLINE_HEAD_CPUS logical CPUs (default 0), so nothing that
#   needs a CPU (Spark executors and RayDP's master, Ray Train workers, Tune trials, Serve
#   replicas, Ray Data tasks) lands there; it runs the job drivers (the Spark driver), the Serve
#   controller and the HTTP proxy, which need none. Each worker advertises RAYLINE_WORKER_CPUS
#   (default 2): one 1-CPU actor fills half a worker, and Ray's default (hybrid) scheduling
#   spreads from 50% utilisation on, so two executors, two Train workers or two replicas land on
#   two workers. Each node's object store is capped at RAYLINE_OBJECT_STORE_MEMORY bytes
#   (default 1 GiB; its /dev/shm tmpfs is sized to it).
#   Ports: GCS RAYLINE_RAY_PORT and dashboard RAYLINE_DASHBOARD_PORT on the head; every port a
#   node binds comes from its block of 200 from RAYLINE_NODE_PORT_BASE (default 22000; node i =
#   head 0, workers 1..N, at base + 200 i): node manager +0, object manager +1, metrics export
#   +2, dashboard agent HTTP +3 (the job agent on the head), dashboard agent gRPC +4, runtime env
#   agent +5, Ray client server +6 (head), the autoscaler's and the dashboard's metrics +7, +8
#   (head), worker processes +20..+199. Ray's C++ servers (GCS, node and object managers), the
#   agents' gRPC and the metrics servers listen on every address (Ray binds them to the node's
#   address only for 127.0.0.1): they stay on these ports; everything else listens on 127.0.0.x.
#   Two multi-node clusters need different GCS ports and bases. RAYLINE_METRICS_PORT,
#   RAYLINE_AGENT_PORT, RAYLINE_CLUSTER_CPUS and RAYLINE_RAY_TEMP_DIR apply to the single node.
#   State in .cache/cluster-<GCS port>/ (RAYLINE_CLUSTER_STATE, not under /tmp): `nodes` (name,
#   address, pid, pgid, start time, mount namespace per line) and per node <name>/node.log (`ray
#   start`'s output) and <name>/ray/, the node's Ray temp dir (its /tmp/ray, bind-mounted: logs
#   under <name>/ray/session_*/logs; session_latest there links to the node's own /tmp/ray).
#   `down` sends SIGTERM to each node's process group (`ray start` stops its node), then to every
#   process left in a node's mount namespace, and SIGKILL after 20 s in all: Ray runs each worker process
#   in a process group of its own and each job driver in a session of its own, so the namespace,
#   not the group, holds all of a node. Processes are found by the recorded pid and namespace
#   (checked by the node's own /tmp mount), never by name. `status` lists the nodes (address,
#   pid, alive, processes) and prints `ray status`.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
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
case "$RAY" in /*) ;; */*) RAY="$ROOT/$RAY" ;; esac  # the nodes run it from their own cwd
addr="http://127.0.0.1:$DPORT"
log="${TMPDIR:-/tmp}/rayline-cluster-$DPORT.log"

# Multi-node settings (see the header).
STATE="${RAYLINE_CLUSTER_STATE:-$ROOT/.cache/cluster-$PORT}"
NODES="$STATE/nodes"
PORT_BASE="${RAYLINE_NODE_PORT_BASE:-22000}"
HEAD_CPUS="${RAYLINE_HEAD_CPUS:-0}"
WORKER_CPUS="${RAYLINE_WORKER_CPUS:-2}"
OBJECT_STORE="${RAYLINE_OBJECT_STORE_MEMORY:-1073741824}"
PRIVATE_DIRS=(data warehouse runs registry checkpoints)
UP_TIMEOUT="${RAYLINE_CLUSTER_UP_TIMEOUT:-120}"

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

# --- multi-node -----------------------------------------------------------------------------

# A node's address: workers 127.0.0.2, 127.0.0.3, ...; the head's Ray node is 127.0.0.254. Not
# 127.0.0.1: Ray replaces that node address with the machine's network address (and binds the
# head's agents there), and with that replacement turned off, Ray's C++ servers listen on
# 127.0.0.1 alone, which the workers and the CLIs, replacing 127.0.0.1 the same way, never reach.
# Clients still use 127.0.0.1: the dashboard and job API, Serve's HTTP proxy, and the GCS (which
# listens on every address) as 127.0.0.1:<port>.
HEAD_IP=127.0.0.254
node_ip() { if [ "$1" = 0 ]; then echo "$HEAD_IP"; else echo "127.0.0.$(( $1 + 1 ))"; fi; }

# A process's start time (clock ticks since boot, /proc/PID/stat field 22): with the pid, it
# names the process, so a pid reused after the node died is never taken for the node.
start_time() { sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | awk '{print $20}'; }
alive() { [ -n "$1" ] && [ "$(start_time "$1")" = "$2" ]; }  # alive PID START

# Every process of a node is in the node's mount namespace, whatever its process group: Ray puts
# each worker process in a group of its own and each job's driver in a session of its own, so
# the group that `ray start` leads holds only Ray's daemons. A node is therefore identified by
# its namespace (the inode of /proc/PID/ns/mnt, recorded at start), checked to be the node's by
# the tmpfs it mounted on /tmp (named after this cluster and node), never by process names.
node_tag() { echo "rayline-$PORT-$1"; }
mnt_ns() { stat -L -c %i "/proc/$1/ns/mnt" 2>/dev/null; }
ns_pids() {  # ns_pids NS: the pids in mount namespace NS
  stat -L -c '%n %i' /proc/[0-9]*/ns/mnt 2>/dev/null | awk -v ns="$1" '$2 == ns {split($1, p, "/"); print p[3]}'
}
node_pids() {  # node_pids NAME NS: the processes of node NAME (none if NS is not the node's)
  local name="$1" ns="$2" pids first
  [ -n "$ns" ] && [ "$ns" != "$(mnt_ns $$)" ] && [ "$ns" != "$(mnt_ns 1)" ] || return 0
  pids=$(ns_pids "$ns")
  first=$(head -1 <<<"$pids")
  [ -n "$first" ] || return 0
  grep -q " /tmp [^ ]*.* - tmpfs $(node_tag "$name")-tmp " "/proc/$first/mountinfo" 2>/dev/null || return 0
  echo "$pids"
}

# Inside a node's new mount namespace (the script runs itself as `_node NAME INDEX` under
# unshare): private tmpfs over /tmp, /dev/shm and the checkout's data directories, the node's
# Ray temp dir bind-mounted from the state dir, the token copied in; then exec ray start.
node_main() {
  local name="$1" i="$2" ip b
  ip=$(node_ip "$i")
  b=$(( PORT_BASE + 200 * i ))
  local token_src="" shm_mb=$(( OBJECT_STORE / 1048576 + 256 ))
  # setsid made this process a session and group leader: its pid is the node's pgid.
  [ "$(ps -o pgid= -p $$ | tr -d ' ')" = "$$" ] || { echo "cluster: node $name: not a process group leader" >&2; exit 1; }
  if [ "$RAY_AUTH_MODE" = token ] && [ -z "${RAY_AUTH_TOKEN:-}" ]; then
    token_src="${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}"
    exec 3<"$token_src"  # opened before /tmp is covered (HOME may be under /tmp)
  fi
  # A checkout under /tmp (a CI clone) stays visible: held by a bind mount outside /tmp while
  # the node's tmpfs covers /tmp, then bound back to its path.
  local hold=""
  case "$ROOT/" in
    /tmp/*)
      hold=$(mktemp -d -p /run 2>/dev/null || mktemp -d -p /var/tmp)
      mount --bind "$ROOT" "$hold"
      ;;
  esac
  mount -t tmpfs -o mode=1777,size=8g "$(node_tag "$name")-tmp" /tmp
  if [ -n "$hold" ]; then
    mkdir -p "$ROOT"
    mount --bind "$hold" "$ROOT"
    umount "$hold" && rmdir "$hold"
  fi
  mount -t tmpfs -o mode=1777,size="${shm_mb}m" "$(node_tag "$name")-shm" /dev/shm
  local d
  for d in "${PRIVATE_DIRS[@]}"; do
    mount -t tmpfs -o mode=755,size=4g "$(node_tag "$name")-$d" "$ROOT/$d"
  done
  mkdir -p /tmp/ray
  mount --bind "$STATE/$name/ray" /tmp/ray
  if [ -n "$token_src" ]; then
    (umask 077; mkdir -p /tmp/.rayline-auth; cat <&3 >/tmp/.rayline-auth/token)
    exec 3<&-
    export RAY_AUTH_TOKEN_PATH=/tmp/.rayline-auth/token
  fi
  mkdir -p "$HOME" 2>/dev/null || true  # an empty HOME under /tmp: private to the node
  export TMPDIR=/tmp SPARK_LOCAL_IP="$ip"
  # On SIGTERM `ray start --block` first drains its node through the GCS (up to 30 s), which
  # `down` (SIGTERM to every process of every node) stops at the same time: no drain.
  export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="${RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S:-0}"
  echo $$ >"$STATE/$name/pid"
  local common=(
    --block --node-ip-address="$ip" --temp-dir=/tmp/ray
    --node-manager-port=$(( b + 0 )) --object-manager-port=$(( b + 1 ))
    --metrics-export-port=$(( b + 2 )) --dashboard-agent-listen-port=$(( b + 3 ))
    --dashboard-agent-grpc-port=$(( b + 4 )) --runtime-env-agent-port=$(( b + 5 ))
    --min-worker-port=$(( b + 20 )) --max-worker-port=$(( b + 199 ))
    --object-store-memory="$OBJECT_STORE" --disable-usage-stats
  )
  if [ "$i" = 0 ]; then
    # The autoscaler's and the dashboard's own metrics servers: fixed ports (44217, 44227) on
    # every address unless moved, so any two Ray heads on one machine collide there.
    export AUTOSCALER_METRIC_PORT=$(( b + 7 )) DASHBOARD_METRIC_PORT=$(( b + 8 ))
    exec "$RAY" start --head --port="$PORT" --ray-client-server-port=$(( b + 6 )) \
      --dashboard-host=127.0.0.1 --dashboard-port="$DPORT" --include-dashboard=true \
      --num-cpus="$HEAD_CPUS" "${common[@]}"
  fi
  exec "$RAY" start --address="$HEAD_IP:$PORT" --num-cpus="$WORKER_CPUS" "${common[@]}"
}

start_node() {  # start_node NAME INDEX: in the background, its own session and mount namespace
  local name="$1" i="$2" pid=""
  rm -rf "${STATE:?}/$name"
  mkdir -p "$STATE/$name/ray"
  # Ray's daemons keep the output streams they start with: a log file, never a pipe.
  setsid unshare --mount --propagation private -- "$ROOT/scripts/cluster.sh" _node "$name" "$i" \
    >"$STATE/$name/node.log" 2>&1 </dev/null &
  local bg=$!
  # The node writes its own pid (a session leader's: its pgid) once inside its namespace; it
  # keeps it through the exec of ray start.
  for _ in $(seq 1 300); do
    [ -s "$STATE/$name/pid" ] && pid=$(cat "$STATE/$name/pid") && break
    sleep 0.1
  done
  if [ -z "$pid" ]; then
    kill -KILL "$bg" 2>/dev/null || true  # what this call started, by its pid
    echo "cluster: node $name did not start within 30 s" >&2; node_log_tail "$name"; down_nodes >&2; exit 1
  fi
  local ns
  ns=$(mnt_ns "$pid")
  if [ -z "$ns" ] || [ "$ns" = "$(mnt_ns $$)" ]; then
    echo "cluster: node $name is not in a mount namespace of its own" >&2; node_log_tail "$name"; down_nodes >&2; exit 1
  fi
  echo "$name $(node_ip "$i") $pid $pid $(start_time "$pid") $ns" >>"$NODES"
}

node_log_tail() {  # a node's start log, and the errors its raylet and GCS logged
  local name="$1" logs f
  echo "--- $STATE/$name/node.log (last 25 lines)" >&2
  tail -25 "$STATE/$name/node.log" >&2 2>/dev/null || true
  # session_latest links to the node's own /tmp/ray: the newest session dir instead.
  logs=$(find "$STATE/$name/ray" -maxdepth 1 -name 'session_2*' -type d -printf '%T@ %p\n' 2>/dev/null | sort -rn | awk 'NR==1{print $2}')
  for f in raylet.out gcs_server.out; do
    if [ -z "$logs" ] || [ ! -f "$logs/logs/$f" ]; then continue; fi
    echo "--- $logs/logs/$f (errors, last 5)" >&2
    { grep -E '^\[[^]]* [CFE] ' "$logs/logs/$f" || true; } | tail -5 | cut -c1-500 >&2
  done
}

alive_nodes() {  # alive nodes in `ray status` (lines "  1 node_<id>" under "Active:")
  { "$RAY" status --address "$HEAD_IP:$PORT" 2>/dev/null || true; } \
    | awk '/^Active:/{a=1; next} /^(Pending|Recent failures):/{a=0} a && /node_/{n++} END{print n+0}'
}

fail_up() {  # fail_up MESSAGE: report, show the dead (else every) node's log tail, stop it all
  echo "cluster: $1" >&2
  local name ip pid pgid start ns shown=0
  while read -r name ip pid pgid start ns; do
    if ! alive "$pid" "$start"; then echo "cluster: node $name ($ip, pid $pid) exited" >&2; node_log_tail "$name"; shown=1; fi
  done <"$NODES"
  if [ "$shown" = 0 ]; then
    while read -r name ip pid pgid start ns; do node_log_tail "$name"; done <"$NODES"
  fi
  down_nodes >&2
  exit 1
}

up_nodes() {
  local workers="$1"
  [ "$(id -u)" = 0 ] || { echo "cluster: --workers needs root (unshare --mount, tmpfs mounts)" >&2; exit 1; }
  if [ -s "$NODES" ]; then
    local name ip pid pgid start ns any=0
    while read -r name ip pid pgid start ns; do alive "$pid" "$start" && any=1; done <"$NODES"
    if [ "$any" = 1 ]; then echo "cluster: already up (nodes in $NODES); scripts/cluster.sh status"; exit 0; fi
  fi
  if status; then echo "cluster: a cluster not started by --workers answers on $addr: scripts/cluster.sh down first" >&2; exit 1; fi
  case "$STATE/" in
    "$ROOT"/*) ;;  # the checkout stays visible in every node, also under /tmp
    /tmp/*) echo "cluster: the state dir $STATE must not be under /tmp (each node covers its /tmp)" >&2; exit 2 ;;
  esac
  if [ "$PORT_BASE" -lt 1024 ] || [ $(( PORT_BASE + 200 * (workers + 1) )) -gt 30000 ]; then
    echo "cluster: node ports $PORT_BASE..$(( PORT_BASE + 200 * (workers + 1) - 1 )) must lie in 1024..29999 (above: the object store's gRPC ports, then the ephemeral range): change RAYLINE_NODE_PORT_BASE or --workers" >&2
    exit 2
  fi
  ensure_token
  local d
  for d in "${PRIVATE_DIRS[@]}"; do mkdir -p "$ROOT/$d"; done
  mkdir -p "$STATE"
  : >"$NODES"
  start_node head 0
  local t0=$SECONDS
  until status; do
    # shellcheck disable=SC2046  # pid and start time: two words
    alive $(awk '$1=="head"{print $3, $5}' "$NODES") || fail_up "the head node exited during start-up"
    [ $(( SECONDS - t0 )) -lt "$UP_TIMEOUT" ] || fail_up "the head's dashboard at $addr did not answer within ${UP_TIMEOUT}s"
    sleep 1
  done
  local i
  for i in $(seq 1 "$workers"); do start_node "worker$i" "$i"; done
  local want=$(( workers + 1 )) n=0
  t0=$SECONDS
  while :; do
    n=$(alive_nodes)
    [ "$n" -ge "$want" ] && break
    local name ip pid pgid start ns
    while read -r name ip pid pgid start ns; do
      alive "$pid" "$start" || fail_up "node $name ($ip) exited during start-up ($n of $want nodes alive)"
    done <"$NODES"
    [ $(( SECONDS - t0 )) -lt "$UP_TIMEOUT" ] || fail_up "only $n of $want nodes alive in ray status after ${UP_TIMEOUT}s"
    sleep 2
  done
  echo "cluster: up with $want nodes; dashboard $addr (RAY_AUTH_MODE=$RAY_AUTH_MODE); GCS 127.0.0.1:$PORT"
  local name ip pid pgid start ns
  while read -r name ip pid pgid start ns; do
    echo "  $name $ip pid $pid; logs $STATE/$name/ray/session_*/logs"
  done <"$NODES"
  echo "  head: $HEAD_CPUS CPUs (drivers, Serve controller and proxy); workers: $WORKER_CPUS CPUs each; object store $(( OBJECT_STORE / 1048576 )) MiB per node"
  echo "  shared storage: only the object store; give data, warehouse, runs, registry and checkpoints as s3:// locations"
  echo "  submit: RAY_AUTH_MODE=$RAY_AUTH_MODE ray job submit --address $addr --working-dir . \\"
  echo "    --runtime-env-json '{\"env_vars\": {\"RAYLINE_DATA_DIR\": \"s3://BUCKET/data\", \"RAYLINE_WAREHOUSE\": \"s3://BUCKET/warehouse\", \"RAYLINE_RUN_STORE\": \"s3://BUCKET/runs\"}}' \\"
  echo "    -- python workloads/batch_pipeline.py --spec pipelines/flights.yaml"
}

down_nodes() {  # SIGTERM each node's process group, then its other processes; SIGKILL after 20 s
  [ -s "$NODES" ] || { echo "cluster: down (no nodes recorded in $NODES)"; rm -f "$NODES"; return 0; }
  local name ip pid pgid start ns stopped=0 left
  while read -r name ip pid pgid start ns; do
    [ "$pgid" != "$(ps -o pgid= -p $$ | tr -d ' ')" ] || continue  # never this script's own group
    # `ray start --block` stops its node's processes on SIGTERM; the group is its daemons.
    # Without its leader the group id may be anyone's: then the node's own processes.
    if alive "$pid" "$start"; then
      kill -TERM -- "-$pgid" 2>/dev/null || true
      stopped=$(( stopped + 1 ))
    else
      left=$(node_pids "$name" "$ns" | tr '\n' ' ')
      # shellcheck disable=SC2086  # one word per pid
      if [ -n "${left// /}" ]; then kill -TERM $left 2>/dev/null || true; stopped=$(( stopped + 1 )); fi
    fi
  done < <(tac "$NODES")  # workers first, then the head
  # Then what `ray start` left (job drivers run in sessions of their own): SIGTERM, and SIGKILL
  # after 20 s in all.
  local t0=$SECONDS termed=0
  while [ $(( SECONDS - t0 )) -lt 20 ]; do
    left=""
    while read -r name ip pid pgid start ns; do left+=$(node_pids "$name" "$ns"); done <"$NODES"
    [ -z "$left" ] && break
    if [ "$termed" = 0 ]; then
      local leaders=0
      while read -r name ip pid pgid start ns; do alive "$pid" "$start" && leaders=1; done <"$NODES"
      if [ "$leaders" = 0 ] || [ $(( SECONDS - t0 )) -ge 10 ]; then
        while read -r name ip pid pgid start ns; do
          # shellcheck disable=SC2046  # one word per pid
          kill -TERM $(node_pids "$name" "$ns") 2>/dev/null || true
        done <"$NODES"
        termed=1
      fi
    fi
    sleep 0.5
  done
  while read -r name ip pid pgid start ns; do
    left=$(node_pids "$name" "$ns" | tr '\n' ' ')
    if [ -n "${left// /}" ]; then
      echo "cluster: node $name still has processes after 20 s (${left% }): SIGKILL"
      # shellcheck disable=SC2086  # one word per pid
      kill -KILL $left 2>/dev/null || true
    fi
  done <"$NODES"
  rm -f "$NODES"
  echo "cluster: down ($stopped node(s) stopped)"
}

status_nodes() {
  local name ip pid pgid start ns up=0 n
  printf '%-9s %-12s %-8s %-6s %s\n' node address pid alive processes
  while read -r name ip pid pgid start ns; do
    n=$(node_pids "$name" "$ns" | grep -c . || true)
    if alive "$pid" "$start"; then up=1; printf '%-9s %-12s %-8s %-6s %s\n' "$name" "$ip" "$pid" yes "$n"
    else printf '%-9s %-12s %-8s %-6s %s\n' "$name" "$ip" "$pid" no "$n"; fi
  done <"$NODES"
  if [ "$up" = 1 ] && status; then
    echo "cluster: up; dashboard $addr"
    "$RAY" status --address "$HEAD_IP:$PORT" 2>/dev/null | sed -n '1,40p'
  else
    echo "cluster: down"; exit 3
  fi
}

# --- commands -------------------------------------------------------------------------------

case "${1:-}" in
  _node)  # internal: one node of a multi-node cluster, inside its mount namespace
    node_main "$2" "$3"
    ;;
  up)
    shift
    workers=""
    while [ $# -gt 0 ]; do
      case "$1" in
        --workers) workers="${2:-}"; shift 2 || true ;;
        --workers=*) workers="${1#--workers=}"; shift ;;
        *) echo "usage: $0 up [--workers N]" >&2; exit 2 ;;
      esac
    done
    if [ -n "$workers" ]; then
      [[ "$workers" =~ ^[1-9][0-9]*$ ]] || { echo "cluster: --workers needs a number >= 1, not '$workers'" >&2; exit 2; }
      up_nodes "$workers"
      exit 0
    fi
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
    # A multi-node cluster: the process groups it recorded, never processes found by name.
    if [ -s "$NODES" ]; then down_nodes; exit 0; fi
    # Stop this cluster's processes only (those that name its GCS port), not other Ray
    # instances on the machine as `ray stop` would; RAYLINE_STOP_ALL=1 runs `ray stop` instead.
    if [ "${RAYLINE_STOP_ALL:-0}" = 1 ]; then "$RAY" stop --force >/dev/null 2>&1 || true; echo "cluster: down (ray stop)"; exit 0; fi
    pattern="(gcs_server_port=|gcs-address=[^ ]*:|ray\.address=[^ ]*:|--address=[^ ]*:)$PORT( |$)"
    pids=$(pgrep -f -- "$pattern" || true)
    # shellcheck disable=SC2086  # one word per pid
    if [ -n "$pids" ]; then
      kill $pids 2>/dev/null || true
      for _ in $(seq 1 20); do pgrep -f -- "$pattern" >/dev/null || break; sleep 0.5; done
      pids=$(pgrep -f -- "$pattern" || true)
      [ -z "$pids" ] || kill -9 $pids 2>/dev/null || true
    fi
    echo "cluster: down"
    ;;
  status)
    if [ -s "$NODES" ]; then status_nodes; exit 0; fi
    if status; then echo "cluster: up; dashboard $addr"; "$RAY" status --address "127.0.0.1:$PORT" 2>/dev/null | sed -n '1,20p'; else echo "cluster: down"; exit 3; fi
    ;;
  *)
    echo "usage: $0 up [--workers N] | down | status" >&2; exit 2 ;;
esac
