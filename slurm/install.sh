#!/usr/bin/env bash
# Install the Debian packages for a local multi-node Slurm cluster (slurm-wlm 22.05 on bookworm).
# Idempotent: when every package is already installed it exits at once without touching apt.
# Usage: bash slurm/install.sh
set -euo pipefail

PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)

if [[ ${EUID} -ne 0 ]]; then
    echo "slurm/install.sh: must run as root (it calls apt-get)" >&2
    exit 1
fi

missing=()
for pkg in "${PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${db:Status-Status}' "${pkg}" 2>/dev/null || true)
    if [[ ${status} != "installed" ]]; then
        missing+=("${pkg}")
    fi
done

if [[ ${#missing[@]} -eq 0 ]]; then
    echo "slurm/install.sh: all packages already installed (${PACKAGES[*]})"
    exit 0
fi

start=${SECONDS}
export DEBIAN_FRONTEND=noninteractive
# Package scripts must not try to start daemons: there is no init system here, and
# slurm/start.sh starts every daemon itself. policy-rc.d exit 101 = "action forbidden".
policy=/usr/sbin/policy-rc.d
own_policy=0
if [[ ! -e ${policy} ]]; then
    printf '#!/bin/sh\nexit 101\n' >"${policy}"
    chmod 755 "${policy}"
    own_policy=1
fi
cleanup() {
    if [[ ${own_policy} -eq 1 ]]; then
        rm -f "${policy}"
    fi
}
trap cleanup EXIT

apt-get update -qq
apt-get install -y -qq --no-install-recommends \
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
    "${missing[@]}" >/dev/null
echo "slurm/install.sh: installed ${missing[*]} in $((SECONDS - start)) s"
