"""Local backend: N processes on this machine with torchrun-style variables.

`submit()` runs the supervisor (`supervisor.py`) in this process, or detached with
`--detach`; `plan()` is pure and shows every process with its environment.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from launcher import runs
from launcher.backends.base import ArrayBackend, Plan, SupervisorPayload
from launcher.backends.local.supervisor import (
    PORT_AT_START,
    alive,
    points_at_once,
    prepare_run_dir,
    process_table,
    require_one_node,
    supervise,
)
from launcher.entrypoint import entry_argv
from launcher.errors import BackendError, ConfigError
from launcher.hardware import Hardware, LoaderPicks, detect, pick_loader
from launcher.spec import JobSpec


class LocalBackend:
    name = "local"
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
        require_one_node(spec, config_file, "local", "use backend=slurm for several nodes")
        if spec.resources.gpus_per_node:
            raise ConfigError(
                "the local backend does not assign GPUs; use procs_per_node and set "
                "CUDA_VISIBLE_DEVICES in env, or backend=docker/slurm",
                file=config_file,
                key="resources.gpus_per_node",
            )
        hw = hardware or detect()
        nprocs = spec.resources.tasks_per_node
        picks = pick_loader(hw, nprocs, spec.loader)
        procs = process_table(
            spec,
            run_dir=run_dir,
            picks=picks,
            argv=entry_argv(spec),
            cwd=spec.workdir or os.getcwd(),
            master_addr=spec.local.master_addr,
            master_port=spec.local.master_port or PORT_AT_START,
        )
        payload: SupervisorPayload = {"procs": procs, "stop_grace_s": spec.local.stop_grace_s}
        return Plan(
            backend=self.name,
            spec=spec,
            run_id=run_id,
            run_dir=run_dir,
            text=render(spec, run_dir, procs, picks),
            payload=payload,
            config_file=config_file,
        )

    def submit(
        self, plan: Plan[SupervisorPayload], *, foreground: bool = True, echo: bool = True
    ) -> int:
        run_dir = plan.run_dir
        prepare_run_dir(plan)
        if foreground:
            return supervise(run_dir, echo=echo)
        log = open(run_dir / "supervisor.log", "ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "launcher.backends.local", str(run_dir)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        runs.update_record(run_dir, backend_info={"supervisor_pid": proc.pid})
        return 0

    def refresh(self, run_dirs: list[Path]) -> None:
        """A run whose supervisor is gone but whose record says RUNNING died with it."""
        for run_dir in run_dirs:
            record = runs.read_record(run_dir)
            if record["state"] not in ("PENDING", "RUNNING"):
                continue
            pid = record.get("backend_info", {}).get("supervisor_pid")
            if pid and not alive(pid):
                runs.update_record(
                    run_dir,
                    state="FAILED",
                    ended_at=runs.now(),
                    error="the supervisor process died (killed?); ranks were stopped with it",
                )

    def cancel(self, run_dir: Path) -> None:
        record = runs.read_record(run_dir)
        if record["state"] in runs.FINAL_STATES:
            raise BackendError(f"run {record['run_id']} already ended ({record['state']})")
        info = record.get("backend_info", {})
        pid = info.get("supervisor_pid")
        if pid and alive(pid):
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and alive(pid):
                time.sleep(0.05)
            if not alive(pid):
                return
        # No supervisor: stop the ranks' process groups ourselves.
        for rank_pid in info.get("rank_pids", {}).values():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(rank_pid, signal.SIGKILL)
        runs.update_record(run_dir, state="CANCELLED", ended_at=runs.now())

    def log_files(self, run_dir: Path) -> dict[int, Path]:
        """Every rank's log path, also before the rank has written anything."""
        world = int(runs.read_record(run_dir).get("world_size") or 0)
        return {rank: run_dir / "logs" / f"rank{rank}.log" for rank in range(world)}

    def default_parallelism(self, spec: JobSpec) -> int | None:
        return points_at_once(spec)

    def needs_hardware(self) -> bool:
        return True


def render(spec: JobSpec, run_dir: Path, procs: list[dict[str, Any]], picks: LoaderPicks) -> str:
    """The dry-run text: every process with its working dir, launcher-set env and argv."""
    res = spec.resources
    lines = [
        "# launcher plan (local backend): nothing has been started",
        f"run dir:    {run_dir}",
        f"processes:  {res.tasks_per_node} on this machine (world size {res.tasks_per_node})",
        f"entrypoint: {spec.entrypoint.kind}",
        "loader picks per process:",
    ]
    for key in ("num_workers", "pin_memory", "persistent_workers", "prefetch_factor"):
        lines.append(f"  {key}={getattr(picks, key)}  # {picks.reasons.get(key, '')}")
    lines.append("commands (environment = yours plus the variables shown):")
    for proc in procs:
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in proc["env"].items())
        lines.append(
            f"  [rank {proc['rank']}] cd {shlex.quote(proc['cwd'])} && env {env} "
            f"{shlex.join(proc['argv'])} > {shlex.quote(proc['log'])} 2>&1"
        )
    return "\n".join(lines)


BACKEND = LocalBackend()
