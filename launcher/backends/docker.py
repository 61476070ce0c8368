"""Docker backend: the job's N processes in one container on this machine (docker SDK).

The container runs the same supervisor as the local backend (`backends/local/supervisor.py`),
reading the same plan.json from the run directory, which is mounted at the same path
inside, so per-rank logs, the run record and checkpoints land on the host. `plan()` never
contacts the daemon; `submit()` creates, starts, streams and waits. A submission that fails
ends FAILED with the reason and leaves no container. A foreground container lives only as
long as the launcher that started it: its supervisor treats the attached stdin as a lifeline
(the engine closes it when our connection drops, kill -9 included), and the engine removes
the container (auto_remove), so nothing depends on this process surviving to clean up.

The supervisor runs with the image's own python (IMAGE_PYTHON: the image's launcher); only
the ranks run `entrypoint.python`, which needs what the script imports and no launcher.
`launcher cancel` and Ctrl-C reach the supervisor as SIGTERM and SIGINT, and every rank gets
the job's stop signal first, SIGKILL after the grace, as on the local backend.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, cast

from launcher import runs
from launcher.backends.base import ArrayBackend, Plan, ProcEntry, SupervisorPayload
from launcher.backends.local.guard import same_process
from launcher.backends.local.supervisor import (
    GUARD_MARGIN_S,
    PLAN_FILE,
    PORT_AT_START,
    points_at_once,
    prepare_run_dir,
    process_table,
    rank_logs,
    require_one_node,
    stop_lines,
    stop_settings,
)
from launcher.entrypoint import entry_argv, exit_note
from launcher.errors import BackendError, ConfigError
from launcher.hardware import Hardware, LoaderPicks, detect, pick_loader, shm_bytes_needed
from launcher.image import image_for
from launcher.spec import JobSpec

LABEL = "launcher.run"
# The image's python that has launcher (the first `python` on the image's PATH: /opt/venv in
# images `launcher build` makes); it runs the supervisor, whatever entrypoint.python is.
IMAGE_PYTHON = "python"
# Seconds the engine gets on top of the ranks' grace and the guards' margin to stop it.
STOP_MARGIN_S = 5
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
        picks = pick_loader(hw, nprocs, spec.loader, trainer=spec.entrypoint.kind == "trainer")
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
            config_file=config_file,
        )
        gpus: dict[str, Any] | None = None
        if spec.docker.gpu_ids:
            gpus = {"device_ids": list(spec.docker.gpu_ids), "capabilities": [["gpu"]]}
        elif spec.resources.gpus_per_node:
            gpus = {"count": spec.resources.gpus_per_node, "capabilities": [["gpu"]]}
        user = spec.docker.user or f"{os.getuid()}:{os.getgid()}"
        container = {
            "image": image_for(spec),
            "command": [IMAGE_PYTHON, "-m", "launcher.backends.local", str(run_dir), "--echo"],
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
            # tini as PID 1: forwards signals to the supervisor and reaps orphaned workers;
            # when the supervisor dies, tini exits and the kernel ends every process left.
            "init": True,
        }
        payload: SupervisorPayload = {
            "procs": procs,
            **stop_settings(spec),
            "container": container,
        }
        return Plan(
            backend=self.name,
            spec=spec,
            run_id=run_id,
            run_dir=run_dir,
            text=_render(spec, run_dir, payload, picks, shm_why),
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
        spec = dict(plan.payload["container"])
        if foreground:
            # The container lives only as long as this process: its supervisor watches the
            # stdin we attach below and stops the run when the engine closes it, which it
            # does when our connection drops, however this process ends (kill -9 too).
            spec["command"] = [*spec["command"], "--lifeline-stdin"]
        container = None
        lifeline = None
        try:
            container = _create(client, spec, lifeline=foreground)
            runs.update_record(
                plan.run_dir,
                backend_info={
                    "container_id": container.id,
                    "container_name": spec["name"],
                    "image": spec["image"],
                },
            )
            if foreground:
                lifeline = client.api.attach_socket(container.id, params={"stdin": 1, "stream": 1})
            if runs.read_record(plan.run_dir)["state"] in runs.FINAL_STATES:
                _remove(container)  # cancelled while it was being created
                _close(lifeline)
                return 130
            _start(container, spec)
        except BaseException as exc:
            _close(lifeline)
            if container is not None:
                _remove(container)
            if isinstance(exc, KeyboardInterrupt):
                _end(plan.run_dir, "CANCELLED", "interrupted before the container started")
                raise
            message = str(exc) if isinstance(exc, BackendError) else _docker_error(exc)
            _end(plan.run_dir, "FAILED", message)
            raise BackendError(message) from None
        if not foreground:
            return 0
        grace = float(plan.payload.get("stop_grace_s", 5.0))
        return _follow(
            container,
            plan.run_dir,
            auto_remove=spec["auto_remove"],
            lifeline=lifeline,
            stop_timeout_s=int(grace + GUARD_MARGIN_S) + STOP_MARGIN_S,
        )

    def refresh(self, run_dirs: list[Path]) -> None:
        """One container listing for every run; a vanished container ends its run, and one
        created by a launcher that died before starting it is removed."""
        from launcher.image import connect

        # An engine that does not answer is one BackendError: `status` warns and shows the
        # last known state instead of silently calling nothing.
        client = connect(timeout_s=10)
        found = {
            c.labels.get(LABEL): c
            for c in client.containers.list(all=True, filters={"label": LABEL})
        }
        for run_dir in run_dirs:
            record = _record(run_dir)
            if record["state"] in runs.FINAL_STATES:
                continue
            submitting = same_process(record.get("submitter"))
            container = found.get(record["run_id"])
            if container is None:
                if record["state"] == "PENDING" and submitting:
                    continue  # being created
                if record["state"] == "PENDING" and not record["backend_info"].get("container_id"):
                    _end(run_dir, "FAILED", "the launcher died before it created the container")
                else:
                    _end(run_dir, "FAILED", "the container is gone and the run has no final record")
            elif container.status == "created" and not submitting:
                _remove(container)
                _end(run_dir, "FAILED", "the launcher died before it started the container")
            elif container.status in ("exited", "dead"):
                code = container.attrs["State"]["ExitCode"]
                _end(
                    run_dir, "FAILED", f"container ended (exit code {code}) without a final record"
                )

    def cancel(self, run_dir: Path) -> None:
        from launcher.image import connect

        record = _record(run_dir)
        if record["state"] in runs.FINAL_STATES:
            raise BackendError(f"run {record['run_id']} already ended ({record['state']})")
        client = connect()
        deadline = time.monotonic() + 10
        while (
            record["state"] == "PENDING"
            and not record["backend_info"].get("container_id")
            and same_process(record.get("submitter"))
            and time.monotonic() < deadline
        ):
            time.sleep(0.1)  # being created: give it a moment
            record = _record(run_dir)
        container = _get(client, record["backend_info"].get("container_id"))
        if container is not None and container.labels.get(LABEL) != record["run_id"]:
            raise BackendError(
                f"container {container.id[:12]} is not run {record['run_id']}'s "
                f"(label {LABEL}={container.labels.get(LABEL)!r}); left alone"
            )
        note = "cancelled before its container started"
        if container is not None and container.status == "running":
            # SIGTERM to the in-container supervisor: it stops every rank and records the end.
            grace = float(_plan(run_dir).get("stop_grace_s", 5.0))
            container.stop(timeout=int(grace + GUARD_MARGIN_S) + STOP_MARGIN_S)
            note = "cancelled; the container stopped without a final record"
        elif container is not None:
            _remove(container)
        elif record["state"] == "RUNNING":
            note = "cancelled; its container was already gone"
        record = _record(run_dir)
        if record["state"] == "CANCELLED":
            return
        if record["state"] in runs.FINAL_STATES:
            raise BackendError(
                f"run {record['run_id']} ended {record['state']} before the stop took effect "
                f"({record.get('error') or 'every rank exited 0'}); nothing to cancel"
            )
        _end(run_dir, "CANCELLED", note)

    def log_files(self, run_dir: Path) -> dict[int, Path]:
        return rank_logs(run_dir)

    def default_parallelism(self, spec: JobSpec) -> int | None:
        return points_at_once(spec)

    def needs_hardware(self) -> bool:
        return True

    def preflight(self, plan: Plan[SupervisorPayload], *, points: int = 1) -> list[Any]:
        """Engine, image, GPUs/CPUs/memory/shm against the engine, mount sources (`Check`s)."""
        from launcher.backends.docker_preflight import preflight

        return preflight(plan, points=points)


def _record(run_dir: Path) -> dict[str, Any]:
    return cast(dict[str, Any], runs.read_record(run_dir))


def _plan(run_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((run_dir / PLAN_FILE).read_text())
    except (OSError, ValueError):
        return {}


def _end(run_dir: Path, state: str, error: str) -> None:
    """Final state, unless the in-container supervisor wrote one already."""
    if _record(run_dir)["state"] not in runs.FINAL_STATES:
        runs.update_record(run_dir, state=state, ended_at=runs.now(), error=error)


def _docker_error(exc: BaseException) -> str:
    """One line for what the engine (or the connection to it) said."""
    text = str(getattr(exc, "explanation", None) or exc)
    return "docker: " + " ".join(text.split())


def _create(client: Any, spec: dict[str, Any], *, lifeline: bool) -> Any:
    import docker

    skip = ("image", "gpus", "mounts")
    kwargs = {k: v for k, v in spec.items() if v is not None and k not in skip}
    kwargs["mounts"] = [
        docker.types.Mount(m["target"], m["source"], type="bind", read_only=m["read_only"])
        for m in spec["mounts"]
    ]
    if spec["gpus"]:
        kwargs["device_requests"] = [docker.types.DeviceRequest(**spec["gpus"])]
    if lifeline:
        # detach=False makes docker-py set StdinOnce: the engine closes the container's
        # stdin when the attached client (this process) goes away.
        kwargs.update(stdin_open=True, detach=False)
    try:
        return client.containers.create(spec["image"], **kwargs)
    except docker.errors.ImageNotFound:
        raise BackendError(
            f"image {spec['image']} not found: build it with `launcher build` or set docker.image"
        ) from None
    except docker.errors.APIError as exc:
        raise BackendError(f"docker refused the container: {_docker_error(exc)}") from None


def _start(container: Any, spec: dict[str, Any]) -> None:
    try:
        container.start()
    except Exception as exc:  # docker.errors.APIError; docker is imported lazily
        message = _docker_error(exc)
        if spec["gpus"] and any(s in message for s in GPU_RUNTIME_ERRORS):
            message = (
                "GPUs were asked for (resources.gpus_per_node / docker.gpu_ids) but "
                "this Docker engine has no GPU runtime (NVIDIA Container Toolkit); "
                f"the container was removed. Docker said: {message}"
            )
        raise BackendError(message) from None


def _get(client: Any, container_id: str | None) -> Any:
    import docker

    if not container_id:
        return None
    try:
        return client.containers.get(container_id)
    except docker.errors.NotFound:
        return None


def _remove(container: Any) -> None:
    import docker

    try:
        container.remove(force=True)
    except docker.errors.NotFound:
        pass
    except docker.errors.APIError as exc:
        if "is already in progress" not in str(exc):  # auto-remove got there first
            raise


def _close(lifeline: Any) -> None:
    if lifeline is not None:
        sock = getattr(lifeline, "_sock", lifeline)
        try:
            sock.close()
        except OSError:
            pass


def _wait(container: Any, auto_remove: bool) -> dict[str, Any] | None:
    """The engine's exit result; None if an auto-removed container is gone already."""
    import docker

    try:
        return container.wait(condition="removed" if auto_remove else "not-running")
    except docker.errors.NotFound:
        return None


