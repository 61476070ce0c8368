"""Slurm backend: submitit's SlurmExecutor; the only module here that runs sbatch.

`plan()` renders the exact sbatch script submitit will write (`sbatch.render_sbatch`) without
importing submitit or touching the cluster. `submit()` imports submitit and runs sbatch.
Status comes from ONE sacct + squeue query for every run shown (`status`).

Script and built-in-trainer jobs run as one `srun` step started from the batch shell
(`batch.StepTask`), so requeue decisions stay on the host even when the ranks run in a
container. Callables run through submitit in every task (`batch.CallableTask`).
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

from launcher import config, runs
from launcher.backends.base import ArrayBackend, Plan, SlurmPayload
from launcher.backends.slurm.array import ARRAYS
from launcher.backends.slurm.sbatch import (
    check,
    executor_params,
    render_sbatch,
    render_text,
    step_argv,
    step_mode,
    submitit_command,
    submitit_python,
    task_env,
)
from launcher.backends.slurm.status import apply_state, query_states, run_slurm_command
from launcher.errors import BackendError
from launcher.spec import JobSpec

if TYPE_CHECKING:
    from launcher.backends.slurm.batch import CallableTask, StepTask
    from launcher.hardware import Hardware


class SlurmBackend:
    name = "slurm"

    # Sweeps queue their points as job arrays (array.py).
    array: ArrayBackend | None = ARRAYS

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
        check(spec, config_file)
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
        prepare_run_dir(plan)
        executor = _executor(Path(plan.payload.folder), plan.spec, plan.payload.params)
        job = _submit_or_fail(executor, task_for(plan))
        _mark_submitted(plan, job.job_id, plan.payload.folder)
        print(f"submitted Slurm job {job.job_id}; follow with: launcher logs {plan.run_id} -f")
        return 0

    def refresh(self, run_dirs: list[Path]) -> None:
        records = {d: runs.read_record(d) for d in run_dirs}
        ids = {r["backend_info"].get("job_id") for r in records.values()} - {None}
        if not ids:
            return
        states = query_states(sorted(ids))
        for run_dir, record in records.items():
            job_id = record["backend_info"].get("job_id")
            if job_id and job_id in states:
                apply_state(run_dir, record, states[job_id])

    def cancel(self, run_dir: Path) -> None:
        record = runs.read_record(run_dir)
        job_id = record["backend_info"].get("job_id")
        if not job_id:
            raise BackendError(f"run {record['run_id']} has no Slurm job id")
        if record["state"] in runs.FINAL_STATES:
            raise BackendError(f"run {record['run_id']} already ended ({record['state']})")
        run_slurm_command(["scancel", job_id])
        runs.update_record(
            run_dir, state="CANCELLED", ended_at=runs.now(), error="cancelled by launcher cancel"
        )

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


def _executor(folder: Path, spec: JobSpec, params: dict[str, Any]):
    import submitit

    try:
        executor = submitit.SlurmExecutor(
            folder=folder,
            max_num_timeout=spec.slurm.max_requeue,
            python=submitit_python(step_mode(spec)),
        )
    except RuntimeError as exc:
        raise BackendError(f"Slurm is not reachable from here ({exc}); try --dry-run") from None
    executor.update_parameters(**params)
    return executor


def task_for(plan: Plan[SlurmPayload]) -> StepTask | CallableTask:
    """The submitit callable for a plan: the host-side step, or the callable in every task."""
    from launcher.backends.slurm.batch import CallableTask, StepTask

    spec, env = plan.spec, plan.payload.env
    if plan.payload.step:
        grace = max(10, spec.slurm.signal_delay_s - 10)
        return StepTask(
            plan.payload.step,
            str(plan.run_dir),
            spec.slurm.max_requeue,
            grace,
            env,
            signal_delay_s=spec.slurm.signal_delay_s,
        )
    return CallableTask(
        spec.entrypoint.callable or "",
        env["LAUNCHER_CONFIG"],
        str(plan.run_dir),
        spec.workdir or ".",
        env,
    )


def _submit_or_fail(executor, task):
    import submitit

    try:
        return executor.submit(task)
    except (submitit.core.utils.FailedJobError, subprocess.CalledProcessError, OSError) as exc:
        raise BackendError(f"sbatch refused the job: {str(exc).strip().splitlines()[-1]}") from None


def _mark_submitted(plan: Plan[SlurmPayload], job_id: str, folder: str) -> None:
    runs.update_record(
        plan.run_dir, backend_info={"job_id": job_id, "folder": folder}, submitted_at=runs.now()
    )


BACKEND = SlurmBackend()
