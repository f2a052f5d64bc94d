#!/usr/bin/env bash
# A real S3-compatible object store for Rayline's development, tests and demo: SeaweedFS
# (Apache-2.0) as one `weed server` process (master, volume server, filer and the S3 API) on
# 127.0.0.1, built once from the Go module proxy and cached in .cache/seaweedfs/.
#
#   scripts/objectstore.sh build    build the weed binary once (first time: about 5 minutes)
#   scripts/objectstore.sh start    build if needed, start, wait for the S3 API, create the bucket
#   scripts/objectstore.sh stop     stop it (SIGTERM, then SIGKILL after 30 s)
#   scripts/objectstore.sh restart  stop, then start
#   scripts/objectstore.sh status   running or not, endpoint and bucket (exit 3 when not running)
#   scripts/objectstore.sh env      export lines for clients: eval "$(scripts/objectstore.sh env)"
#
# Settings (environment): RAYLINE_S3_PORT (S3 API port, default 20333: above Ray's worker port
# range 10002-19999, its gRPC ports below the ephemeral range), RAYLINE_OBJECTSTORE_DIR
# (data, config, credentials, log, pid; default .cache/objectstore/node-<port>), RAYLINE_S3_BUCKET
# (default rayline), AWS_REGION (default us-east-1). Idempotent: start when running and stop
# when stopped are no-ops; a restart keeps the data and the credentials.
#
# Ports, all on 127.0.0.1 and derived from RAYLINE_S3_PORT: master +1, volume server +2, filer
# +3, and each one's gRPC port at +10000 (20333-20336 and 30333-30336 by default); instances
# need RAYLINE_S3_PORTs at least 4 apart. Off: the Iceberg REST catalog (8181), the Lance
# namespace server (9101), the metrics port, telemetry, the filer's HTTP API, the embedded IAM/STS
# API. SeaweedFS's gRPC Unix sockets are /tmp/seaweedfs-<service>-grpc-<gRPC port>.sock.
#
# Credentials: S3 requests must be signed with the store's key; anonymous requests are refused.
# On first start a random access key and secret are written to <dir>/credentials (mode 600), or
# AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY are taken if both are set then; only `env` prints them.
# The internal master/volume/filer ports are loopback-only but, as in any SeaweedFS without gRPC
# mTLS, not authenticated: this is a store for one developer's machine, not a shared service.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"

version="v0.0.0-20261109003541-7506e5f91cd6"
module="github.com/seaweedfs/seaweedfs"
cache="$root/.cache/seaweedfs"
weed="$cache/weed-$version"

port="${RAYLINE_S3_PORT:-20333}"
case "$port" in
  '' | *[!0-9]*) echo "objectstore: RAYLINE_S3_PORT must be a port number, not '$port'" >&2; exit 2 ;;
esac
if [ "$port" -lt 1024 ] || [ "$port" -gt 55000 ]; then
  echo "objectstore: RAYLINE_S3_PORT must be in 1024..55000 (ports up to +10003 are derived from it)" >&2
  exit 2
fi
# Derived ports, all on 127.0.0.1: the master, volume server and filer at port + 1, + 2, + 3, and
# each service's gRPC port at its HTTP port + 10000 (SeaweedFS's convention, so `weed shell
# -master=127.0.0.1:<port+1>` finds it). Two instances need RAYLINE_S3_PORTs at least 4 apart.
master_port=$((port + 1))
volume_port=$((port + 2))
filer_port=$((port + 3))
s3_grpc_port=$((port + 10000))
master_grpc_port=$((master_port + 10000))
volume_grpc_port=$((volume_port + 10000))
filer_grpc_port=$((filer_port + 10000))

bucket="${RAYLINE_S3_BUCKET:-rayline}"
if ! [[ "$bucket" =~ ^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$ ]]; then
  echo "objectstore: RAYLINE_S3_BUCKET must be an S3 bucket name (3-63 of a-z 0-9 . -), not '$bucket'" >&2
  exit 2
fi
region="${AWS_REGION:-us-east-1}"
node="${RAYLINE_OBJECTSTORE_DIR:-$root/.cache/objectstore/node-$port}"
pidfile="$node/weed.pid"
log="$node/weed.log"
creds="$node/credentials"
s3config="$node/s3.json"
endpoint="http://127.0.0.1:$port"
python="${RAYLINE_PYTHON:-$root/.venv/bin/python}"

gocmd() {  # go with its caches (and its telemetry counters) under .cache/seaweedfs/go, not $HOME
  env GOPATH="$cache/go" GOMODCACHE="$cache/go/mod" GOCACHE="$cache/go/build" \
    XDG_CONFIG_HOME="$cache/go/config" GOENV=off GOTOOLCHAIN=local \
    GOFLAGS="-buildvcs=false -modcacherw" CGO_ENABLED=0 go "$@"
}

