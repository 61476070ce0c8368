#!/usr/bin/env bash
# Stop the local Slurm cluster that slurm/start.sh started, by its pid files (never by name).
# Keeps the state dir (job ids keep counting up; accounting history stays).
# Usage: bash slurm/stop.sh            (SLURM_STOP_KEEP_DB=1 leaves MariaDB and munged running)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=slurm/lib.sh
source "${here}/lib.sh"

[[ ${EUID} -eq 0 ]] || slurm_die "slurm/stop.sh must run as root"
t0=$(slurm_now)
D=${SLURM_STATE_DIR}

while read -r pidfile; do
    if [[ -n ${pidfile} ]]; then
        slurm_stop_pidfile "${pidfile}" slurmd
    fi
done < <(slurm_slurmd_pidfiles)
slurm_stop_pidfile "${D}/run/slurmctld.pid" slurmctld
slurm_stop_pidfile "${D}/run/slurmdbd.pid" slurmdbd
if [[ ${SLURM_STOP_KEEP_DB:-0} != 1 ]]; then
    slurm_stop_pidfile "${MARIADB_PID}" mariadbd 60
    slurm_stop_pidfile "${MUNGE_PID}" munged
fi
echo "slurm: stopped in $(slurm_elapsed "${t0}") s (state kept in ${D})"
