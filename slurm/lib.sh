# shellcheck shell=bash
# Shared settings and helpers for slurm/start.sh, stop.sh and status.sh (sourced, not run).
# Every path and knob comes from the environment so tests and CI can pick their own.

# shellcheck disable=SC2034  # used by the scripts that source this file
SLURM_STATE_DIR=${LAUNCHER_SLURM_DIR:-/var/lib/launcher-slurm}
SLURM_ETC=/etc/slurm
SLURM_CLUSTER=${SLURM_CLUSTER_NAME:-launcher}
MUNGE_PID=/run/munge/munged.pid
MARIADB_PID=/run/mysqld/mysqld.pid
MARIADB_SOCKET=/run/mysqld/mysqld.sock

slurm_log() {
    echo "slurm: $*" >&2
}

slurm_die() {
    echo "slurm: error: $*" >&2
    exit 1
}

# Seconds since the epoch with milliseconds, for the timing in the summary line.
slurm_now() {
    date +%s.%N
}

slurm_elapsed() {
    awk -v a="$1" -v b="$(slurm_now)" 'BEGIN { printf "%.1f", b - a }'
}

# The pid in a pid file, if that process is alive and is the daemon named (pids get reused).
# PID 1 here reaps exited daemons seconds late: a zombie (state Z) still answers kill -0,
# so it counts as stopped.
slurm_pid_alive() {
    local pidfile=$1 name=$2 pid stat rest state comm
    # The daemon may remove its pid file between any two reads.
    pid=$(cat "${pidfile}" 2>/dev/null) || return 1
    pid=${pid//[^0-9]/}
    [[ -n ${pid} ]] || return 1
    stat=$(cat "/proc/${pid}/stat" 2>/dev/null) || return 1
    comm=${stat#*(}
    comm=${comm%)*}
    rest=${stat##*) }
    state=${rest%% *}
    [[ ${state} != "Z" && ${state} != "X" ]] || return 1
    [[ ${comm} == "${name}" ]] || return 1
    echo "${pid}"
}

# Stop the daemon in a pid file: TERM, wait up to $3 seconds, then KILL.
slurm_stop_pidfile() {
    local pidfile=$1 name=$2 wait_s=${3:-20} pid i
    pid=$(slurm_pid_alive "${pidfile}" "${name}") || {
        rm -f "${pidfile}"
        return 0
    }
    kill -TERM "${pid}" 2>/dev/null || true
    for ((i = 0; i < wait_s * 10; i++)); do
        slurm_pid_alive "${pidfile}" "${name}" >/dev/null || {
            rm -f "${pidfile}"
            return 0
        }
        sleep 0.1
    done
    slurm_log "${name} (pid ${pid}) ignored TERM for ${wait_s} s, sending KILL"
    kill -KILL "${pid}" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
        slurm_pid_alive "${pidfile}" "${name}" >/dev/null || break
        sleep 0.1
    done
    rm -f "${pidfile}"
}

# Pid files of every slurmd this state dir has run (node count may have changed since).
slurm_slurmd_pidfiles() {
    compgen -G "${SLURM_STATE_DIR}/run/slurmd-*.pid" || true
}
