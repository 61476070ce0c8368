"""Pure sbatch rendering: the script submitit writes, built without submitit or a cluster.

`render_sbatch` mirrors `submitit.slurm.slurm._make_sbatch_string` (a test holds them equal),
so `--dry-run` shows the exact script. Everything here is pure: no subprocess, no imports of
submitit or torch.

`check()` is the one gate for what reaches the sbatch script or the srun line, run at plan
time (so `--dry-run` refuses too, and nothing is written or submitted). It refuses, never
rewrites:
- `slurm.extra` keys that are not plain option names (a newline in a key would end its
  `#SBATCH` line and run the rest as shell), and keys for options launcher sets itself:
  from the config (`time`: use `resources.time_min`) or for its own machinery (`signal`,
  `output`, `error`, `open-mode`, `array`, `export`, `container`, `no-requeue`), abbreviations
  included (sbatch accepts `--sig` for `--signal`);
- control characters in any value of the script (name, partition, account, qos, constraint,
  extra values, srun_args, container fields, the run folder), and backslashes in `#SBATCH`
  values (sbatch's own parser drops them, so the value would not arrive intact);
- `%` in the run folder (Slurm expands `%j`, `%t` ... in log paths: the logs would go
  elsewhere and the ranks could not start);
- srun_args for flags launcher sets on the step (`--output`, `--error`, `--open-mode`,
  `--kill-on-bad-exit`, `--chdir`, `--export`, `--container*`, and `-o -e -K -D`);
- NUL bytes in setup lines, arguments and env values (no command line can carry one).
`slurm.setup` lines are shell by design and go in verbatim; only NUL and `#SBATCH` lines
(which sbatch would read as options) are refused there.
"""

from __future__ import annotations

import re
import shlex
import sys
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from launcher.backends.base import SlurmPayload
from launcher.backends.slurm import container
from launcher.entrypoint import (
    entry_argv,
    exit_note,
    job_env,
    lightning_stop,
    stop_grace_s,
    stop_signal,
)
from launcher.errors import ConfigError
from launcher.spec import JobSpec

USR_SIG = "USR2"

# slurm.* keys that are plain `#SBATCH --key=value` settings.
SBATCH_KEYS = ("partition", "account", "qos", "constraint")

# The time limit when the config gives none.
DEFAULT_TIME_MIN = 60

# CPUs per GPU task when the config does not say: the main loop plus a few loader workers.
DEFAULT_CPUS_PER_GPU_TASK = 5


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
    if isinstance(spec.loader.num_workers, int):  # "auto" is measured in the job: no count
        return spec.loader.num_workers + 1
    return DEFAULT_CPUS_PER_GPU_TASK if res.gpus_per_node else 1


def step_mode(spec: JobSpec) -> bool:
    """Every entrypoint (script, callable, built-in trainer) runs as one srun step started
    from the batch shell, so one host task signals the ranks and requeues the job."""
    return True


def executor_params(spec: JobSpec) -> dict[str, Any]:
    """Parameters for SlurmExecutor.update_parameters (Slurm's own names)."""
    res, sl = spec.resources, spec.slurm
    params: dict[str, Any] = {
        "job_name": spec.name,
        "nodes": res.nodes,
        "ntasks_per_node": res.tasks_per_node,
        "cpus_per_task": cpus_per_task(spec),
        # Unset (the schema may allow null): Slurm's runs get an hour.
        "time": getattr(res, "time_min", None) or DEFAULT_TIME_MIN,
        "signal_delay_s": sl.signal_delay_s,
    }
    if res.gpus_per_node:
        params["gpus_per_node"] = res.gpus_per_node
    if res.mem_gb:
        params["mem"] = _mem(res.mem_gb)
    for key in SBATCH_KEYS:
        value = getattr(sl, key)
        if value:
            params[key] = value
    if sl.exclusive:
        params["exclusive"] = True
    setup = list(sl.setup)
    if step_mode(spec):
        # Slurm may send USR2 up to 60 s early, even before python has its handler: ignored
        # then (the host task re-arms it from the job's end time) rather than fatal to bash.
        setup.insert(0, "trap '' USR2")
    if setup:
        params["setup"] = setup
    extra = dict(sl.extra)  # check() refused keys launcher sets itself, `signal` included
    if step_mode(spec):
        params["use_srun"] = False
        # Signal the batch shell (B:), where the host-side task forwards it to the ranks.
        extra["signal"] = f"B:{USR_SIG}@{sl.signal_delay_s}"
    else:
        params["srun_args"] = list(sl.srun_args)
    if extra:
        params["additional_parameters"] = extra
    return params


