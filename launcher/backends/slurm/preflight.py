"""Slurm preflight: the cluster's own answer to "would this job be accepted, and could it run?"

A few quick calls per submit, started together so the wait is the slowest one, never one per
sweep point:
- `sinfo -N` (one line per node and partition): the partition exists and is up, the time
  limit is within its MaxTime, the job's nodes fit (CPUs, memory, GPUs per node), and whether
  the nodes are other machines (for the shared-filesystem warning);
- `sbatch --test-only` of the real script (read from stdin, so nothing is written): the
  cluster's whole policy (partition, account, QOS, limits), its refusal turned into one line;
- `scontrol show assoc_mgr` (the controller's copy of accounting) when an account or QOS is
  given, or for a sweep: they exist, and the sweep fits MaxSubmitJobs;
- `scontrol show config` for a sweep: MaxArraySize (chunks) and MaxJobCount;
- `srun --help` only with a pyxis container (pyxis adds --container-image to srun).
Nothing here writes a file or queues a job.
"""

from __future__ import annotations

import getpass
import importlib
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher.backends.base import Check, Plan, SlurmPayload
from launcher.backends.slurm.sbatch import cpus_per_task
from launcher.backends.slurm.status import DEFAULT_MAX_ARRAY_SIZE
from launcher.errors import LauncherError
from launcher.preflight import job_checks, network_check
from launcher.spec import JobSpec

# Each call answers in milliseconds on a healthy controller; past this it is not answering.
CALL_TIMEOUT_S = 15.0
SINFO_FORMAT = "%R|%P|%N|%c|%m|%G|%l|%a|%T|%n|%o|%f"
# Filesystems every node of a cluster can mount; anything else (ext4, xfs, tmpfs, overlay)
# is taken to be this machine's own.
SHARED_FS = (
    "nfs",
    "nfs4",
    "lustre",
    "gpfs",
    "beegfs",
    "cephfs",
    "ceph",
    "glusterfs",
    "fuse.glusterfs",
    "cifs",
    "smb3",
    "panfs",
    "wekafs",
    "fuse.sshfs",
    "fuse.juicefs",
    "fuse.weka",
    "virtiofs",
    "9p",
)
NODE_LOCAL_PREFIXES = ("/tmp", "/var/tmp", "/dev/shm", "/run")

# sbatch's refusals (Slurm 22.05 wording) -> the key that fixes them and how.
REFUSALS: tuple[tuple[str, str, str], ...] = (
    # First: its text also says "time limits".
    ("accounting/qos policy", "slurm.qos", "stay within your association's and QOS's limits"),
    ("invalid partition", "slurm.partition", "name a partition `sinfo -s` lists"),
    ("time limit", "resources.time_min", "ask for at most the partition's MaxTime"),
    ("invalid account", "slurm.account", "use an account `sacctmgr show assoc user=$USER` lists"),
    ("invalid qos", "slurm.qos", "use a QOS your association allows"),
    ("qos", "slurm.qos", "use a QOS your association allows"),
    ("node count", "resources.nodes", "ask for at most the partition's nodes"),
    ("memory", "resources.mem_gb", "ask for at most a node's memory"),
    ("gres", "resources.gpus_per_node", "ask for GPUs only on a partition that has them"),
    ("feature", "slurm.constraint", "use a feature `sinfo -o %f` lists"),
    ("array", "slurm.max_array_size", "at most the cluster's MaxArraySize tasks per array"),
    ("node configuration", "resources", "ask for at most what one node has (sinfo -N -l)"),
)


@dataclass(frozen=True)
class Node:
    """One node as one partition shows it (`sinfo -N -o SINFO_FORMAT`)."""

    partition: str
    default: bool
    name: str
    cpus: int
    mem_mb: int
    gpus: int
    max_time_min: float  # math.inf: no limit
    avail: str
    state: str
    hostname: str
    addr: str


def parse_time_min(text: str) -> float:
    """Slurm's time limit text ('infinite', '1-02:00:00', '30:00', '45') -> minutes."""
    text = text.strip()
    if text.lower() in ("infinite", "unlimited", "n/a", ""):
        return math.inf
    days = 0
    if "-" in text:
        head, _, text = text.partition("-")
        days = int(head)
    parts = [int(p) for p in text.split(":")]
    if len(parts) == 3:
        h, m, s = parts
    elif len(parts) == 2:
        h, m, s = 0, parts[0], parts[1]
    else:
        h, m, s = 0, parts[0], 0
    return days * 1440 + h * 60 + m + s / 60


