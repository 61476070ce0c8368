"""The process supervisor: runs on this machine, or as the main process of a Docker container.

It starts every rank in its own process group with its log file, watches them, and stops all
ranks promptly when one fails or when it is cancelled. Ranks also get PDEATHSIG, so even a
SIGKILLed supervisor leaves no orphans. `python -m launcher.backends.local RUN_DIR` runs it
detached (`--detach`) or in a container; the plan it runs is `plan.json` in the run dir.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from launcher import config, runs
from launcher.backends.base import Plan
from launcher.entrypoint import dist_env, job_env
from launcher.errors import BackendError, ConfigError
from launcher.hardware import LoaderPicks, detect_cpus
from launcher.ports import free_port
from launcher.spec import JobSpec

PLAN_FILE = "plan.json"
PORT_AT_START = "<free port picked at start>"
POLL_S = 0.05


def _set_pdeathsig() -> None:
    """In the child: die with SIGKILL if the supervisor dies (Linux prctl)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def alive(pid: int) -> bool:
    """True if pid runs and is not a zombie (PID 1 here may reap late)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def points_at_once(spec: JobSpec) -> int:
    """Sweep points to run at once on this machine: as many as its CPUs hold, at the
    point's processes each (the local and Docker backends' default parallelism)."""
    cpus, _ = detect_cpus(os.environ)
    return max(1, int(cpus) // spec.resources.tasks_per_node)


def require_one_node(spec: JobSpec, config_file: str | None, backend: str, hint: str) -> None:
    """Backends on this machine run one node; say which key to change otherwise."""
    if spec.resources.nodes != 1:
        raise ConfigError(
            f"the {backend} backend runs on this machine, got nodes={spec.resources.nodes} "
            f"({hint})",
            file=config_file,
            key="resources.nodes",
        )


def process_table(
    spec: JobSpec,
    *,
    run_dir: Path,
    picks: LoaderPicks,
    argv: list[str],
    cwd: str,
    master_addr: str,
    master_port: int | str,
) -> list[dict[str, Any]]:
    """One entry per rank on this machine (or in one container): argv, env, cwd, log file."""
    nprocs = spec.resources.tasks_per_node
    base_env = job_env(spec, run_dir=run_dir, picks=picks)
    procs = []
    for rank in range(nprocs):
        env = dict(base_env)
        env.update(
            dist_env(
                rank=rank,
                local_rank=rank,
                world_size=nprocs,
                local_world_size=nprocs,
                master_addr=master_addr,
                master_port=master_port,
            )
        )
        log = str(run_dir / "logs" / f"rank{rank}.log")
        procs.append({"rank": rank, "argv": argv, "env": env, "cwd": cwd, "log": log})
    return procs


def prepare_run_dir(plan: Plan, backend: str = "local") -> None:
    """Write config, plan and the PENDING record: what `status` and the supervisor read."""
    run_dir = plan.run_dir
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    runs.atomic_write_text(run_dir / runs.CONFIG, config.dump(plan.spec))
    payload = dict(plan.payload)
    if any(p["env"]["MASTER_PORT"] == PORT_AT_START for p in payload["procs"]):
        # The docker backend shares the host network here, so a free host port works there too.
        port = str(free_port(payload["procs"][0]["env"]["MASTER_ADDR"]))
        payload["procs"] = [
            {**p, "env": {**p["env"], "MASTER_PORT": port}} for p in payload["procs"]
        ]
    runs.atomic_write_json(run_dir / PLAN_FILE, payload)
    record = runs.new_record(
        run_id=plan.run_id,
        name=plan.spec.name,
        backend=backend,
        world_size=len(payload["procs"]),
        config_file=plan.config_file,
    )
    runs.write_record(run_dir, record)


class _Echo:
    """Copies new complete lines of every rank log to stdout, prefixed with the rank."""

    def __init__(self, logs: dict[int, Path], enabled: bool) -> None:
        self.logs = logs
        self.enabled = enabled
        self.offsets = dict.fromkeys(logs, 0)
        self.partial = dict.fromkeys(logs, b"")

    def pump(self, final: bool = False) -> None:
        if not self.enabled:
            return
        for rank, path in self.logs.items():
            try:
                with open(path, "rb") as fh:
                    fh.seek(self.offsets[rank])
                    data = fh.read()
            except FileNotFoundError:
                continue
            self.offsets[rank] += len(data)
            buf = self.partial[rank] + data
            *lines, rest = buf.split(b"\n")
            if final and rest:
                lines, rest = [*lines, rest], b""
            self.partial[rank] = rest
            for line in lines:
                sys.stdout.write(f"[rank {rank}] {line.decode(errors='replace')}\n")
        sys.stdout.flush()


def supervise(run_dir: Path, *, echo: bool = True) -> int:
    """Start every rank, wait, stop all on the first failure or on SIGINT/SIGTERM."""
    payload = json.loads((run_dir / PLAN_FILE).read_text())
    grace = float(payload.get("stop_grace_s", 5.0))
    stop_reason: list[str] = []

    def on_signal(signum: int, _frame: Any) -> None:
        stop_reason.append(signal.Signals(signum).name)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    procs: dict[int, subprocess.Popen] = {}
    try:
        for spec in payload["procs"]:
            log = open(spec["log"], "ab")
            env = {**os.environ, **spec["env"]}
            try:
                procs[spec["rank"]] = subprocess.Popen(
                    spec["argv"],
                    cwd=spec["cwd"],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                    preexec_fn=_set_pdeathsig,
                )
            except OSError as exc:
                _stop_all(procs, grace)
                runs.update_record(
                    run_dir,
                    state="FAILED",
                    ended_at=runs.now(),
                    failed_rank=spec["rank"],
                    error=f"cannot start rank {spec['rank']}: {exc}",
                )
                raise BackendError(
                    f"cannot start rank {spec['rank']}: {exc.strerror}: {spec['argv'][0]}"
                ) from None
            finally:
                log.close()
        info = runs.read_record(run_dir).get("backend_info", {})
        runs.update_record(
            run_dir,
            state="RUNNING",
            started_at=runs.now(),
            backend_info={
                **info,  # the docker backend keeps its container id here
                "supervisor_pid": os.getpid(),
                "rank_pids": {str(r): p.pid for r, p in procs.items()},
            },
        )
        logs = {s["rank"]: Path(s["log"]) for s in payload["procs"]}
        return _watch(run_dir, procs, logs, grace, stop_reason, _Echo(logs, echo))
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _watch(
    run_dir: Path,
    procs: dict[int, subprocess.Popen],
    logs: dict[int, Path],
    grace: float,
    stop_reason: list[str],
    echo: _Echo,
) -> int:
    exit_codes: dict[int, int] = {}
    failed_rank: int | None = None
    while len(exit_codes) < len(procs):
        echo.pump()
        if stop_reason:
            break
        for rank, proc in procs.items():
            if rank in exit_codes:
                continue
            code = proc.poll()
            if code is None:
                continue
            exit_codes[rank] = code
            if code != 0 and failed_rank is None:
                failed_rank = rank
        if failed_rank is not None:
            break
        time.sleep(POLL_S)
    _stop_all(procs, grace)
    for rank, proc in procs.items():
        exit_codes.setdefault(rank, proc.returncode)
    echo.pump(final=True)
    codes = {str(r): c for r, c in sorted(exit_codes.items())}
    if stop_reason:
        runs.update_record(
            run_dir,
            state="CANCELLED",
            ended_at=runs.now(),
            exit_codes=codes,
            error=f"stopped by {stop_reason[0]}",
        )
        print(f"launcher: run cancelled ({stop_reason[0]}); all ranks stopped", file=sys.stderr)
        return 130
    if failed_rank is not None:
        log = logs[failed_rank]
        error = f"rank {failed_rank} exited with code {exit_codes[failed_rank]} (log: {log})"
        runs.update_record(
            run_dir,
            state="FAILED",
            ended_at=runs.now(),
            exit_codes=codes,
            failed_rank=failed_rank,
            error=error,
        )
        print(
            f"launcher: run FAILED: {error}\n--- last lines of rank {failed_rank} ---\n"
            f"{runs.tail(log, 15)}",
            file=sys.stderr,
        )
        return 1
    runs.update_record(run_dir, state="COMPLETED", ended_at=runs.now(), exit_codes=codes)
    return 0


def _stop_all(procs: dict[int, subprocess.Popen], grace: float) -> None:
    """SIGTERM every rank's process group, then SIGKILL what is left after `grace`."""
    running = [p for p in procs.values() if p.poll() is None]
    for proc in running:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in running:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    for proc in procs.values():
        # The group may outlive its leader (DataLoader workers): kill it whatever happened.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