def grace_s(spec: JobSpec) -> float:
    """Seconds the ranks get to save before the time limit: entrypoint.stop_grace_s, else
    slurm.signal_delay_s - 10 (at least 10)."""
    return stop_grace_s(spec, float(max(10, spec.slurm.signal_delay_s - 10)))


def rank_wrapper(spec: JobSpec) -> list[str]:
    """The per-rank wrapper (rank.py) and its interpreter: launcher's own (the batch shell
    `exec`s it too), never the job's, which needs only what the script imports; inside a
    container, the image's python (the project image has launcher)."""
    python = spec.slurm.container.python if spec.slurm.container else sys.executable
    lightning = (
        ["--stop-ranks=first", "--block-term"] if lightning_stop(spec, slurm_env=True) else []
    )
    return [
        python,
        "-m",
        "launcher.backends.slurm.rank",
        f"--stop-signal={stop_signal(spec, slurm_env=True)}",
        *lightning,
        "--",
    ]


def step_argv(spec: JobSpec, run_dir: Path) -> list[str]:
    """The srun command the batch shell runs: every rank, one log file per rank; with
    slurm.container, the runtime's flags and the rank command inside the image."""
    log = str(run_dir / "logs" / "rank%t.log")
    if spec.slurm.container:
        rendered = container.render(spec, run_dir, task_env(spec, run_dir))
        flags = rendered.srun_flags
        command = container.step_command(
            rendered, entry_argv(spec, rendered.python), rank_wrapper(spec)
        )
    else:
        flags = [f"--chdir={spec.workdir}"]
        command = [*rank_wrapper(spec), *entry_argv(spec, None)]
    return [
        "srun",
        "--unbuffered",
        f"--output={log}",
        "--kill-on-bad-exit=1",
        "--open-mode=append",
        *flags,
        *spec.slurm.srun_args,
        *command,
    ]


def task_env(spec: JobSpec, run_dir: Path) -> dict[str, str]:
    # Loader picks are made inside each task from the hardware it got (rank.py).
    return job_env(spec, run_dir=run_dir, picks=None)


# An sbatch long option as `slurm.extra` may name it (`_` reads as `-`, as in submitit).
OPTION_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")

# sbatch options launcher sets from the config, and the key that sets them: refused in
# `slurm.extra` whenever launcher sets them for this config (one place for each setting).
SET_FROM_CONFIG = {
    "job-name": "name",
    "nodes": "resources.nodes",
    "ntasks-per-node": "resources.procs_per_node",
    "cpus-per-task": "resources.cpus_per_proc",
    "gpus-per-node": "resources.gpus_per_node",
    "mem": "resources.mem_gb",
    "time": "resources.time_min",
    "partition": "slurm.partition",
    "account": "slurm.account",
    "qos": "slurm.qos",
    "constraint": "slurm.constraint",
    "exclusive": "slurm.exclusive",
}
# sbatch options launcher's own machinery needs: always refused in `slurm.extra`.
LAUNCHER_OWNS = {
    "signal": "B:USR2 lets the batch shell checkpoint and requeue; use slurm.signal_delay_s",
    "output": "submitit reads the job's log there",
    "error": "submitit reads the job's log there",
    "open-mode": "append keeps the logs across requeues",
    "array": "sweeps make their own arrays (launcher sweep)",
    "ntasks": "the task count is resources.nodes x resources.procs_per_node",
    "export": "the tasks need the job's environment; use env",
    "container": "requeue is decided outside the container; use slurm.container",
    "no-requeue": "preemption and time limits requeue the job; use slurm.max_requeue: 0",
}
# Full sbatch option names that are also prefixes of a name above (so not abbreviations).
_FULL_SBATCH_NAMES = frozenset({"gpus"})

# srun flags launcher sets on the step (or submitit on its srun line): refused in srun_args.
SRUN_OWNS = {
    "output": "each rank's log is logs/rank<N>.log",
    "error": "each rank's log is logs/rank<N>.log",
    "open-mode": "append keeps the logs across requeues",
    "kill-on-bad-exit": "one failed rank stops the others",
    "chdir": "the tasks start in workdir; set workdir",
    "export": "the tasks need the job's environment; use env",
    "container": "use slurm.container",
}
_SRUN_SHORT = {"o": "output", "e": "error", "K": "kill-on-bad-exit", "D": "chdir"}
# srun's short flags that take no argument: a bundle like `-lK` goes on after them.
_SRUN_NO_ARG = frozenset("EHOQVXZhklsuv")

