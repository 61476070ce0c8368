#!/usr/bin/env bash
# Start (or keep) a real multi-node Slurm cluster on this one machine, with accounting.
# Idempotent: when the cluster already runs with the same configuration and every node is
# up, it prints the summary and exits 0 at once. When the configuration differs (node count,
# MaxArraySize, ...) it restarts the Slurm daemons with the new one.
# Usage: bash slurm/start.sh [NODES]     (see slurm/README.md for the environment variables)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=slurm/lib.sh
source "${here}/lib.sh"

t0=$(slurm_now)

NODES=${1:-${SLURM_NODES:-2}}
CPUS=${SLURM_CPUS_PER_NODE:-4}
MEM_MB=${SLURM_MEM_PER_NODE_MB:-4000}
MAX_ARRAY=${SLURM_MAX_ARRAY_SIZE:-1001}
GRACE_S=${SLURM_GRACE_TIME_S:-10}
PORT_BASE=${SLURM_SLURMD_PORT_BASE:-6900}
TIMEOUT_S=${SLURM_START_TIMEOUT_S:-60}

for var in NODES CPUS MEM_MB MAX_ARRAY GRACE_S PORT_BASE TIMEOUT_S; do
    [[ ${!var} =~ ^[0-9]+$ ]] || slurm_die "${var}=${!var}: expected a whole number"
done
((NODES >= 1 && NODES <= 64)) || slurm_die "NODES=${NODES}: expected 1 to 64"
((CPUS >= 1)) || slurm_die "SLURM_CPUS_PER_NODE=${CPUS}: expected at least 1"
((MAX_ARRAY >= 1 && MAX_ARRAY <= 4000001)) ||
    slurm_die "SLURM_MAX_ARRAY_SIZE=${MAX_ARRAY}: expected 1 to 4000001"
[[ ${SLURM_CLUSTER} =~ ^[a-z][a-z0-9_]*$ ]] ||
    slurm_die "SLURM_CLUSTER_NAME=${SLURM_CLUSTER}: expected lower-case letters, digits and _"
[[ ${EUID} -eq 0 ]] || slurm_die "slurm/start.sh must run as root"
for bin in munged mariadbd slurmdbd slurmctld slurmd sacctmgr sinfo scontrol; do
    command -v "${bin}" >/dev/null || slurm_die "${bin} not found: run 'bash slurm/install.sh' first"
done

HOST=$(hostname -s)
NODE_NAMES=()
for ((i = 1; i <= NODES; i++)); do
    NODE_NAMES+=("node${i}")
done
if ((NODES == 1)); then
    NODELIST=node1
else
    NODELIST="node[1-${NODES}]"
fi
MAX_JOBS=$((MAX_ARRAY * 2 > 10000 ? MAX_ARRAY * 2 : 10000))
D=${SLURM_STATE_DIR}
CONF=${D}/etc/slurm.conf
DBD_CONF=${D}/etc/slurmdbd.conf
CGROUP_CONF=${D}/etc/cgroup.conf
# Daemons read their files from the state dir; clients (sbatch, squeue, sacct) read
# /etc/slurm/slurm.conf, which is a link to the same file.
export SLURM_CONF=${CONF}

mkdir -p "${D}/etc" "${D}/run" "${D}/log" "${D}/spool" "${D}/state/${SLURM_CLUSTER}"
# One start at a time: tests may call this script concurrently. Daemons are started with
# 9>&- so they do not inherit (and hold) this lock.
exec 9>"${D}/start.lock"
flock -w 300 9 || slurm_die "another slurm/start.sh held ${D}/start.lock for 300 s"

