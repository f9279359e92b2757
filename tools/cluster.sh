#!/usr/bin/env bash
# tools/cluster.sh N [RANKS] [-- COMMAND...]
#
# Starts N tuteld daemons on this machine, each with RANKS CPU ranks (default 1), on generated
# configs in a temporary directory: unix sockets only, metrics on free loopback ports, and a
# [cluster] table so the daemons join one cluster (node i is daemon i; coordinator on a free
# loopback port) and serve only once all have joined. Prints where each daemon listens, then
# either runs COMMAND with the sockets in the environment
# (TUTELD_SOCKET_<i>, TUTELD_ADMIN_SOCKET_<i>, TUTELD_CLUSTER_DIR) or waits for Ctrl-C. The
# daemons are stopped by PID on exit, whatever happens; the exit status is COMMAND's.
#
# Layers of one expert-parallel job are created on the daemons with a [group] table naming a
# coordinator port on 127.0.0.1 (docs/config.md).
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { echo "usage: tools/cluster.sh N [RANKS] [-- COMMAND...]" >&2; exit 2; }
[ $# -ge 1 ] || usage
nodes=$1; shift
ranks=1
if [ $# -ge 1 ] && [ "$1" != "--" ]; then ranks=$1; shift; fi
[[ "$nodes" =~ ^[1-9][0-9]*$ ]] && [[ "$ranks" =~ ^[1-9][0-9]*$ ]] || usage
if [ $# -ge 1 ]; then [ "$1" = "--" ] || usage; shift; fi

bin="${TUTEL_BUILD_DIR:-build}/bin/tuteld"
[ -x "$bin" ] || { echo "cluster.sh: $bin is missing; run tools/build.sh first" >&2; exit 1; }
bin=$(cd "$(dirname "$bin")" && pwd)/tuteld

dir=$(mktemp -d /tmp/tutel-cluster-XXXXXX)
pids=()
# Whether process $1 still runs (an exited child stays a zombie until waited for).
running() { local state; state=$(ps -o stat= -p "$1" 2>/dev/null) && [ "${state:0:1}" != Z ]; }
cleanup() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  # 30 s for all of them (their shutdown grace is 5 s), then SIGKILL: a daemon that does not
  # stop must not hold this script for ever.
  for _ in $(seq 1 300); do
    local alive=0
    for pid in "${pids[@]}"; do running "$pid" && alive=1; done
    [ "$alive" = 0 ] && break
    sleep 0.1
  done
  for pid in "${pids[@]}"; do
    if running "$pid"; then
      echo "cluster.sh: tuteld (pid $pid) did not stop within 30 s of SIGTERM; killing it" >&2
      kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
  done
  rm -rf "$dir"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# A loopback port nothing listens on (checked, not reserved: good enough for a test machine),
# below the kernel's ephemeral range, where outgoing connections could take it meanwhile.
while :; do
  port=$((10000 + RANDOM % 22000))
  (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null || break
done

for ((i = 0; i < nodes; i++)); do
  mkdir -p "$dir/node$i"
  cat > "$dir/node$i/tuteld.toml" <<EOF
[server]
client_socket = "client.sock"
admin_socket = "admin.sock"
state_dir = "state"
metrics_listen = "127.0.0.1:0"
log_level = "info"

[backend]
kind = "cpu"
ranks = $ranks
threads_per_rank = 1

[cluster]
coordinator = "127.0.0.1:$port"
nodes = $nodes
node_rank = $i
bootstrap_timeout_ms = 30000

[[tenant]]
name = "default"
uids = [$(id -u)]
EOF
  (cd "$dir/node$i" && exec "$bin" --config tuteld.toml) > "$dir/node$i/tuteld.log" 2>&1 &
  pids+=($!)
done

for ((i = 0; i < nodes; i++)); do
  # Serving means the cluster is complete (the sockets exist earlier, during the join).
  for _ in $(seq 1 1750); do
    grep -q "serving on" "$dir/node$i/tuteld.log" 2>/dev/null && break
    kill -0 "${pids[$i]}" 2>/dev/null || { cat "$dir/node$i/tuteld.log" >&2; echo "cluster.sh: daemon $i exited" >&2; exit 1; }
    sleep 0.02
  done
  grep -q "serving on" "$dir/node$i/tuteld.log" || { cat "$dir/node$i/tuteld.log" >&2; echo "cluster.sh: daemon $i did not come up" >&2; exit 1; }
  export "TUTELD_SOCKET_$i=$dir/node$i/client.sock" "TUTELD_ADMIN_SOCKET_$i=$dir/node$i/admin.sock"
  echo "daemon $i (pid ${pids[$i]}, $ranks rank(s)): client $dir/node$i/client.sock  admin $dir/node$i/admin.sock"
done
export TUTELD_CLUSTER_DIR="$dir"

if [ $# -gt 0 ]; then
  "$@"
else
  echo "clients: tutel_connect(\$TUTELD_SOCKET_<i>); tutelctl --socket \$TUTELD_ADMIN_SOCKET_<i> peers. Ctrl-C stops the cluster."
  while true; do sleep 1; done
fi
