#!/usr/bin/env bash
# Stop the dockerd started by docker-start.sh, by the pid in its pidfile (nothing else).
set -euo pipefail

state_dir="${DOCKER_STATE_DIR:-/var/run/launcher-docker}"
pidfile="$state_dir/dockerd.pid"

if [[ ! -s "$pidfile" ]]; then
    echo "docker-stop: no pidfile at $pidfile; nothing to stop"
    exit 0
fi
pid="$(cat "$pidfile")"
if ! kill -0 "$pid" 2>/dev/null; then
    echo "docker-stop: dockerd (pid $pid) is not running"
    rm -f "$pidfile"
    exit 0
fi
kill -TERM "$pid"
# dockerd stops its containers first (up to their stop timeout), so give it a while.
for _ in $(seq 1 150); do
    kill -0 "$pid" 2>/dev/null || { echo "docker-stop: dockerd (pid $pid) stopped"; exit 0; }
    sleep 0.2
done
echo "docker-stop: dockerd (pid $pid) still running after 30s; sending SIGKILL" >&2
kill -KILL "$pid" 2>/dev/null || true
rm -f "$pidfile"
