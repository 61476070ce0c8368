"""Latency preflight adds to a Slurm submit: `launcher run ... backend=slurm` and a 1,000-point
sweep, median of N, with and without preflight, side by side. Target: at most 0.1 s added.

    python bench/preflight_latency.py [--repeat 7] [--points 1000]

Needs the local cluster (bash slurm/start.sh). Single runs are real submissions that cannot
start (queued with `--begin=now+1hour`, cancelled at once). Sweep arrays go through
`sbatch --test-only`, the same controller round trip without a job: a cancelled 1,000-task
array keeps 1,000 job records for MinJobAge, and a few repeats would fill MaxJobCount.
Each repeat measures with and without preflight back to back (order alternating), so load
on the machine hits both columns alike. Also prints the preflight call alone.
"""

from __future__ import annotations

import argparse
import io
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from launcher import config, preflight, runs  # noqa: E402
from launcher.backends.slurm import preflight as slurm_preflight  # noqa: E402
from launcher.backends.slurm.backend import BACKEND  # noqa: E402
from launcher.sweep import execute, plan  # noqa: E402


class _WithPreflight:
    """The Slurm backend, with its preflight for a launcher whose backend has not wired it."""

    def __init__(self, backend: Any) -> None:
        self._backend = backend

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)

    def preflight(self, plan_: Any, *, points: int = 1) -> list[Any]:
        return slurm_preflight.preflight(plan_, points=points)


BACKEND_WITH = BACKEND if hasattr(BACKEND, "preflight") else _WithPreflight(BACKEND)


def _config(folder: Path, points: int) -> Path:
    (folder / "train.py").write_text("print('never runs')\n")
    path = folder / "job.yaml"
    path.write_text(
        f"""name: pf-bench
backend: slurm
workdir: .
runs_dir: {folder / "runs"}
entrypoint:
  script: train.py
resources:
  nodes: 1
  time_min: 5
slurm:
  extra:
    begin: now+1hour
sweep:
  grid:
    train.seed: {list(range(points))}
"""
    )
    return path


def _cancel(job_ids: list[str]) -> None:
    if job_ids:
        subprocess.run(["scancel", *job_ids], check=False, capture_output=True, timeout=60)


def one_run(path: Path, with_preflight: bool) -> float:
    """plan -> [preflight] -> submit, as `launcher run` does; returns seconds."""
    start = time.perf_counter()
    loaded = config.load(str(path), ["sweep=null"])
    run_id = runs.new_run_id()
    run_dir = runs.run_dir_for(loaded.spec.runs_dir, loaded.spec.name, run_id)
    the_plan = BACKEND.plan(loaded.spec, run_id=run_id, run_dir=run_dir, config_file=loaded.file)
    if with_preflight:
        preflight.before_submit(BACKEND_WITH, the_plan, err=io.StringIO())
    sys.stdout, saved = io.StringIO(), sys.stdout
    try:
        BACKEND.submit(the_plan, foreground=False)
    finally:
        sys.stdout = saved
    took = time.perf_counter() - start
    _cancel([runs.read_record(run_dir)["backend_info"]["job_id"]])
    return took


def one_cli_run(path: Path, with_preflight: bool) -> float:
    """`launcher run CONFIG` as a user types it (a fresh interpreter each time)."""
    argv = [sys.executable, "-m", "launcher", "run", str(path), "sweep=null", "--detach"]
    if not with_preflight:
        argv.append("--no-preflight")
    start = time.perf_counter()
    out = subprocess.run(argv, cwd=path.parent, capture_output=True, text=True, timeout=300)
    took = time.perf_counter() - start
    if out.returncode != 0:
        raise SystemExit(f"launcher run failed: {out.stderr.strip()}")
    _cancel(re.findall(r"submitted Slurm job (\d+)", out.stdout))
    return took


def one_sweep(path: Path, with_preflight: bool) -> float:
    """A whole sweep submit (load, expand, plan, [preflight], sbatch the arrays)."""
    start = time.perf_counter()
    prepared = plan.prepare(str(path), [f"runs_dir={path.parent / 'runs' / str(time.time_ns())}"])
    prepared.backend = BACKEND_WITH  # type: ignore[assignment]
    opts = execute.Options(test_only=True, preflight=with_preflight, err=io.StringIO())
    execute.run(prepared, opts)
    return time.perf_counter() - start


def preflight_alone(path: Path, points: int) -> float:
    loaded = config.load(str(path), ["sweep=null"])
    run_id = runs.new_run_id()
    run_dir = runs.run_dir_for(loaded.spec.runs_dir, loaded.spec.name, run_id)
    the_plan = BACKEND.plan(loaded.spec, run_id=run_id, run_dir=run_dir, config_file=loaded.file)
    start = time.perf_counter()
    preflight.before_submit(BACKEND_WITH, the_plan, points=points, err=io.StringIO())
    return time.perf_counter() - start


def paired(fn, path: Path, repeat: int) -> tuple[float, float]:
    with_, without = [], []
    for i in range(repeat):
        order = (True, False) if i % 2 == 0 else (False, True)
        for flag in order:
            (with_ if flag else without).append(fn(path, flag))
    return statistics.median(without), statistics.median(with_)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--points", type=int, default=1000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pf-bench-") as tmp:
        path = _config(Path(tmp), args.points)
        one_run(path, True)  # warm: imports, the controller's caches
        alone_run = statistics.median(preflight_alone(path, 1) for _ in range(args.repeat))
        alone_sweep = statistics.median(
            preflight_alone(path, args.points) for _ in range(args.repeat)
        )
        run_without, run_with = paired(one_run, path, args.repeat)
        cli_without, cli_with = paired(one_cli_run, path, args.repeat)
        sweep_without, sweep_with = paired(one_sweep, path, args.repeat)
    if not hasattr(BACKEND, "preflight"):
        print(
            "note: SlurmBackend.preflight is not wired: the command's 'with' runs job checks only"
        )
    print(f"median of {args.repeat}, seconds        without   with   added")
    print(
        f"launcher run backend=slurm        {run_without:7.3f} {run_with:7.3f} "
        f"{run_with - run_without:+7.3f}"
    )
    print(
        f"  same, as a command (new python)  {cli_without:7.3f} {cli_with:7.3f} "
        f"{cli_with - cli_without:+7.3f}"
    )
    print(
        f"{args.points}-point sweep submit        {sweep_without:7.3f} {sweep_with:7.3f} "
        f"{sweep_with - sweep_without:+7.3f}"
    )
    print(
        f"preflight call alone: run {alone_run:.3f} s, "
        f"{args.points}-point sweep {alone_sweep:.3f} s"
    )


if __name__ == "__main__":
    main()
