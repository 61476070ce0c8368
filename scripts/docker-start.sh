#!/usr/bin/env bash
# Start a local Docker engine for tests and demos; safe to run again (idempotent).
#
# Installs Debian's docker.io when dockerd is missing, then starts a plain dockerd in the
# background with a pidfile. The network flags keep the host untouched (no iptables chains,
# no docker0 bridge, no ip_forward change); containers use --network host.
#
# Environment: DOCKER_DATA_ROOT (default /var/lib/docker), DOCKER_STATE_DIR (default
# /var/run/launcher-docker: pidfile and log), DOCKER_START_TIMEOUT_S (default 30).
set -euo pipefail

state_dir="${DOCKER_STATE_DIR:-/var/run/launcher-docker}"
data_root="${DOCKER_DATA_ROOT:-/var/lib/docker}"
timeout_s="${DOCKER_START_TIMEOUT_S:-30}"
pidfile="$state_dir/dockerd.pid"
logfile="$state_dir/dockerd.log"

# docker-registry (Debian's distribution registry) serves the push tests on 127.0.0.1.
missing=()
command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
command -v docker-registry >/dev/null 2>&1 || missing+=(docker-registry)
if ((${#missing[@]})); then
    echo "docker-start: installing ${missing[*]} (Debian)"
    export DEBIAN_FRONTEND=noninteractive
    # Wait for another apt run (CI installs Slurm at the same time) instead of failing.
    apt=(apt-get -o DPkg::Lock::Timeout=600 -y -q)
    if ! "${apt[@]}" install --no-install-recommends "${missing[@]}" >/dev/null; then
        "${apt[@]}" update >/dev/null
        "${apt[@]}" install --no-install-recommends "${missing[@]}" >/dev/null
    fi
fi

if docker info >/dev/null 2>&1; then
    echo "docker-start: engine already answering ($(docker info --format '{{.ServerVersion}}'))"
    exit 0
fi

mkdir -p "$state_dir"
if [[ -s "$pidfile" ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    echo "docker-start: dockerd already running (pid $(cat "$pidfile")), waiting for it"
else
    rm -f "$pidfile"
    nohup dockerd \
        --pidfile "$pidfile" \
        --data-root "$data_root" \
        --iptables=false --ip6tables=false --bridge=none --ip-forward=false \
        >"$logfile" 2>&1 </dev/null &
fi

deadline=$((SECONDS + timeout_s))
until docker info >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then
        echo "docker-start: dockerd did not answer within ${timeout_s}s; last log lines:" >&2
        tail -n 20 "$logfile" >&2 || true
        exit 1
    fi
    sleep 0.2
done
echo "docker-start: engine up ($(docker info --format '{{.ServerVersion}} {{.Driver}}'))," \
    "pid $(cat "$pidfile" 2>/dev/null || echo '?'), log $logfile"
