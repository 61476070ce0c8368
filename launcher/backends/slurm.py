"""Slurm backend: submitit's SlurmExecutor, with a pure sbatch renderer for --dry-run.

`plan()` builds the executor parameters and renders the exact sbatch script submitit
will write (`render_sbatch` mirrors `submitit.slurm.slurm._make_sbatch_string`; a test
holds them equal) without importing submitit or touching the cluster. `submit()` is the
only place that imports submitit and runs sbatch. Status comes from ONE sacct + squeue
query for every run shown.

Script and built-in-trainer jobs run as one `srun` step started from the batch shell
(`slurm_task.StepTask`), so requeue decisions stay on the host even when the ranks run
in a pyxis container. Callables run through submitit in every task (`CallableTask`).
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from launcher import config, runs
from launcher.backends.base import Plan
from launcher.entrypoint import entry_argv, job_env
from launcher.errors import BackendError, ConfigError
from launcher.spec import JobSpec

USR_SIG = "USR2"
# CPUs per GPU task when the config does not say: the main loop plus a few loader workers.
DEFAULT_CPUS_PER_GPU_TASK = 5
SACCT_FIELDS = "JobID,State,ExitCode,Start,End,NodeList"
ACTIVE = {
    "PENDING",
    "RUNNING",
    "REQUEUED",
    "CONFIGURING",
    "COMPLETING",
    "RESIZING",
    "SUSPENDED",
    "PREEMPTED",
    "REQUEUE_HOLD",
    "REQUEUE_FED",
    "SIGNALING",
    "STAGE_OUT",
}
FAILED = {"FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


# --- pure rendering ------------------------------------------------------------------


def _sbatch_value(value: Any) -> str:
    """#SBATCH directives are single lines: a newline in a value would start a new line
    of the script, so control characters become spaces before quoting."""
    return "".join(" " if ord(c) < 32 else c for c in str(value))


def _as_sbatch_flag(key: str, value: Any) -> str:
    key = key.replace("_", "-")
    if value is True:
        return f"#SBATCH --{key}"
    return f"#SBATCH --{key}={shlex.quote(str(value))}"


def render_sbatch(
    command: str, folder: Path, params: dict[str, Any], map_count: int | None = None
) -> str:
    """The sbatch script submitit writes for these executor parameters (same text)."""
    p = {
        "job_name": "submitit",
        "time": 5,
        "nodes": 1,
        "signal_delay_s": 90,
        "wckey": "submitit",
        "array_parallelism": 256,
        "use_srun": True,
        **params,
    }
    nonslurm = {
        "setup",
        "teardown",
        "signal_delay_s",
        "stderr_to_stdout",
        "srun_args",
        "use_srun",
        "array_parallelism",
        "additional_parameters",
    }
    sbatch = {k: v for k, v in p.items() if v is not None and k not in nonslurm}
    sbatch["signal"] = f"{USR_SIG}@{p['signal_delay_s']}"
    stdout = str(Path(folder).absolute() / "%j_%t_log.out")
    stderr = str(Path(folder).absolute() / "%j_%t_log.err")
    if map_count is not None:
        sbatch["array"] = f"0-{map_count - 1}%{min(map_count, p['array_parallelism'])}"
        stdout = stdout.replace("%j", "%A_%a")
        stderr = stderr.replace("%j", "%A_%a")
    sbatch["output"] = stdout.replace("%t", "0")
    if not p.get("stderr_to_stdout"):
        sbatch["error"] = stderr.replace("%t", "0")
    sbatch["open-mode"] = "append"
    sbatch.update(p.get("additional_parameters") or {})
    lines = ["#!/bin/bash", "", "# Parameters"]
    lines += [_as_sbatch_flag(k, sbatch[k]) for k in sorted(sbatch)]
    if p.get("setup") is not None:
        lines += ["", "# setup", *p["setup"]]
    if p["use_srun"]:
        stderr_flags = [] if p.get("stderr_to_stdout") else ["--error", stderr]
        srun = [
            "srun",
            "--unbuffered",
            "--output",
            stdout,
            *stderr_flags,
            *(p.get("srun_args") or []),
        ]
        command = " ".join((shlex.join(srun), command))
    lines += ["", "# command", "export SUBMITIT_EXECUTOR=slurm", command, ""]
    if p.get("teardown") is not None:
        lines += ["", "# teardown", *p["teardown"]]
    return "\n".join(lines)


def submitit_python(step: bool) -> str:
    """The python command submitit writes into the script.

    In step mode the batch shell `exec`s python: Slurm's `B:USR2` goes to the batch shell
    only, and bash would die of it instead of letting submitit checkpoint and requeue.
    """
    py = shlex.quote(sys.executable)
    return f"exec {py}" if step else py


def submitit_command(folder: Path, step: bool) -> str:
    """What submitit's sbatch script runs: its job runner over the pickled task."""
    return " ".join(
        [submitit_python(step), "-u -m submitit.core._submit", shlex.quote(str(folder))]
    )


