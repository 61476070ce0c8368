"""The training image on Slurm: one runtime per cluster kind, the image converted once per tag.

Three runtimes, one shape (`render` is pure; `prepare_image` shells out):
- `pyxis`: pyxis/enroot (NVIDIA clusters). srun flags `--container-image=SQSH ...`; the
  squashfs comes from `enroot import dockerd://TAG`. A registry image named in
  `slurm.container.image` goes to pyxis as it is (enroot imports it on each node).
- `apptainer`: Apptainer/Singularity (most university and national centres). The step runs
  `apptainer exec ... IMAGE.sif CMD`; the SIF comes from `apptainer build docker-daemon://TAG`.
- `oci`: Slurm's own `srun --container=BUNDLE` with an oci.conf that calls runc or crun. The
  rootfs comes from `docker export`; each run gets its own small bundle (config.json with its
  mounts, cwd, user and environment) whose root points at the rootfs cached for the tag.

The conversion runs on the submit host before submission, once per image tag, into a cache
folder the nodes share (by default `<runs_dir>/.images`); ranks never convert. The host side of
the job (the batch shell, requeue decision) stays outside the container; only the srun step's
tasks run inside it.

Proof the container applied: every rank's command starts with `guard.sh` (written into the run
folder, so it exists inside and outside the container). It checks the image's marker file
(`/etc/launcher-image`, written by docker/Dockerfile) and that the runtime passed the task's
own variables, and fails the rank with one line (and its exit file) when not. A missing oci.conf
makes Slurm run the step bare without a word; the guard turns that into a failed rank.

Environment inside: the image's variables win over the host's (as pyxis and Apptainer do), and
the job's own (`env:` and launcher's LAUNCHER_* ...) win over the image's.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shlex
import shutil
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from launcher.errors import BackendError, ConfigError

if TYPE_CHECKING:
    from launcher.spec import JobSpec

RUNTIMES = ("pyxis", "apptainer", "oci")
DEFAULT_RUNTIME = "pyxis"
# The file docker/Dockerfile writes. Its content is a constant; a marker that names a tag
# (`repo:hex`) must name the expected one.
MARKER = "/etc/launcher-image"
# Exit code of a rank whose container did not apply (sysexits EX_CONFIG).
GUARD_EXIT_CODE = 78
# Per run: everything the runtime needs that is not the image itself.
RUN_SUBDIR = "container"

# Runs first in every rank, inside the container or (when it did not apply) on the node:
# argv is TAG [NAME=VALUE...] COMMAND... (TAG empty: any marker will do, for a ready-made
# image); plain POSIX sh, no config value is interpolated into it.
GUARD_SH = r"""#!/bin/sh
# Written by launcher: the first thing every rank runs. Proof that the container applied:
# the image's marker file names the expected tag, and the runtime passed the task's own
# variables. Otherwise the rank fails with one line and its exit file (exit 78).
want=$1
shift
marker=/etc/launcher-image
got=$(head -c 200 "$marker" 2>/dev/null | tr -cd 'A-Za-z0-9._:/@+-')
node=$(printf '%s' "${SLURMD_NODENAME:-?}" | tr -cd 'A-Za-z0-9._-')
# Each rank number once per step launch (mkdir is atomic, on NFS too): two tasks with one
# SLURM_PROCID mean the runtime gave them stale variables.
claim() {
    [ -n "$LAUNCHER_RUN_DIR" ] || return 0
    step="${SLURM_JOB_ID}.${SLURM_STEP_ID}.${SLURM_RESTART_COUNT:-0}.${SLURM_STEP_LAUNCHER_PORT}"
    step=$(printf '%s' "$step" | tr -cd 'A-Za-z0-9._')
    mkdir -p "$LAUNCHER_RUN_DIR/container/ranks/$step" &&
        mkdir "$LAUNCHER_RUN_DIR/container/ranks/$step/$SLURM_PROCID" 2>/dev/null
}
if [ -z "$got" ]; then
    why="not inside the image $want: $marker is missing on node $node (the container runtime"
    why="$why did not apply: srun --container without an oci.conf runs the task bare;"
    why="$why or the image was not made by launcher build)"
