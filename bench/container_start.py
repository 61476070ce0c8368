"""What the training image costs on Slurm (runtime oci, the local cluster).

  python3 bench/container_start.py --image launcher-test:TAG [--repeat 5]

Prints, as one JSON object and a table:
- the conversion (docker export into a rootfs) into an empty cache, then the cached lookup;
- per-rank start: from `srun` being started to the first line of Python in each rank, on the
  host and inside the container (guard, image's venv python), 2 nodes x 1 task, median of
  `--repeat` runs; all steps run in one allocation (salloc), so no queue wait is counted;
- the whole quickstart (examples/quickstart_ddp.py, 30 steps, 2 nodes, gloo) on the host and in
  the container, median wall seconds.
apptainer and enroot conversions are timed too when those tools are installed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from launcher import config  # noqa: E402
from launcher.backends.slurm import container as C  # noqa: E402
from launcher.entrypoint import entry_argv, job_env  # noqa: E402
from launcher.spec import ContainerSpec, JobSpec  # noqa: E402


def _spec(runtime: str, image: str, runs: Path) -> JobSpec:
    spec = config.load(
        ROOT / "configs" / "slurm-2nodes.yaml", [f"workdir={ROOT}", f"runs_dir={runs}"]
    ).spec
    ctr = ContainerSpec(runtime=runtime, image=image)
    return dataclasses.replace(spec, slurm=dataclasses.replace(spec.slurm, container=ctr))


def _srun(argv: list[str], run_dir: Path, env: dict[str, str]) -> float:
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    full = {**os.environ, **env, "MASTER_PORT": str(23000 + os.getpid() % 5000)}
    t0 = time.time()
    subprocess.run(
        [
            "srun",
            "-N2",
            "--ntasks-per-node=1",
            f"--output={run_dir}/logs/rank%t.log",
            *argv,
        ],
        env=full,
        check=True,
        capture_output=True,
        timeout=600,
    )
    return t0


def _first_lines(run_dir: Path, t0: float) -> list[float]:
    starts = []
    for log in sorted((run_dir / "logs").glob("rank*.log")):
        stamps = [line for line in log.read_text().splitlines() if line.startswith("T=")]
        starts.append(float(stamps[-1][2:]) - t0)
    return starts


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--image", required=True, help="a docker image tag `launcher build` made")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    if not os.environ.get("SLURM_JOB_ID"):
        # Every step in one allocation: a queue wait (the cluster is shared) is no start cost.
        argv = ["salloc", "-N2", "--ntasks-per-node=1", "-p", "debug", "--exclusive"]
        return subprocess.call([*argv, sys.executable, *sys.argv])
    work = Path(tempfile.mkdtemp(prefix="container-bench-"))
    out: dict[str, object] = {"image": args.image, "repeat": args.repeat}
    try:
        cache = work / "cache"
        spec = _spec("oci", args.image, work / "runs")
        first = C.prepare_image(spec, cache)
        again = C.prepare_image(spec, cache)
        size = subprocess.run(
            ["du", "-sm", str(first.artifact.rootfs)], capture_output=True, text=True
        ).stdout.split()[0]
        out["oci_convert_first_s"] = round(first.seconds, 2)
        out["oci_convert_cached_s"] = round(again.seconds, 4)
        out["oci_rootfs_mb"] = int(size)
        for runtime in ("apptainer", "pyxis"):
            tool = C.CONVERT_TOOLS[runtime][0]
            if shutil.which(tool) is None:
                out[f"{runtime}_convert"] = f"not run: `{tool}` is not installed here"
                continue
            s = _spec(runtime, args.image, work / "runs")
            a, b = C.prepare_image(s, cache), C.prepare_image(s, cache)
            out[f"{runtime}_convert_first_s"] = round(a.seconds, 2)
            out[f"{runtime}_convert_cached_s"] = round(b.seconds, 4)

        probe = ["-c", "import time; print(f'T={time.time()}')"]
        host_py = sys.executable
        results: dict[str, list[float]] = {k: [] for k in ("host_start", "oci_start")}
        walls: dict[str, list[float]] = {k: [] for k in ("host_quickstart", "oci_quickstart")}
        for i in range(args.repeat):
            run = work / "runs" / f"host-{i}"
            t0 = _srun([host_py, *probe], run, {})
            results["host_start"] += _first_lines(run, t0)

            run = work / "runs" / f"oci-{i}"
            env = job_env(spec, run_dir=run, picks=None)
            r = C.render(spec, run, env, cache)
            C.write_run_files(r, run)
            t0 = _srun([*r.srun_flags, *r.prefix, r.python, *probe], run, env)
            results["oci_start"] += _first_lines(run, t0)

            run = work / "runs" / f"host-q{i}"
            env = job_env(spec, run_dir=run, picks=None)
            inner = entry_argv(spec, host_py)
            t0 = time.time()
            _srun(
                [f"--chdir={ROOT}", host_py, "-m", "launcher.backends.slurm.rank", "--", *inner],
                run,
                env,
            )
            walls["host_quickstart"].append(time.time() - t0)

            run = work / "runs" / f"oci-q{i}"
            env = job_env(spec, run_dir=run, picks=None)
            r = C.render(spec, run, env, cache)
            C.write_run_files(r, run)
            t0 = time.time()
            _srun([*r.srun_flags, *C.step_command(r, entry_argv(spec, r.python))], run, env)
            walls["oci_quickstart"].append(time.time() - t0)
        for key, values in {**results, **walls}.items():
            out[f"{key}_median_s"] = round(statistics.median(values), 3)
            out[f"{key}_max_s"] = round(max(values), 3)
        out["start_overhead_per_rank_s"] = round(
            statistics.median(results["oci_start"]) - statistics.median(results["host_start"]), 3
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(out, indent=1))
    print()
    print(f"{'':28} {'host':>8} {'oci container':>14}")
    print(
        f"{'rank start (median s)':28} {out['host_start_median_s']:>8} "
        f"{out['oci_start_median_s']:>14}"
    )
    print(
        f"{'quickstart 2x1 (median s)':28} {out['host_quickstart_median_s']:>8} "
        f"{out['oci_quickstart_median_s']:>14}"
    )
    print(
        f"conversion (oci): first {out['oci_convert_first_s']} s, "
        f"cached {out['oci_convert_cached_s']} s, rootfs {out['oci_rootfs_mb']} MB"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
