#!/usr/bin/env bash
# A real Apache Kafka broker for Rayline's streaming stage and its tests: a single KRaft node
# (broker + controller) on 127.0.0.1, run from the broker's jars fetched from Maven Central.
#
#   scripts/kafka.sh start     fetch the jars once, format the storage on first start, start, wait
#   scripts/kafka.sh stop      stop it (SIGTERM, then SIGKILL after 30 s)
#   scripts/kafka.sh status    running or not, and where
#   scripts/kafka.sh jars      fetch the Spark Kafka connector jars; print them comma-separated
#
# Settings (environment): RAYLINE_KAFKA_PORT (default 19092; the controller uses port + 1),
# RAYLINE_KAFKA_DIR (data, config, log, pid; default .cache/kafka/node), RAYLINE_KAFKA_CACHE
# (jars; default .cache/kafka). Idempotent: start when running and stop when stopped are no-ops.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
port="${RAYLINE_KAFKA_PORT:-19092}"
cport=$((port + 1))
cache="${RAYLINE_KAFKA_CACHE:-$root/.cache/kafka}"
node="${RAYLINE_KAFKA_DIR:-$cache/node-$port}"
libs="$cache/broker"
spark_jars="$cache/spark-jars"
pidfile="$node/kafka.pid"
log="$node/kafka.log"

fetch() {  # fetch POM OUTDIR: resolve a pom's dependencies into OUTDIR once per pom version
  local pom="$1" out="$2" stamp
  stamp="$out/.stamp-$(sha256sum "$pom" | cut -c1-16)"
  if [ ! -f "$stamp" ]; then
    command -v mvn >/dev/null || { echo "kafka: Maven (mvn) is needed to fetch the jars" >&2; exit 1; }
    echo "kafka: fetching $(basename "$pom" .xml) jars from Maven Central into $out" >&2
    rm -rf "$out"
    mkdir -p "$out"
    mvn -q -B -f "$pom" dependency:copy-dependencies -DoutputDirectory="$out" >&2
    touch "$stamp"
  fi
}

running() { [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; }

answers() {  # the broker accepts connections on its port
  (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null
}

write_config() {
  mkdir -p "$node/data"
  cat > "$node/server.properties" <<EOF
process.roles=broker,controller
node.id=1
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$cport
advertised.listeners=PLAINTEXT://127.0.0.1:$port
controller.listener.names=CONTROLLER
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
controller.quorum.bootstrap.servers=127.0.0.1:$cport
inter.broker.listener.name=PLAINTEXT
log.dirs=$node/data
num.partitions=1
auto.create.topics.enable=true
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
log.retention.hours=168
EOF
  cat > "$node/log4j2.properties" <<EOF
rootLogger.level=INFO
rootLogger.appenderRef.out.ref=out
appender.out.type=Console
appender.out.name=out
appender.out.layout.type=PatternLayout
appender.out.layout.pattern=[%d] %p %m (%c)%n
logger.kafka.name=kafka
logger.kafka.level=INFO
logger.state.name=state.change.logger
logger.state.level=WARN
logger.request.name=kafka.request.logger
logger.request.level=WARN
EOF
}

java_opts=(-Xms256m -Xmx768m -XX:+UseG1GC -Djava.awt.headless=true)

java_cmd() {
  java "${java_opts[@]}" -Dlog4j2.configurationFile="$node/log4j2.properties" -cp "$libs/*" "$@"
}

start() {
  if running; then
    echo "kafka: already running on 127.0.0.1:$port (pid $(cat "$pidfile"))"
    return 0
  fi
  if answers; then
    echo "kafka: port $port is taken by another process; set RAYLINE_KAFKA_PORT" >&2
    exit 1
  fi
  fetch "$root/scripts/kafka/broker-pom.xml" "$libs"
  write_config
  if [ ! -f "$node/data/meta.properties" ]; then
    echo "kafka: formatting storage in $node/data"
    java_cmd kafka.tools.StorageTool format --standalone -t "$(java_cmd kafka.tools.StorageTool random-uuid)" \
      -c "$node/server.properties" >> "$log" 2>&1
  fi
  echo "kafka: starting broker on 127.0.0.1:$port (log: $log)"
  nohup java "${java_opts[@]}" -Dlog4j2.configurationFile="$node/log4j2.properties" \
    -cp "$libs/*" kafka.Kafka "$node/server.properties" >> "$log" 2>&1 < /dev/null &
  echo $! > "$pidfile"
  for _ in $(seq 1 120); do
    if ! running; then
      echo "kafka: the broker exited; last lines of $log:" >&2
      tail -20 "$log" >&2
      exit 1
    fi
    if answers && grep -q "Kafka Server started" "$log"; then
      echo "kafka: ready on 127.0.0.1:$port"
      return 0
    fi
    sleep 0.5
  done
  echo "kafka: not ready after 60 s; see $log" >&2
  exit 1
}

stop() {
  if ! running; then
    echo "kafka: not running"
    rm -f "$pidfile"
    return 0
  fi
  local pid
  pid="$(cat "$pidfile")"
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 60); do
    if ! kill -0 "$pid" 2>/dev/null; then
      rm -f "$pidfile"
      echo "kafka: stopped"
      return 0
    fi
    sleep 0.5
  done
  kill -KILL "$pid" 2>/dev/null || true
  rm -f "$pidfile"
  echo "kafka: killed after 30 s"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  restart) stop; start ;;
  status)
    if running; then echo "kafka: running on 127.0.0.1:$port (pid $(cat "$pidfile"), data $node/data)"
    else echo "kafka: not running"; exit 3; fi ;;
  jars)
    fetch "$root/scripts/kafka/spark-kafka-pom.xml" "$spark_jars"
    ls "$spark_jars"/*.jar | paste -sd, - ;;
  *) echo "usage: $0 start|stop|restart|status|jars" >&2; exit 2 ;;
esac
