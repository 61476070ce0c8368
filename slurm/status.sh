#!/usr/bin/env bash
# Show the local Slurm cluster: each daemon (by pid file), the controller, and sinfo -N.
# Exit 0 when every daemon runs and every node can take jobs, 1 otherwise.
# Usage: bash slurm/status.sh
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=slurm/lib.sh
source "${here}/lib.sh"

D=${SLURM_STATE_DIR}
ok=0

report() {
    local label=$1 pidfile=$2 name=$3 pid
    if pid=$(slurm_pid_alive "${pidfile}" "${name}"); then
        printf '%-16s running (pid %s)\n' "${label}" "${pid}"
    else
        printf '%-16s STOPPED (%s)\n' "${label}" "${pidfile}"
        ok=1
    fi
}

report munged "${MUNGE_PID}" munged
report mariadbd "${MARIADB_PID}" mariadbd
report slurmdbd "${D}/run/slurmdbd.pid" slurmdbd
report slurmctld "${D}/run/slurmctld.pid" slurmctld
while read -r pidfile; do
    if [[ -n ${pidfile} ]]; then
        node=${pidfile##*/slurmd-}
        report "slurmd ${node%.pid}" "${pidfile}" slurmd
    fi
done < <(slurm_slurmd_pidfiles)

if ! scontrol ping 2>/dev/null | grep -q 'is UP'; then
    echo "slurmctld does not answer (scontrol ping)"
    exit 1
fi
echo
sinfo -N
bad=$(sinfo -h -N -o '%N %T' | sort -u | grep -Ev ' (idle|allocated|mixed|completing|planned|reserved)$' || true)
if [[ -n ${bad} ]]; then
    echo
    echo "nodes that cannot take jobs:"
    echo "${bad}"
    ok=1
fi
echo
squeue
exit "${ok}"
