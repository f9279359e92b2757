#!/usr/bin/env bash
# The main job on a fresh machine: install what is missing, build, start tuteld on
# examples/tuteld.toml in a temporary directory, train the toy model whose MoE layer lives in the
# daemon, print `tutelctl status`, stop the daemon and exit 0.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
tools/bootstrap.sh
tools/build.sh
bin="$repo/${TUTEL_BUILD_DIR:-build}/bin"

work=$(mktemp -d)
daemon_pid=""
cleanup() {
  if [ -n "$daemon_pid" ] && kill -0 "$daemon_pid" 2>/dev/null; then
    kill -TERM "$daemon_pid"
    wait "$daemon_pid" || true
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
  kill -0 "$daemon_pid" 2>/dev/null || { cat "$work/tuteld.log"; echo "quickstart: tuteld did not start" >&2; exit 1; }
  sleep 0.02
done
echo "== tuteld is running (pid $daemon_pid) on $work/run/client.sock"

"$bin/train_toy" --socket "$work/run/client.sock" --steps 300 --print-every 50

echo "== tutelctl status"
"$bin/tutelctl" --socket "$work/run/admin.sock" status
"$bin/tutelctl" --socket "$work/run/admin.sock" layers

kill -TERM "$daemon_pid"
wait "$daemon_pid"
daemon_pid=""
echo "== tuteld stopped cleanly; its log:"
cat "$work/tuteld.log"