elif [ -n "$want" ] && [ "$got" != "$want" ] && [ "${got#*:}" != "$got" ]; then
    why="inside image $got, not $want (a stale converted image)"
elif [ -z "$SLURM_PROCID" ]; then
    why="the container runtime did not pass the task's variables (SLURM_PROCID is unset):"
    why="$why Slurm 22.05 needs the RunTimeRun wrapper that slurm/start.sh writes, or 23.02+"
elif ! claim; then
    why="another task of this step is rank $SLURM_PROCID too: the container runtime passed"
    why="$why srun's own SLURM_PROCID, not the task's (Slurm 22.05 without the RunTimeRun"
    why="$why wrapper that slurm/start.sh writes)"
else
    echo "launcher: rank $SLURM_PROCID on $node: inside the image ($marker: $got)" >&2
    exec env "$@"
fi
rank=$(printf '%s' "${SLURM_PROCID:-}" | tr -cd 0-9)
if [ -n "$rank" ] && [ -n "$LAUNCHER_RUN_DIR" ] && mkdir -p "$LAUNCHER_RUN_DIR/exits"; then
    now=$(date +%s)
    job=$(printf '%s' "${SLURM_JOB_ID:-}" | tr -cd 0-9_)
    restart=$(printf '%s' "${SLURM_RESTART_COUNT:-0}" | tr -cd 0-9)
    tmp="$LAUNCHER_RUN_DIR/exits/.rank$rank.json.tmp"
    fields='"rank": %s, "node": "%s", "exit_code": 78, "started": %s, "ended": %s'
    fields="$fields"', "restart": %s, "job_id": "%s", "error": "%s"'
    printf "{$fields}\n" "$rank" "$node" "$now" "$now" "${restart:-0}" "$job" "$why" >"$tmp" &&
        mv -f "$tmp" "$LAUNCHER_RUN_DIR/exits/rank$rank.json"
fi
echo "launcher: rank ${SLURM_PROCID:-?}: $why" >&2
# The other ranks meet the same check at the same moment: the first exit 78 makes srun's
# --kill-on-bad-exit kill them, which lost a rank's exit file (1 full-suite run in 3).
sleep 2
exit 78
"""

# What a runtime's conversion needs on the submit host.
CONVERT_TOOLS = {"oci": ("docker", "tar"), "apptainer": ("apptainer",), "pyxis": ("enroot",)}
ARTIFACT_SUFFIX = {"oci": "", "apptainer": ".sif", "pyxis": ".sqsh"}


def runtime_of(spec: JobSpec) -> str:
    """The configured runtime (`slurm.container.runtime`, pyxis by default)."""
    c = spec.slurm.container
    name = c.runtime if c is not None else DEFAULT_RUNTIME
    if name not in RUNTIMES:  # the schema refuses it in a config; a spec made in code
        raise ConfigError(
            f"unknown container runtime {name!r}",
            key="slurm.container.runtime",
            hint=f"expected one of {', '.join(RUNTIMES)}",
        )
    return str(name)


def cache_dir_for(spec: JobSpec) -> Path:
    """Where converted images live: `slurm.container.cache_dir`, else `<runs_dir>/.images`
    (the runs folder is on storage every node sees, or no run could start)."""
    c = spec.slurm.container
    given = c.cache_dir if c is not None else None
    return Path(given).expanduser() if given else Path(spec.runs_dir).expanduser() / ".images"


def _is_path(image: str) -> bool:
    return image.startswith(("/", "./", "../", "~"))


def image_tag(spec: JobSpec) -> str:
    """The docker image the job runs: `slurm.container.image`, else `launcher build`'s tag."""
    c = spec.slurm.container
    if c is not None and c.image and not _is_path(c.image):
        return c.image
    from launcher.image import image_for

    return image_for(spec)


