"""Docker backend: the job's N processes in one container on this machine (docker SDK).

The container runs the same supervisor as the local backend (`backends/local/supervisor.py`),
reading the same plan.json from the run directory, which is mounted at the same path
inside, so per-rank logs, the run record and checkpoints land on the host. `plan()` never
contacts the daemon; `submit()` creates, starts, streams, waits and removes the container.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import sys
import threading
from pathlib import Path
from typing import Any

from launcher import runs
from launcher.backends.base import ArrayBackend, Plan, SupervisorPayload
from launcher.backends.local.supervisor import (
    PORT_AT_START,
    points_at_once,
    prepare_run_dir,
    process_table,
    require_one_node,
)
from launcher.entrypoint import entry_argv
from launcher.errors import BackendError, ConfigError
from launcher.hardware import Hardware, LoaderPicks, detect, pick_loader, shm_bytes_needed
from launcher.image import image_for
from launcher.spec import JobSpec

LABEL = "launcher.run"
IMAGE_PYTHON = "python"
# When the config gives no sample size: a 3x224x224 float32 image, a common upper bound.
DEFAULT_SAMPLE_BYTES = 3 * 224 * 224 * 4
MIN_SHM_BYTES = 256 * 1024**2
GPU_RUNTIME_ERRORS = ("could not select device driver", "nvidia-container", "NVIDIA")


def shm_plan(spec: JobSpec, picks: LoaderPicks) -> tuple[int | None, str]:
    """/dev/shm size for the container and why (None with ipc_host)."""
    if spec.docker.ipc_host:
        return None, "ipc: host (the host's /dev/shm)"
    if spec.docker.shm_gb is not None:
        return int(spec.docker.shm_gb * 1024**3), "set in the config (docker.shm_gb)"
    nprocs = spec.resources.tasks_per_node
    batch = spec.train.micro_batch_size or max(1, spec.train.global_batch_size // nprocs)
    sample = spec.loader.sample_bytes or DEFAULT_SAMPLE_BYTES
    need = shm_bytes_needed(picks, batch, sample, nprocs)
    size = max(MIN_SHM_BYTES, need)
    why = (
        f"{nprocs} procs x {max(1, picks.num_workers)} workers x prefetch "
        f"{picks.prefetch_factor or 1} x batch {batch} x {sample} B/sample x 2 margin = "
        f"{need / 1024**2:.0f} MiB (at least {MIN_SHM_BYTES // 1024**2} MiB)"
    )
    return size, why


def container_hardware(spec: JobSpec, host: Hardware) -> Hardware:
    """What the container will get: the host, narrowed by the CPU and memory limits."""
    cpus = host.cpus
    source = host.cpus_source
    if spec.docker.cpus is not None and int(spec.docker.cpus) < cpus:
        cpus, source = max(1, int(spec.docker.cpus)), "docker.cpus limit"
    mem = host.mem_bytes
    if spec.resources.mem_gb:
        mem = int(spec.resources.mem_gb * 1024**3)
    gpus = spec.resources.gpus_per_node or len(spec.docker.gpu_ids)
    # /dev/shm is sized from the picks afterwards, so it does not cap them here.
    return dataclasses.replace(
        host, cpus=cpus, cpus_source=source, mem_bytes=mem, shm_bytes=None, gpus=gpus
    )


def _mounts(spec: JobSpec, run_dir: Path) -> list[dict[str, Any]]:
    mounts = [
        {"source": str(run_dir), "target": str(run_dir), "read_only": False},
        {"source": spec.workdir or os.getcwd(), "target": spec.docker.workdir, "read_only": False},
    ]
    if spec.data.sources:
        cache = os.path.expanduser(spec.data.cache_dir)
        mounts.append({"source": cache, "target": cache, "read_only": False})
    for i, item in enumerate(spec.docker.mounts):
        parts = item.split(":")
        if (
            len(parts) not in (2, 3)
            or not parts[0]
            or not parts[1]
            or (len(parts) == 3 and parts[2] not in ("ro", "rw"))
        ):
            raise ConfigError(
                f"expected 'host_path:container_path[:ro]', got {item!r}", key=f"docker.mounts[{i}]"
            )
        source = os.path.abspath(os.path.expanduser(parts[0]))
        mounts.append(
            {
                "source": source,
                "target": parts[1],
                "read_only": len(parts) == 3 and parts[2] == "ro",
            }
        )
    return mounts


class DockerBackend:
    name = "docker"
    array: ArrayBackend | None = None

    def plan(
        self,
        spec: JobSpec,
        *,
        run_id: str,
        run_dir: Path,
        config_file: str | None,
        hardware: Hardware | None = None,
    ) -> Plan[SupervisorPayload]:
        require_one_node(
            spec, config_file, "docker", "use backend=slurm with slurm.container for several nodes"
        )
        hw = container_hardware(spec, hardware or detect())
        nprocs = spec.resources.tasks_per_node
        picks = pick_loader(hw, nprocs, spec.loader)
        shm, shm_why = shm_plan(spec, picks)
        python = spec.entrypoint.python or IMAGE_PYTHON
        procs = process_table(
            spec,
            run_dir=run_dir,
            picks=picks,
            argv=entry_argv(spec, python),
            cwd=spec.docker.workdir,
            master_addr="127.0.0.1",
            master_port=spec.local.master_port or PORT_AT_START,
        )
        gpus: dict[str, Any] | None = None
        if spec.docker.gpu_ids:
            gpus = {"device_ids": list(spec.docker.gpu_ids), "capabilities": [["gpu"]]}
        elif spec.resources.gpus_per_node:
            gpus = {"count": spec.resources.gpus_per_node, "capabilities": [["gpu"]]}
        user = spec.docker.user or f"{os.getuid()}:{os.getgid()}"
        container = {
            "image": image_for(spec),
            "command": [python, "-m", "launcher.backends.local", str(run_dir), "--echo"],
            "name": f"launcher-{runs.slug(spec.name)[:40]}-{run_id}",
            "labels": {LABEL: run_id, "launcher.run_dir": str(run_dir)},
            "environment": {
                "LAUNCHER_RUN_DIR": str(run_dir),
                "PYTHONUNBUFFERED": "1",
                "HOME": "/tmp",
            },
            "mounts": _mounts(spec, run_dir),
            "working_dir": spec.docker.workdir,
            "user": user,
            "shm_size": shm,
            "ipc_mode": "host" if spec.docker.ipc_host else None,
            "network_mode": "host" if spec.docker.network_host else None,
            "nano_cpus": int(spec.docker.cpus * 1e9) if spec.docker.cpus else None,
            "mem_limit": f"{int(spec.resources.mem_gb * 1024)}m" if spec.resources.mem_gb else None,
            "gpus": gpus,
            "auto_remove": spec.docker.auto_remove,
            # tini as PID 1: forwards signals to the supervisor and reaps orphaned workers.
            "init": True,
        }
        payload: SupervisorPayload = {
            "procs": procs,
            "stop_grace_s": spec.local.stop_grace_s,
            "container": container,
        }
        return Plan(
            backend=self.name,
            spec=spec,
            run_id=run_id,
            run_dir=run_dir,
            text=_render(spec, run_dir, container, procs, picks, shm_why),
            payload=payload,
            config_file=config_file,
        )

    def submit(
        self, plan: Plan[SupervisorPayload], *, foreground: bool = True, echo: bool = True
    ) -> int:
        # `echo`: the supervisor in the container always echoes to the container's log,
        # which a foreground run follows.
        from launcher.image import connect

        client = connect()
        prepare_run_dir(plan, backend=self.name)
        spec = plan.payload["container"]
        # Foreground: we read the exit code, then remove it. Detached: the engine removes it.
        container = _create(client, spec, auto_remove=spec["auto_remove"] and not foreground)
        runs.update_record(
            plan.run_dir,
            backend_info={
                "container_id": container.id,
                "container_name": spec["name"],
                "image": spec["image"],
            },
        )
        try:
            container.start()
        except Exception as exc:  # docker.errors.APIError; docker is imported lazily
            _remove(container)
            message = " ".join(str(getattr(exc, "explanation", None) or exc).split())
            if spec["gpus"] and any(s in message for s in GPU_RUNTIME_ERRORS):
                message = (
                    "GPUs were asked for (resources.gpus_per_node / docker.gpu_ids) but "
                    "this Docker engine has no GPU runtime (NVIDIA Container Toolkit); "
                    f"the container was removed. Docker said: {message}"
                )
            runs.update_record(plan.run_dir, state="FAILED", ended_at=runs.now(), error=message)
            raise BackendError(message) from None
        if not foreground:
            return 0
        return _follow(container, plan.run_dir, keep=not spec["auto_remove"])

    def refresh(self, run_dirs: list[Path]) -> None:
        """One container listing for every run; a vanished container ends its run."""
        from launcher.image import connect

        try:
            client = connect(timeout_s=10)
        except BackendError:
            return
        found = {
            c.labels.get(LABEL): c
            for c in client.containers.list(all=True, filters={"label": LABEL})
        }
        for run_dir in run_dirs:
            record = runs.read_record(run_dir)
            if record["state"] in runs.FINAL_STATES:
                continue
            container = found.get(record["run_id"])
            if container is None or container.status in ("exited", "dead"):
                code = container.attrs["State"]["ExitCode"] if container is not None else None
                runs.update_record(
                    run_dir,
                    state="FAILED",
                    ended_at=runs.now(),
                    error=f"container ended (exit code {code}) without a final record",
                )

    def cancel(self, run_dir: Path) -> None:
        from launcher.image import connect

        record = runs.read_record(run_dir)
        if record["state"] in runs.FINAL_STATES:
            raise BackendError(f"run {record['run_id']} already ended ({record['state']})")
        client = connect()
        container = _get(client, record["backend_info"].get("container_id"))
        if container is not None:
            # SIGTERM to the in-container supervisor: it stops every rank, records CANCELLED.
            grace = int(runs.read_record(run_dir).get("stop_grace_s") or 10) + 10
            container.stop(timeout=grace)
        record = runs.read_record(run_dir)
        if record["state"] not in runs.FINAL_STATES:
            runs.update_record(run_dir, state="CANCELLED", ended_at=runs.now())

    def log_files(self, run_dir: Path) -> dict[int, Path]:
        world = int(runs.read_record(run_dir).get("world_size") or 0)
        return {rank: run_dir / "logs" / f"rank{rank}.log" for rank in range(world)}

    def default_parallelism(self, spec: JobSpec) -> int | None:
        return points_at_once(spec)

    def needs_hardware(self) -> bool:
        return True


def _create(client, spec: dict[str, Any], *, auto_remove: bool):
    import docker

    skip = ("image", "gpus", "mounts", "auto_remove")
    kwargs = {k: v for k, v in spec.items() if v is not None and k not in skip}
    kwargs["auto_remove"] = auto_remove
    kwargs["mounts"] = [
        docker.types.Mount(m["target"], m["source"], type="bind", read_only=m["read_only"])
        for m in spec["mounts"]
    ]
    if spec["gpus"]:
        kwargs["device_requests"] = [docker.types.DeviceRequest(**spec["gpus"])]
    try:
        return client.containers.create(spec["image"], **kwargs)
    except docker.errors.ImageNotFound:
        raise BackendError(
            f"image {spec['image']} not found: build it with `launcher build` or set docker.image"
        ) from None
    except docker.errors.APIError as exc:
        raise BackendError(f"docker refused the container: {exc.explanation}") from None


def _get(client, container_id: str | None):
    import docker

    if not container_id:
        return None
    try:
        return client.containers.get(container_id)
    except docker.errors.NotFound:
        return None


def _remove(container) -> None:
    import docker

    try:
        container.remove(force=True)
    except docker.errors.NotFound:
        pass


def _follow(container, run_dir: Path, keep: bool) -> int:
    """Stream the container's output to the terminal and container.log; wait; clean up."""
    stop = threading.Event()

    def pump() -> None:
        with open(run_dir / "container.log", "ab") as log:
            for chunk in container.logs(stream=True, follow=True):
                log.write(chunk)
                log.flush()
                sys.stdout.write(chunk.decode(errors="replace"))
                sys.stdout.flush()
                if stop.is_set():
                    break

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    try:
        result = container.wait()
    except KeyboardInterrupt:
        container.stop(timeout=15)
        result = container.wait()
    finally:
        thread.join(timeout=5)
        stop.set()
    code = int(result.get("StatusCode", 1))
    record = runs.read_record(run_dir)
    if record["state"] not in runs.FINAL_STATES:
        error = result.get("Error") or {}
        oom = container.attrs.get("State", {}).get("OOMKilled")
        runs.update_record(
            run_dir,
            state="FAILED" if code else "COMPLETED",
            ended_at=runs.now(),
            error=(
                "killed: out of memory"
                if oom
                else error.get("Message") or f"container exited with code {code}"
            ),
        )
    runs.update_record(run_dir, container_exit_code=code)
    if not keep:
        _remove(container)
    return 0 if code == 0 else (130 if runs.read_record(run_dir)["state"] == "CANCELLED" else 1)