render_slurm_conf() {
    cat <<EOF
# Written by slurm/start.sh: edits are overwritten. Facts: shared/notes/slurm-local.md
ClusterName=${SLURM_CLUSTER}
SlurmctldHost=${HOST}(127.0.0.1)
SlurmctldPort=6817
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# Default 120 s: every requeued job waited ~137 s before it could start again.
AuthInfo=cred_expire=10
StateSaveLocation=${D}/state/${SLURM_CLUSTER}
SlurmdSpoolDir=${D}/spool/%n
SlurmctldPidFile=${D}/run/slurmctld.pid
SlurmdPidFile=${D}/run/slurmd-%n.pid
SlurmctldLogFile=${D}/log/slurmctld.log
SlurmdLogFile=${D}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
# Nodes advertise more CPUs and memory than this host has.
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
MinJobAge=300
KillWait=10
InactiveLimit=0
MaxArraySize=${MAX_ARRAY}
MaxJobCount=${MAX_JOBS}
MailProg=/bin/true
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=6819
JobAcctGatherType=jobacct_gather/linux
JobCompType=jobcomp/none
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
# 22.05 has no PreemptParameters=: this sends the job's --signal at preemption time.
SlurmctldParameters=preempt_send_user_signal
EOF
    local i
    for ((i = 1; i <= NODES; i++)); do
        echo "NodeName=node${i} NodeHostname=${HOST} NodeAddr=127.0.0.1 Port=$((PORT_BASE + i))" \
            "CPUs=${CPUS} RealMemory=${MEM_MB} State=UNKNOWN"
    done
    echo "PartitionName=debug Nodes=${NODELIST} Default=YES PriorityTier=1 GraceTime=${GRACE_S}" \
        "MaxTime=INFINITE State=UP"
    echo "PartitionName=high Nodes=${NODELIST} PriorityTier=2 PreemptMode=OFF" \
        "MaxTime=INFINITE State=UP"
}

render_dbd_conf() {
    cat <<EOF
# Written by slurm/start.sh: edits are overwritten.
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
PidFile=${D}/run/slurmdbd.pid
LogFile=${D}/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StoragePort=3306
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
}

render_cgroup_conf() {
    cat <<EOF
# Written by slurm/start.sh. Unused while ProctrackType=proctrack/linuxproc and
# TaskPlugin=task/none (no systemd here to delegate cgroups); kept so tools find one.
CgroupPlugin=autodetect
IgnoreSystemd=yes
EOF
}

want_conf=$(render_slurm_conf)
want_dbd=$(render_dbd_conf)
want_cgroup=$(render_cgroup_conf)
hosts_line="127.0.0.1 ${NODE_NAMES[*]} # launcher-slurm"

munge_works() {
    munge -n 2>/dev/null | unmunge >/dev/null 2>&1
}

file_is() {
    [[ -r $1 ]] && [[ $(cat "$1") == "$2" ]]
}

# Node name -> state, one line each, from the controller (sinfo lists a node once per
# partition, hence sort -u).
node_states() {
    sinfo -h -N -o '%N %T' 2>/dev/null | sort -u
}

# A node is up when it responds and can take jobs (or runs one). '*' means not responding;
# "planned" (22.05) is an idle node the backfill scheduler holds for a pending job.
node_ready() {
    case $1 in
        idle | allocated | mixed | completing | planned | reserved) return 0 ;;
        *) return 1 ;;
    esac
}

all_nodes_ready() {
    local states name state n=0
    states=$(node_states) || return 1
    while read -r name state; do
        [[ -n ${name} ]] || continue
        node_ready "${state}" || return 1
        n=$((n + 1))
    done <<<"${states}"
    ((n == NODES))
}

healthy() {
    file_is "${CONF}" "${want_conf}" || return 1
    file_is "${DBD_CONF}" "${want_dbd}" || return 1
    [[ $(readlink /etc/slurm/slurm.conf 2>/dev/null) == "${CONF}" ]] || return 1
    grep -qxF "${hosts_line}" /etc/hosts || return 1
    munge_works || return 1
    slurm_pid_alive "${MARIADB_PID}" mariadbd >/dev/null || return 1
    slurm_pid_alive "${D}/run/slurmdbd.pid" slurmdbd >/dev/null || return 1
    slurm_pid_alive "${D}/run/slurmctld.pid" slurmctld >/dev/null || return 1
    local node
    for node in "${NODE_NAMES[@]}"; do
        slurm_pid_alive "${D}/run/slurmd-${node}.pid" slurmd >/dev/null || return 1
    done
    all_nodes_ready
}