build() {
  [ -x "$weed" ] && return 0
  command -v go >/dev/null || { echo "objectstore: Go (go) is needed to build SeaweedFS" >&2; exit 1; }
  mkdir -p "$cache"
  exec 9> "$cache/.build.lock"
  flock 9  # one build at a time; a second caller waits, then finds the binary
  if [ -x "$weed" ]; then
    exec 9>&-
    return 0
  fi
  local t0 src dir blog="$cache/build.log"
  t0=$(date +%s)
  echo "objectstore: building SeaweedFS $version (first time: about 5 minutes; log $blog)" >&2
  : > "$blog"
  dir="$(gocmd mod download -json "$module@$version" 2>> "$blog" |
    sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')" || true
  if [ -z "$dir" ] || [ ! -f "$dir/weed/weed.go" ]; then
    echo "objectstore: go mod download $module@$version failed; see $blog" >&2
    exit 1
  fi
  src="$cache/src-$version"
  rm -rf "$src"
  cp -r "$dir" "$src"
  chmod -R u+w "$src"
  if ! (cd "$src/weed" && gocmd build -trimpath -ldflags "-s -w" -o "$weed.tmp" .) >> "$blog" 2>&1; then
    echo "objectstore: go build failed; last lines of $blog:" >&2
    grep -v '^go: downloading' "$blog" | tail -20 >&2
    exit 1
  fi
  mv "$weed.tmp" "$weed"
  # Only the binary is kept: the sources, module and build caches take about 4 GB.
  rm -rf "$src" "$cache/go"
  exec 9>&-
  echo "objectstore: built $weed ($(du -m "$weed" | cut -f1) MB) in $(($(date +%s) - t0)) s" >&2
}

# Every port this instance listens on, for the "port taken" check.
all_ports() {
  echo "$port $master_port $volume_port $filer_port $master_grpc_port $volume_grpc_port" \
    "$filer_grpc_port $s3_grpc_port"
}

# The process in the pidfile is alive and is this instance's weed (not a reused pid).
running() {
  [ -f "$pidfile" ] || return 1
  local pid
  pid="$(cat "$pidfile")"
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
  tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -q -- "-s3.port=$port "
}