def _render(
    spec: JobSpec,
    run_dir: Path,
    container: dict[str, Any],
    procs: list[dict],
    picks: LoaderPicks,
    shm_why: str,
) -> str:
    shm = container["shm_size"]
    lines = [
        "# launcher plan (docker backend): nothing has been started; the daemon was not asked",
        f"run dir:   {run_dir}",
        f"image:     {container['image']}",
        f"name:      {container['name']}",
        f"command:   {shlex.join(container['command'])}",
        f"user:      {container['user']}    workdir: {container['working_dir']}",
        f"network:   {container['network_mode'] or 'default'}    ipc: "
        f"{container['ipc_mode'] or 'private'}",
        f"/dev/shm:  {'host' if shm is None else f'{shm / 1024**2:.0f} MiB'}  # {shm_why}",
        f"cpus:      {spec.docker.cpus or 'no limit'}    memory: "
        f"{container['mem_limit'] or 'no limit'}",
        f"gpus:      {json.dumps(container['gpus']) if container['gpus'] else 'none'}",
        "mounts:",
        *(
            f"  {m['source']} -> {m['target']}{' (ro)' if m['read_only'] else ''}"
            for m in container["mounts"]
        ),
        "loader picks per process: "
        + ", ".join(
            f"{k}={getattr(picks, k)}"
            for k in ("num_workers", "pin_memory", "persistent_workers", "prefetch_factor")
        ),
        f"processes in the container ({len(procs)}):",
    ]
    for proc in procs:
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in proc["env"].items())
        lines.append(
            f"  [rank {proc['rank']}] env {env} {shlex.join(proc['argv'])} > "
            f"{shlex.quote(proc['log'])} 2>&1"
        )
    return "\n".join(lines)


BACKEND = DockerBackend()