summary() {
    local how=$1
    echo "slurm: ${how} in $(slurm_elapsed "${t0}") s: cluster ${SLURM_CLUSTER}," \
        "${NODES} nodes ${NODELIST} (${CPUS} CPUs, ${MEM_MB} MB each)," \
        "partitions debug (default) + high (preempts debug), MaxArraySize=${MAX_ARRAY}," \
        "accounting on, state ${D}"
}

# --- Slurm's own OCI containers (`srun --container=BUNDLE`). slurmstepd reads oci.conf from
# the slurm.conf folder at each container step launch, so writing it needs no restart and
# touches no other job. 22.05 fills the bundle's process.env before the task's own variables
# exist (SLURM_PROCID, SLURM_NODEID, ... are missing inside; fixed in 23.02): RunTimeRun goes
# through launcher-oci-run, which sets them from the step's node list, then runs the runtime.
# `exec`: slurmstepd runs it under `sh -c`, and a USR2 (preemption, time limit) would kill sh.
# Without runc or crun no oci.conf is written: launcher then refuses `runtime: oci` at submit.
OCI_CONF=${D}/etc/oci.conf
OCI_RUN=${D}/etc/launcher-oci-run
OCI_STATE=/run/launcher-oci
OCI_RUNTIME=${SLURM_OCI_RUNTIME:-}
if [[ -z ${OCI_RUNTIME} ]]; then
    for bin in runc crun; do
        if command -v "${bin}" >/dev/null; then
            OCI_RUNTIME=${bin}
            break
        fi
    done
fi
[[ -z ${OCI_RUNTIME} || ${OCI_RUNTIME} =~ ^(runc|crun)$ ]] ||
    slurm_die "SLURM_OCI_RUNTIME=${OCI_RUNTIME}: expected runc or crun"

render_oci_conf() {
    local rt="${OCI_RUNTIME} --root=${OCI_STATE}" id="%n.%u.%j.%s.%t"
    cat <<EOF
# Written by slurm/start.sh: edits are overwritten. Read by slurmstepd at each container step.
RunTimeQuery="${rt} state ${id}"
RunTimeRun="exec /usr/bin/python3 ${OCI_RUN} ${id} %b %n %t -- ${rt}"
RunTimeKill="${rt} kill -a ${id}"
RunTimeDelete="${rt} delete --force ${id}; rm -rf ${OCI_STATE}/bundles/${id}"
EOF
}

render_oci_run() {
    cat <<'EOF'
# Written by slurm/start.sh: RunTimeRun of oci.conf. Usage: ID BUNDLE NODE LOCALID -- RUNTIME...
# Slurm 22.05 writes BUNDLE/config.json before the task's own variables are set: set them
# (one task per node, which is all 22.05 allows in a container step), then run the runtime.
import json, os, re, shutil, signal, subprocess, sys

cid, bundle, node, local = sys.argv[1:5]
runtime = sys.argv[6:]
with open(os.path.join(bundle, "config.json")) as f:
    config = json.load(f)
env = config.setdefault("process", {}).setdefault("env", [])
have = dict(e.split("=", 1) for e in env if "=" in e)
nodes = subprocess.run(
    ["scontrol", "show", "hostnames", have.get("SLURM_STEP_NODELIST", node)],
    capture_output=True, text=True, check=True,
).stdout.split()
counts = []
for part in have.get("SLURM_STEP_TASKS_PER_NODE", "1").split(","):
    m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
    counts += [int(m[1])] * int(m[2] or 1) if m else []
nodeid = nodes.index(node)
task = {
    "SLURMD_NODENAME": node,
    "SLURM_NODEID": str(nodeid),
    "SLURM_LOCALID": local,
    "SLURM_PROCID": str(sum(counts[:nodeid]) + int(local)),
}
# Always replaced: srun's own environment (a batch shell's SLURM_PROCID=0) fills these with
# the wrong task's values.
env[:] = [e for e in env if e.split("=", 1)[0] not in task]
env += [f"{k}={v}" for k, v in task.items()]
# 22.05 sets root.path to BUNDLE/rootfs; runc refuses a symlink there (a per-run bundle
# links a rootfs cached once per image).
root = config.setdefault("root", {})
if not root.get("path", "").startswith("/"):
    sys.exit(f"launcher-oci-run: {cid}: root.path is not absolute (give --container a full path)")
root["path"] = os.path.realpath(root["path"])
own = os.path.join("/run/launcher-oci/bundles", cid)
os.makedirs(own, mode=0o700, exist_ok=True)
with open(os.path.join(own, "config.json"), "w") as f:
    json.dump(config, f)
# Not exec'd: the copy is removed when the container ends (RunTimeDelete runs only for a
# container still known). Slurm signals every process of the step, the container's included,
# so this one only survives signals; forwarding them would deliver each one twice.
for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
    signal.signal(sig, lambda *_: None)
try:
    code = subprocess.call([*runtime, "run", cid, "-b", own])
finally:
    shutil.rmtree(own, ignore_errors=True)
sys.exit(code if code >= 0 else 128 - code)
EOF
}