def _safe_name(tag: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", tag)


@dataclass(frozen=True)
class Artifact:
    """The converted image a runtime reads: a rootfs folder, a .sif or a .sqsh file."""

    runtime: str
    # The docker image it is made from; None when the config names a ready artifact.
    tag: str | None
    path: Path
    # pyxis only: a registry image that enroot imports on each node itself (not converted).
    ref: str | None = None

    @property
    def rootfs(self) -> Path:
        return self.path / "rootfs"

    @property
    def info_file(self) -> Path:
        """Facts about the image (its Env, Id), written by the conversion, read by render."""
        return self.path / "image.json" if self.runtime == "oci" else Path(f"{self.path}.json")

    def ready(self) -> bool:
        if self.ref is not None:
            return True
        if self.runtime == "oci":
            return self.rootfs.is_dir() and (self.tag is None or self.info_file.is_file())
        return self.path.is_file()


def artifact_for(spec: JobSpec, cache_dir: Path | None = None) -> Artifact:
    """Where this job's converted image is (or will be); pure."""
    runtime = runtime_of(spec)
    c = spec.slurm.container
    if c is not None and c.image and _is_path(c.image):
        return Artifact(runtime, None, Path(c.image).expanduser().absolute())
    if runtime == "pyxis" and c is not None and c.image:
        return Artifact(runtime, None, Path(), ref=c.image)
    tag = image_tag(spec)
    folder = (cache_dir or cache_dir_for(spec)).absolute() / runtime
    return Artifact(runtime, tag, folder / f"{_safe_name(tag)}{ARTIFACT_SUFFIX[runtime]}")


def conversion_argv(artifact: Artifact, out: Path | None = None) -> list[list[str]]:
    """The commands that make `artifact` from its docker image (shown by --dry-run)."""
    if artifact.tag is None:
        return []
    tag, dest = artifact.tag, str(out or artifact.path)
    if artifact.runtime == "oci":
        return [
            ["docker", "image", "inspect", tag],
            ["docker", "create", tag],
            ["docker", "export", "CONTAINER", "|", "tar", "-x", "-C", f"{dest}/rootfs"],
            ["docker", "rm", "CONTAINER"],
        ]
    if artifact.runtime == "apptainer":
        return [["apptainer", "build", dest, f"docker-daemon://{tag}"]]
    return [["enroot", "import", "-o", dest, f"dockerd://{tag}"]]


def describe(spec: JobSpec, cache_dir: Path | None = None) -> str:
    """One line for --dry-run: the runtime, the image and its converted form."""
    art = artifact_for(spec, cache_dir)
    head = f"container: runtime {art.runtime}, "
    if art.ref is not None:
        return head + f"image {art.ref} (imported by enroot on each node; not converted here)"
    if art.tag is None:
        state = "present" if art.ready() else "MISSING"
        return head + f"ready-made image {art.path} ({state})"
    if art.ready():
        return head + f"image {art.tag} -> {art.path} (converted, cached)"
    steps = " ; ".join(shlex.join(a).replace("'|'", "|") for a in conversion_argv(art))
    return head + f"image {art.tag} -> {art.path} (converted once at submit: {steps})"


# --------------------------------------------------------------------------------------------
# Checks before submission (one line each)


def _oci_conf() -> Path:
    """oci.conf is read from the folder of the slurm.conf that slurmd uses."""
    conf = Path(os.environ.get("SLURM_CONF") or "/etc/slurm/slurm.conf")
    return conf.resolve().parent / "oci.conf"


def check_runtime(
    spec: JobSpec, cache_dir: Path | None = None, config_file: str | None = None
) -> None:
    """Refuse, before anything is submitted, a runtime that cannot apply: a missing ready-made
    image, a missing conversion tool on this submit host, or (oci) no oci.conf, with which
    Slurm would run the tasks bare. Raises ConfigError or BackendError with one line."""
    if spec.slurm.container is None:
        return
    art = artifact_for(spec, cache_dir)
    key = "slurm.container"
    if art.tag is None:
        if not art.ready():
            what = "OCI bundle (a folder with rootfs/)" if art.runtime == "oci" else "file"
            raise ConfigError(
                f"the {what} {art.path} does not exist", file=config_file, key=f"{key}.image"
            )
    elif not art.ready():
        for tool in CONVERT_TOOLS[art.runtime]:
            if shutil.which(tool) is None:
                raise BackendError(
                    f"{key}.runtime {art.runtime}: converting {art.tag} needs `{tool}` on "
                    f"this submit host, and it is not in PATH (or convert it elsewhere and "
                    f"set {key}.image to the converted image's path)"
                )
    if art.runtime == "oci":
        conf = _oci_conf()
        if not conf.is_file():
            raise BackendError(
                f"{key}.runtime oci: no {conf} (next to slurm.conf): without it "
                "srun --container runs the tasks bare, outside the image; "
                "slurm/start.sh writes one for runc or crun"
            )
    if art.runtime == "oci" and spec.resources.tasks_per_node > 1:
        raise ConfigError(
            "runtime oci starts one task per node in Slurm 22.05 "
            f"(got procs_per_node={spec.resources.tasks_per_node})",
            file=config_file,
            key="resources.procs_per_node",
            hint="use 1 with more nodes, or runtime pyxis or apptainer",
        )


# --------------------------------------------------------------------------------------------
# Conversion (shells out; once per tag, under a lock)


@dataclass(frozen=True)
class Prepared:
    artifact: Artifact
    # False when the cache already held it.
    converted: bool
    seconds: float
    info: dict[str, Any] = field(default_factory=dict)


def _run(argv: list[str], what: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, **kw)
    except FileNotFoundError as exc:
        raise BackendError(f"{what}: `{argv[0]}` is not installed on this submit host") from exc
    if proc.returncode != 0:
        tail = " ".join((proc.stderr or proc.stdout).split())[-400:]
        raise BackendError(f"{what} failed ({shlex.join(argv)}): {tail}")
    return proc


def _inspect(tag: str) -> dict[str, Any]:
    proc = subprocess.run(
        ["docker", "image", "inspect", tag], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise BackendError(
            f"image {tag} is not in the local Docker engine: run `launcher build` first "
            f"({' '.join(proc.stderr.split())[-200:]})"
        )
    data = json.loads(proc.stdout)[0]
    cfg = data.get("Config") or {}
    return {
        "tag": tag,
        "id": data.get("Id"),
        "env": list(cfg.get("Env") or []),
        "workdir": cfg.get("WorkingDir") or "",
        "user": cfg.get("User") or "",
    }


def _write_json(path: Path, data: dict[str, Any]) -> None:
    from launcher.runs import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=1, sort_keys=True) + "\n")