def _gpus(gres: str) -> int:
    total = 0
    for item in gres.split(","):
        match = re.match(r"gpu(?::[^:(]+)?:(\d+)", item.strip())
        if match:
            total += int(match[1])
    return total


def parse_sinfo(text: str) -> list[Node]:
    nodes = []
    for line in text.splitlines():
        parts = line.split("|")
        if len(parts) < 11:
            continue
        try:
            nodes.append(
                Node(
                    partition=parts[0],
                    default=parts[1].endswith("*"),
                    name=parts[2],
                    cpus=int(parts[3]),
                    mem_mb=int(parts[4].rstrip("+") or 0),
                    gpus=_gpus(parts[5]),
                    max_time_min=parse_time_min(parts[6]),
                    avail=parts[7],
                    state=parts[8],
                    hostname=parts[9],
                    addr=parts[10],
                )
            )
        except ValueError:
            continue
    return nodes


TRANSIENT = ("resource temporarily unavailable", "socket timed out", "try again")


def _transient(stderr: str) -> bool:
    low = stderr.lower()
    return any(word in low for word in TRANSIENT)


def refusal(stderr: str) -> tuple[str, str, str]:
    """sbatch's refusal -> (key, the reason as one line, fix)."""
    lines = [" ".join(x.split()) for x in stderr.splitlines() if x.strip()]
    # The last line is the controller's reason; sbatch's own error line may come before it.
    reason = lines[-1] if lines else "no message"
    for prefix in ("sbatch: error: ", "allocation failure: ", "Batch job submission failed: "):
        reason = reason.removeprefix(prefix)
    low = " ".join(lines).lower()
    for needle, key, fix in REFUSALS:
        if needle in low:
            return key, reason, fix
    return "slurm", reason, "see `sbatch --test-only` with the script `--dry-run` prints"


# --- calls -------------------------------------------------------------------------------


@dataclass
class Answer:
    rc: int
    out: str
    err: str


def run_together(
    calls: Mapping[str, tuple[list[str], str | None]], timeout_s: float = CALL_TIMEOUT_S
) -> dict[str, Answer]:
    """Start every call at once (argv, stdin text), wait for all: the slowest one's time."""
    procs: dict[str, subprocess.Popen[str]] = {}
    answers: dict[str, Answer] = {}
    for name, (argv, _) in calls.items():
        try:
            procs[name] = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        except OSError as exc:
            answers[name] = Answer(127, "", f"{argv[0]}: {exc.strerror or exc}")
    deadline = time.monotonic() + timeout_s
    for name, proc in procs.items():
        try:
            out, err = proc.communicate(
                calls[name][1] or "", timeout=max(0.1, deadline - time.monotonic())
            )
            answers[name] = Answer(proc.returncode, out, err)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            answers[name] = Answer(124, "", f"did not answer within {timeout_s:g} s")
    return answers


# --- the checks ----------------------------------------------------------------------------