if [[ -n ${OCI_RUNTIME} ]]; then
    want_oci_run=$(render_oci_run)
    want_oci_conf=$(render_oci_conf)
    file_is "${OCI_RUN}" "${want_oci_run}" || {
        printf '%s\n' "${want_oci_run}" >"${OCI_RUN}.tmp" && mv -f "${OCI_RUN}.tmp" "${OCI_RUN}"
    }
    file_is "${OCI_CONF}" "${want_oci_conf}" || {
        printf '%s\n' "${want_oci_conf}" >"${OCI_CONF}.tmp" && mv -f "${OCI_CONF}.tmp" "${OCI_CONF}"
    }
    chmod 0644 "${OCI_RUN}" "${OCI_CONF}"
    install -d -m 0711 "${OCI_STATE}" "${OCI_STATE}/bundles"
else
    rm -f "${OCI_CONF}"
fi

if healthy; then
    summary "already running"
    exit 0
fi

# Wait up to TIMEOUT_S for a command to succeed; on timeout show the log and fail.
wait_for() {
    local what=$1 log=$2 i
    shift 2
    for ((i = 0; i < TIMEOUT_S * 5; i++)); do
        if "$@" >/dev/null 2>&1; then
            return 0
        fi
        sleep 0.2
    done
    slurm_log "timed out after ${TIMEOUT_S} s waiting for ${what}; last lines of ${log}:"
    tail -n 20 "${log}" >&2 || true
    exit 1
}

write_if_changed() {
    local path=$1 text=$2 mode=$3
    if ! file_is "${path}" "${text}"; then
        printf '%s\n' "${text}" >"${path}.tmp"
        chmod "${mode}" "${path}.tmp"
        mv -f "${path}.tmp" "${path}"
        return 0
    fi
    chmod "${mode}" "${path}"
    return 1
}

# --- /etc/hosts: node names resolve to this host (MASTER_ADDR=node1 must resolve).
# Rewritten in place, not replaced: it may be a bind mount.
if ! grep -qxF "${hosts_line}" /etc/hosts; then
    new_hosts=$(grep -v '# launcher-slurm$' /etc/hosts || true)
    printf '%s\n%s\n' "${new_hosts}" "${hosts_line}" >/etc/hosts
fi

# --- munge
if ! munge_works; then
    slurm_stop_pidfile "${MUNGE_PID}" munged 5
    if [[ ! -s /etc/munge/munge.key ]]; then
        runuser -u munge -- mungekey --create --keyfile=/etc/munge/munge.key
    fi
    install -d -o munge -g munge -m 0755 /run/munge
    rm -f /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
    runuser -u munge -- /usr/sbin/munged </dev/null >>"${D}/log/munged.out" 2>&1 9>&-
    wait_for "munged" /var/log/munge/munged.log munge_works
fi