def _mem(mem_gb: float) -> str:
    return f"{int(mem_gb)}GB" if mem_gb == int(mem_gb) else f"{int(mem_gb * 1024)}MB"


def cpus_per_task(spec: JobSpec) -> int:
    """Enough CPUs for each task's main loop and the loader workers it will pick."""
    res = spec.resources
    if res.cpus_per_proc:
        return res.cpus_per_proc
    if spec.loader.num_workers is not None:
        return spec.loader.num_workers + 1
    return DEFAULT_CPUS_PER_GPU_TASK if res.gpus_per_node else 1


def step_mode(spec: JobSpec) -> bool:
    """Scripts and the built-in trainer run as one srun step from the batch shell."""
    return spec.entrypoint.kind != "callable"


def executor_params(spec: JobSpec) -> dict[str, Any]:
    """Parameters for SlurmExecutor.update_parameters (Slurm's own names)."""
    res, sl = spec.resources, spec.slurm
    params: dict[str, Any] = {
        "job_name": _sbatch_value(spec.name),
        "nodes": res.nodes,
        "ntasks_per_node": res.tasks_per_node,
        "cpus_per_task": cpus_per_task(spec),
        "time": res.time_min,
        "signal_delay_s": sl.signal_delay_s,
    }
    if res.gpus_per_node:
        params["gpus_per_node"] = res.gpus_per_node
    if res.mem_gb:
        params["mem"] = _mem(res.mem_gb)
    for key in ("partition", "account", "qos", "constraint"):
        value = getattr(sl, key)
        if value:
            params[key] = _sbatch_value(value)
    if sl.exclusive:
        params["exclusive"] = True
    setup = list(sl.setup)
    if step_mode(spec):
        # Slurm may send USR2 up to 60 s early, even before python has its handler: ignored
        # then (the host task re-arms it from the job's end time) rather than fatal to bash.
        setup.insert(0, "trap '' USR2")
    if setup:
        params["setup"] = setup
    extra = {k: _sbatch_value(v) for k, v in sl.extra.items()}
    if step_mode(spec):
        params["use_srun"] = False
        # Signal the batch shell (B:), where the host-side task forwards it to the ranks.
        extra.setdefault("signal", f"B:{USR_SIG}@{sl.signal_delay_s}")
    else:
        params["srun_args"] = list(sl.srun_args)
    if extra:
        params["additional_parameters"] = extra
    return params


def container_args(spec: JobSpec, run_dir: Path) -> list[str]:
    """pyxis flags for srun: image, mounts (run dir and workdir always), workdir."""
    c = spec.slurm.container
    if c is None:
        return []
    workdir = spec.workdir or "/"
    mounts = [*c.mounts, f"{run_dir}:{run_dir}", f"{workdir}:{workdir}"]
    from launcher.backends.docker import image_for

    image = c.image or image_for(spec)
    return [
        f"--container-image={image}",
        f"--container-mounts={','.join(mounts)}",
        f"--container-workdir={c.workdir or workdir}",
    ]


def step_argv(spec: JobSpec, run_dir: Path) -> list[str]:
    """The srun command the batch shell runs: every rank, one log file per rank."""
    python = spec.slurm.container.python if spec.slurm.container else None
    inner = entry_argv(spec, python)
    log = str(run_dir / "logs" / "rank%t.log")
    return [
        "srun",
        "--unbuffered",
        f"--output={log}",
        "--kill-on-bad-exit=1",
        "--open-mode=append",
        *([] if spec.slurm.container else [f"--chdir={spec.workdir}"]),
        *container_args(spec, run_dir),
        *spec.slurm.srun_args,
        inner[0],
        "-m",
        "launcher.slurm_env",
        "--",
        *inner,
    ]