def preflight(plan: Plan[SlurmPayload], *, points: int = 1) -> list[Check]:
    """Every check before sbatch; see the module docstring for the calls."""
    spec, file = plan.spec, plan.config_file
    host_python = None if spec.slurm.container else (spec.entrypoint.python or sys.executable)
    checks = job_checks(plan, python=host_python)
    sl = spec.slurm
    script, array_size = _script(plan, points)
    calls: dict[str, tuple[list[str], str | None]] = {
        "sinfo": (["sinfo", "-h", "-N", "-o", SINFO_FORMAT], None),
        "sbatch": (["sbatch", "--test-only"], script),
    }
    if sl.account or sl.qos or points > 1:
        calls["assoc"] = (["scontrol", "-o", "show", "assoc_mgr", "flags=assoc,qos"], None)
    if points > 1:
        calls["config"] = (["scontrol", "show", "config"], None)
    runtime = _runtime(spec)
    if runtime == "pyxis":
        calls["srun"] = (["srun", "--help"], None)
    answers = run_together(calls)

    sinfo = answers["sinfo"]
    if sinfo.rc != 0:
        why = " ".join(sinfo.err.split()) or f"exit code {sinfo.rc}"
        checks.append(
            Check(
                "slurm.controller",
                "fail",
                f"the Slurm controller did not answer sinfo: {why}",
                "is slurmctld up? (`scontrol ping`)",
                file=file,
            )
        )
        return checks
    nodes = parse_sinfo(sinfo.out)
    # The limit sbatch gets (resources.time_min, or the backend's default when unset).
    time_min = int(plan.payload.params.get("time") or spec.resources.time_min or 60)
    part_checks, part_nodes = _partition_checks(spec, nodes, time_min, file)
    checks += part_checks
    checks.append(_shared_fs_check(plan, part_nodes or nodes, file))
    if "assoc" in answers:
        checks += _assoc_checks(spec, answers["assoc"], points, answers.get("config"), file)
    if "config" in answers:
        checks += _array_checks(spec, answers["config"], points, array_size, file)
    if sl.container is not None:
        checks.append(_container_check(spec, runtime, answers.get("srun"), file))
    sbatch = answers["sbatch"]
    if sbatch.rc == 0:
        said = " ".join(sbatch.err.split()).removeprefix("sbatch: ")
        checks.append(Check("slurm.sbatch", "ok", f"sbatch --test-only: {said}", file=file))
    elif _transient(sbatch.err):
        # A busy controller is no refusal: sbatch itself waits and retries on it.
        said = " ".join(sbatch.err.split())
        checks.append(
            Check(
                "slurm.sbatch",
                "warn",
                f"sbatch --test-only got no verdict (the controller is busy or at its "
                f"MaxJobCount: {said}); the cluster's policy was not checked",
                file=file,
            )
        )
    else:
        key, reason, fix = refusal(sbatch.err or sbatch.out)
        done = {c.key for c in checks if c.status == "fail"}
        # The array is tried at Slurm's default size; the sweep is chunked to the cluster's.
        chunked = key == "slurm.max_array_size" and not sl.max_array_size and points > 1
        # One line per cause: the specific check above already said it better.
        if key not in done and not chunked and not (key == "resources" and done & _RESOURCE_KEYS):
            checks.append(
                Check(
                    "slurm.sbatch",
                    "fail",
                    f"the cluster refuses this job (sbatch --test-only): {reason}",
                    fix,
                    file=file,
                    key=key,
                )
            )
    return checks


_RESOURCE_KEYS = {
    "resources.nodes",
    "resources.cpus_per_proc",
    "resources.procs_per_node",
    "resources.mem_gb",
    "resources.gpus_per_node",
    "resources.time_min",
    "slurm.partition",
}


def _runtime(spec: JobSpec) -> str | None:
    if spec.slurm.container is None:
        return None
    return str(getattr(spec.slurm.container, "runtime", None) or "pyxis")


def _script(plan: Plan[SlurmPayload], points: int) -> tuple[str, int]:
    """What sbatch would get: the plan's script, or for a sweep its first array's."""
    if points <= 1:
        return plan.payload.script, 1
    from launcher.backends.slurm.array import render_array

    spec = plan.spec
    size = min(points, spec.slurm.max_array_size or DEFAULT_MAX_ARRAY_SIZE)
    folder = Path(plan.payload.folder)
    script = render_array(
        spec,
        plan.payload.params,
        folder,
        folder / "chunk-1.json",
        size,
        spec.slurm.array_parallelism,
    )
    return script, size


