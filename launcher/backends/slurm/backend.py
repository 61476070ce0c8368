"""Slurm backend: submitit's SlurmExecutor; the only module here that runs sbatch.

`plan()` renders the exact sbatch script submitit will write (`sbatch.render_sbatch`) without
importing submitit or touching the cluster. `submit()` imports submitit and runs sbatch.
Status comes from ONE sacct + squeue query for every run shown (`status`).

Every job (script, callable, built-in trainer) runs as one `srun` step started from the
batch shell (`batch.StepTask`), so requeue decisions stay on the host even when the ranks
run in a container, and every rank gets `entrypoint.stop_signal` the same way.

The record follows Slurm, never launcher's own wish: a refused (or unanswered) sbatch leaves
the run FAILED with the reason; `cancel` asks sacct first and records CANCELLED only when
Slurm says so, so a job that finished first stays COMPLETED. Every Slurm command has a
timeout (`status.run_slurm_command`, and `timeout` around submitit's sbatch).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import io
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from launcher import config, runs
from launcher.backends.base import ArrayBackend, Plan, SlurmPayload
from launcher.backends.slurm import container
from launcher.backends.slurm.array import ARRAYS
from launcher.backends.slurm.sbatch import (
    check,
    executor_params,
    grace_s,
    render_sbatch,
    render_text,
    step_argv,
    step_mode,
    submitit_command,
    submitit_python,
    task_env,
)
from launcher.backends.slurm.status import (
    QUERY_TIMEOUT_S,
    Runner,
    apply_state,
    query_states,
    run_slurm_command,
)
from launcher.errors import BackendError, LauncherError
from launcher.spec import JobSpec

if TYPE_CHECKING:
    from launcher.backends.slurm.batch import StepTask
    from launcher.hardware import Hardware


# sbatch answers in about a second; past this the controller is down or overloaded.
SBATCH_TIMEOUT_S = 120.0
# A record still without a job id this long after it was written: its submission died.
STALE_SUBMISSION_S = 2 * SBATCH_TIMEOUT_S + 60
# How long `launcher cancel` waits for Slurm to say how the job ended.
CANCEL_WAIT_S = 20.0


class SlurmBackend:
    name = "slurm"

    # Sweeps queue their points as job arrays (array.py).
    array: ArrayBackend | None = ARRAYS

    def __init__(
        self,
        *,
        run: Runner = run_slurm_command,
        timeout_s: float = QUERY_TIMEOUT_S,
        sbatch_timeout_s: float = SBATCH_TIMEOUT_S,
        cancel_wait_s: float = CANCEL_WAIT_S,
    ) -> None:
        # `run` runs sacct, squeue and scancel (a stand-in in unit tests of the logic).
        self.run = run
        self.timeout_s = timeout_s
        self.sbatch_timeout_s = sbatch_timeout_s
        self.cancel_wait_s = cancel_wait_s

    def plan(
        self,
        spec: JobSpec,
        *,
        run_id: str,
        run_dir: Path,
        config_file: str | None,
        hardware: Hardware | None = None,
    ) -> Plan[SlurmPayload]:
        # `hardware` is not used: loader picks are made on each node, from what it got.
        check(spec, config_file, run_dir)
        params = executor_params(spec)
        folder = run_dir / "slurm"
        script = render_sbatch(submitit_command(folder, step_mode(spec)), folder, params)
        payload = SlurmPayload(
            params=params,
            folder=str(folder),
            env=task_env(spec, run_dir),
            step=step_argv(spec, run_dir) if step_mode(spec) else None,
            script=script,
        )
        return Plan(
            backend=self.name,
            spec=spec,
            run_id=run_id,
            run_dir=run_dir,
            text=render_text(spec, run_dir, payload),
            payload=payload,
            config_file=config_file,
        )

    def submit(
        self, plan: Plan[SlurmPayload], *, foreground: bool = False, echo: bool = True
    ) -> int:
        # The job runs in the queue: nothing to echo here; `launcher logs -f` follows it.
        if plan.spec.slurm.container:
            # Before anything is written: a runtime that cannot apply is one line, no run.
            container.check_runtime(plan.spec, config_file=plan.config_file)
        prepare_run_dir(plan)
        if plan.spec.slurm.container and plan.payload.step is not None:
            try:
                container.prepare_image(plan.spec)  # once per tag, into the shared cache
            except LauncherError as exc:
                runs.update_record(
                    plan.run_dir, state="FAILED", ended_at=runs.now(), error=str(exc)
                )
                raise
            rendered = container.render(plan.spec, plan.run_dir, plan.payload.env)
            container.write_run_files(rendered, plan.run_dir)
            # Rendered again now that the image's own environment and python are known.
            step = step_argv(plan.spec, plan.run_dir)
            plan = dataclasses.replace(plan, payload=dataclasses.replace(plan.payload, step=step))
        try:
            executor = _executor(
                Path(plan.payload.folder), plan.spec, plan.payload.params, self.sbatch_timeout_s
            )
            job = _submit_or_fail(executor, task_for(plan), self.sbatch_timeout_s)
        except BaseException as exc:
            # No PENDING record may outlive a submission that did not happen.
            why = str(exc) if isinstance(exc, LauncherError) else _interrupted(exc)
            runs.update_record(plan.run_dir, state="FAILED", ended_at=runs.now(), error=why)
            raise
        _mark_submitted(plan, job.job_id, plan.payload.folder)
        print(f"submitted Slurm job {job.job_id}; follow with: launcher logs {plan.run_id} -f")
        return 0

    def refresh(self, run_dirs: list[Path]) -> None:
        """ONE sacct + squeue query for these runs; BackendError within `timeout_s` when
        Slurm does not answer (records are left as they were)."""
        records = {d: runs.read_record(d) for d in run_dirs}
        for run_dir, record in records.items():
            if not record["backend_info"].get("job_id"):
                _fail_stale_submission(run_dir, record)
        ids = {job for r in records.values() if (job := r["backend_info"].get("job_id"))}
        if not ids:
            return
        states = query_states(sorted(ids), run=self.run, timeout_s=self.timeout_s)
        for run_dir, record in records.items():
            job_id = record["backend_info"].get("job_id")
            if job_id and job_id in states:
                apply_state(run_dir, dict(record), states[job_id])

    def cancel(self, run_dir: Path) -> None:
        """scancel the run's job, then record what Slurm says happened.

        sacct is asked first (scancel of a finished job succeeds silently), and CANCELLED is
        written only when Slurm reports it: a job that finished before the cancel reached it
        stays COMPLETED (or FAILED), and that is an error here ("already ended")."""
        record = runs.read_record(run_dir)
        if record["state"] in runs.FINAL_STATES:
            raise BackendError(_already_ended(record))
        job_id = record["backend_info"].get("job_id")
        if not job_id:
            raise BackendError(
                f"run {record['run_id']} has no Slurm job id: it was never submitted "
                "(or its submission is still under way); nothing to cancel"
            )
        with contextlib.suppress(BackendError):
            # Not answering is no reason not to scancel: the record waits for Slurm's word.
            record = self._refreshed(run_dir, job_id)
        if record["state"] in runs.FINAL_STATES:
            raise BackendError(_already_ended(record))
        self.run(["scancel", job_id], self.timeout_s)
        record = runs.update_record(run_dir, cancel_requested_at=runs.now())
        deadline = time.monotonic() + self.cancel_wait_s
        while record["state"] not in runs.FINAL_STATES and time.monotonic() < deadline:
            time.sleep(0.5)
            with contextlib.suppress(BackendError):
                record = self._refreshed(run_dir, job_id)
        if record["state"] in ("COMPLETED", "FAILED"):
            raise BackendError(_already_ended(record, raced=True))

    def _refreshed(self, run_dir: Path, job_id: str) -> runs.RunRecord:
        states = query_states([job_id], run=self.run, timeout_s=self.timeout_s)
        if job_id in states:
            apply_state(run_dir, dict(runs.read_record(run_dir)), states[job_id])
        return runs.read_record(run_dir)

    def log_files(self, run_dir: Path) -> dict[int, Path]:
        found = {int(p.stem.removeprefix("rank")): p for p in (run_dir / "logs").glob("rank*.log")}
        if found:
            return found
        record = runs.read_record(run_dir)
        job_id = record["backend_info"].get("job_id", "")
        folder = Path(record["backend_info"].get("folder", run_dir / "slurm"))
        return {
            int(p.name[len(job_id) + 1 :].split("_")[0]): p
            for p in folder.glob(f"{job_id}_*_log.out")
        }

    def default_parallelism(self, spec: JobSpec) -> int | None:
        return spec.slurm.array_parallelism

    def needs_hardware(self) -> bool:
        return False

    def preflight(self, plan: Plan[SlurmPayload], *, points: int = 1) -> list[Any]:
        """sinfo + sbatch --test-only of the real script (+ accounts, sweep limits)."""
        from launcher.backends.slurm.preflight import preflight

        return preflight(plan, points=points)


def prepare_run_dir(plan: Plan[SlurmPayload]) -> None:
    run_dir = plan.run_dir
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    runs.atomic_write_text(run_dir / runs.CONFIG, config.dump(plan.spec))
    runs.atomic_write_text(run_dir / "sbatch.sh", plan.payload.script)
    record = runs.new_record(
        run_id=plan.run_id,
        name=plan.spec.name,
        backend="slurm",
        world_size=plan.spec.resources.world_size,
        config_file=plan.config_file,
    )
    runs.write_record(run_dir, record)


def _already_ended(record: runs.RunRecord, *, raced: bool = False) -> str:
    when = "before the cancel reached Slurm" if raced else "already"
    why = f": {record['error']}" if record.get("error") else ""
    return f"run {record['run_id']} {when} ended {record['state']}{why}; nothing to cancel"


def _interrupted(exc: BaseException) -> str:
    return (
        f"submission interrupted ({type(exc).__name__}: {exc}); sbatch may have queued the "
        "job anyway (see squeue --me)"
    )


def _fail_stale_submission(run_dir: Path, record: runs.RunRecord) -> None:
    """A PENDING record that never got a job id (launcher killed during sbatch) ends FAILED
    once its submission cannot still be under way."""
    if record["state"] != "PENDING":
        return
    try:
        age = dt.datetime.now(dt.timezone.utc) - dt.datetime.fromisoformat(record["created_at"])
    except (TypeError, ValueError):
        return
    if age.total_seconds() > STALE_SUBMISSION_S:
        runs.update_record(
            run_dir,
            state="FAILED",
            ended_at=runs.now(),
            error="the submission did not finish (no Slurm job id was recorded; launcher was "
            "stopped during sbatch?)",
        )


def _executor(folder: Path, spec: JobSpec, params: dict[str, Any], sbatch_timeout_s: float):
    import submitit

    class Executor(submitit.SlurmExecutor):
        def _make_submission_command(self, submission_file_path: Path) -> list[str]:
            # submitit waits for sbatch without a limit; a controller that does not answer
            # must not hang `launcher run`.
            sbatch = super()._make_submission_command(submission_file_path)
            return ["timeout", "-k", "5", f"{sbatch_timeout_s:g}", *sbatch]

    try:
        executor = Executor(
            folder=folder,
            max_num_timeout=spec.slurm.max_requeue,
            python=submitit_python(step_mode(spec)),
        )
    except RuntimeError as exc:
        raise BackendError(f"Slurm is not reachable from here ({exc}); try --dry-run") from None
    executor.update_parameters(**params)
    return executor


def task_for(plan: Plan[SlurmPayload]) -> StepTask:
    """The submitit callable for a plan: the host side of its one srun step."""
    from launcher.backends.slurm.batch import StepTask

    spec = plan.spec
    return StepTask(
        plan.payload.step or [],
        str(plan.run_dir),
        spec.slurm.max_requeue,
        grace_s(spec),
        plan.payload.env,
        signal_delay_s=spec.slurm.signal_delay_s,
        world_size=spec.resources.world_size,
    )


def _submit_or_fail(executor, task, sbatch_timeout_s: float):
    """executor.submit, with sbatch's refusal (or silence) as one BackendError line."""
    from submitit.core.utils import FailedJobError, FailedSubmissionError

    try:
        # submitit also prints sbatch's stderr; the one line below says it instead.
        with contextlib.redirect_stderr(io.StringIO()):
            return executor.submit(task)
    except (FailedJobError, FailedSubmissionError, subprocess.CalledProcessError, OSError) as exc:
        cause = exc.__cause__
        if isinstance(cause, subprocess.CalledProcessError) and cause.returncode in (124, 137):
            raise BackendError(
                f"sbatch did not answer within {sbatch_timeout_s:g} s: is the Slurm controller "
                "up? (the job may have been queued anyway: see squeue --me)"
            ) from None
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        raise BackendError(f"sbatch refused the job: {lines[-1] if lines else exc!r}") from None


def _mark_submitted(plan: Plan[SlurmPayload], job_id: str, folder: str) -> None:
    runs.update_record(
        plan.run_dir, backend_info={"job_id": job_id, "folder": folder}, submitted_at=runs.now()
    )


BACKEND = SlurmBackend()
