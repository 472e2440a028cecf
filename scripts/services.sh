#!/usr/bin/env bash
# Install and run the backing services on loopback, for development, tests and CI:
#   - Redis (Debian's redis-server), daemonized on 127.0.0.1:${REDIS_PORT:-6379}, no persistence
#   - Apache Cassandra 5.0 (org.apache.cassandra:cassandra-all from Maven Central) on JDK 17,
#     CQL on 127.0.0.1:${CASSANDRA_PORT:-9042}
#   - an S3 API server (moto's server mode, the `moto[server]` package of requirements.txt, run
#     from the project's .venv) on 127.0.0.1:${S3_PORT:-9400}, in memory: for attachments
#   - PostgreSQL (Debian's postgresql) on 127.0.0.1:${POSTGRES_PORT:-5433}, a cluster of its own in
#     the runtime dir; role and database ${POSTGRES_DB:-chat}, trust authentication on loopback
#   - the browser for the web client's tests (tests/browser): Debian's chromium and
#     chromium-driver, installed when missing (nothing runs: each test starts its own)
#
#   - a three-node Cassandra cluster (`cluster`, only when asked for) on 127.0.0.2-4 (CLUSTER_HOSTS)
#
# Usage: scripts/services.sh start|stop|status [redis|cassandra|s3|postgres|browser|cluster]
#        (default: redis, cassandra, s3, postgres and browser); `scripts/services.sh cluster` = `start cluster`
#
#   start   installs what is missing, starts what is not answering, waits until it answers
#           (idempotent: a service that already answers is left alone)
#   stop    stops what this script started (pidfiles in the runtime dir) and waits for exit
#   status  prints up/down per service; exit 0 only if every requested service is up
#
# Environment:
#   CHAT_SERVICES_DIR        runtime dir (jars, data, logs, pids); default <repo>/.services
#   REDIS_PORT               default 6379
#   POSTGRES_PORT            default 5433 (beside, not on, a system server's 5432)
#   POSTGRES_DB              role and database name, default chat
#   CASSANDRA_PORT           CQL port, default 9042
#   CASSANDRA_START_TIMEOUT  seconds to wait for the first CQL query, default 180
#   CASSANDRA_HEAP           max heap, default 1g (initial heap is 512m)
#   CLUSTER_HOSTS            the cluster's three addresses, default "127.0.0.2 127.0.0.3 127.0.0.4"
#   CLUSTER_CQL_PORT         CQL port on each of them, default 9042
#   CLUSTER_HEAP             each node's max heap, default 512m (initial 256m)
#   CASSANDRA_JAVA_HOME      default /usr/lib/jvm/java-17-openjdk-amd64 (Cassandra 5.0 runs on 11/17 only)
#   S3_PORT                  default 9400
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/.." && pwd)"
RUNTIME_DIR="${CHAT_SERVICES_DIR:-$REPO_ROOT/.services}"
CASS_CONF_DIR="$REPO_ROOT/services/cassandra"

REDIS_PORT="${REDIS_PORT:-6379}"
POSTGRES_PORT="${POSTGRES_PORT:-5433}"
POSTGRES_DB="${POSTGRES_DB:-chat}"
CASSANDRA_PORT="${CASSANDRA_PORT:-9042}"
CASSANDRA_START_TIMEOUT="${CASSANDRA_START_TIMEOUT:-180}"
CASSANDRA_HEAP="${CASSANDRA_HEAP:-1g}"
JDK17="${CASSANDRA_JAVA_HOME:-/usr/lib/jvm/java-17-openjdk-amd64}"
S3_PORT="${S3_PORT:-9400}"

RUN_DIR="$RUNTIME_DIR/run"
LOG_DIR="$RUNTIME_DIR/logs"
REDIS_PID="$RUN_DIR/redis.pid"
REDIS_LOG="$LOG_DIR/redis.log"
CASS_PID="$RUN_DIR/cassandra.pid"
CASS_LIB="$RUNTIME_DIR/cassandra/lib"
CASS_DATA="$RUNTIME_DIR/cassandra/data"
CASS_LOG_DIR="$LOG_DIR/cassandra"
CASS_OUT="$CASS_LOG_DIR/cassandra.out"
S3_PID="$RUN_DIR/s3.pid"
S3_LOG="$LOG_DIR/s3.log"
MOTO_SERVER="$REPO_ROOT/.venv/bin/moto_server"