def _partition_checks(
    spec: JobSpec, nodes: Sequence[Node], time_min: int, file: str | None
) -> tuple[list[Check], list[Node]]:
    partitions = sorted({n.partition for n in nodes})
    wanted = spec.slurm.partition
    if wanted is None:
        defaults = {n.partition for n in nodes if n.default}
        if not defaults:
            return [
                Check(
                    "slurm.partition",
                    "fail",
                    f"no partition given and the cluster has no default one (partitions: "
                    f"{', '.join(partitions)})",
                    "set slurm.partition",
                    file=file,
                    key="slurm.partition",
                )
            ], []
        wanted = sorted(defaults)[0]
    names = [p.strip() for p in wanted.split(",")]
    missing = [p for p in names if p not in partitions]
    if missing:
        from launcher.preflight import did_you_mean

        close = did_you_mean(missing[0], partitions)
        return [
            Check(
                "slurm.partition",
                "fail",
                f"no partition {missing[0]!r} on this cluster (partitions: "
                f"{', '.join(partitions)})",
                close or "pick one of those",
                file=file,
                key="slurm.partition",
            )
        ], []
    mine = [n for n in nodes if n.partition in names]
    label = ",".join(names)
    checks = [
        Check(
            "slurm.partition",
            "ok",
            f"partition {label}: {len({n.name for n in mine})} nodes",
            file=file,
            key="slurm.partition",
        )
    ]
    if all(n.avail != "up" for n in mine):
        checks.append(
            Check(
                "slurm.partition.state",
                "warn",
                f"partition {label} is {mine[0].avail}: the job would wait until it is up",
                "ask the admins, or use another partition",
                file=file,
                key="slurm.partition",
            )
        )
    max_time = max(n.max_time_min for n in mine)
    if time_min > max_time:
        longer = sorted({n.partition for n in nodes if n.max_time_min >= time_min} - set(names))
        also = f", or a partition that allows it: {', '.join(longer)}" if longer else ""
        checks.append(
            Check(
                "slurm.time_limit",
                "fail",
                f"{time_min} min is over partition {label}'s MaxTime of {max_time:g} min",
                f"set resources.time_min to at most {int(max_time)}{also}",
                file=file,
                key="resources.time_min",
            )
        )
    else:
        shown = "no limit" if max_time == math.inf else f"MaxTime {max_time:g} min"
        checks.append(
            Check(
                "slurm.time_limit",
                "ok",
                f"{time_min} min within partition {label}'s {shown}",
                file=file,
                key="resources.time_min",
            )
        )
    checks += _fit_checks(spec, mine, label, file)
    return checks, mine


def _mem_mb(spec: JobSpec) -> int:
    return int(spec.resources.mem_gb * 1024) if spec.resources.mem_gb else 0


def _fit_checks(spec: JobSpec, nodes: Sequence[Node], label: str, file: str | None) -> list[Check]:
    """The per-node ask (CPUs, memory, GPUs) fits at least `resources.nodes` nodes."""
    res = spec.resources
    per_task = cpus_per_task(spec)
    cpus = res.tasks_per_node * per_task
    mem = _mem_mb(spec)
    gpus = res.gpus_per_node
    unique = {n.name: n for n in nodes}.values()
    fit = [n for n in unique if n.cpus >= cpus and n.mem_mb >= mem and n.gpus >= gpus]
    ask = f"{cpus} CPUs" + (f", {mem} MB" if mem else "") + (f", {gpus} GPUs" if gpus else "")
    if len(fit) >= res.nodes:
        return [
            Check(
                "slurm.node_fit",
                "ok",
                f"{len(fit)} node(s) of {label} fit the per-node ask ({ask}); {res.nodes} needed",
                file=file,
                key="resources",
            )
        ]
    total = len(unique)
    if res.nodes > total:
        return [
            Check(
                "slurm.node_fit",
                "fail",
                f"{res.nodes} nodes asked, partition {label} has {total}",
                f"set resources.nodes to at most {total}",
                file=file,
                key="resources.nodes",
            )
        ]
    # Name the first dimension that no node (or too few) can give.
    most_cpus = max(n.cpus for n in unique)
    most_mem = max(n.mem_mb for n in unique)
    most_gpus = max(n.gpus for n in unique)
    if cpus > most_cpus:
        key = "resources.cpus_per_proc" if res.cpus_per_proc else "resources.procs_per_node"
        found = (
            f"{res.tasks_per_node} task(s) x {per_task} CPUs = {cpus} CPUs per node, but the "
            f"biggest node of partition {label} has {most_cpus}"
        )
        fix = (
            f"at most {most_cpus} CPUs per node: fewer procs_per_node or cpus_per_proc, "
            "or more nodes"
        )
        if not res.cpus_per_proc and spec.loader.num_workers is not None:
            fix += "; without cpus_per_proc each task gets loader.num_workers + 1 CPUs"
    elif mem > most_mem:
        key, found = (
            "resources.mem_gb",
            f"{res.mem_gb:g} GB per node, but the biggest node of partition {label} has "
            f"{most_mem} MB",
        )
        fix = f"set resources.mem_gb to at most {most_mem / 1024:.1f}"
    elif gpus > most_gpus:
        key, found = (
            "resources.gpus_per_node",
            f"{gpus} GPU(s) per node, but the nodes of partition {label} have "
            + (f"at most {most_gpus}" if most_gpus else "none"),
        )
        fix = (
            f"at most {most_gpus}"
            if most_gpus
            else "a partition with GPUs, or resources.gpus_per_node: 0"
        )
    else:
        key, found = (
            "resources.nodes",
            f"only {len(fit)} node(s) of partition {label} fit the per-node ask ({ask}); "
            f"{res.nodes} asked",
        )
        fix = f"set resources.nodes to at most {len(fit)}, or ask less per node"
    return [Check("slurm.node_fit", "fail", found, fix, file=file, key=key)]


