"""Preflight against the real local Slurm cluster: each mistake is caught before anything is
submitted (no job in squeue, no run folder), with its one line naming the key and the fix.

The checks ask the cluster itself (sinfo, sbatch --test-only, the controller's accounts and
config), so each case here is the cluster's real answer, not a canned one.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from launcher import config, runs
from launcher.backends.base import Check
from launcher.backends.slurm import preflight as slurm_preflight
from launcher.backends.slurm.backend import BACKEND
from launcher.preflight import PreflightFailed, gate
from tests.slurm_helpers import require_cluster

pytestmark = pytest.mark.slurm


@pytest.fixture(scope="module", autouse=True)
def _cluster() -> None:
    require_cluster()


def _job(tmp_path: Path, name: str, extra: str = "") -> Path:
    (tmp_path / "train.py").write_text("print('hello')\n")
    (tmp_path / "pkg").mkdir(exist_ok=True)
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "entry.py").write_text("def main(spec):\n    return 0\n")
    path = tmp_path / "job.yaml"
    path.write_text(
        textwrap.dedent(
            f"""\
            name: {name}
            backend: slurm
            runs_dir: {tmp_path / "runs"}
            workdir: .
            entrypoint:
              script: train.py
            resources:
              nodes: 1
              time_min: 5
            """
        )
        + extra
    )
    return path


def _plan(path: Path, overrides: list[str]):
    loaded = config.load(str(path), overrides)
    run_id = runs.new_run_id()
    run_dir = runs.run_dir_for(loaded.spec.runs_dir, loaded.spec.name, run_id)
    return BACKEND.plan(loaded.spec, run_id=run_id, run_dir=run_dir, config_file=loaded.file)


def _queued(name: str) -> list[str]:
    out = subprocess.run(
        ["squeue", "-h", "-n", name, "-o", "%i"], capture_output=True, text=True, timeout=20
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def _caught(plan, checks: list[Check]) -> Check:
    """The first failure, after proving the gate refuses with its line and nothing exists."""
    failures = [c for c in checks if c.status == "fail"]
    assert failures, [c.line() for c in checks]
    with pytest.raises(PreflightFailed) as info:
        gate(checks)
    assert str(info.value).startswith(failures[0].line())
    assert "\n" not in str(info.value)
    assert not Path(plan.run_dir).exists()
    assert _queued(plan.spec.name) == []
    return failures[0]


def _max_time_partition() -> tuple[str, float] | None:
    out = subprocess.run(
        ["sinfo", "-h", "-o", "%R|%l"], capture_output=True, text=True, timeout=20
    ).stdout
    for line in out.splitlines():
        name, _, limit = line.partition("|")
        minutes = slurm_preflight.parse_time_min(limit)
        if minutes != float("inf"):
            return name, minutes
    return None


# (id, overrides, points, key of the failure, words its line must hold)
MISTAKES = [
    (
        "partition-typo",
        ["slurm.partition=hihg"],
        1,
        "slurm.partition",
        ["no partition 'hihg'", "did you mean 'high'"],
    ),
    ("too-many-nodes", ["resources.nodes=3"], 1, "resources.nodes", ["3 nodes asked", "has 2"]),
    (
        "cpus-per-proc-over-node",
        ["resources.cpus_per_proc=8"],
        1,
        "resources.cpus_per_proc",
        ["8 CPUs per node", "has 4"],
    ),
    (
        "procs-per-node-over-node",
        ["resources.procs_per_node=6"],
        1,
        "resources.procs_per_node",
        ["6 task(s) x 1 CPUs", "has 4"],
    ),
    (
        "loader-workers-make-tasks-too-big",
        ["loader.num_workers=7"],
        1,
        "resources.procs_per_node",
        ["8 CPUs per node", "loader.num_workers + 1"],
    ),
    ("mem-over-node", ["resources.mem_gb=6"], 1, "resources.mem_gb", ["6 GB per node", "4000 MB"]),
    (
        "gpus-on-cpu-cluster",
        ["resources.gpus_per_node=1", "resources.cpus_per_proc=1"],
        1,
        "resources.gpus_per_node",
        ["1 GPU(s) per node", "have none"],
    ),
    (
        "account-missing",
        ["slurm.account=rooot"],
        1,
        "slurm.account",
        ["no account 'rooot'", "did you mean 'root'"],
    ),
    (
        "qos-missing",
        ["slurm.qos=normall"],
        1,
        "slurm.qos",
        ["no QOS 'normall'", "did you mean 'normal'"],
    ),
    (
        "constraint-no-node-has",
        ["slurm.constraint=bigmem"],
        1,
        "slurm.constraint",
        ["sbatch --test-only", "Invalid feature specification"],
    ),
    (
        "extra-names-missing-node",
        ["slurm.extra.nodelist=node9"],
        1,
        "slurm",
        ["the cluster refuses this job", "Invalid node name specified"],
    ),
    (
        "array-size-over-cluster",
        ["slurm.max_array_size=5000"],
        20,
        "slurm.max_array_size",
        ["5000 is over the cluster's MaxArraySize"],
    ),
    (
        "sweep-over-max-job-count",
        [],
        50_000,
        "sweep",
        ["50000 points", "MaxJobCount"],
    ),
    (
        "interpreter-missing",
        ["entrypoint.python=/opt/nowhere/bin/python3"],
        1,
        "entrypoint.python",
        ["'/opt/nowhere/bin/python3' does not exist"],
    ),
    (
        "callable-function-missing",
        ["entrypoint.script=null", "entrypoint.callable=pkg.entry:mian"],
        1,
        "entrypoint.callable",
        ["defines no 'mian'", "did you mean 'main'"],
    ),
]


@pytest.mark.parametrize(
    "overrides,points,key,words", [m[1:] for m in MISTAKES], ids=[m[0] for m in MISTAKES]
)
def test_each_slurm_mistake_is_caught_before_submit(tmp_path, overrides, points, key, words):
    name = f"pf-{tmp_path.name}"[:60]
    plan = _plan(_job(tmp_path, name), overrides)
    failure = _caught(plan, slurm_preflight.preflight(plan, points=points))
    assert failure.key == key, failure.line()
    line = failure.line()
    assert line.startswith(f"{tmp_path / 'job.yaml'}: {key}: ")
    for word in words:
        assert word in line, line


@pytest.fixture
def max_time_partition():
    """A partition with a MaxTime: slurm/start.sh's when it has one, else one made for this
    test with `scontrol create` (the controller's memory only; no restart) and deleted after."""
    found = _max_time_partition()
    if found is not None:
        yield found
        return
    name = f"lpf_short_{os.getpid()}"
    made = subprocess.run(
        ["scontrol", "create", f"PartitionName={name}", "Nodes=ALL", "MaxTime=10", "State=UP"],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert made.returncode == 0, made.stderr
    try:
        yield name, 10.0
    finally:
        subprocess.run(
            ["scontrol", "delete", f"PartitionName={name}"], capture_output=True, timeout=20
        )


def test_a_time_limit_over_the_partitions_max_time_is_caught(tmp_path, max_time_partition):
    partition, minutes = max_time_partition
    name = f"pf-{tmp_path.name}"[:60]
    over = int(minutes) + 1
    plan = _plan(
        _job(tmp_path, name), [f"slurm.partition={partition}", f"resources.time_min={over}"]
    )
    failure = _caught(plan, slurm_preflight.preflight(plan))
    assert failure.key == "resources.time_min"
    line = failure.line()
    assert f"{over} min is over partition {partition}'s MaxTime of {minutes:g} min" in line
    assert f"at most {int(minutes)}" in line
    # Within the limit, the same partition passes, with sbatch --test-only's agreement.
    plan = _plan(_job(tmp_path, name), [f"slurm.partition={partition}", "resources.time_min=5"])
    checks = slurm_preflight.preflight(plan)
    assert [c.line() for c in checks if c.status == "fail"] == []


def test_an_unreachable_controller_is_one_line(tmp_path):
    conf = Path(os.environ.get("SLURM_CONF") or "/etc/slurm/slurm.conf").read_text()
    bad = tmp_path / "slurm.conf"
    bad.write_text(
        "\n".join(
            "SlurmctldPort=1" if line.startswith("SlurmctldPort=") else line
            for line in conf.splitlines()
        )
    )
    name = f"pf-{tmp_path.name}"[:60]
    plan = _plan(_job(tmp_path, name), [])
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(bad)
    try:
        checks = slurm_preflight.preflight(plan)
    finally:
        if old is None:
            del os.environ["SLURM_CONF"]
        else:
            os.environ["SLURM_CONF"] = old
    failure = _caught(plan, checks)
    assert failure.name == "slurm.controller"
    assert "did not answer sinfo" in failure.line() and "scontrol ping" in failure.line()


@pytest.mark.parametrize("runtime", ["apptainer", "pyxis"])
def test_a_container_runtime_that_is_not_here_is_caught(tmp_path, runtime):
    from launcher.spec import ContainerSpec

    if "runtime" not in {f.name for f in ContainerSpec.__dataclass_fields__.values()}:
        if runtime != "pyxis":
            pytest.skip("this launcher has only the pyxis runtime")
        extra = "slurm:\n  container:\n    image: /nonexistent/image.sqsh\n"
    else:
        extra = f"slurm:\n  container:\n    runtime: {runtime}\n    image: launcher-test:x\n"
    name = f"pf-{tmp_path.name}"[:60]
    plan = _plan(_job(tmp_path, name, extra), [])
    failure = _caught(plan, slurm_preflight.preflight(plan))
    assert failure.key.startswith("slurm.container"), failure.line()


def test_a_good_job_passes_with_the_clusters_own_answer(tmp_path):
    name = f"pf-{tmp_path.name}"[:60]
    plan = _plan(_job(tmp_path, name), ["resources.nodes=2", "resources.procs_per_node=2"])
    checks = slurm_preflight.preflight(plan)
    assert [c.line() for c in checks if c.status == "fail"] == []
    said = {c.name: c for c in checks}
    assert "to start at" in said["slurm.sbatch"].found  # sbatch --test-only's own answer
    assert said["slurm.node_fit"].status == "ok"
    # Every node is this machine here, so a local run folder is no reason to warn.
    assert said["slurm.shared_fs"].status == "ok"
    assert _queued(name) == [] and not Path(plan.run_dir).exists()


def test_a_1000_point_sweep_is_checked_as_arrays_with_a_few_calls(tmp_path):
    name = f"pf-{tmp_path.name}"[:60]
    plan = _plan(_job(tmp_path, name), [])
    checks = slurm_preflight.preflight(plan, points=1000)
    assert [c.line() for c in checks if c.status == "fail"] == []
    arrays = next(c for c in checks if c.name == "slurm.array_size")
    assert "1000 points in 1 array(s)" in arrays.found
    assert _queued(name) == []


def test_the_cli_refuses_before_submit_and_writes_nothing(tmp_path):
    """`launcher run` end to end: exit 2, one line, no job, no run folder."""
    if not hasattr(BACKEND, "preflight"):
        # Without the method the CLI runs only the job checks and this would reach sbatch.
        pytest.skip("SlurmBackend.preflight is not wired to slurm/preflight.py yet")
    name = f"pf-{tmp_path.name}"[:60]
    path = _job(tmp_path, name)
    out = subprocess.run(
        [sys.executable, "-m", "launcher", "run", str(path), "slurm.partition=hihg"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "slurm.partition: no partition 'hihg'" in lines[0], lines
    assert not (tmp_path / "runs").exists()
    assert _queued(name) == []


def test_a_sweep_submit_is_refused_before_any_array_is_queued(tmp_path):
    if not hasattr(BACKEND, "preflight"):
        pytest.skip("SlurmBackend.preflight is not wired to slurm/preflight.py yet")
    name = f"pf-{tmp_path.name}"[:60]
    path = _job(tmp_path, name, "sweep:\n  grid:\n    train.seed: [1, 2, 3]\n")
    out = subprocess.run(
        [sys.executable, "-m", "launcher", "sweep", str(path), "resources.mem_gb=64"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2, out.stderr
    assert "resources.mem_gb: 64 GB per node" in out.stderr
    assert not list((tmp_path / "runs").rglob("sweep.json"))
    assert not list((tmp_path / "runs").rglob("chunk-*"))
    assert _queued(name) == []