def prepare_image(spec: JobSpec, cache_dir: Path | None = None) -> Prepared:
    """Make the runtime's form of the image unless the cache has it for this tag."""
    started = time.monotonic()
    art = artifact_for(spec, cache_dir)
    if art.tag is None or art.ready():
        return Prepared(art, False, time.monotonic() - started, read_info(art))
    check_runtime(spec, cache_dir)
    art.path.parent.mkdir(parents=True, exist_ok=True)
    with open(art.path.parent / f".{art.path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another submit converting the same tag
        if art.ready():
            return Prepared(art, False, time.monotonic() - started, read_info(art))
        info = _inspect(art.tag)
        tmp = art.path.with_name(f".{art.path.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.unlink(missing_ok=True)
        try:
            _convert(art, tmp)
            if art.runtime == "oci":
                _write_json(tmp / "image.json", info)
            else:
                _write_json(art.info_file, info)
            os.replace(tmp, art.path)
        finally:
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
    return Prepared(art, True, time.monotonic() - started, info)


def _convert(art: Artifact, out: Path) -> None:
    assert art.tag is not None
    what = f"converting {art.tag} for runtime {art.runtime}"
    if art.runtime == "oci":
        (out / "rootfs").mkdir(parents=True)
        cid = _run(["docker", "create", art.tag], what).stdout.strip()
        try:
            export = subprocess.Popen(["docker", "export", cid], stdout=subprocess.PIPE)
            assert export.stdout is not None
            untar = subprocess.run(
                ["tar", "-x", "--numeric-owner", "-C", str(out / "rootfs")],
                stdin=export.stdout,
                capture_output=True,
                text=True,
            )
            export.stdout.close()
            if export.wait() != 0 or untar.returncode != 0:
                raise BackendError(f"{what} failed: {' '.join(untar.stderr.split())[-300:]}")
        finally:
            subprocess.run(["docker", "rm", "-f", cid], capture_output=True, check=False)
        return
    # apptainer / enroot write one file.
    (argv,) = conversion_argv(art, out)
    _run(argv, what)


def read_info(art: Artifact) -> dict[str, Any]:
    """The image facts the conversion recorded ({} for a ready-made artifact or none yet)."""
    try:
        return dict(json.loads(art.info_file.read_text()))
    except (OSError, ValueError):
        return {}


# --------------------------------------------------------------------------------------------
# Rendering (pure)


@dataclass(frozen=True)
class Rendered:
    """What a runtime adds to the srun step."""

    # Flags for srun itself (pyxis, oci).
    srun_flags: list[str]
    # argv the rank command is prefixed with (guard.sh, then `apptainer exec ...`).
    prefix: list[str]
    # Files written into <run_dir>/container/ before submission: name -> text.
    files: dict[str, str]
    # The interpreter to run inside the image (resolved from the image's PATH for oci).
    python: str
    # oci: the cached rootfs the run's bundle links to.
    rootfs: Path | None = None


def _env_dict(entries: list[str]) -> dict[str, str]:
    return dict(e.split("=", 1) for e in entries if "=" in e)


def _mounts(spec: JobSpec, run_dir: Path) -> list[tuple[str, str, bool]]:
    """(host, container, read_only): the config's mounts, then the run dir and workdir."""
    c = spec.slurm.container
    assert c is not None
    out: list[tuple[str, str, bool]] = []
    for m in c.mounts:
        parts = m.split(":")
        host, dest = parts[0], parts[1] if len(parts) > 1 else parts[0]
        out.append((host, dest, len(parts) > 2 and parts[2] == "ro"))
    workdir = spec.workdir or "/"
    for path in dict.fromkeys([str(run_dir), workdir]):
        if path != "/":
            out.append((path, path, False))
    return out


def _resolve_python(python: str, image_env: Mapping[str, str], rootfs: Path | None) -> str:
    """An absolute interpreter inside the image: Slurm's OCI support starts args[0] with the
    host's PATH (it overrides the image's), which finds the image's system python, not its
    venv. Looked up along the image's own PATH in the unpacked rootfs."""
    if "/" in python or rootfs is None:
        return python
    for folder in image_env.get("PATH", "/usr/local/bin:/usr/bin:/bin").split(":"):
        if folder.startswith("/") and os.path.lexists(rootfs / folder.lstrip("/") / python):
            return f"{folder.rstrip('/')}/{python}"
    return python


def _oci_config(
    spec: JobSpec,
    run_dir: Path,
    art: Artifact,
    image_env: Mapping[str, str],
    uid: int,
    gid: int,
) -> dict[str, Any]:
    """The run's config.json. Slurm 22.05 replaces process.args with the step's command, sets
    root.path to BUNDLE/rootfs (a link to the cached rootfs) and appends the step's
    environment to process.env; cwd, user, mounts and namespaces are ours."""
    c = spec.slurm.container
    assert c is not None
    workdir = c.workdir or spec.workdir or "/"
    mounts: list[dict[str, Any]] = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {
            "destination": "/dev",
            "type": "tmpfs",
            "source": "tmpfs",
            "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
        },
        {
            "destination": "/dev/pts",
            "type": "devpts",
            "source": "devpts",
            "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"],
        },
        # The host's shared memory: DataLoader workers and NCCL need more than 64 MB.
        {"destination": "/dev/shm", "type": "bind", "source": "/dev/shm", "options": ["rbind"]},
        {
            "destination": "/sys",
            "type": "sysfs",
            "source": "sysfs",
            "options": ["nosuid", "noexec", "nodev", "ro"],
        },
        # Host network: node names (MASTER_ADDR) must resolve as they do on the node.
        *(
            {"destination": p, "type": "bind", "source": p, "options": ["rbind", "ro"]}
            for p in ("/etc/hosts", "/etc/resolv.conf")
        ),
        # The image is shared by every rank and run: read-only, with a private /tmp.
        {
            "destination": "/tmp",
            "type": "tmpfs",
            "source": "tmpfs",
            "options": ["nosuid", "nodev", "mode=1777"],
        },
    ]
    for host, dest, ro in _mounts(spec, run_dir):
        mounts.append(
            {
                "destination": dest,
                "type": "bind",
                "source": host,
                "options": ["rbind", "ro" if ro else "rw"],
            }
        )
    env = [f"{k}={v}" for k, v in image_env.items()]
    if spec.resources.gpus_per_node:
        # Read by nvidia-container-runtime (oci.conf must call it instead of runc for GPUs).
        env += ["NVIDIA_VISIBLE_DEVICES=all", "NVIDIA_DRIVER_CAPABILITIES=compute,utility"]
    caps = ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]
    # Host network and IPC (gloo/NCCL between nodes, shared memory); no UTS namespace, so
    # `hostname` is the node's, as on the host.
    namespaces: list[dict[str, Any]] = [{"type": "pid"}, {"type": "mount"}]
    linux: dict[str, Any] = {
        "namespaces": namespaces,
        "maskedPaths": [
            "/proc/acpi",
            "/proc/kcore",
            "/proc/keys",
            "/proc/latency_stats",
            "/proc/timer_list",
            "/proc/sched_debug",
            "/sys/firmware",
        ],
        "readonlyPaths": [
            "/proc/bus",
            "/proc/fs",
            "/proc/irq",
            "/proc/sys",
            "/proc/sysrq-trigger",
        ],
    }
    if uid != 0:
        # Rootless runc/crun: the user's own id maps to itself (files in the run dir keep
        # their owner). Not run here (this machine runs jobs as root).
        namespaces.append({"type": "user"})
        linux["uidMappings"] = [{"containerID": uid, "hostID": uid, "size": 1}]
        linux["gidMappings"] = [{"containerID": gid, "hostID": gid, "size": 1}]
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": uid, "gid": gid},
            "args": ["/bin/false"],  # replaced by Slurm with the step's command
            "env": env,
            "cwd": workdir,
            "capabilities": {k: caps for k in ("bounding", "effective", "permitted")},
            "noNewPrivileges": True,
        },
        "root": {"path": str(art.rootfs.resolve()), "readonly": True},
        "mounts": mounts,
        "linux": linux,
    }