def _this_host() -> set[str]:
    names = {"localhost", "127.0.0.1", "::1"}
    host = socket.gethostname()
    names |= {host, host.split(".")[0]}
    try:
        names.add(socket.gethostbyname(host))
    except OSError:
        pass
    return names


def _mount_of(path: Path) -> tuple[str, str]:
    """(mount point, filesystem type) holding `path` (longest /proc/mounts prefix)."""
    best = ("/", "")
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return best
    target = str(path)
    for line in lines:
        parts = line.split()
        if len(parts) < 3:
            continue
        point = parts[1].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best[0]):
            best = (point, parts[2])
    return best


def _shared_fs_check(plan: Plan[SlurmPayload], nodes: Sequence[Node], file: str | None) -> Check:
    """Warn when the run folder is on this machine's own disk and some node is another
    machine: Slurm's output files and the ranks' logs would land where nobody reads them,
    and the tasks could not find the pickled job."""
    key = "runs_dir"
    run_dir = Path(plan.run_dir).absolute()
    here = _this_host()
    others = sorted({n.name for n in nodes if n.hostname not in here and n.addr not in here})
    point, fstype = _mount_of(run_dir)
    local = fstype not in SHARED_FS or str(run_dir).startswith(NODE_LOCAL_PREFIXES)
    where = f"{run_dir} is on {point} ({fstype or 'unknown'})"
    if not local:
        return Check("slurm.shared_fs", "ok", f"{where}, shared", file=file, key=key)
    if not others:
        return Check(
            "slurm.shared_fs",
            "ok",
            f"{where}, this machine's own; every node is this machine",
            file=file,
            key=key,
        )
    return Check(
        "slurm.shared_fs",
        "warn",
        f"{where}, which nodes {', '.join(others[:4])} cannot see: the job's files and logs "
        "would not be found",
        "set runs_dir to a shared filesystem (e.g. under $HOME or /scratch)",
        file=file,
        key=key,
    )


def _assoc_records(text: str) -> tuple[list[dict[str, str]], dict[str, dict[str, str]]]:
    """`scontrol -o show assoc_mgr flags=assoc,qos` -> association records, QOS by name."""
    assocs: list[dict[str, str]] = []
    qos: dict[str, dict[str, str]] = {}
    for line in text.splitlines():
        fields = dict(re.findall(r"(\S+?)=(\S*)", line))
        if line.startswith("ClusterName="):
            assocs.append(fields)
        elif line.startswith("QOS="):
            qos[fields["QOS"].split("(")[0]] = fields
    return assocs, qos


def _limit(value: str | None) -> int | None:
    """A limit field ('5', '5(0)', 'N(0)', '') -> the number, or None when unlimited."""
    match = re.match(r"(\d+)", value or "")
    return int(match[1]) if match else None


def _assoc_checks(
    spec: JobSpec, answer: Any, points: int, config: Any, file: str | None
) -> list[Check]:
    sl = spec.slurm
    if answer.rc != 0:
        return [
            Check(
                "slurm.accounting",
                "warn",
                f"could not read the controller's accounts: {' '.join(answer.err.split())}",
                "",
                file=file,
            )
        ]
    assocs, qos = _assoc_records(answer.out)
    user = getpass.getuser()
    accounts = sorted({a.get("Account", "") for a in assocs} - {""})
    checks: list[Check] = []
    from launcher.preflight import did_you_mean

    if sl.account:
        if sl.account not in accounts:
            checks.append(
                Check(
                    "slurm.account",
                    "fail",
                    f"no account {sl.account!r} on this cluster (accounts: {', '.join(accounts)})",
                    did_you_mean(sl.account, accounts) or "use one `sacctmgr show assoc` lists",
                    file=file,
                    key="slurm.account",
                )
            )
        else:
            mine = [
                a
                for a in assocs
                if a.get("Account") == sl.account and a.get("UserName", "").split("(")[0] == user
            ]
            checks.append(
                Check(
                    "slurm.account",
                    "ok" if mine else "warn",
                    f"account {sl.account}"
                    + ("" if mine else f" has no association for user {user}"),
                    "" if mine else f"sacctmgr add user {user} account={sl.account}",
                    file=file,
                    key="slurm.account",
                )
            )
    if sl.qos:
        if sl.qos not in qos:
            checks.append(
                Check(
                    "slurm.qos",
                    "fail",
                    f"no QOS {sl.qos!r} on this cluster (QOS: {', '.join(sorted(qos))})",
                    did_you_mean(sl.qos, list(qos)) or "use one `sacctmgr show qos` lists",
                    file=file,
                    key="slurm.qos",
                )
            )
        else:
            checks.append(Check("slurm.qos", "ok", f"QOS {sl.qos}", file=file, key="slurm.qos"))
    if points > 1:
        checks += _submit_limit_checks(spec, assocs, qos, user, points, config, file)
    return checks


