"""Sweep points as Slurm job arrays: one sbatch per chunk, each task resolves its own point.

Submitting writes one chunk file (the points' overrides) and one sbatch script per array,
not a run directory per point, so 10,000 points go in within seconds. The script is the
Slurm backend's own submitit script (`render_sbatch`) whose command is
`python -m launcher.sweep.task CHUNK FOLDER`: it builds the task's point from the chunk
file, plans it with the Slurm backend, writes its run directory and record, pickles the
backend's task where submitit's runner looks for it, and runs submitit's runner. A
requeued task finds that pickle (with its checkpointed state) and leaves it alone.
"""

from __future__ import annotations

import shlex
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from launcher import runs
from launcher.backends.slurm.sbatch import check as sbatch_check
from launcher.backends.slurm.sbatch import (
    executor_params,
    render_sbatch,
    step_mode,
    submitit_python,
)
from launcher.backends.slurm.status import cluster_max_array_size
from launcher.errors import BackendError, ConfigError

if TYPE_CHECKING:
    from launcher.sweep.execute import Prepared

FOLDER = "slurm"
SBATCH_TIMEOUT_S = 120


def folder_of(prepared: Prepared) -> Path:
    return prepared.directory / FOLDER


def check(prepared: Prepared) -> dict[str, Any]:
    """Every point must plan on Slurm with the same sbatch parameters (one array script
    serves them all); returns those parameters. Pure: no cluster call."""
    file = prepared.loaded.file
    first: dict[str, Any] | None = None
    seen: set[tuple[int, ...]] = set()
    for point in prepared.points:
        spec = point.spec
        # Points share section objects when their sections are equal: check each kind once.
        key = (id(spec.resources), id(spec.slurm), id(spec.loader), id(spec.entrypoint))
        if key in seen:
            continue
        seen.add(key)
        sbatch_check(spec, file)
        params = executor_params(spec)
        if first is None:
            first = params
            continue
        if params != first:
            differ = sorted(k for k in {*params, *first} if params.get(k) != first.get(k))
            shown = ", ".join(f"{k}: {first.get(k)!r} vs {params.get(k)!r}" for k in differ)
            values = ", ".join(f"{k}={v!r}" for k, v in point.overrides.items())
            raise ConfigError(
                f"sweep point {point.index} ({values}) needs other sbatch settings than "
                f"point 0 ({shown}); one job array runs every point with the same settings",
                file=file,
                key="sweep",
                hint="sweep only keys that leave resources and slurm settings alone",
            )
    return dict(first or {})


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


def render(
    prepared: Prepared, folder: Path, chunk_file: Path, count: int, parallelism: int | None
) -> str:
    """The sbatch script of one array of `count` tasks (pure)."""
    params = dict(prepared.array_params)
    params["array_parallelism"] = parallelism or count
    step = step_mode(prepared.points[0].spec)
    command = task_command(chunk_file, folder, step)
    return render_sbatch(command, folder, params, map_count=count)


def chunks(ids: list[str], size: int) -> list[list[str]]:
    return [ids[i : i + size] for i in range(0, len(ids), size)]


def next_chunk_number(folder: Path) -> int:
    numbers = [int(p.stem.split("-")[1]) for p in folder.glob("chunk-*.json")]
    return max(numbers, default=0) + 1


def submit(
    prepared: Prepared,
    ids: list[str],
    *,
    parallelism: int | None,
    max_array_size: int | None,
    on_submitted: Callable[[str, list[str]], None],
    hold: bool = False,
    test_only: bool = False,
) -> list[str]:
    """sbatch one array per chunk of at most MaxArraySize points (read from the cluster
    when not configured); `on_submitted(array_id, point_ids)` after each. Returns the ids."""
    if not ids:
        return []
    size = max_array_size or cluster_max_array_size()
    folder = folder_of(prepared)
    folder.mkdir(parents=True, exist_ok=True)
    by_id = {p.id: p for p in prepared.points}
    number = next_chunk_number(folder)
    array_ids = []
    for chunk in chunks(ids, size):
        chunk_file = folder / f"chunk-{number}.json"
        runs.atomic_write_json(
            chunk_file,
            {
                "sweep_dir": str(prepared.directory),
                "config_file": prepared.loaded.file,
                "folder": str(folder),
                "base": prepared.loaded.raw,
                "points": [
                    {
                        "id": i,
                        "index": by_id[i].index,
                        "run_id": by_id[i].run_id,
                        "overrides": by_id[i].overrides,
                    }
                    for i in chunk
                ],
            },
        )
        script = folder / f"chunk-{number}.sh"
        runs.atomic_write_text(
            script, render(prepared, folder, chunk_file, len(chunk), parallelism)
        )
        # With a %N limit, arrays run one after another so the limit holds for the sweep.
        after = array_ids[-1] if array_ids and parallelism else None
        array_id = sbatch(script, hold=hold, after=after, test_only=test_only)
        array_ids.append(array_id)
        on_submitted(array_id, chunk)
        number += 1
    return array_ids


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