def render(
    spec: JobSpec,
    run_dir: Path,
    job_env: Mapping[str, str],
    cache_dir: Path | None = None,
    *,
    uid: int | None = None,
    gid: int | None = None,
) -> Rendered:
    """srun flags, the rank command's prefix and the run's files for this job's runtime.

    Pure apart from reading the conversion's image.json (the image's own environment) when it
    exists; before the conversion (a --dry-run) the image's variables are left out.
    `job_env` is what every task gets from launcher: it wins over the image's variables.
    """
    c = spec.slurm.container
    assert c is not None, "render() is for jobs with slurm.container"
    art = artifact_for(spec, cache_dir)
    info = read_info(art)
    run_dir = Path(run_dir)
    folder = run_dir / RUN_SUBDIR
    tag = art.tag or art.ref or ""
    uid = os.getuid() if uid is None else uid
    gid = os.getgid() if gid is None else gid
    mounts = _mounts(spec, run_dir)
    workdir = c.workdir or spec.workdir or "/"
    files = {"guard.sh": GUARD_SH}
    guard = ["/bin/sh", str(folder / "guard.sh"), tag]
    image_env = _env_dict(info.get("env", []))
    if art.runtime == "oci":
        files["config.json"] = (
            json.dumps(_oci_config(spec, run_dir, art, image_env, uid, gid), indent=1) + "\n"
        )
        python = _resolve_python(c.python, image_env, art.rootfs if art.rootfs.is_dir() else None)
        # The step's environment (the host's) overrides the image's in 22.05: put the image's
        # variables back for the command, except those launcher sets for the job.
        restore = [f"{k}={v}" for k, v in image_env.items() if k not in job_env]
        return Rendered(
            srun_flags=[f"--container={folder / 'bundle'}"],
            prefix=[*guard, *restore],
            files=files,
            python=python,
            rootfs=art.rootfs,
        )
    if art.runtime == "pyxis":
        joined = ",".join(f"{h}:{d}" + (":ro" if ro else "") for h, d, ro in mounts)
        flags = [
            f"--container-image={art.ref or art.path}",
            f"--container-mounts={joined}",
            f"--container-workdir={workdir}",
            # pyxis keeps the image's value of a variable it defines; these keep the job's.
            f"--container-env={','.join(sorted(job_env))}",
        ]
        return Rendered(srun_flags=flags, prefix=guard, files=files, python=c.python)
    # apptainer: the image's variables win over the host's; --env-file puts the job's back.
    files["apptainer.env"] = "".join(f"{k}={shlex.quote(v)}\n" for k, v in sorted(job_env.items()))
    binds = ",".join(f"{h}:{d}" + (":ro" if ro else "") for h, d, ro in mounts)
    prefix = [
        "apptainer",
        "exec",
        f"--bind={binds}",
        f"--pwd={workdir}",
        f"--env-file={folder / 'apptainer.env'}",
        *(["--nv"] if spec.resources.gpus_per_node else []),
        str(art.path),
        *guard,
    ]
    return Rendered(srun_flags=[], prefix=prefix, files=files, python=c.python)


