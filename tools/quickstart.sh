#!/usr/bin/env bash
# The main job on a fresh machine: install what is missing, build, start tuteld on
# examples/tuteld.toml in a temporary directory, train the toy model whose MoE layer lives in the
# daemon, print `tutelctl status`, stop the daemon and exit 0.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
tools/bootstrap.sh
tools/build.sh
build_dir=${TUTEL_BUILD_DIR:-build}
case "$build_dir" in
  /*) bin="$build_dir/bin" ;;
  *) bin="$repo/$build_dir/bin" ;;
esac

work=$(mktemp -d)
daemon_pid=""
# Whether process $1 still runs (an exited child stays a zombie until waited for).
running() { local state; state=$(ps -o stat= -p "$1" 2>/dev/null) && [ "${state:0:1}" != Z ]; }
# SIGTERM, then SIGKILL if tuteld has not exited 30 s later (its shutdown grace is 5 s): a stuck
# daemon must not hold this script for ever. Returns the daemon's exit status.
stop_daemon() {
  kill -TERM "$daemon_pid" 2>/dev/null || true
  for _ in $(seq 1 300); do running "$daemon_pid" || break; sleep 0.1; done
  if running "$daemon_pid"; then
    echo "quickstart: tuteld (pid $daemon_pid) did not stop within 30 s of SIGTERM; killing it" >&2
    kill -KILL "$daemon_pid" 2>/dev/null || true
  fi
  local pid=$daemon_pid
  daemon_pid=""
  wait "$pid"
}
cleanup() {
  local rc=$?
  if [ -n "$daemon_pid" ]; then stop_daemon || true; fi
  # On failure the daemon's log says why (it lives in $work, removed below).
  if [ "$rc" -ne 0 ] && [ -f "$work/tuteld.log" ]; then
    echo "== quickstart failed; tuteld's log:" >&2
    cat "$work/tuteld.log" >&2
  fi
  rm -rf "$work"
}
trap cleanup EXIT

# The example config as it is, but with its metrics on a free port (9464 may be taken) and its
# tenant mapping this user (the example maps root, uid 0).
sed -e 's/^metrics_listen = .*/metrics_listen = "127.0.0.1:0"/' \
    -e "s/^uids = \[0\]/uids = [$(id -u)]/" examples/tuteld.toml > "$work/tuteld.toml"
(cd "$work" && exec "$bin/tuteld" --config tuteld.toml) > "$work/tuteld.log" 2>&1 &
daemon_pid=$!
for _ in $(seq 1 500); do
  [ -S "$work/run/client.sock" ] && [ -S "$work/run/admin.sock" ] && break
  running "$daemon_pid" || { echo "quickstart: tuteld exited at start" >&2; exit 1; }
  sleep 0.02
done
if ! [ -S "$work/run/client.sock" ] || ! [ -S "$work/run/admin.sock" ]; then
  echo "quickstart: tuteld made no sockets within 10 s" >&2
  exit 1
fi
echo "== tuteld is running (pid $daemon_pid) on $work/run/client.sock"

"$bin/train_toy" --socket "$work/run/client.sock" --steps 300 --print-every 50

echo "== tutelctl status"
"$bin/tutelctl" --socket "$work/run/admin.sock" status
"$bin/tutelctl" --socket "$work/run/admin.sock" layers

stop_daemon
echo "== tuteld stopped cleanly; its log:"
cat "$work/tuteld.log"