def _submit_limit_checks(
    spec: JobSpec,
    assocs: list[dict[str, str]],
    qos: dict[str, dict[str, str]],
    user: str,
    points: int,
    config: Any,
    file: str | None,
) -> list[Check]:
    """Every array task counts against MaxSubmitJobs (the user's association, its QOS)."""
    mine = [a for a in assocs if a.get("UserName", "").split("(")[0] == user]
    if spec.slurm.account:
        mine = [a for a in mine if a.get("Account") == spec.slurm.account] or mine
    limits: list[tuple[int, str]] = []
    for a in mine:
        limit = _limit(a.get("MaxSubmitJobs"))
        if limit is not None:
            limits.append((limit, f"MaxSubmitJobs of association {a.get('Account')}/{user}"))
    for name in [spec.slurm.qos] if spec.slurm.qos else []:
        record = qos.get(name or "", {})
        for field in ("MaxSubmitJobsPU", "MaxSubmitJobsPerUser", "GrpSubmitJobs"):
            limit = _limit(record.get(field))
            if limit is not None:
                limits.append((limit, f"{field} of QOS {name}"))
    if not limits:
        return [Check("slurm.max_submit", "ok", "no MaxSubmitJobs limit applies", file=file)]
    limit, what = min(limits)
    if points <= limit:
        return [
            Check("slurm.max_submit", "ok", f"{points} points within {what} {limit}", file=file)
        ]
    enforced = "limits" in _config_value(config, "AccountingStorageEnforce").lower()
    return [
        Check(
            "slurm.max_submit",
            "fail" if enforced else "warn",
            f"{points} points (each array task is a job) over {what} {limit}"
            + ("" if enforced else " (not enforced by this cluster)"),
            f"at most {limit} points per sweep (sweep.max_points), or run it in parts",
            file=file,
            key="sweep",
        )
    ]


def _config_value(answer: Any, name: str) -> str:
    if answer is None or answer.rc != 0:
        return ""
    for line in answer.out.splitlines():
        key, _, value = line.partition("=")
        if key.strip() == name:
            return value.strip()
    return ""


def _array_checks(
    spec: JobSpec, answer: Any, points: int, array_size: int, file: str | None
) -> list[Check]:
    """The sweep is chunked into arrays of at most MaxArraySize tasks, and the controller can
    hold all of its tasks (MaxJobCount: sbatch waits when the queue is full)."""
    max_array = _limit(_config_value(answer, "MaxArraySize")) or DEFAULT_MAX_ARRAY_SIZE
    max_jobs = _limit(_config_value(answer, "MaxJobCount"))
    checks: list[Check] = []
    given = spec.slurm.max_array_size
    if given and given > max_array:
        checks.append(
            Check(
                "slurm.max_array_size",
                "fail",
                f"slurm.max_array_size {given} is over the cluster's MaxArraySize {max_array}",
                f"set it to at most {max_array}, or leave it out to use the cluster's",
                file=file,
                key="slurm.max_array_size",
            )
        )
    size = min(given or max_array, max_array)
    arrays = math.ceil(points / size)
    checks.append(
        Check(
            "slurm.array_size",
            "ok",
            f"{points} points in {arrays} array(s) of at most {size} tasks (MaxArraySize "
            f"{max_array})",
            file=file,
            key="sweep",
        )
    )
    if max_jobs is not None and points > max_jobs:
        checks.append(
            Check(
                "slurm.max_job_count",
                "fail",
                f"{points} points, but the controller holds at most MaxJobCount {max_jobs} "
                "jobs (each array task counts)",
                f"at most {max_jobs} points per sweep (sweep.max_points)",
                file=file,
                key="sweep",
            )
        )
    return checks