def write_run_files(rendered: Rendered, run_dir: Path) -> Path:
    """Write <run_dir>/container/ (guard.sh, config.json, ...) and, for oci, the run's bundle
    (config.json plus a `rootfs` link to the cached rootfs). Returns that folder."""
    from launcher.runs import atomic_write_text

    folder = Path(run_dir) / RUN_SUBDIR
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in rendered.files.items():
        if name == "config.json" and rendered.rootfs is not None:
            bundle = folder / "bundle"
            bundle.mkdir(exist_ok=True)
            atomic_write_text(bundle / name, text)
            link = bundle / "rootfs"
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(rendered.rootfs.resolve())
        else:
            atomic_write_text(folder / name, text)
    (folder / "guard.sh").chmod(0o755)
    return folder


# The per-rank wrapper as sbatch.rank_wrapper gives it (its interpreter is replaced).
RANK_WRAPPER = ("python3", "-m", "launcher.backends.slurm.rank", "--")


def step_command(
    rendered: Rendered, inner: list[str], rank_wrapper: list[str] | tuple[str, ...] = RANK_WRAPPER
) -> list[str]:
    """The rank command under the runtime: PREFIX, the rank wrapper (`rank_wrapper` with the
    image's interpreter), then `inner` (entry_argv(spec, rendered.python))."""
    return [*rendered.prefix, rendered.python, *rank_wrapper[1:], *inner]