log() { printf '[services] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# Run as root directly, or through sudo when there is one.
as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"
  elif command -v sudo >/dev/null 2>&1; then sudo "$@"
  else die "need root (or sudo) to run: $*"; fi
}

APT_UPDATED=0
apt_install() {
  if [ "$APT_UPDATED" -eq 0 ]; then
    log "apt-get update"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    APT_UPDATED=1
  fi
  log "apt-get install -y $*"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

pid_alive() { # pidfile [cmdline-substring]
  local pid
  [ -s "$1" ] || return 1
  pid="$(cat "$1" 2>/dev/null)" || return 1
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
  if [ -n "${2:-}" ]; then tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "$2" || return 1; fi
}

stop_pidfile() { # name pidfile cmdline-substring timeout
  local name="$1" pidfile="$2" match="$3" timeout="$4" pid i
  if ! pid_alive "$pidfile" "$match"; then
    log "$name: not running (no live pid in $pidfile)"
    rm -f "$pidfile"
    return 0
  fi
  pid="$(cat "$pidfile")"
  log "$name: stopping pid $pid"
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < timeout * 10; i++)); do
    kill -0 "$pid" 2>/dev/null || { rm -f "$pidfile"; log "$name: stopped"; return 0; }
    sleep 0.1
  done
  log "$name: still running after ${timeout}s, sending SIGKILL"
  kill -KILL "$pid" 2>/dev/null || true
  sleep 0.5
  rm -f "$pidfile"
}

# ---------------------------------------------------------------- Redis

redis_ping() {
  if command -v redis-cli >/dev/null 2>&1; then
    [ "$(timeout 3 redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null)" = "PONG" ]
  else
    timeout 3 bash -c 'exec 3<>/dev/tcp/127.0.0.1/'"$REDIS_PORT"'; printf "PING\r\n" >&3; IFS= read -r l <&3; [ "${l%$'"'"'\r'"'"'}" = "+PONG" ]' 2>/dev/null
  fi
}

redis_start() {
  local t0 i
  if redis_ping; then log "redis: already answering on 127.0.0.1:$REDIS_PORT"; return 0; fi
  if ! command -v redis-server >/dev/null 2>&1; then
    apt_install redis-server
    # The package may start its own instance through init scripts (not in containers with a
    # policy-rc.d): stop it so that the one below is ours.
    if [ -x /etc/init.d/redis-server ] && [ -s /run/redis/redis-server.pid ]; then
      as_root /etc/init.d/redis-server stop >/dev/null 2>&1 || true
    fi
    if redis_ping; then log "redis: a system instance answers on 127.0.0.1:$REDIS_PORT; using it"; return 0; fi
  fi
  mkdir -p "$RUN_DIR" "$LOG_DIR" "$RUNTIME_DIR/redis"
  t0="$(now)"
  redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --daemonize yes \
    --pidfile "$REDIS_PID" --logfile "$REDIS_LOG" --dir "$RUNTIME_DIR/redis" \
    --save '' --appendonly no >/dev/null 9>&-
  for ((i = 0; i < 100; i++)); do
    if redis_ping; then log "redis: up on 127.0.0.1:$REDIS_PORT in $(elapsed "$t0")s (pid $(cat "$REDIS_PID" 2>/dev/null), log $REDIS_LOG)"; return 0; fi
    sleep 0.1
  done
  log "redis: not answering after 10s; last lines of $REDIS_LOG:"
  tail -n 40 "$REDIS_LOG" >&2 2>/dev/null || true
  return 1
}

redis_stop() { stop_pidfile redis "$REDIS_PID" redis-server 30; }

redis_status() {
  if redis_ping; then echo "redis: up (127.0.0.1:$REDIS_PORT)"; return 0; fi
  echo "redis: down (127.0.0.1:$REDIS_PORT)"; return 1
}

# ---------------------------------------------------------------- Cassandra