# --- MariaDB: no init system here, so it is started by hand.
mariadb_works() {
    mariadb-admin --socket="${MARIADB_SOCKET}" ping >/dev/null 2>&1
}
if ! mariadb_works; then
    slurm_stop_pidfile "${MARIADB_PID}" mariadbd 30
    if [[ ! -d /var/lib/mysql/mysql ]]; then
        mariadb-install-db --user=mysql --datadir=/var/lib/mysql >>"${D}/log/mariadb.log" 2>&1
    fi
    install -d -o mysql -g root -m 0755 /run/mysqld
    setsid /usr/sbin/mariadbd --user=mysql --pid-file="${MARIADB_PID}" \
        --socket="${MARIADB_SOCKET}" --bind-address=127.0.0.1 \
        --innodb-lock-wait-timeout=900 --innodb-buffer-pool-size=256M \
        </dev/null >>"${D}/log/mariadb.log" 2>&1 9>&- &
    wait_for "mariadbd" "${D}/log/mariadb.log" mariadb_works
fi
mariadb --socket="${MARIADB_SOCKET}" -u root <<'SQL'
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
SQL

# --- config files
install -d -m 0755 "${SLURM_ETC}"
write_if_changed "${CGROUP_CONF}" "${want_cgroup}" 0644 || true
dbd_changed=0
write_if_changed "${DBD_CONF}" "${want_dbd}" 0600 && dbd_changed=1
conf_changed=0
write_if_changed "${CONF}" "${want_conf}" 0644 && conf_changed=1
if [[ $(readlink "${SLURM_ETC}/slurm.conf" 2>/dev/null) != "${CONF}" ]]; then
    ln -sfn "${CONF}" "${SLURM_ETC}/slurm.conf"
fi

# --- slurmdbd
if ((dbd_changed)); then
    slurm_stop_pidfile "${D}/run/slurmdbd.pid" slurmdbd
fi
if ! slurm_pid_alive "${D}/run/slurmdbd.pid" slurmdbd >/dev/null; then
    slurmdbd </dev/null >>"${D}/log/slurmdbd.out" 2>&1 9>&-
fi
wait_for "slurmdbd" "${D}/log/slurmdbd.log" sacctmgr -n list cluster
if [[ -z $(sacctmgr -n -P list cluster "${SLURM_CLUSTER}" format=cluster) ]]; then
    sacctmgr -i add cluster "${SLURM_CLUSTER}" >/dev/null
fi

# --- slurmctld and one slurmd per node. A changed slurm.conf (node count, MaxArraySize)
# needs a restart: 22.05 cannot add or remove nodes by reconfigure.
if ((conf_changed)); then
    while read -r pidfile; do
        if [[ -n ${pidfile} ]]; then
            slurm_stop_pidfile "${pidfile}" slurmd
        fi
    done < <(slurm_slurmd_pidfiles)
    slurm_stop_pidfile "${D}/run/slurmctld.pid" slurmctld
fi
if ! slurm_pid_alive "${D}/run/slurmctld.pid" slurmctld >/dev/null; then
    slurmctld </dev/null >>"${D}/log/slurmctld.out" 2>&1 9>&-
fi
wait_for "slurmctld" "${D}/log/slurmctld.log" bash -c 'scontrol ping | grep -q "is UP"'
for node in "${NODE_NAMES[@]}"; do
    mkdir -p "${D}/spool/${node}"
    if ! slurm_pid_alive "${D}/run/slurmd-${node}.pid" slurmd >/dev/null; then
        slurmd -N "${node}" </dev/null >>"${D}/log/slurmd-${node}.out" 2>&1 9>&-
    fi
done

# --- wait for every node to be up; resume nodes an earlier run left down or drained.
for ((i = 0; i < TIMEOUT_S * 5; i++)); do
    all_nodes_ready && break
    if ((i % 5 == 0)); then
        while read -r name state; do
            case ${state} in
                down | drained | draining | drain | fail | failing)
                    scontrol update nodename="${name}" state=resume 2>/dev/null || true
                    ;;
            esac
        done < <(node_states)
    fi
    sleep 0.2
done
if ! all_nodes_ready; then
    slurm_log "timed out after ${TIMEOUT_S} s waiting for ${NODES} nodes; sinfo says:"
    node_states >&2 || true
    tail -n 20 "${D}/log/slurmctld.log" >&2 || true
    exit 1
fi
summary "started"