alive() {  # the started process exists (during start-up, before it has exec'd weed)
  [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null
}

port_open() {  # something accepts connections on 127.0.0.1:$1
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

http_get() {  # http_get PORT PATH: the raw HTTP response (headers and body), empty if none in 3 s
  timeout 3 bash -c '
    exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 1
    printf "GET %s HTTP/1.0\r\nHost: 127.0.0.1:%s\r\n\r\n" "$2" "$1" >&3
    cat <&3' _ "$1" "$2" 2>/dev/null || true
}

s3_answers() {  # the S3 API gives an HTTP answer (an anonymous request: 403 AccessDenied)
  http_get "$port" / | head -1 | grep -q '^HTTP/1\.[01] [0-9]'
}

volume_registered() {  # the master knows the volume server, so writes can be placed
  http_get "$master_port" /dir/status | grep -q "127.0.0.1:$volume_port"
}

valid_key() {  # characters safe to embed in JSON and shell quotes, and a sane length
  case "$1" in
    '' | *[!A-Za-z0-9/+=._-]*) return 1 ;;
  esac
  [ "${#1}" -ge 8 ] && [ "${#1}" -le 128 ]
}

random_hex() {  # random_hex NBYTES
  head -c "$1" /dev/urandom | od -An -tx1 | tr -d ' \n'
}

read_credentials() {  # sets access_key and secret_key from $creds
  access_key="$(sed -n 's/^AWS_ACCESS_KEY_ID=//p' "$creds")"
  secret_key="$(sed -n 's/^AWS_SECRET_ACCESS_KEY=//p' "$creds")"
  if ! valid_key "$access_key" || ! valid_key "$secret_key"; then
    echo "objectstore: $creds is not a valid credentials file (AWS_ACCESS_KEY_ID=... and" \
      "AWS_SECRET_ACCESS_KEY=... lines); remove it to generate new credentials" >&2
    exit 1
  fi
}

ensure_credentials() {  # first start: from the environment if both are set, else random
  if [ ! -f "$creds" ]; then
    local key secret from
    if [ -n "${AWS_ACCESS_KEY_ID:-}" ] && [ -n "${AWS_SECRET_ACCESS_KEY:-}" ]; then
      key="$AWS_ACCESS_KEY_ID" secret="$AWS_SECRET_ACCESS_KEY" from="taken from the environment"
      if ! valid_key "$key" || ! valid_key "$secret"; then
        echo "objectstore: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY must be 8-128 characters of" \
          "A-Z a-z 0-9 / + = . _ -; unset them to have random credentials generated" >&2
        exit 1
      fi
    else
      key="RL$(random_hex 9 | tr a-f A-F)" secret="$(random_hex 20)" from="generated"
    fi
    (umask 077 && printf 'AWS_ACCESS_KEY_ID=%s\nAWS_SECRET_ACCESS_KEY=%s\n' "$key" "$secret" > "$creds.tmp")
    mv "$creds.tmp" "$creds"
    echo "objectstore: credentials $from, stored in $creds (mode 600; print them with: $0 env)"
  fi
  chmod 600 "$creds"
  read_credentials
  if [ -n "${AWS_ACCESS_KEY_ID:-}" ] && [ "$AWS_ACCESS_KEY_ID" != "$access_key" ]; then
    echo "objectstore: note: AWS_ACCESS_KEY_ID in the environment is not this store's key;" \
      "the credentials in $creds are used (eval \"\$($0 env)\" to use them)" >&2
  fi
}

write_s3_config() {  # SeaweedFS's static S3 identities: one admin identity, no anonymous one
  (umask 077 && cat > "$s3config.tmp" <<EOF
{
  "identities": [
    {
      "name": "rayline",
      "credentials": [{"accessKey": "$access_key", "secretKey": "$secret_key"}],
      "actions": ["Admin", "Read", "List", "Tagging", "Write"]
    }
  ]
}
EOF
  )
  mv "$s3config.tmp" "$s3config"
}

write_security_config() {  # once: random keys that must stay the same for the store's lifetime
  [ -f "$node/security.toml" ] && return 0
  (umask 077 && cat > "$node/security.toml.tmp" <<EOF
# SeaweedFS security settings for this store (written once by scripts/objectstore.sh).
# The filer's IAM gRPC calls (create users, policies) require a token signed with this key.
[jwt.filer_signing]
key = "$(random_hex 32)"

# Would wrap an SSE-S3 key-encryption key stored on the filer; SSE-S3 itself stays off (no
# s3.sse.kek or s3.sse.key): set only so SeaweedFS does not warn about a plaintext KEK.
[s3.sse.kek]
passphrase = "$(random_hex 32)"
EOF
  )
  mv "$node/security.toml.tmp" "$node/security.toml"
}

# Unix sockets: the filer's and the S3 API's are placed in the instance directory (if the path
# fits a socket address); the gRPC ones are fixed by SeaweedFS at
# /tmp/seaweedfs-<service>-grpc-<grpc port>.sock, so distinct per instance through the ports.
socket_path() {  # socket_path NAME
  local p="$node/$1.sock"
  if [ "${#p}" -gt 100 ]; then p="/tmp/rayline-seaweedfs-$1-$port.sock"; fi
  echo "$p"
}

leftover_sockets() {
  echo "$(socket_path filer) $(socket_path s3)"
  local svc
  for svc in "master $master_grpc_port" "volume $volume_grpc_port" "filer $filer_grpc_port" \
    "s3 $s3_grpc_port"; do
    set -- $svc
    echo "/tmp/seaweedfs-$1-grpc-$2.sock"
  done
}

create_bucket() {
  if [ -x "$python" ] && "$python" -c 'import pyarrow.fs' 2>/dev/null; then
    # Through the S3 API with the credentials (in the environment, not on a command line).
    S3_KEY="$access_key" S3_SECRET="$secret_key" S3_ENDPOINT="127.0.0.1:$port" S3_BUCKET="$bucket" \
      S3_REGION="$region" "$python" - <<'EOF'
import os
import sys
import time

from pyarrow import fs

s3 = fs.S3FileSystem(
    access_key=os.environ["S3_KEY"],
    secret_key=os.environ["S3_SECRET"],
    endpoint_override=os.environ["S3_ENDPOINT"],
    scheme="http",
    region=os.environ["S3_REGION"],
    allow_bucket_creation=True,
)
bucket = os.environ["S3_BUCKET"]
error = None
for _ in range(30):
    try:
        if s3.get_file_info(bucket).type != fs.FileType.Directory:
            s3.create_dir(bucket)
        sys.exit(0)
    except OSError as e:  # the filer may still be starting
        error = e
        time.sleep(1)
sys.exit(f"objectstore: cannot create the bucket {bucket}: {error}")
EOF
    return
  fi
  # No Python with pyarrow (scripts/setup.sh not run yet): SeaweedFS's own shell over gRPC.
  local out shell=("$weed" shell -master="127.0.0.1:$master_port" -filer="127.0.0.1:$filer_port")
  out="$(echo "s3.bucket.list" | "${shell[@]}" 2>&1)" || true
  if ! grep -qE "^ *$bucket(\s|$)" <<< "$out"; then
    out="$(echo "s3.bucket.create -name $bucket -owner rayline" | "${shell[@]}" 2>&1)" || true
    if grep -qi "error\|fail" <<< "$out"; then
      echo "objectstore: cannot create the bucket $bucket: $out" >&2
      return 1
    fi
  fi
}

start() {
  if running; then
    echo "objectstore: already running at $endpoint (pid $(cat "$pidfile")), bucket $bucket"
    return 0
  fi
  local p
  for p in $(all_ports); do
    if port_open "$p"; then
      echo "objectstore: port $p (derived from RAYLINE_S3_PORT=$port) is taken by another" \
        "process; set RAYLINE_S3_PORT to another port (instances need ports at least 4 apart)" >&2
      exit 1
    fi
  done
  build
  mkdir -p "$node/data"
  chmod 700 "$node"
  ensure_credentials
  write_s3_config
  write_security_config
  echo "objectstore: starting SeaweedFS S3 at $endpoint (data $node/data, log $log)"
  # The AWS_* variables are removed from weed's environment: SeaweedFS would add them as an extra
  # admin identity. Its working directory is the instance directory (it reads *.toml from ".").
  (
    cd "$node"
    exec env -u AWS_ACCESS_KEY_ID -u AWS_SECRET_ACCESS_KEY -u AWS_SESSION_TOKEN \
      nohup "$weed" -logtostderr=true server \
      -ip=127.0.0.1 -ip.bind=127.0.0.1 -dir="$node/data" \
      -master.port="$master_port" -master.port.grpc="$master_grpc_port" \
      -master.volumeSizeLimitMB=1024 -master.telemetry=false -master.electionTimeout=2s \
      -volume.port="$volume_port" -volume.port.grpc="$volume_grpc_port" \
      -volume.max=0 -volume.preStopSeconds=1 \
      -filer.port="$filer_port" -filer.port.grpc="$filer_grpc_port" -filer.disableHttp=true \
      -filer.localSocket="$(socket_path filer)" \
      -s3 -s3.port="$port" -s3.port.grpc="$s3_grpc_port" \
      -s3.port.iceberg=0 -s3.port.lance=0 -s3.iam=false -s3.config="$s3config" \
      -s3.autoCreateBucket=false \
      -s3.localSocket="$(socket_path s3)" \
      >> "$log" 2>&1 < /dev/null
  ) &
  echo $! > "$pidfile"
  local t0=$SECONDS
  until s3_answers && volume_registered; do
    if ! alive; then
      echo "objectstore: SeaweedFS exited; last lines of $log:" >&2
      tail -20 "$log" >&2
      rm -f "$pidfile"
      exit 1
    fi
    if [ $((SECONDS - t0)) -ge 90 ]; then
      echo "objectstore: the S3 API did not answer within 90 s; see $log (stopping it)" >&2
      stop >&2
      exit 1
    fi
    sleep 0.5
  done
  if ! create_bucket; then
    stop >&2
    exit 1
  fi
  echo "objectstore: ready at $endpoint, bucket $bucket (pid $(cat "$pidfile"))"
  echo "objectstore: for clients: eval \"\$($0 env)\""
}

stop() {
  if ! running; then
    echo "objectstore: not running"
    rm -f "$pidfile"
    return 0
  fi
  local pid
  pid="$(cat "$pidfile")"
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 60); do
    if ! kill -0 "$pid" 2>/dev/null; then
      break
    fi
    sleep 0.5
  done
  if kill -0 "$pid" 2>/dev/null; then
    kill -KILL "$pid" 2>/dev/null || true
    echo "objectstore: killed after 30 s"
  else
    echo "objectstore: stopped"
  fi
  rm -f "$pidfile"
  local s
  for s in $(leftover_sockets); do
    [ -S "$s" ] && rm -f "$s"
  done
  return 0
}

status() {
  if ! running; then
    echo "objectstore: not running (endpoint would be $endpoint, bucket $bucket)"
    exit 3
  fi
  if s3_answers; then
    echo "objectstore: running at $endpoint (pid $(cat "$pidfile")), bucket $bucket, data $node/data"
  else
    echo "objectstore: running (pid $(cat "$pidfile")) but the S3 API at $endpoint does not answer;" \
      "see $log"
    exit 1
  fi
}

print_env() {
  if [ ! -f "$creds" ]; then
    echo "objectstore: no credentials yet in $node: run '$0 start' first" >&2
    exit 1
  fi
  read_credentials
  echo "export AWS_ENDPOINT_URL='$endpoint'"
  echo "export AWS_ACCESS_KEY_ID='$access_key'"
  echo "export AWS_SECRET_ACCESS_KEY='$secret_key'"
  echo "export AWS_REGION='$region'"
  echo "export RAYLINE_S3_BUCKET='$bucket'"
}

case "${1:-}" in
  build) build ;;
  start) start ;;
  stop) stop ;;
  restart) stop; start ;;
  status) status ;;
  env) print_env ;;
  *) echo "usage: $0 build|start|stop|restart|status|env" >&2; exit 2 ;;
esac
