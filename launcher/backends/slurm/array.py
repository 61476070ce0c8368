"""Sweep points as Slurm job arrays: one sbatch per chunk, each task resolves its own point.

The Slurm backend's `array` capability (`launcher.backends.base.ArrayBackend`). It takes
points (id, index, run id, swept overrides), the base raw config and the sweep folder, and
knows nothing else of sweeps. Submitting writes one chunk file (the points' overrides) and
one sbatch script per array, not a run directory per point, so 10,000 points go in within
seconds. The script is the Slurm backend's own submitit script (`render_sbatch`) whose
command is `python -m launcher.sweep.task CHUNK FOLDER`: it builds the task's point from the
chunk file, plans it with the Slurm backend, writes its run directory and record, pickles
the backend's task where submitit's runner looks for it, and runs submitit's runner. A
requeued task finds that pickle (with its checkpointed state) and leaves it alone.
"""

from __future__ import annotations

import shlex
import subprocess
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypedDict

from launcher import runs
from launcher.backends.base import Plan
from launcher.backends.slurm import status
from launcher.backends.slurm.sbatch import check as sbatch_check
from launcher.backends.slurm.sbatch import (
    executor_params,
    render_sbatch,
    step_mode,
    submitit_python,
    task_lines,
)
from launcher.errors import BackendError, ConfigError
from launcher.spec import JobSpec

FOLDER = "slurm"
SBATCH_TIMEOUT_S = 120


class ChunkPoint(TypedDict):
    """One task of an array, as chunk-N.json stores it (what `launcher.sweep.task` reads)."""

    id: str
    index: int
    run_id: str
    overrides: dict[str, Any]


def folder_of(sweep_dir: Path) -> Path:
    return sweep_dir / FOLDER


def task_command(chunk_file: Path, folder: Path, step: bool) -> str:
    """The array script's command: submitit's, with our task runner in front of its runner
    (`exec` in step mode, as the backend does, so B:USR2 reaches submitit's handler)."""
    return " ".join(
        [
            submitit_python(step),
            "-u -m launcher.sweep.task",
            shlex.quote(str(chunk_file)),
            shlex.quote(str(folder)),
        ]
    )


def render_array(
    spec: JobSpec,
    params: dict[str, Any],
    folder: Path,
    chunk_file: Path,
    count: int,
    parallelism: int | None,
) -> str:
    """The sbatch script of one array of `count` tasks (pure)."""
    params = {**params, "array_parallelism": parallelism or count}
    command = task_command(chunk_file, folder, step_mode(spec))
    return render_sbatch(command, folder, params, map_count=count)


def chunks(ids: Sequence[str], size: int) -> list[list[str]]:
    return [list(ids[i : i + size]) for i in range(0, len(ids), size)]


def next_chunk_number(folder: Path) -> int:
    numbers = [int(p.stem.split("-")[1]) for p in folder.glob("chunk-*.json")]
    return max(numbers, default=0) + 1