def _interrupt(container: Any, timeout_s: int) -> None:
    """Ctrl-C: SIGINT to the supervisor (tini forwards it), which gives every rank the stop
    signal and the grace; SIGKILL by the engine only if it is still running after
    `timeout_s`. Further Ctrl-Cs are ignored meanwhile: the stop is already bounded."""
    import docker

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        print(
            f"launcher: stopping the container (Ctrl-C): the ranks get their stop signal, "
            f"SIGKILL after at most {timeout_s} s",
            file=sys.stderr,
            flush=True,
        )
        try:
            container.kill(signal="SIGINT")
            container.wait(timeout=timeout_s, condition="not-running")
        except docker.errors.NotFound:
            return
        except docker.errors.APIError:
            pass  # not running any more
        except Exception:  # requests' ReadTimeout/ConnectionError: still running
            try:
                container.stop(timeout=0)
            except docker.errors.NotFound:
                pass
    finally:
        signal.signal(signal.SIGINT, previous)


def _follow(
    container: Any, run_dir: Path, *, auto_remove: bool, lifeline: Any, stop_timeout_s: int = 15
) -> int:
    """Stream the container's output to the terminal and container.log; wait; clean up."""
    import docker

    def pump() -> None:
        with open(run_dir / "container.log", "ab") as log:
            try:
                for chunk in container.logs(stream=True, follow=True):
                    log.write(chunk)
                    log.flush()
                    sys.stdout.write(chunk.decode(errors="replace"))
                    sys.stdout.flush()
            except docker.errors.NotFound:
                pass  # removed before we got to read it; the rank logs are in the run dir

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    try:
        try:
            result = _wait(container, auto_remove)
        except KeyboardInterrupt:
            _interrupt(container, stop_timeout_s)
            result = _wait(container, auto_remove)
    finally:
        thread.join(timeout=5)
        _close(lifeline)
    code = None if result is None else int(result.get("StatusCode", 1))
    oom = False
    if not auto_remove:
        container.reload()
        oom = bool(container.attrs.get("State", {}).get("OOMKilled"))
    record = _record(run_dir)
    if record["state"] not in runs.FINAL_STATES:
        error = (result or {}).get("Error") or {}
        runs.update_record(
            run_dir,
            state="COMPLETED" if code == 0 else "FAILED",
            ended_at=runs.now(),
            error=(
                "killed: out of memory"
                if oom
                else error.get("Message") or f"container exited with code {code}"
            ),
        )
    runs.update_record(run_dir, container_exit_code=code)
    state = _record(run_dir)["state"]
    return {"COMPLETED": 0, "CANCELLED": 130}.get(state, 1)


def _render(
    spec: JobSpec,
    run_dir: Path,
    payload: SupervisorPayload,
    picks: LoaderPicks,
    shm_why: str,
) -> str:
    container: dict[str, Any] = payload["container"]
    procs: list[ProcEntry] = payload["procs"]
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
        *stop_lines(payload),
        *[f"exit:       {note}" for note in [exit_note(procs[0]["argv"])] if procs and note],
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
