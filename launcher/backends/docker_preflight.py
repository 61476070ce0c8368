"""Docker preflight: the engine answers, the image is there, and the container can get what
the plan asks for (GPUs, CPUs, memory, /dev/shm for the loader picks, mount sources).

Two engine calls per submit (`info`, `inspect_image`; a third, the image list, only to
suggest a name when the image is missing). Nothing is created. The Docker backend's
`preflight` method returns `preflight(plan)`.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

from launcher.backends.base import Check, Plan, SupervisorPayload
from launcher.hardware import detect_shm, picks_from_env, shm_bytes_needed
from launcher.preflight import did_you_mean, job_checks
from launcher.spec import JobSpec

ENGINE_TIMEOUT_S = 10
GIB = 1024**3
# When the config gives no sample size: what the Docker backend assumes (docker.py).
DEFAULT_SAMPLE_BYTES = 3 * 224 * 224 * 4
NVIDIA_HOOKS = ("nvidia-container-runtime-hook", "nvidia-container-runtime", "nvidia-ctk")


def connect(timeout_s: float = ENGINE_TIMEOUT_S) -> tuple[Any, str | None]:
    """(client, None), or (None, why) when the engine does not answer."""
    import docker

    try:
        client = docker.from_env(timeout=int(timeout_s))
        return client, None
    except docker.errors.DockerException as exc:
        return None, " ".join(str(exc).split())


def _engine_where() -> str:
    return os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")


def preflight(plan: Plan[SupervisorPayload], *, points: int = 1, client: Any = None) -> list[Check]:
    """Every check before a container is created."""
    import docker

    spec, file = plan.spec, plan.config_file
    checks = job_checks(plan, python=None)
    why = None
    if client is None:
        client, why = connect()
    info: dict[str, Any] = {}
    if client is not None:
        try:
            info = client.info()
        except (docker.errors.DockerException, OSError) as exc:
            why = " ".join(str(exc).split())
    if not info:
        checks.append(
            Check(
                "docker.engine",
                "fail",
                f"the Docker engine at {_engine_where()} does not answer: {why}",
                "start it (scripts/docker-start.sh) or set DOCKER_HOST",
                file=file,
            )
        )
        return checks
    checks.append(
        Check("docker.engine", "ok", f"engine {info.get('ServerVersion')} answers", file=file)
    )
    container = plan.payload.get("container") or {}
    checks.append(_image_check(client, spec, container.get("image", ""), file))
    checks += _resource_checks(spec, info, file)
    checks += _shm_checks(plan, container, file)
    checks += _mount_checks(spec, file)
    return checks


def _image_check(client: Any, spec: JobSpec, ref: str, file: str | None) -> Check:
    import docker

    key = "docker.image" if spec.docker.image else "image"
    try:
        client.api.inspect_image(ref)
        return Check("docker.image", "ok", f"image {ref} is in the engine", file=file, key=key)
    except docker.errors.ImageNotFound:
        pass
    except docker.errors.DockerException as exc:
        return Check(
            "docker.image",
            "fail",
            f"cannot look image {ref} up: {' '.join(str(exc).split())}",
            "",
            file=file,
            key=key,
        )
    if spec.docker.image:
        try:
            tags = [t for i in client.api.images() for t in (i.get("RepoTags") or [])]
        except docker.errors.DockerException:
            tags = []
        fix = did_you_mean(ref, tags) or f"docker pull {ref}, or leave docker.image out and "
        if not fix.startswith("did"):
            fix += "run `launcher build CONFIG`"
    else:
        fix = "build it with `launcher build CONFIG` (the tag follows docker/ and image:)"
    return Check(
        "docker.image", "fail", f"image {ref} is not in the Docker engine", fix, file=file, key=key
    )


def _has_gpu_runtime(info: dict[str, Any]) -> bool:
    runtimes = info.get("Runtimes") or {}
    if any("nvidia" in name for name in runtimes):
        return True
    return any(shutil.which(hook) for hook in NVIDIA_HOOKS)


def _resource_checks(spec: JobSpec, info: dict[str, Any], file: str | None) -> list[Check]:
    checks = []
    gpus = spec.resources.gpus_per_node or len(spec.docker.gpu_ids)
    if gpus:
        key = "docker.gpu_ids" if spec.docker.gpu_ids else "resources.gpus_per_node"
        if _has_gpu_runtime(info):
            checks.append(
                Check("docker.gpus", "ok", "the engine has the NVIDIA runtime", file=file, key=key)
            )
        else:
            runtimes = ", ".join(sorted(info.get("Runtimes") or {})) or "none"
            checks.append(
                Check(
                    "docker.gpus",
                    "fail",
                    f"{gpus} GPU(s) asked, but the engine has no NVIDIA runtime "
                    f"(runtimes: {runtimes})",
                    "install nvidia-container-toolkit and restart dockerd, or ask for 0 GPUs",
                    file=file,
                    key=key,
                )
            )
    ncpu = info.get("NCPU")
    if spec.docker.cpus is not None and ncpu and spec.docker.cpus > ncpu:
        checks.append(
            Check(
                "docker.cpus",
                "fail",
                f"docker.cpus {spec.docker.cpus:g} is more than the engine's {ncpu} CPUs",
                f"set it to at most {ncpu}",
                file=file,
                key="docker.cpus",
            )
        )
    total = info.get("MemTotal")
    mem = spec.resources.mem_gb
    if mem and total and mem * GIB > total:
        checks.append(
            Check(
                "docker.memory",
                "fail",
                f"resources.mem_gb {mem:g} is more than the engine's {total / GIB:.1f} GiB",
                f"set it to at most {int(total / GIB)}",
                file=file,
                key="resources.mem_gb",
            )
        )
    return checks


def _shm_checks(
    plan: Plan[SupervisorPayload], container: dict[str, Any], file: str | None
) -> list[Check]:
    """/dev/shm against what the loader picks put in flight (workers x prefetch x batch)."""
    spec = plan.spec
    procs = plan.payload.get("procs") or []
    picks = picks_from_env(procs[0]["env"]) if procs else None
    if picks is None or not picks.num_workers:
        return []
    nprocs = spec.resources.tasks_per_node
    batch = spec.train.micro_batch_size or max(1, spec.train.global_batch_size // nprocs)
    sample = spec.loader.sample_bytes or DEFAULT_SAMPLE_BYTES
    need = shm_bytes_needed(picks, batch, sample, nprocs)
    if spec.docker.ipc_host:
        have, where, key = detect_shm(), "the host's /dev/shm (ipc_host)", "docker.ipc_host"
    else:
        have, where, key = container.get("shm_size"), "docker.shm_gb", "docker.shm_gb"
    if have is None or have >= need:
        return []
    shown = (
        f"{nprocs} procs x {picks.num_workers} workers x prefetch {picks.prefetch_factor or 1} x "
        f"batch {batch} x {sample} B x 2"
    )
    # With the default sample size the need is a guess: say so, do not refuse.
    sure = spec.loader.sample_bytes is not None
    return [
        Check(
            "docker.shm",
            "fail" if sure else "warn",
            f"{where} {have / GIB:.2f} GiB is less than the {need / GIB:.2f} GiB the loader "
            f"picks need ({shown}): workers would die with a bus error",
            f"raise docker.shm_gb to {need / GIB:.1f} (or leave it out to size it from the "
            "picks), or lower loader.num_workers",
            file=file,
            key=key,
        )
    ]


def _mount_checks(spec: JobSpec, file: str | None) -> list[Check]:
    checks = []
    for i, item in enumerate(spec.docker.mounts):
        source = os.path.abspath(os.path.expanduser(item.split(":")[0]))
        if not os.path.exists(source):
            checks.append(
                Check(
                    "docker.mounts",
                    "fail",
                    f"mount source {source} does not exist (the engine refuses a missing one)",
                    "create it, or fix the path",
                    file=file,
                    key=f"docker.mounts[{i}]",
                )
            )
    return checks


def doctor_checks(spec: JobSpec | None) -> list[Check]:
    """The engine's version, runtimes and default runtime; whether GPUs could be passed."""
    client, why = connect()
    info: dict[str, Any] = {}
    if client is not None:
        try:
            info = client.info()
        except Exception as exc:  # the SDK raises requests' errors too; reported, not raised
            why = " ".join(str(exc).split())
    if not info:
        return [
            Check(
                "docker.engine",
                "fail",
                f"the Docker engine at {_engine_where()} does not answer: {why}",
                "start it (scripts/docker-start.sh) or set DOCKER_HOST",
            )
        ]
    runtimes = ", ".join(sorted(info.get("Runtimes") or {}))
    checks = [
        Check(
            "docker.version",
            "ok",
            f"engine {info.get('ServerVersion')} ({info.get('OperatingSystem')}, "
            f"{info.get('NCPU')} CPUs, {(info.get('MemTotal') or 0) / GIB:.1f} GiB)",
        ),
        Check(
            "docker.runtimes",
            "ok",
            f"runtimes: {runtimes}; default {info.get('DefaultRuntime')}",
        ),
    ]
    if not _has_gpu_runtime(info):
        checks.append(
            Check(
                "docker.gpus",
                "warn" if not (spec and spec.resources.gpus_per_node) else "fail",
                "no NVIDIA runtime: containers get no GPUs",
                "install nvidia-container-toolkit for GPU jobs",
            )
        )
    client.close()
    return checks