def task_env(spec: JobSpec, run_dir: Path) -> dict[str, str]:
    # Loader picks are made inside each task from the hardware it got (slurm_env).
    return job_env(spec, run_dir=run_dir, picks=None)


def check(spec: JobSpec, config_file: str | None) -> None:
    if spec.slurm.container and spec.entrypoint.kind == "callable":
        raise ConfigError(
            "a container runs script or built-in-trainer entrypoints (requeue is decided on "
            "the host); run callables without slurm.container",
            file=config_file,
            key="slurm.container",
        )


class SlurmBackend:
    name = "slurm"

    def plan(self, spec: JobSpec, *, run_id: str, run_dir: Path, config_file: str | None) -> Plan:
        check(spec, config_file)
        params = executor_params(spec)
        folder = run_dir / "slurm"
        script = render_sbatch(submitit_command(folder, step_mode(spec)), folder, params)
        env = task_env(spec, run_dir)
        payload = {
            "params": params,
            "folder": str(folder),
            "env": env,
            "step": step_argv(spec, run_dir) if step_mode(spec) else None,
        }
        return Plan(
            self.name,
            spec,
            run_id,
            run_dir,
            _render_text(spec, run_dir, script, payload),
            payload,
            config_file,
            {"script": script},
        )

    def submit(self, plan: Plan, *, foreground: bool = False) -> int:
        prepare_run_dir(plan)
        executor = _executor(Path(plan.payload["folder"]), plan.spec, plan.payload["params"])
        job = _submit_or_fail(executor, task_for(plan))
        _mark_submitted(plan, job.job_id, plan.payload["folder"])
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
                _apply_state(run_dir, record, states[job_id])

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


def _render_text(spec: JobSpec, run_dir: Path, script: str, payload: dict[str, Any]) -> str:
    lines = [
        "# launcher plan (slurm backend): nothing has been submitted",
        f"# run dir: {run_dir}",
        f"# {spec.resources.nodes} node(s) x {spec.resources.tasks_per_node} task(s); "
        f"entrypoint: {spec.entrypoint.kind}; submitted through submitit",
        "# ---- sbatch script ----",
        script.rstrip("\n"),
        "# ---- end of sbatch script ----",
        "# the pickled task runs with this environment:",
        *(f"export {k}={shlex.quote(v)}" for k, v in payload["env"].items()),
    ]
    if payload["step"]:
        lines += [
            "# and starts this job step from the batch shell (first node); it forwards "
            f"{USR_SIG} to the ranks and requeues (at most {spec.slurm.max_requeue} times):",
            "MASTER_ADDR=$SLURMD_NODENAME MASTER_PORT=<free port> " + shlex.join(payload["step"]),
            "# every task sets RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID "
            "WORLD_SIZE=$SLURM_NTASKS LOCAL_WORLD_SIZE and keeps SLURM_*",
        ]
    else:
        lines.append(
            f"# every task calls {spec.entrypoint.callable}(spec) with RANK, "
            "WORLD_SIZE, MASTER_ADDR, MASTER_PORT exported"
        )
    return "\n".join(lines)


def prepare_run_dir(plan: Plan) -> None:
    run_dir = plan.run_dir
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    runs.atomic_write_text(run_dir / runs.CONFIG, config.dump(plan.spec))
    runs.atomic_write_text(run_dir / "sbatch.sh", plan.extra["script"])
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