def _container_check(spec: JobSpec, runtime: str | None, srun: Any, file: str | None) -> Check:
    """The runtime `slurm.container` names is present (its conversion tools here, its
    plugin in srun, oci.conf for Slurm's own OCI support)."""
    key = "slurm.container.runtime"
    runtimes: Any
    try:
        runtimes = importlib.import_module("launcher.backends.slurm.container")
    except ImportError:  # a launcher without container runtimes: pyxis only
        runtimes = None
    try:
        if runtimes is not None:
            runtimes.check_runtime(spec)
    except LauncherError as exc:
        return Check("slurm.container", "fail", str(exc), "", file=file, key=key)
    if runtime == "pyxis" and srun is not None and "--container-image" not in srun.out:
        return Check(
            "slurm.container",
            "fail",
            "runtime pyxis: srun has no --container-image (the pyxis plugin is not loaded)",
            "use runtime: apptainer or oci, or install pyxis",
            file=file,
            key=key,
        )
    if runtime == "apptainer" and not (shutil.which("apptainer") or shutil.which("singularity")):
        return Check(
            "slurm.container",
            "fail",
            "runtime apptainer: neither apptainer nor singularity is in PATH here",
            "install Apptainer, or use another runtime",
            file=file,
            key=key,
        )
    return Check("slurm.container", "ok", f"runtime {runtime} present", file=file, key=key)


# --- doctor --------------------------------------------------------------------------------


def _first_node(spec: JobSpec) -> str | None:
    """The node distributed init would connect to: the partition's first node (sinfo)."""
    answers = run_together({"sinfo": (["sinfo", "-h", "-N", "-o", SINFO_FORMAT], None)})
    nodes = parse_sinfo(answers["sinfo"].out)
    wanted = spec.slurm.partition
    for n in nodes:
        if (wanted and n.partition == wanted) or (not wanted and n.default):
            return n.name
    return nodes[0].name if nodes else None


def doctor_checks(spec: JobSpec | None) -> list[Check]:
    """Slower checks: the controller answers, accounting (sacct, which status needs) answers;
    with a Slurm job's spec, the interface distributed init would use to its first node."""
    if not shutil.which("sinfo"):
        return [
            Check(
                "slurm.client",
                "fail",
                "no Slurm client commands here (sinfo not in PATH)",
                "run on a login node, or bash slurm/install.sh",
            )
        ]
    answers = run_together(
        {
            "ping": (["scontrol", "ping"], None),
            "version": (["sinfo", "--version"], None),
            "sacct": (["sacct", "-n", "-X", "-P", "-S", "now-1hours", "-o", "JobID"], None),
            "dbd": (["sacctmgr", "-n", "-P", "show", "cluster", "format=cluster"], None),
        },
        timeout_s=30,
    )
    checks: list[Check] = []
    ping = answers["ping"]
    up = ping.rc == 0 and "UP" in ping.out
    said = " ".join((ping.out or ping.err).split())
    checks.append(
        Check(
            "slurm.controller",
            "ok" if up else "fail",
            f"{answers['version'].out.strip()}: {said}",
            "" if up else "start slurmctld (bash slurm/start.sh here)",
        )
    )
    sacct = answers["sacct"]
    checks.append(
        Check(
            "slurm.accounting",
            "ok" if sacct.rc == 0 else "fail",
            "sacct answers (launcher status reads job states from it)"
            if sacct.rc == 0
            else f"sacct fails: {' '.join(sacct.err.split())[:200]}",
            "" if sacct.rc == 0 else "start slurmdbd and set AccountingStorageType",
        )
    )
    dbd = answers["dbd"]
    clusters = dbd.out.split()
    checks.append(
        Check(
            "slurm.slurmdbd",
            "ok" if dbd.rc == 0 and clusters else "warn",
            f"slurmdbd knows cluster(s) {', '.join(clusters)}"
            if dbd.rc == 0
            else f"sacctmgr fails: {' '.join(dbd.err.split())[:200]}",
        )
    )
    conf = os.environ.get("SLURM_CONF") or "/etc/slurm/slurm.conf"
    if not Path(conf).exists():
        checks.append(Check("slurm.conf", "warn", f"{conf} not found", "set SLURM_CONF"))
    if spec is not None and up:
        node = _first_node(spec)
        if node:
            checks.append(network_check(node, spec.env, what="the job's first node"))
    return checks