Problem = tuple[str, str, str | None]  # dotted key, what is wrong, hint


def _shown(text: str, limit: int = 24) -> str:
    """A value as one printable line, for error messages (repr escapes control chars)."""
    return repr(text if len(text) <= limit else text[:limit] + "…")


def _bad_char(text: str, *, only_nul: bool = False) -> str | None:
    for i, c in enumerate(text):
        if c == "\0" or (not only_nul and unicodedata.category(c) in ("Cc", "Cs")):
            return f"{c!r} at position {i}"
    return None


def _value_problem(text: str, *, sbatch: bool) -> str | None:
    """Why `text` cannot go on its one line of the script as data, or None."""
    bad = _bad_char(text)
    if bad:
        return (
            f"control character {bad} (refused, not rewritten): the sbatch script and "
            "its srun line take each value on one line, as data"
        )
    if sbatch and "\\" in text:
        return "a backslash: sbatch's #SBATCH parser drops it, so the value would not arrive"
    return None


def _extra_key_problem(name: str, reserved: dict[str, str]) -> tuple[str, str | None] | None:
    if not OPTION_NAME.fullmatch(name):
        return "not a valid sbatch option name (letters, digits, '-', '_')", None
    option = name.replace("_", "-")
    for owned in sorted(reserved):
        if owned == option or (owned.startswith(option) and option not in _FULL_SBATCH_NAMES):
            if owned == option:
                return f"launcher sets --{owned} itself", reserved[owned]
            return f"--{option} abbreviates --{owned}, which launcher sets itself", reserved[owned]
    return None


def _srun_arg_problem(arg: str) -> tuple[str, str] | None:
    """The launcher-owned srun flag `arg` would override, with why, or None."""
    if arg.startswith("--"):
        name = arg[2:].partition("=")[0]
        if not name:
            return None
        for owned, why in SRUN_OWNS.items():
            if owned.startswith(name) or (owned == "container" and name.startswith(owned)):
                return owned, why
        return None
    if arg.startswith("-") and len(arg) > 1:
        for letter in arg[1:]:
            if letter in _SRUN_SHORT:
                owned = _SRUN_SHORT[letter]
                return owned, SRUN_OWNS[owned]
            if letter not in _SRUN_NO_ARG:
                break  # the rest is this flag's argument
    return None


def problems(spec: JobSpec, run_dir: Path | None = None) -> Iterator[Problem]:
    """Everything that would not reach the sbatch script or the srun line as exactly the
    data it is; one entry per problem, in config order."""
    sl = spec.slurm
    sbatch_values = [("name", spec.name)]
    sbatch_values += [(f"slurm.{k}", getattr(sl, k)) for k in SBATCH_KEYS if getattr(sl, k)]
    params = executor_params(spec)
    reserved = dict(LAUNCHER_OWNS)
    reserved |= {
        option: f"set {key} instead"
        for option, key in SET_FROM_CONFIG.items()
        if params.get(option.replace("-", "_")) not in (None, False)
    }
    seen: dict[str, str] = {}
    for name, value in sl.extra.items():
        key = f"slurm.extra.{name if OPTION_NAME.fullmatch(name) else _shown(name)}"
        bad_key = _extra_key_problem(name, reserved)
        if bad_key:
            yield key, *bad_key
            continue
        option = name.replace("_", "-")
        if option in seen:
            yield key, f"the same option as slurm.extra.{seen[option]} (--{option})", None
        seen[option] = name
        sbatch_values.append((key, value))
    for key, value in sbatch_values:
        message = _value_problem(value, sbatch=True)
        if message:
            yield key, message, None
    folder = str(run_dir or spec.runs_dir)
    for path in dict.fromkeys([spec.runs_dir, folder]):  # the configured one named first
        message = _value_problem(path, sbatch=True)
        if message:
            yield "runs_dir", f"{_shown(path, 60)}: {message}", None
            break
        if "%" in path:
            yield (
                "runs_dir",
                f"{_shown(path, 60)} holds '%': Slurm expands %j, %t ... in log file names, "
                "so the logs would go elsewhere and the tasks could not start",
                "use a folder without '%'",
            )
            break
    for i, line in enumerate(sl.setup):
        bad = _bad_char(line, only_nul=True)
        if bad:
            yield f"slurm.setup[{i}]", f"a NUL byte ({bad}) cannot go in a script", None
        elif any(part.lstrip().startswith("#SBATCH") for part in line.split("\n")):
            yield (
                f"slurm.setup[{i}]",
                "a #SBATCH line here would be read as an sbatch option",
                "use slurm.extra",
            )
    for i, arg in enumerate(sl.srun_args):
        message = _value_problem(arg, sbatch=False)
        if message:
            yield f"slurm.srun_args[{i}]", message, None
            continue
        owned = _srun_arg_problem(arg)
        if owned:
            flag, why = owned
            yield (
                f"slurm.srun_args[{i}]",
                f"{_shown(arg)} overrides --{flag}, which launcher sets on the step",
                why,
            )
    if sl.container:
        c = sl.container
        fields: list[tuple[str, str | None]] = [
            ("image", c.image),
            ("workdir", c.workdir),
            ("python", c.python),
        ]
        fields += [(f"mounts[{i}]", m) for i, m in enumerate(c.mounts)]
        for name, field_value in fields:
            message = _value_problem(field_value or "", sbatch=False)
            if message:
                yield f"slurm.container.{name}", message, None
            elif name.startswith("mounts") and "," in (field_value or ""):
                yield f"slurm.container.{name}", "a ',' would split the mount list", None
        for key, path in (("runs_dir", folder), ("workdir", spec.workdir or "")):
            if "," in path or ":" in path:
                yield key, f"{_shown(path, 60)}: ',' or ':' would break the container mounts", None
    ep = spec.entrypoint
    argv: list[tuple[str, str | None]] = [
        ("entrypoint.script", ep.script),
        ("entrypoint.python", ep.python),
    ]
    argv += [(f"entrypoint.args[{i}]", a) for i, a in enumerate(ep.args)]
    argv += [("workdir", spec.workdir)] + [(f"env.{k}", v) for k, v in spec.env.items()]
    for key, word in argv:
        bad = _bad_char(word or "", only_nul=True)
        if bad:
            yield key, f"a NUL byte ({bad}) cannot be passed to a process", None