def task_for(plan: Plan):
    """The submitit callable for a plan: the host-side step, or the callable in every task."""
    from launcher.slurm_task import CallableTask, StepTask

    spec, env = plan.spec, plan.payload["env"]
    if plan.payload["step"]:
        grace = max(10, spec.slurm.signal_delay_s - 10)
        return StepTask(
            plan.payload["step"],
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


def _mark_submitted(plan: Plan, job_id: str, folder: str) -> None:
    runs.update_record(
        plan.run_dir, backend_info={"job_id": job_id, "folder": folder}, submitted_at=runs.now()
    )


def run_slurm_command(argv: list[str]) -> str:
    """Run a Slurm client command; its failure is a one-line BackendError."""
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise BackendError(f"{argv[0]} not found: is this a Slurm login node?") from None
    if out.returncode != 0:
        raise BackendError(f"{shlex.join(argv[:2])} failed: {out.stderr.strip()[:300]}")
    return out.stdout


def cluster_max_array_size() -> int:
    """MaxArraySize from the controller (`scontrol show config`); Slurm's default 1001."""
    for line in run_slurm_command(["scontrol", "show", "config"]).splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "MaxArraySize":
            return int(value.strip())
    return 1001


def query_states(job_ids: list[str]) -> dict[str, dict[str, str]]:
    """One sacct call (plus one squeue, which sees new jobs before sacct) for all jobs."""
    bases = sorted({j.split("_")[0] for j in job_ids})
    states: dict[str, dict[str, str]] = {}
    out = run_slurm_command(["sacct", "-X", "-P", "-n", "-j", ",".join(bases), "-o", SACCT_FIELDS])
    for line in out.splitlines():
        parts = line.split("|")
        if len(parts) >= 6:
            states[parts[0]] = {
                "state": parts[1].split()[0],
                "exit": parts[2],
                "start": parts[3],
                "end": parts[4],
                "nodes": parts[5],
            }
    try:
        queue = run_slurm_command(["squeue", "-h", "-j", ",".join(bases), "-o", "%i|%T"])
    except BackendError:
        queue = ""  # squeue refuses ids it no longer knows; sacct has them
    for line in queue.splitlines():
        job, _, state = line.partition("|")
        if job and (job not in states or states[job]["state"] not in ("CANCELLED",)):
            states.setdefault(job, {"exit": "", "start": "", "end": "", "nodes": ""})
            states[job]["state"] = state.strip()
    return states


def _attempts(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "attempts.jsonl"
    if not path.is_file():
        return []
    events = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    attempts: dict[int, dict[str, Any]] = {}
    for event in events:
        att = attempts.setdefault(
            event["restart"],
            {
                "attempt": event["restart"] + 1,
                "job_id": event.get("job_id"),
                "node": event.get("node"),
            },
        )
        if event["phase"] == "start":
            att["started"] = event["time"]
        elif event["phase"] == "end":
            att["ended"], att["exit_code"] = event["time"], event.get("exit_code")
        elif event["phase"] == "signal":
            att["signalled"] = event["time"]
            att["requeued"] = event.get("requeue", False)
    return [attempts[k] for k in sorted(attempts)]


def first_failure(run_dir: Path) -> dict[str, Any] | None:
    """The rank that failed first (by end time), from the per-task exit files."""
    failures = []
    for path in (run_dir / "exits").glob("rank*.json"):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if data.get("exit_code") not in (0, None):
            failures.append(data)
    return min(failures, key=lambda d: d["ended"]) if failures else None


def _apply_state(run_dir: Path, record: dict[str, Any], info: dict[str, str]) -> None:
    slurm_state = info["state"].rstrip("+")
    changes: dict[str, Any] = {"attempts": _attempts(run_dir), "slurm_state": slurm_state}
    if slurm_state in ACTIVE:
        changes["state"] = "RUNNING" if slurm_state in ("RUNNING", "COMPLETING") else "PENDING"
        if changes["state"] == "RUNNING" and not record.get("started_at"):
            changes["started_at"] = runs.now()
    elif slurm_state == "COMPLETED":
        changes.update(state="COMPLETED", ended_at=record.get("ended_at") or runs.now())
    elif slurm_state.startswith("CANCELLED"):
        changes.update(
            state="CANCELLED",
            ended_at=record.get("ended_at") or runs.now(),
            error=record.get("error") or "cancelled (scancel or preemption without requeue)",
        )
    elif slurm_state in FAILED:
        failure = first_failure(run_dir)
        error = f"Slurm state {slurm_state}, exit {info['exit']}"
        if failure:
            rank = failure["rank"]
            changes["failed_rank"] = rank
            error = (
                f"rank {rank} on {failure['node']} exited with code {failure['exit_code']} "
                f"(log: {run_dir / 'logs' / f'rank{rank}.log'}); {error}"
            )
        changes.update(state="FAILED", ended_at=record.get("ended_at") or runs.now(), error=error)
    runs.update_record(run_dir, **changes)


BACKEND = SlurmBackend()
