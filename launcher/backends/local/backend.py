"""Local backend: N processes on this machine with torchrun-style variables.

`submit()` runs the supervisor (`supervisor.py`) in this process, or detached with
`--detach`; `plan()` is pure and shows every process with its environment.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, cast

from launcher import runs
from launcher.backends.base import ArrayBackend, Plan, ProcEntry, SupervisorPayload
from launcher.backends.local.guard import (
    EXITED,
    all_pids,
    environ_has,
    identity,
    mismatch,
    same_process,
    signal_all,
    signal_verified,
)
from launcher.backends.local.supervisor import (
    GUARD_MARGIN_S,
    PLAN_FILE,
    PORT_AT_START,
    alive,
    points_at_once,
    prepare_run_dir,
    process_table,
    rank_logs,
    require_one_node,
    run_marker,
    stop_lines,
    stop_settings,
    supervise,
)
from launcher.entrypoint import entry_argv, exit_note
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
        picks = pick_loader(hw, nprocs, spec.loader, trainer=spec.entrypoint.kind == "trainer")
        procs = process_table(
            spec,
            run_dir=run_dir,
            picks=picks,
            argv=entry_argv(spec),
            cwd=spec.workdir or os.getcwd(),
            master_addr=spec.local.master_addr,
            master_port=spec.local.master_port or PORT_AT_START,
            config_file=config_file,
        )
        payload: SupervisorPayload = {"procs": procs, **stop_settings(spec)}
        return Plan(
            backend=self.name,
            spec=spec,
            run_id=run_id,
            run_dir=run_dir,
            text=render(spec, run_dir, payload, picks),
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
        try:
            # It waits for stdin to close: only then may it write the record, so the
            # identity recorded here is never overwritten by a concurrent write of its own.
            proc = subprocess.Popen(
                [sys.executable, "-m", "launcher.backends.local", str(run_dir), "--wait-stdin"],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.PIPE,
                start_new_session=True,
            )
        except OSError as exc:
            error = f"cannot start the supervisor: {exc.strerror}: {sys.executable}"
            runs.update_record(run_dir, state="FAILED", ended_at=runs.now(), error=error)
            raise BackendError(error) from None
        finally:
            log.close()
        assert proc.stdin is not None
        try:
            runs.update_record(
                run_dir,
                backend_info={"supervisor": identity(proc.pid), "supervisor_pid": proc.pid},
            )
        finally:
            proc.stdin.close()
        return 0

    def refresh(self, run_dirs: list[Path]) -> None:
        """A run whose supervisor is gone (checked by identity, not by pid) but whose record
        is not final died with it; so did a PENDING run whose launcher died before starting."""
        for run_dir in run_dirs:
            record = _record(run_dir)
            if record["state"] in runs.FINAL_STATES or _supervised(record):
                continue
            if record["state"] == "PENDING" and same_process(record.get("submitter")):
                continue  # the submission is still under way
            runs.update_record(
                run_dir, state="FAILED", ended_at=runs.now(), error=_death_note(record)
            )

    def cancel(self, run_dir: Path) -> None:
        """SIGTERM the supervisor if it is the one recorded; without one, stop only the
        processes whose recorded identity still matches (a reused pid is left alone)."""
        record = _record(run_dir)
        if record["state"] in runs.FINAL_STATES:
            raise BackendError(f"run {record['run_id']} already ended ({record['state']})")
        if not _supervised(record) and record["state"] == "PENDING":
            record = _await_supervisor(run_dir, record)
        info: dict[str, Any] = record.get("backend_info") or {}
        sup: dict[str, Any] | None = info.get("supervisor")
        if record["state"] == "PENDING" and "supervisor" not in info:
            reason = "cancelled before it started"
        else:
            reason = "cancelled after its supervisor had died"
        if signal_verified(sup, signal.SIGTERM) is None:
            wait_s = float(_plan(run_dir).get("stop_grace_s", 5.0)) + GUARD_MARGIN_S + 20
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline and same_process(sup):
                time.sleep(0.05)
            record = _record(run_dir)
            if record["state"] == "CANCELLED":
                return
            if record["state"] in runs.FINAL_STATES:
                # The supervisor decides from the ranks' exits: they all ended before the stop.
                raise BackendError(
                    f"run {record['run_id']} ended {record['state']} before the stop took "
                    f"effect ({record.get('error') or 'every rank exited 0'}); nothing to cancel"
                )
            if sup is not None and same_process(sup):
                reason = (
                    f"cancelled; its supervisor (pid {sup['pid']}) ignored SIGTERM for {wait_s:g} s"
                )
        _cancel_without_supervisor(run_dir, _record(run_dir), reason)

    def log_files(self, run_dir: Path) -> dict[int, Path]:
        return rank_logs(run_dir)

    def default_parallelism(self, spec: JobSpec) -> int | None:
        return points_at_once(spec)

    def needs_hardware(self) -> bool:
        return True

    def preflight(self, plan: Plan[SupervisorPayload], *, points: int = 1) -> list[Any]:
        """The job's files, as this machine's interpreter will see them (`Check`s)."""
        from launcher.entrypoint import python_for
        from launcher.preflight import job_checks

        return job_checks(plan, python=python_for(plan.spec))


def render(spec: JobSpec, run_dir: Path, payload: SupervisorPayload, picks: LoaderPicks) -> str:
    """The dry-run text: every process with its working dir, launcher-set env and argv."""
    res = spec.resources
    procs: list[ProcEntry] = payload["procs"]
    lines = [
        "# launcher plan (local backend): nothing has been started",
        f"run dir:    {run_dir}",
        f"processes:  {res.tasks_per_node} on this machine (world size {res.tasks_per_node})",
        f"entrypoint: {spec.entrypoint.kind}",
        *stop_lines(payload),
        *[f"exit:       {note}" for note in [exit_note(procs[0]["argv"])] if procs and note],
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


def _record(run_dir: Path) -> dict[str, Any]:
    """The record as a plain dict: it also holds keys RunRecord does not declare."""
    return cast(dict[str, Any], runs.read_record(run_dir))


def _plan(run_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((run_dir / PLAN_FILE).read_text())
    except (OSError, ValueError):
        return {}


def _supervised(record: dict[str, Any]) -> bool:
    """True if the run's supervisor still runs. A record an older launcher wrote has a bare
    pid: a live process with that pid counts (it cannot be checked)."""
    info: dict[str, Any] = record.get("backend_info") or {}
    if "supervisor" in info:
        return same_process(info["supervisor"])
    pid = info.get("supervisor_pid")
    return isinstance(pid, int) and alive(pid)


def _live_ranks(record: dict[str, Any]) -> list[str]:
    ranks = (record.get("backend_info") or {}).get("ranks") or {}
    return [rank for rank, ident in sorted(ranks.items()) if same_process(ident)]


def _death_note(record: dict[str, Any]) -> str:
    if record["state"] == "PENDING" and "supervisor" not in (record.get("backend_info") or {}):
        return "the launcher process died before the run started; nothing ran"
    note = "the supervisor process died (killed?)"
    live = _live_ranks(record)
    if live:
        return f"{note}; rank(s) {', '.join(live)} still run: `launcher cancel` stops them"
    return f"{note}; its ranks were stopped with it"


def _await_supervisor(run_dir: Path, record: dict[str, Any]) -> dict[str, Any]:
    """A PENDING run whose submitter still runs gets a moment to record its supervisor."""
    deadline = time.monotonic() + 10
    while (
        time.monotonic() < deadline
        and record["state"] == "PENDING"
        and not _supervised(record)
        and same_process(record.get("submitter"))
    ):
        time.sleep(0.05)
        record = _record(run_dir)
    return record


def _cancel_without_supervisor(run_dir: Path, record: dict[str, Any], reason: str) -> None:
    """Stop what is left of a run whose supervisor is gone, touching only processes whose
    identity matches the record or that carry the run's marker, and say what was left alone."""
    if record["state"] in runs.FINAL_STATES:
        return  # the supervisor wrote it while we waited
    info = record.get("backend_info") or {}
    grace = float(_plan(run_dir).get("stop_grace_s", 5.0))
    notes: list[str] = []
    sup = info.get("supervisor")
    if sup is None and info.get("supervisor_pid"):
        sup = {"pid": info["supervisor_pid"]}
    if sup is not None:
        why = mismatch(sup)
        if why and EXITED not in why:
            notes.append(f"supervisor: {why}; left alone")
    # A guard stops its rank's whole tree within the grace period.
    guards = [
        g for g in (info.get("guards") or {}).values() if not signal_verified(g, signal.SIGTERM)
    ]
    deadline = time.monotonic() + grace + GUARD_MARGIN_S
    while time.monotonic() < deadline and any(same_process(g) for g in guards):
        time.sleep(0.05)
    ranks = info.get("ranks")
    if ranks is None:  # an older record: bare pids cannot be checked, so nothing is signalled
        ranks = {r: {"pid": pid} for r, pid in (info.get("rank_pids") or {}).items()}
    for rank, ident in sorted(ranks.items()):
        why = signal_verified(ident, signal.SIGKILL, group=True)  # each rank leads its group
        if why is not None and EXITED not in why:
            notes.append(f"rank {rank}: {why}; left alone")
    # Whatever is left of the run (both its supervisor and a guard were SIGKILLed).
    marker = run_marker(_plan(run_dir), run_dir)
    left = [p for p in all_pids() if p != os.getpid() and environ_has(p, marker)]
    signal_all(left, signal.SIGKILL)
    for note in notes:
        print(f"launcher: {note}", file=sys.stderr)
    error = reason
    if left:
        error += f"; killed {len(left)} leftover process(es) of the run"
    if notes:
        error += "; " + "; ".join(notes)
    runs.update_record(run_dir, state="CANCELLED", ended_at=runs.now(), error=error)


BACKEND = LocalBackend()