def check(spec: JobSpec, config_file: str | None, run_dir: Path | None = None) -> None:
    """Refuse, at plan time, a config whose sbatch script or srun step would not carry
    exactly what it says (see the module docstring); one ConfigError line, nothing written."""
    for key, message, hint in problems(spec, run_dir):
        raise ConfigError(message, file=config_file, key=key, hint=hint)
    grace = spec.entrypoint.stop_grace_s
    if grace is not None and spec.slurm.signal_delay_s and grace >= spec.slurm.signal_delay_s:
        raise ConfigError(
            f"{grace:g} s to save is not less than slurm.signal_delay_s "
            f"({spec.slurm.signal_delay_s} s): the time limit would kill the ranks while they save",
            file=config_file,
            key="entrypoint.stop_grace_s",
            hint="raise slurm.signal_delay_s or lower entrypoint.stop_grace_s",
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
        *([f"# {container.describe(spec)}"] if spec.slurm.container else []),
    ]
    return "\n".join(lines + task_lines(spec, payload))


def task_lines(spec: JobSpec, payload: SlurmPayload) -> list[str]:
    """The dry-run lines of what the pickled task does: its environment, the srun step it
    starts, the stop its ranks get (a run's plan and a sweep's array task show the same)."""
    sig = stop_signal(spec, slurm_env=True)
    who = (
        "global rank 0 gets SIGUSR1 (Lightning's handler saves hpc_ckpt; Slurm's TERM is "
        "blocked in the ranks)"
        if lightning_stop(spec, slurm_env=True)
        else f"every rank gets SIG{sig}"
    )
    lines = [
        "# the pickled task runs with this environment:",
        *(f"export {k}={shlex.quote(v)}" for k, v in payload.env.items()),
        "# and starts this job step from the batch shell (first node). Before preemption and "
        f"the time limit {who}",
        f"# and {grace_s(spec):g} s to save (preemption: the partition's "
        f"GraceTime); then the job is requeued, at most {spec.slurm.max_requeue} times:",
        "MASTER_ADDR=$SLURMD_NODENAME MASTER_PORT=<free port> " + shlex.join(payload.step or []),
        "# every task sets RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID "
        "WORLD_SIZE=$SLURM_NTASKS LOCAL_WORLD_SIZE and keeps SLURM_*; "
        "<run dir>/bin/scontrol turns its `scontrol requeue` into a request to the host task",
    ]
    note = exit_note(entry_argv(spec, None))
    if note:
        lines.append(f"# and in every task {note}")
    return lines
