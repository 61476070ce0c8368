"""Inside one Slurm array task: turn the task's index into its point, then run it.

`python -m launcher.sweep.task CHUNK_FILE FOLDER` is the array script's command, in place
of submitit's `python -m submitit.core._submit FOLDER`. It reads point SLURM_ARRAY_TASK_ID
of the chunk, builds and checks its spec, plans it with the Slurm backend, writes the
point's run directory (config, record with this task's job id), pickles the backend's task
where submitit's runner looks for it, and then runs that runner in the same process (one
Python start per task, not two). When Slurm requeues the task, the pickle (holding the
checkpointed state) is already there and nothing is rewritten.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def prepare_task(chunk_file: Path, array_job_id: str, task_index: int) -> tuple[Path, bool]:
    """Write the point's run dir and submitit pickle (once); returns the run dir and
    whether this was the first start (False: a requeued task)."""
    from submitit.core.utils import DelayedSubmission, JobPaths

    from launcher import runs
    from launcher.backends.slurm import backend as slurm
    from launcher.errors import ConfigError
    from launcher.sweep import define

    chunk = json.loads(chunk_file.read_text())
    point = chunk["points"][task_index]
    job_id = f"{array_job_id}_{task_index}"
    folder = Path(chunk["folder"])
    pickle = JobPaths(folder, job_id=job_id).submitted_pickle
    base = chunk["base"]
    run_dir = runs.run_dir_for(base["runs_dir"], base["name"], point["run_id"])
    if pickle.exists():
        return run_dir, False  # requeued: submitit resumes from the pickle it checkpointed
    spec = define.point_spec(base, point["overrides"], chunk["config_file"])
    if define.spec_id(spec) != point["id"]:
        raise ConfigError(
            f"point {point['index']} resolves to id {define.spec_id(spec)}, not {point['id']} "
            "(launcher version changed since submission?); resubmit the sweep",
            file=chunk["config_file"],
            key="sweep",
        )
    plan = slurm.BACKEND.plan(
        spec, run_id=point["run_id"], run_dir=run_dir, config_file=chunk["config_file"]
    )
    slurm.prepare_run_dir(plan)
    runs.update_record(
        run_dir,
        backend_info={"job_id": job_id, "folder": str(folder)},
        submitted_at=runs.now(),
        sweep_dir=chunk["sweep_dir"],
    )
    tmp = pickle.with_name(f".{pickle.name}.tmp")
    delayed = DelayedSubmission(slurm.task_for(plan))
    # As submitit's executor does: the requeue budget travels in the pickle.
    delayed.set_timeout(plan.payload.params["time"], spec.slurm.max_requeue)
    delayed.dump(tmp)
    os.replace(tmp, pickle)
    return run_dir, True


def main(argv: list[str]) -> int:
    """Rank 0 (or the batch shell) resolves the point; then every task runs submitit's job
    runner in this same process (other ranks wait there for the pickle, as submitit does)."""
    from launcher.errors import LauncherError

    if len(argv) != 2:
        print("usage: python -m launcher.sweep.task CHUNK_FILE SUBMITIT_FOLDER", file=sys.stderr)
        return 2
    try:
        array_job_id = os.environ["SLURM_ARRAY_JOB_ID"]
        task_index = int(os.environ["SLURM_ARRAY_TASK_ID"])
    except (KeyError, ValueError):
        print("launcher: error: not inside a Slurm array task", file=sys.stderr)
        return 2
    if os.environ.get("SLURM_PROCID", "0") == "0":
        try:
            run_dir, first = prepare_task(Path(argv[0]), array_job_id, task_index)
        except LauncherError as exc:
            print(f"launcher: error: {exc}", file=sys.stderr)
            return exc.exit_code or 1
        verb = "runs" if first else "resumes (requeued)"
        print(f"launcher: array task {array_job_id}_{task_index} {verb} {run_dir}", flush=True)
    from submitit.core.submission import process_job

    process_job(argv[1])
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