class SlurmArrays:
    """`SlurmBackend.array`: sweeps queue their points here as chunked job arrays."""

    def check_points(
        self,
        specs: Sequence[JobSpec],
        config_file: str | None,
        describe: Callable[[int], str] | None = None,
    ) -> dict[str, Any]:
        """Every point must plan on Slurm with the same sbatch parameters (one array script
        serves them all); returns those parameters. Pure: no cluster call."""
        name = describe or (lambda i: f"sweep point {i}")
        first: dict[str, Any] | None = None
        seen: set[tuple[int, ...]] = set()
        for i, spec in enumerate(specs):
            # Points share section objects when their sections are equal: check each kind once.
            key = (id(spec.resources), id(spec.slurm), id(spec.loader), id(spec.entrypoint))
            if key in seen:
                continue
            seen.add(key)
            sbatch_check(spec, config_file)
            params = executor_params(spec)
            if first is None:
                first = params
                continue
            if params != first:
                differ = sorted(k for k in {*params, *first} if params.get(k) != first.get(k))
                shown = ", ".join(f"{k}: {first.get(k)!r} vs {params.get(k)!r}" for k in differ)
                raise ConfigError(
                    f"{name(i)} needs other sbatch settings than {name(0)} ({shown}); one "
                    "job array runs every point with the same settings",
                    file=config_file,
                    key="sweep",
                    hint="sweep only keys that leave resources and slurm settings alone",
                )
        return dict(first or {})

    def max_array_size(self, spec: JobSpec, *, ask: bool = True) -> int:
        """slurm.max_array_size, else MaxArraySize from the controller (`ask=False`: Slurm's
        default, without asking)."""
        if spec.slurm.max_array_size:
            return spec.slurm.max_array_size
        return status.cluster_max_array_size() if ask else status.DEFAULT_MAX_ARRAY_SIZE

    def render(
        self,
        sweep_dir: Path,
        ids: Sequence[str],
        *,
        spec: JobSpec,
        params: dict[str, Any],
        parallelism: int | None,
    ) -> str:
        """The arrays these points would go in, each with its script. Reads the folder (for
        the next chunk number) but writes nothing and asks the cluster nothing."""
        size = self.max_array_size(spec, ask=False)
        where = (
            "slurm.max_array_size"
            if spec.slurm.max_array_size
            else "Slurm's default; the cluster's is read at submit"
        )
        groups = chunks(ids, size)
        limit = (
            f"at most {parallelism} tasks at once (each array starts after the one before it ends)"
            if parallelism
            else "no limit on running tasks"
        )
        lines = [
            f"# slurm: {len(ids)} points in {len(groups)} array(s) of at most {size} tasks "
            f"({where}); {limit}"
        ]
        folder = folder_of(sweep_dir)
        first = next_chunk_number(folder) if folder.is_dir() else 1
        for n, group in enumerate(groups):
            chunk_file = folder / f"chunk-{first + n}.json"
            lines.append(
                f"# ---- array {n + 1}/{len(groups)}: {len(group)} points, task i runs point "
                f"i of {chunk_file} ----"
            )
            script = render_array(spec, params, folder, chunk_file, len(group), parallelism)
            lines.append(script.rstrip("\n"))
        return "\n".join(lines)

    def render_task(self, plan: Plan[Any]) -> str:
        """From the plan's payload: the task's environment and the step it starts."""
        return "\n".join(task_lines(plan.spec, plan.payload))

    def submit(
        self,
        sweep_dir: Path,
        points: Sequence[Mapping[str, Any]],
        *,
        base: dict[str, Any],
        config_file: str | None,
        spec: JobSpec,
        params: dict[str, Any],
        parallelism: int | None,
        on_submitted: Callable[[str, list[str]], None],
        hold: bool = False,
        test_only: bool = False,
    ) -> list[str]:
        """sbatch one array per chunk of at most max_array_size points; with a %N limit each
        array waits for the one before it (afterany), so the limit holds for the sweep."""
        if not points:
            return []
        size = self.max_array_size(spec)
        folder = folder_of(sweep_dir)
        folder.mkdir(parents=True, exist_ok=True)
        number = next_chunk_number(folder)
        array_ids: list[str] = []
        for start in range(0, len(points), size):
            chunk: list[ChunkPoint] = [
                {
                    "id": p["id"],
                    "index": p["index"],
                    "run_id": p["run_id"],
                    "overrides": p["overrides"],
                }
                for p in points[start : start + size]
            ]
            chunk_file = folder / f"chunk-{number}.json"
            runs.atomic_write_json(
                chunk_file,
                {
                    "sweep_dir": str(sweep_dir),
                    "config_file": config_file,
                    "folder": str(folder),
                    "base": base,
                    "points": chunk,
                },
            )
            script = folder / f"chunk-{number}.sh"
            runs.atomic_write_text(
                script, render_array(spec, params, folder, chunk_file, len(chunk), parallelism)
            )
            after = array_ids[-1] if array_ids and parallelism else None
            array_id = sbatch(script, hold=hold, after=after, test_only=test_only)
            array_ids.append(array_id)
            on_submitted(array_id, [p["id"] for p in chunk])
            number += 1
        return array_ids

    def task_states(self, task_ids: list[str]) -> dict[str, str]:
        return status.task_states(task_ids)


def sbatch(
    script: Path, *, hold: bool = False, after: str | None = None, test_only: bool = False
) -> str:
    """Submit one array script; returns its job id. `test_only`: the controller checks the
    script and answers when it would start, creating no job (benchmarks); returns ''."""
    argv = ["sbatch", "--test-only"] if test_only else ["sbatch", "--parsable"]
    if hold:
        argv.append("--hold")
    if after and not test_only:
        argv.append(f"--dependency=afterany:{after}")
    argv.append(str(script))
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=SBATCH_TIMEOUT_S)
    except FileNotFoundError:
        raise BackendError("sbatch not found: is this a Slurm login node?") from None
    except subprocess.TimeoutExpired:
        # sbatch keeps retrying while the controller is full (e.g. at MaxJobCount, which
        # counts every array task): give up with the arrays so far recorded.
        raise BackendError(
            f"sbatch did not answer within {SBATCH_TIMEOUT_S} s for {script}; the controller "
            "may be at its MaxJobCount (each array task counts): rerun the sweep later to "
            "submit the rest"
        ) from None
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["no message"])[-1]
        raise BackendError(f"sbatch refused the array ({script}): {last}")
    if test_only:
        return ""
    return out.stdout.strip().split(";")[0]


ARRAYS = SlurmArrays()
