"""Pure sbatch rendering: the script submitit writes, built without submitit or a cluster.

`render_sbatch` mirrors `submitit.slurm.slurm._make_sbatch_string` (a test holds them equal),
so `--dry-run` shows the exact script. Everything here is pure: no subprocess, no imports of
submitit or torch. Every value that reaches the script goes through `sbatch_value` (one line,
no control characters) and `shlex.quote`.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any

from launcher.backends.base import SlurmPayload
from launcher.entrypoint import entry_argv, job_env
from launcher.errors import ConfigError
from launcher.image import image_for
from launcher.spec import JobSpec

USR_SIG = "USR2"

# CPUs per GPU task when the config does not say: the main loop plus a few loader workers.
DEFAULT_CPUS_PER_GPU_TASK = 5


def sbatch_value(value: Any) -> str:
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
        "job_name": sbatch_value(spec.name),
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
            params[key] = sbatch_value(value)
    if sl.exclusive:
        params["exclusive"] = True
    setup = list(sl.setup)
    if step_mode(spec):
        # Slurm may send USR2 up to 60 s early, even before python has its handler: ignored
        # then (the host task re-arms it from the job's end time) rather than fatal to bash.
        setup.insert(0, "trap '' USR2")
    if setup:
        params["setup"] = setup
    extra = {k: sbatch_value(v) for k, v in sl.extra.items()}
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
        "launcher.backends.slurm.rank",
        "--",
        *inner,
    ]


def task_env(spec: JobSpec, run_dir: Path) -> dict[str, str]:
    # Loader picks are made inside each task from the hardware it got (rank.py).
    return job_env(spec, run_dir=run_dir, picks=None)


def check(spec: JobSpec, config_file: str | None) -> None:
    if spec.slurm.container and spec.entrypoint.kind == "callable":
        raise ConfigError(
            "a container runs script or built-in-trainer entrypoints (requeue is decided on "
            "the host); run callables without slurm.container",
            file=config_file,
            key="slurm.container",
        )


def render_text(spec: JobSpec, run_dir: Path, payload: SlurmPayload) -> str:
    """The dry-run text: the sbatch script, the task's environment and its srun step."""
    lines = [
        "# launcher plan (slurm backend): nothing has been submitted",
        f"# run dir: {run_dir}",
        f"# {spec.resources.nodes} node(s) x {spec.resources.tasks_per_node} task(s); "
        f"entrypoint: {spec.entrypoint.kind}; submitted through submitit",
        "# ---- sbatch script ----",
        payload.script.rstrip("\n"),
        "# ---- end of sbatch script ----",
        "# the pickled task runs with this environment:",
        *(f"export {k}={shlex.quote(v)}" for k, v in payload.env.items()),
    ]
    if payload.step:
        lines += [
            "# and starts this job step from the batch shell (first node); it forwards "
            f"{USR_SIG} to the ranks and requeues (at most {spec.slurm.max_requeue} times):",
            "MASTER_ADDR=$SLURMD_NODENAME MASTER_PORT=<free port> " + shlex.join(payload.step),
            "# every task sets RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID "
            "WORLD_SIZE=$SLURM_NTASKS LOCAL_WORLD_SIZE and keeps SLURM_*",
        ]
    else:
        lines.append(
            f"# every task calls {spec.entrypoint.callable}(spec) with RANK, "
            "WORLD_SIZE, MASTER_ADDR, MASTER_PORT exported"
        )
    return "\n".join(lines)