# One CQL round trip (native protocol v4: STARTUP, then SELECT release_version FROM system.local)
# to [host (127.0.0.1)] [port ($CASSANDRA_PORT)].
# Prints the server's release_version and exits 0 only if the query returned a row.
# Needs only python3's standard library; without python3, falls back to a TCP check.
cql_ping() {
  local host="${1:-127.0.0.1}" port="${2:-$CASSANDRA_PORT}"
  if command -v python3 >/dev/null 2>&1; then
    python3 - "$host" "$port" <<'PY' 2>/dev/null
import socket, struct, sys
host, port = sys.argv[1], int(sys.argv[2])
s = socket.create_connection((host, port), timeout=3)
s.settimeout(5)
def frame(stream, op, body):
    return struct.pack(">BBhBi", 0x04, 0, stream, op, len(body)) + body
def recv_exact(n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            raise EOFError
        b += c
    return b
def read_frame():
    ver, flags, stream, op, ln = struct.unpack(">BBhBi", recv_exact(9))
    return op, recv_exact(ln)
def string(v):
    v = v.encode(); return struct.pack(">H", len(v)) + v
s.sendall(frame(1, 0x01, struct.pack(">H", 1) + string("CQL_VERSION") + string("3.0.0")))
op, _ = read_frame()
if op != 0x02:  # READY
    sys.exit(1)
q = b"SELECT release_version FROM system.local"
s.sendall(frame(2, 0x07, struct.pack(">i", len(q)) + q + struct.pack(">HB", 0x0001, 0)))
op, body = read_frame()
if op != 0x08 or struct.unpack(">i", body[:4])[0] != 2:  # RESULT, kind Rows
    sys.exit(1)
p = 4
flags, ncols = struct.unpack(">ii", body[p:p + 8]); p += 8
if flags & 0x0002:
    n = struct.unpack(">i", body[p:p + 4])[0]; p += 4 + max(n, 0)
def rstr():
    global p
    n = struct.unpack(">H", body[p:p + 2])[0]; p += 2
    v = body[p:p + n]; p += n
    return v
if not flags & 0x0004:
    if flags & 0x0001:
        rstr(); rstr()
    for _ in range(ncols):
        if not flags & 0x0001:
            rstr(); rstr()
        rstr()
        p += 2  # type id (varchar: no further option)
nrows = struct.unpack(">i", body[p:p + 4])[0]; p += 4
if nrows < 1:
    sys.exit(1)
n = struct.unpack(">i", body[p:p + 4])[0]; p += 4
print(body[p:p + n].decode())
PY
  else
    timeout 3 bash -c 'exec 3<>/dev/tcp/'"$host/$port" 2>/dev/null && echo "?"
  fi
}

cassandra_version() {
  sed -n 's:.*<cassandra.version>\(.*\)</cassandra.version>.*:\1:p' "$CASS_CONF_DIR/pom.xml"
}

ensure_jdk17_and_maven() {
  local pkgs=()
  [ -x "$JDK17/bin/java" ] || pkgs+=(openjdk-17-jdk-headless)
  command -v mvn >/dev/null 2>&1 || pkgs+=(maven)
  if [ "${#pkgs[@]}" -gt 0 ]; then apt_install "${pkgs[@]}"; fi
  [ -x "$JDK17/bin/java" ] || die "no JDK 17 at $JDK17 (set CASSANDRA_JAVA_HOME)"
}

# Copies cassandra-all and its runtime dependencies into $CASS_LIB, unless that was already done
# for this exact pom.xml (stamp = sha256 of the pom).
ensure_cassandra_jars() {
  local stamp want tmp t0
  want="$(sha256sum "$CASS_CONF_DIR/pom.xml" | cut -d' ' -f1)"
  stamp="$CASS_LIB/.complete"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then return 0; fi
  log "cassandra: fetching cassandra-all $(cassandra_version) and dependencies from Maven Central"
  tmp="$CASS_LIB.tmp.$$"
  rm -rf "$tmp"
  mkdir -p "$tmp"
  t0="$(now)"
  if ! JAVA_HOME="$JDK17" mvn -q -B -f "$CASS_CONF_DIR/pom.xml" dependency:copy-dependencies \
      -DoutputDirectory="$tmp" >"$LOG_DIR/cassandra-mvn.log" 2>&1; then
    tail -n 40 "$LOG_DIR/cassandra-mvn.log" >&2
    rm -rf "$tmp"
    die "maven could not fetch the Cassandra jars (log: $LOG_DIR/cassandra-mvn.log)"
  fi
  ls "$tmp"/cassandra-all-*.jar "$tmp"/jamm-*.jar >/dev/null 2>&1 || die "cassandra-all or jamm jar missing after maven"
  echo "$want" >"$tmp/.complete"
  rm -rf "$CASS_LIB"
  mv "$tmp" "$CASS_LIB"
  log "cassandra: $(ls "$CASS_LIB"/*.jar | wc -l) jars in $(elapsed "$t0")s"
}

# The JVM options of one node: cassandra_jvm_opts config.yaml storage-dir log-dir initial-heap max-heap cql-port
cassandra_jvm_opts() {
  local config="$1" storage="$2" logdir="$3" heap_initial="$4" heap_max="$5" cql_port="$6" jamm
  jamm="$(ls "$CASS_LIB"/jamm-*.jar | head -n 1)"
  local opts=(
    "-Xms$heap_initial" "-Xmx$heap_max" -Xss256k
    -XX:+UseG1GC -XX:+ParallelRefProcEnabled -XX:MaxGCPauseMillis=300
    -XX:+ExitOnOutOfMemoryError -XX:+PerfDisableSharedMem
    "-javaagent:$jamm"
    # from Cassandra 5.0's conf/jvm17-server.options
    -Djdk.attach.allowAttachSelf=true -Dio.netty.tryReflectionSetAccessible=true
  )
  local m
  for m in java.base/jdk.internal.misc java.management.rmi/com.sun.jmx.remote.internal.rmi \
           java.rmi/sun.rmi.registry java.rmi/sun.rmi.server java.sql/java.sql java.base/java.lang.ref \
           jdk.unsupported/sun.misc jdk.compiler/com.sun.tools.javac.file jdk.attach/sun.tools.attach \
           java.management/com.sun.jmx.remote.security; do
    opts+=(--add-exports "$m=ALL-UNNAMED")
  done
  for m in java.base/java.lang.module java.base/jdk.internal.loader java.base/jdk.internal.ref \
           java.base/jdk.internal.reflect java.base/jdk.internal.math java.base/jdk.internal.module \
           java.base/jdk.internal.util.jar jdk.management/com.sun.management.internal java.base/sun.nio.ch \
           java.base/java.io java.base/java.lang.reflect jdk.compiler/com.sun.tools.javac \
           java.base/java.lang java.base/java.util java.base/java.nio; do
    opts+=(--add-opens "$m=ALL-UNNAMED")
  done
  opts+=(
    -Djava.net.preferIPv4Stack=true
    "-Dcassandra.config=file://$config"
    "-Dcassandra.storagedir=$storage"
    "-Dcassandra.logdir=$logdir"
    "-Dcassandra.triggers_dir=$RUNTIME_DIR/cassandra/triggers"
    "-Dlogback.configurationFile=$CASS_CONF_DIR/logback.xml"
    "-Dcassandra.native_transport_port=$cql_port"
    -Dcassandra-foreground=yes
    -Dcassandra.skip_wait_for_gossip_to_settle=0
  )
  printf '%s\n' "${opts[@]}"
}

cassandra_start() {
  local t0 pid v opts=()
  if v="$(cql_ping)"; then log "cassandra: already answering CQL on 127.0.0.1:$CASSANDRA_PORT (release $v)"; return 0; fi
  mkdir -p "$RUN_DIR" "$LOG_DIR" "$CASS_LOG_DIR" "$CASS_DATA" "$RUNTIME_DIR/cassandra/triggers"
  if pid_alive "$CASS_PID" CassandraDaemon; then
    pid="$(cat "$CASS_PID")"
    log "cassandra: pid $pid is running but not answering yet; waiting for it"
    t0="$(now)"
  else
    ensure_jdk17_and_maven
    ensure_cassandra_jars
    mapfile -t opts < <(cassandra_jvm_opts "$CASS_CONF_DIR/cassandra.yaml" "$CASS_DATA" "$CASS_LOG_DIR" 512m "$CASSANDRA_HEAP" "$CASSANDRA_PORT")
    [ -s "$CASS_OUT" ] && mv -f "$CASS_OUT" "$CASS_OUT.prev"
    t0="$(now)"
    # setsid: own session, so the node outlives the shell (and CI step) that started it.
    nohup setsid "$JDK17/bin/java" "${opts[@]}" -cp "$CASS_LIB/*" \
      org.apache.cassandra.service.CassandraDaemon >"$CASS_OUT" 2>&1 </dev/null 9>&- &
    pid=$!
    echo "$pid" >"$CASS_PID"
    log "cassandra: started pid $pid (JDK 17, heap 512m..$CASSANDRA_HEAP); waiting up to ${CASSANDRA_START_TIMEOUT}s for CQL on 127.0.0.1:$CASSANDRA_PORT"
  fi
  while :; do
    if v="$(cql_ping)"; then
      log "cassandra: CQL answers on 127.0.0.1:$CASSANDRA_PORT (release $v) after $(elapsed "$t0")s (pid $pid, log $CASS_LOG_DIR/system.log)"
      return 0
    fi
    if ! kill -0 "$pid" 2>/dev/null; then
      log "cassandra: the JVM (pid $pid) exited before CQL answered"
      break
    fi
    if awk -v a="$t0" -v b="$(now)" -v t="$CASSANDRA_START_TIMEOUT" 'BEGIN { exit !(b - a > t) }'; then
      log "cassandra: no CQL answer after ${CASSANDRA_START_TIMEOUT}s (pid $pid still running)"
      break
    fi
    sleep 1
  done
  log "cassandra: log is $CASS_LOG_DIR/system.log, stdout/stderr in $CASS_OUT"
  log "--- last 40 lines of $CASS_LOG_DIR/system.log:"
  tail -n 40 "$CASS_LOG_DIR/system.log" >&2 2>/dev/null || true
  log "--- last 40 lines of $CASS_OUT:"
  tail -n 40 "$CASS_OUT" >&2 2>/dev/null || true
  return 1
}

cassandra_stop() { stop_pidfile cassandra "$CASS_PID" CassandraDaemon 90; }

cassandra_status() {
  local v
  if v="$(cql_ping)"; then echo "cassandra: up (CQL 127.0.0.1:$CASSANDRA_PORT, release $v)"; return 0; fi
  if pid_alive "$CASS_PID" CassandraDaemon; then
    echo "cassandra: down (pid $(cat "$CASS_PID") running, CQL not answering yet)"
  else
    echo "cassandra: down (CQL 127.0.0.1:$CASSANDRA_PORT)"
  fi
  return 1
}

# ---------------------------------------------------------------- S3 (moto server)

# One S3 call (ListBuckets, unsigned: moto answers it) with the standard library.
s3_ping() {
  python3 - "$S3_PORT" <<'PY' 2>/dev/null
import sys, urllib.request
with urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/", timeout=3) as response:
    body = response.read()
sys.exit(0 if response.status == 200 and b"ListAllMyBucketsResult" in body else 1)
PY
}

s3_start() {
  local t0 pid i
  if s3_ping; then log "s3: already answering on 127.0.0.1:$S3_PORT"; return 0; fi
  if [ ! -x "$MOTO_SERVER" ]; then
    log "s3: $MOTO_SERVER missing; installing the project's requirements (make install)"
    make -C "$REPO_ROOT" install >&2
  fi
  mkdir -p "$RUN_DIR" "$LOG_DIR"
  t0="$(now)"
  # setsid: own session, so the server outlives the shell (and CI step) that started it.
  nohup setsid "$MOTO_SERVER" -H 127.0.0.1 -p "$S3_PORT" >"$S3_LOG" 2>&1 </dev/null 9>&- &
  pid=$!
  echo "$pid" >"$S3_PID"
  for ((i = 0; i < 300; i++)); do
    if s3_ping; then log "s3: up on 127.0.0.1:$S3_PORT in $(elapsed "$t0")s (pid $pid, log $S3_LOG)"; return 0; fi
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  log "s3: not answering on 127.0.0.1:$S3_PORT; last lines of $S3_LOG:"
  tail -n 40 "$S3_LOG" >&2 2>/dev/null || true
  return 1
}

s3_stop() { stop_pidfile s3 "$S3_PID" moto_server 30; }

s3_status() {
  if s3_ping; then echo "s3: up (127.0.0.1:$S3_PORT)"; return 0; fi
  echo "s3: down (127.0.0.1:$S3_PORT)"; return 1
}

# ---------------------------------------------------------------- Cassandra cluster

# Three nodes on loopback addresses of their own (127.0.0.2-4 by default: a single node may hold
# 127.0.0.1, and every port here is per address), small heaps, one token each spread evenly over the
# ring, all seeds and none bootstrapping, so the three start side by side. For tests and the chaos
# run: keyspace with `SimpleStrategy:3`, LOCAL_QUORUM (docs/reliability.md).
CLUSTER_HOSTS="${CLUSTER_HOSTS:-127.0.0.2 127.0.0.3 127.0.0.4}"
CLUSTER_CQL_PORT="${CLUSTER_CQL_PORT:-9042}"
CLUSTER_HEAP="${CLUSTER_HEAP:-512m}"
CLUSTER_DIR="$RUNTIME_DIR/cluster"
# Murmur3 tokens that split the ring in three equal parts.
CLUSTER_TOKENS=(-9223372036854775808 -3074457345618258603 3074457345618258602)

cluster_node_hosts() { read -r -a CLUSTER_NODES <<<"$CLUSTER_HOSTS"; [ "${#CLUSTER_NODES[@]}" -eq 3 ] || die "CLUSTER_HOSTS needs three addresses"; }
cluster_node_pidfile() { echo "$RUN_DIR/cluster-node$1.pid"; }
cluster_node_logdir() { echo "$CLUSTER_DIR/node$1/logs"; }

cluster_node_config() { # node-number host -> path of its cassandra.yaml, written from the single node's
  local n="$1" host="$2" seeds="" h config="$CLUSTER_DIR/node$1/cassandra.yaml"
  for h in "${CLUSTER_NODES[@]}"; do seeds+="${seeds:+,}$h:7000"; done
  # A write is acknowledged only once it is in the node's commit log on disk (batch sync): with the
  # single node's periodic sync, a node killed with kill -9 comes back without the writes of its
  # last 10 s, and a quorum read of it and a replica that was down misses writes it acknowledged.
  sed -e "s/^cluster_name:.*/cluster_name: 'chat-cluster'/" \
      -e "s/^commitlog_sync:.*/commitlog_sync: batch/" \
      -e "/^commitlog_sync_period:/d" \
      -e "s/- seeds:.*/- seeds: \"$seeds\"/" \
      -e "s/^listen_address:.*/listen_address: $host/" \
      -e "s/^rpc_address:.*/rpc_address: $host/" \
      "$CASS_CONF_DIR/cassandra.yaml" >"$config"
  printf 'initial_token: %s\nauto_bootstrap: false\n' "${CLUSTER_TOKENS[$((n - 1))]}" >>"$config"
  echo "$config"
}

# Starts node n unless its JVM is alive; returns at once.
cluster_node_launch() {
  local n="$1" host="$2" pidfile logdir config opts=() pid
  pidfile="$(cluster_node_pidfile "$n")"
  logdir="$(cluster_node_logdir "$n")"
  if pid_alive "$pidfile" CassandraDaemon; then return 0; fi
  mkdir -p "$CLUSTER_DIR/node$n/data" "$logdir" "$RUNTIME_DIR/cassandra/triggers"
  config="$(cluster_node_config "$n" "$host")"
  mapfile -t opts < <(cassandra_jvm_opts "$config" "$CLUSTER_DIR/node$n/data" "$logdir" 256m "$CLUSTER_HEAP" "$CLUSTER_CQL_PORT")
  # A fresh system.log per start: readiness below counts the peers this run has seen come up.
  [ -s "$logdir/system.log" ] && mv -f "$logdir/system.log" "$logdir/system.log.prev"
  nohup setsid "$JDK17/bin/java" "${opts[@]}" -cp "$CASS_LIB/*" \
    org.apache.cassandra.service.CassandraDaemon >"$logdir/cassandra.out" 2>&1 </dev/null 9>&- &
  pid=$!
  echo "$pid" >"$pidfile"
  log "cluster: node$n started on $host (pid $pid, heap 256m..$CLUSTER_HEAP)"
}

# Up: CQL answers on the node and its gossip has seen both other nodes come up since it started.
cluster_node_up() {
  local n="$1" host="$2" h logdir
  logdir="$(cluster_node_logdir "$n")"
  cql_ping "$host" "$CLUSTER_CQL_PORT" >/dev/null || return 1
  for h in "${CLUSTER_NODES[@]}"; do
    [ "$h" = "$host" ] && continue
    grep -q "/$h:7000 is now UP" "$logdir/system.log" 2>/dev/null || return 1
  done
}

cluster_start() {
  local t0 i n pending
  cluster_node_hosts
  ensure_jdk17_and_maven
  ensure_cassandra_jars
  t0="$(now)"
  for i in 0 1 2; do
    n=$((i + 1))
    cql_ping "${CLUSTER_NODES[$i]}" "$CLUSTER_CQL_PORT" >/dev/null || cluster_node_launch "$n" "${CLUSTER_NODES[$i]}"
  done
  log "cluster: waiting up to ${CASSANDRA_START_TIMEOUT}s for CQL on ${CLUSTER_NODES[*]} (port $CLUSTER_CQL_PORT) and gossip among them"
  while :; do
    pending=()
    for i in 0 1 2; do
      cluster_node_up $((i + 1)) "${CLUSTER_NODES[$i]}" || pending+=($((i + 1)))
    done
    if [ "${#pending[@]}" -eq 0 ]; then
      log "cluster: three nodes up in $(elapsed "$t0")s (CASSANDRA_HOSTS=$(IFS=,; echo "${CLUSTER_NODES[*]}"))"
      return 0
    fi
    for n in "${pending[@]}"; do
      if ! pid_alive "$(cluster_node_pidfile "$n")" CassandraDaemon && ! cql_ping "${CLUSTER_NODES[$((n - 1))]}" "$CLUSTER_CQL_PORT" >/dev/null; then
        log "cluster: node$n exited; last lines of $(cluster_node_logdir "$n")/system.log:"
        tail -n 40 "$(cluster_node_logdir "$n")/system.log" >&2 2>/dev/null || true
        return 1
      fi
    done
    if awk -v a="$t0" -v b="$(now)" -v t="$CASSANDRA_START_TIMEOUT" 'BEGIN { exit !(b - a > t) }'; then
      log "cluster: node(s) ${pending[*]} not up after ${CASSANDRA_START_TIMEOUT}s (logs under $CLUSTER_DIR)"
      return 1
    fi
    sleep 1
  done
}

cluster_stop() {
  local n
  for n in 1 2 3; do stop_pidfile "cluster-node$n" "$(cluster_node_pidfile "$n")" CassandraDaemon 90 & done
  wait
}

cluster_status() {
  local i rc=0
  cluster_node_hosts
  for i in 0 1 2; do
    if cql_ping "${CLUSTER_NODES[$i]}" "$CLUSTER_CQL_PORT" >/dev/null; then
      echo "cluster node$((i + 1)): up (CQL ${CLUSTER_NODES[$i]}:$CLUSTER_CQL_PORT)"
    else
      echo "cluster node$((i + 1)): down (CQL ${CLUSTER_NODES[$i]}:$CLUSTER_CQL_PORT)"; rc=1
    fi
  done
  return "$rc"
}

# ---------------------------------------------------------------- PostgreSQL

# Debian's postgresql server on 127.0.0.1:$POSTGRES_PORT with a cluster of its own under the runtime
# dir (not the package's system cluster), trust authentication on loopback only, and one role and
# database, both named $POSTGRES_DB, that may create databases (the tests create test_<name>).
# PostgreSQL refuses to run as root: as root, the server runs as the package's `postgres` user.
PG_DIR="$RUNTIME_DIR/postgres"
PG_PID="$RUN_DIR/postgres.pid"

pg_bin_dir() {
  local dir
  dir="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)"
  [ -n "$dir" ] && [ -x "$dir/pg_ctl" ] && echo "$dir"
}

as_pg_owner() {
  if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

# The server's files live in $RUNTIME_DIR/postgres, unless the runtime dir sits where the
# `postgres` user cannot reach it (a checkout under /root): then in a directory of /var/tmp named
# after the runtime dir, so each runtime dir keeps one server of its own.
pg_paths() {
  if [ "$(id -u)" -eq 0 ] && ! runuser -u postgres -- test -x "$RUNTIME_DIR" 2>/dev/null; then
    PG_DIR="/var/tmp/chat-postgres-$(printf '%s' "$RUNTIME_DIR" | sha256sum | cut -c1-12)"
  fi
  PG_DATA="$PG_DIR/data"
  PG_SOCKET_DIR="$PG_DIR/socket"
  PG_LOG="$PG_DIR/postgres.log"
}

pg_ready() { "$(pg_bin_dir)/pg_isready" -q -h 127.0.0.1 -p "$POSTGRES_PORT" -t 3 2>/dev/null; }

postgres_start() {
  local bin t0 i pid
  if [ -z "$(pg_bin_dir)" ]; then
    # The package's post-install creates and may start a system cluster on 5432; ours is separate.
    apt_install postgresql
  fi
  bin="$(pg_bin_dir)" || die "no PostgreSQL server binaries under /usr/lib/postgresql"
  if pg_ready; then log "postgres: already answering on 127.0.0.1:$POSTGRES_PORT"; return 0; fi
  # Before pg_paths: the runtime dir is reachable when every parent is and it is o+x.
  mkdir -p "$RUN_DIR" "$LOG_DIR"
  [ "$(id -u)" -eq 0 ] && chmod o+x "$RUNTIME_DIR"
  pg_paths
  mkdir -p "$PG_SOCKET_DIR"
  if [ "$(id -u)" -eq 0 ]; then
    chown postgres: "$PG_DIR" "$PG_SOCKET_DIR"
  fi
  if [ ! -s "$PG_DATA/PG_VERSION" ]; then
    log "postgres: initdb $PG_DATA"
    as_pg_owner "$bin/initdb" -D "$PG_DATA" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 >"$PG_DIR/initdb.log" 2>&1 \
      || { cat "$PG_DIR/initdb.log" >&2; die "postgres: initdb failed"; }
  fi
  t0="$(now)"
  as_pg_owner "$bin/pg_ctl" -D "$PG_DATA" -l "$PG_LOG" -s -o \
    "-c listen_addresses=127.0.0.1 -p $POSTGRES_PORT -k $PG_SOCKET_DIR -c fsync=off -c full_page_writes=off -c max_connections=200" \
    start 9>&- || { tail -n 40 "$PG_LOG" >&2; die "postgres: pg_ctl start failed (log $PG_LOG)"; }
  for ((i = 0; i < 300; i++)); do
    if pg_ready; then break; fi
    sleep 0.1
  done
  pg_ready || { tail -n 40 "$PG_LOG" >&2; die "postgres: not answering after 30s (log $PG_LOG)"; }
  pid="$(head -n 1 "$PG_DATA/postmaster.pid")"
  echo "$pid" >"$PG_PID"
  # The application's role and database (idempotent).
  "$bin/psql" -q -h 127.0.0.1 -p "$POSTGRES_PORT" -U postgres -d postgres -v ON_ERROR_STOP=1 >/dev/null <<SQL
SELECT 'CREATE ROLE "$POSTGRES_DB" LOGIN CREATEDB' WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$POSTGRES_DB')\gexec
SELECT 'CREATE DATABASE "$POSTGRES_DB" OWNER "$POSTGRES_DB"' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '$POSTGRES_DB')\gexec
SQL
  log "postgres: up on 127.0.0.1:$POSTGRES_PORT in $(elapsed "$t0")s (pid $pid, log $PG_LOG); DATABASE_URL=postgres://$POSTGRES_DB@127.0.0.1:$POSTGRES_PORT/$POSTGRES_DB"
}

postgres_stop() {
  pg_paths
  # pg_ctl's fast shutdown ends the sessions and waits; the pidfile guards against stopping a
  # server this script did not start.
  if ! pid_alive "$PG_PID" postgres; then
    log "postgres: not running (no live pid in $PG_PID)"
    rm -f "$PG_PID"
    return 0
  fi
  log "postgres: stopping pid $(cat "$PG_PID")"
  as_pg_owner "$(pg_bin_dir)/pg_ctl" -D "$PG_DATA" -s -m fast -w -t 60 stop || stop_pidfile postgres "$PG_PID" postgres 30
  rm -f "$PG_PID"
  log "postgres: stopped"
}

postgres_status() {
  if [ -n "$(pg_bin_dir)" ] && pg_ready; then echo "postgres: up (127.0.0.1:$POSTGRES_PORT)"; return 0; fi
  echo "postgres: down (127.0.0.1:$POSTGRES_PORT)"; return 1
}

# ---------------------------------------------------------------- browser

# Debian's packages, so chromedriver always matches the browser and no test downloads one.
browser_present() { command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; }

browser_start() {
  if browser_present; then log "browser: $(chromium --version 2>/dev/null | head -n 1) and chromedriver present"; return 0; fi
  apt_install chromium chromium-driver
  browser_present || die "chromium or chromedriver missing after apt-get install"
  log "browser: installed $(chromium --version 2>/dev/null | head -n 1)"
}

browser_stop() { :; }  # nothing runs between tests

browser_status() {
  if browser_present; then echo "browser: present ($(chromium --version 2>/dev/null | head -n 1))"; return 0; fi
  echo "browser: missing (chromium, chromium-driver)"; return 1
}

# ---------------------------------------------------------------- main

usage() { echo "usage: $0 start|stop|status [redis|cassandra|s3|postgres|browser|cluster]  (or: $0 cluster)" >&2; exit 2; }

# `cluster` alone starts the three-node cluster (it is never part of the default set).
if [ "${1:-}" = cluster ] && [ $# -eq 1 ]; then set -- start cluster; fi
action="${1:-}"
case "$action" in start|stop|status) ;; *) usage ;; esac
case "${2:-all}" in
  all) services=(redis cassandra s3 postgres browser) ;;
  redis|cassandra|s3|postgres|browser|cluster) services=("$2") ;;
  *) usage ;;
esac

mkdir -p "$RUNTIME_DIR"
if [ "$action" != status ]; then
  # Serialize concurrent start/stop calls on the same runtime dir.
  exec 9>"$RUNTIME_DIR/.lock"
  flock 9
fi

rc=0
for s in "${services[@]}"; do
  "${s}_${action}" || rc=1
done
exit "$rc"
