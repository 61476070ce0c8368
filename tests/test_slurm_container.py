"""The training image on Slurm (launcher/backends/slurm/container.py).

Rendering of the three runtimes against stored files (pyxis and Apptainer cannot be installed
here: their rendering is all that is tested), the checks before submission, and, for real on
the local cluster, the `oci` runtime (Slurm's own `srun --container`, runc, the oci.conf that
slurm/start.sh writes): the quickstart on 2 nodes inside the project image, the built-in
trainer preempted inside the container and resumed, and a run whose container did not apply.

The srun step is built here from container.py's pieces (the same ones the Slurm backend will
put on its step line), so these tests run the exact command a submitted job runs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from launcher import config
from launcher.backends.slurm import container as C
from launcher.entrypoint import entry_argv, job_env
from launcher.errors import BackendError, ConfigError
from launcher.spec import ContainerSpec, JobSpec
from tests.conftest import ROOT, launcher_cmd
from tests.slurm_helpers import cluster_up

EXPECTED = Path(__file__).parent / "expected"


def _spec(runtime: str, *overrides: str, image: str | None = None, **container) -> JobSpec:
    spec = config.load(ROOT / "configs" / "slurm-2nodes.yaml", [f"workdir={ROOT}", *overrides]).spec
    ctr = ContainerSpec(runtime=runtime, image=image, **container)
    return dataclasses.replace(spec, slurm=dataclasses.replace(spec.slurm, container=ctr))


def _fake_oci_cache(cache: Path, tag: str) -> None:
    """What the oci conversion leaves: image.json and a rootfs with the venv's python."""
    art = cache / "oci" / C._safe_name(tag)
    (art / "rootfs" / "opt" / "venv" / "bin").mkdir(parents=True)
    (art / "rootfs" / "opt" / "venv" / "bin" / "python3").write_text("")
    env = ["PATH=/opt/venv/bin:/usr/bin:/bin", "VIRTUAL_ENV=/opt/venv", "PYTHONUNBUFFERED=1"]
    (art / "image.json").write_text(json.dumps({"tag": tag, "env": env}))


def _shown(spec: JobSpec, run_dir: Path, cache: Path) -> str:
    """The rendered step (srun line and run files) as stored text, with paths normalised."""
    env = job_env(spec, run_dir=run_dir, picks=None)
    r = C.render(spec, run_dir, env, cache, uid=1000, gid=1000)
    argv = ["srun", *r.srun_flags, *C.step_command(r, entry_argv(spec, r.python))]
    parts = [C.describe(spec, cache), shlex.join(argv)]
    for name in sorted(r.files):
        if name != "guard.sh":  # a constant, tested by running it
            parts.append(f"--- {name}\n{r.files[name].rstrip()}")
    text = "\n".join(parts) + "\n"
    return (
        text.replace(str(run_dir), "<RUN_DIR>")
        .replace(str(cache), "<CACHE>")
        .replace(str(ROOT), "<ROOT>")
    )


# --------------------------------------------------------------------------------------------
# Rendering (pure)


@pytest.mark.parametrize("runtime", C.RUNTIMES)
def test_rendering_matches_the_stored_file(runtime, tmp_path):
    spec = _spec(
        runtime,
        "resources.gpus_per_node=1",
        "env={HF_HOME: /scratch/hf}",
        mounts=("/datasets:/data:ro",),
    )
    cache = tmp_path / "cache"
    if runtime == "oci":
        _fake_oci_cache(cache, C.image_tag(spec))
    text = _shown(spec, tmp_path / "run", cache)
    tag = C.image_tag(spec)
    text = text.replace(tag, "<TAG>").replace(C._safe_name(tag), "<TAG_NAME>")
    expected = EXPECTED / f"container-{runtime}.txt"
    if os.environ.get("LAUNCHER_UPDATE_EXPECTED"):
        expected.write_text(text)
    assert text == expected.read_text()


def test_oci_bundle_keeps_the_hosts_network_and_the_image_read_only(tmp_path):
    spec = _spec("oci")
    cache = tmp_path / "cache"
    _fake_oci_cache(cache, C.image_tag(spec))
    r = C.render(spec, tmp_path / "run", {"PYTHONUNBUFFERED": "1"}, cache, uid=0, gid=0)
    cfg = json.loads(r.files["config.json"])
    assert {n["type"] for n in cfg["linux"]["namespaces"]} == {"pid", "mount"}
    assert cfg["root"]["readonly"] is True
    assert cfg["process"]["cwd"] == str(ROOT)
    binds = {m["destination"]: m["source"] for m in cfg["mounts"] if m["type"] == "bind"}
    assert binds[str(tmp_path / "run")] == str(tmp_path / "run")
    assert binds["/etc/hosts"] == "/etc/hosts"
    # The venv's python, found along the image's PATH in the rootfs; the image's variables
    # are put back in front of the command, except those the job sets itself.
    assert r.python == "/opt/venv/bin/python3"
    assert "VIRTUAL_ENV=/opt/venv" in r.prefix
    assert not [a for a in r.prefix if a.startswith("PYTHONUNBUFFERED=")]
    # A non-root user gets a user namespace mapping its own id (rootless runc/crun).
    cfg = json.loads(
        C.render(spec, tmp_path / "r2", {}, cache, uid=1234, gid=99).files["config.json"]
    )
    assert cfg["linux"]["uidMappings"] == [{"containerID": 1234, "hostID": 1234, "size": 1}]


def test_unknown_runtime_is_one_line(tmp_path):
    out = launcher_cmd(
        "run", "configs/slurm-2nodes.yaml", "slurm.container={runtime: podman}", "--dry-run"
    )
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0
    assert "slurm.container.runtime: expected one of 'pyxis', 'apptainer', 'oci'" in out.stderr


def test_dry_run_line_shows_the_conversion_then_the_cache(tmp_path):
    spec = _spec("apptainer")
    cache = tmp_path / "cache"
    line = C.describe(spec, cache)
    tag = C.image_tag(spec)
    assert (
        f"apptainer build {cache}/apptainer/{C._safe_name(tag)}.sif docker-daemon://{tag}" in line
    )
    assert "converted once at submit" in line
    (cache / "apptainer").mkdir(parents=True)
    (cache / "apptainer" / f"{C._safe_name(tag)}.sif").write_bytes(b"sif")
    assert "(converted, cached)" in C.describe(spec, cache)


# --------------------------------------------------------------------------------------------
# Checks before submission


@pytest.mark.parametrize(("runtime", "tool"), [("apptainer", "apptainer"), ("pyxis", "enroot")])
def test_missing_conversion_tool_is_one_line(runtime, tool, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on it
    with pytest.raises(BackendError) as err:
        C.check_runtime(_spec(runtime), tmp_path / "cache")
    text = str(err.value)
    assert "\n" not in text
    assert f"needs `{tool}` on this submit host" in text


def test_missing_ready_made_bundle_is_one_line(tmp_path):
    spec = _spec("oci", image=str(tmp_path / "no-bundle"))
    with pytest.raises(ConfigError) as err:
        C.check_runtime(spec)
    assert "slurm.container.image" in str(err.value)
    assert f"{tmp_path}/no-bundle does not exist" in str(err.value)


def test_oci_without_oci_conf_is_refused_before_submission(tmp_path, monkeypatch):
    # Without oci.conf Slurm ignores --container and runs the tasks bare.
    (tmp_path / "slurm.conf").write_text("ClusterName=x\n")
    monkeypatch.setenv("SLURM_CONF", str(tmp_path / "slurm.conf"))
    bundle = tmp_path / "bundle"
    (bundle / "rootfs").mkdir(parents=True)
    with pytest.raises(BackendError) as err:
        C.check_runtime(_spec("oci", image=str(bundle)))
    assert f"no {tmp_path}/oci.conf" in str(err.value)
    assert "runs the tasks bare" in str(err.value)


def test_oci_refuses_more_than_one_task_per_node(tmp_path, monkeypatch):
    (tmp_path / "slurm.conf").write_text("")
    (tmp_path / "oci.conf").write_text("")
    monkeypatch.setenv("SLURM_CONF", str(tmp_path / "slurm.conf"))
    (tmp_path / "b" / "rootfs").mkdir(parents=True)
    with pytest.raises(ConfigError) as err:
        C.check_runtime(_spec("oci", "resources.procs_per_node=2", image=str(tmp_path / "b")))
    assert "resources.procs_per_node" in str(err.value)


# --------------------------------------------------------------------------------------------
# The guard, run for real by sh (on this host, where the image's marker is absent)


def test_guard_fails_a_rank_that_is_not_in_the_image(tmp_path):
    assert not Path(C.MARKER).exists(), "the host must not carry the image's marker"
    guard = tmp_path / "guard.sh"
    guard.write_text(C.GUARD_SH)
    env = {
        "PATH": os.environ["PATH"],
        "SLURM_PROCID": "1",
        "SLURMD_NODENAME": "node2",
        "SLURM_JOB_ID": "42",
        "LAUNCHER_RUN_DIR": str(tmp_path),
    }
    touched = tmp_path / "ran"
    proc = subprocess.run(
        ["/bin/sh", str(guard), "repo:abc", "touch", str(touched)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == C.GUARD_EXIT_CODE
    assert not touched.exists()
    assert proc.stderr.count("\n") == 1
    assert "rank 1: not inside the image repo:abc" in proc.stderr
    record = json.loads((tmp_path / "exits" / "rank1.json").read_text())
    assert record["exit_code"] == 78 and record["node"] == "node2" and record["job_id"] == "42"
    assert "container runtime did not apply" in record["error"]


# --------------------------------------------------------------------------------------------
# For real: runtime oci on the local cluster


def _oci_ready() -> str | None:
    if not cluster_up():
        return "the local Slurm cluster (bash slurm/start.sh)"
    if not (C._oci_conf()).is_file():
        return "oci.conf (bash slurm/start.sh writes it when runc or crun is installed)"
    return None


@pytest.fixture
def oci_cluster():
    missing = _oci_ready()
    if missing:
        from tests.conftest import need

        need(False, missing)


@pytest.fixture(scope="module")
def oci_cache(tmp_path_factory) -> Iterator[Path]:
    """One conversion for the module's runs; the 1+ GB rootfs goes when they are done."""
    cache = tmp_path_factory.mktemp("image-cache")
    yield cache
    shutil.rmtree(cache, ignore_errors=True)


def _oci_job(
    image: str, cache: Path, run_dir: Path, *overrides: str, **kw
) -> tuple[JobSpec, list[str], dict[str, str]]:
    """The spec, srun argv and environment of a job whose step runs in `image` (runtime oci)."""
    spec = _spec("oci", f"runs_dir={run_dir.parent}", *overrides, image=image, **kw)
    C.check_runtime(spec, cache)
    C.prepare_image(spec, cache)
    (run_dir / "logs").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(config.dump(spec))
    env = job_env(spec, run_dir=run_dir, picks=None)
    rendered = C.render(spec, run_dir, env, cache)
    C.write_run_files(rendered, run_dir)
    step = C.step_command(rendered, entry_argv(spec, rendered.python))
    return spec, [*rendered.srun_flags, *step], env


def _srun(run_dir: Path, argv: list[str], env: dict[str, str], nodes: int = 2, **kw):
    cmd = [
        "srun",
        f"-N{nodes}",
        "--ntasks-per-node=1",
        "-p",
        "debug",
        f"--output={run_dir}/logs/rank%t.log",
        "--kill-on-bad-exit=1",
        *argv,
    ]
    full = {**os.environ, **env, "MASTER_PORT": str(21000 + os.getpid() % 5000)}
    return subprocess.run(cmd, env=full, capture_output=True, text=True, timeout=300, **kw)


@pytest.mark.slurm
@pytest.mark.docker
@pytest.mark.xdist_group("slurm")
def test_quickstart_on_two_nodes_runs_every_rank_in_the_image(
    oci_cluster, project_image, oci_cache, tmp_path
):
    run_dir = tmp_path / "runs" / "quick"
    _, argv, env = _oci_job(project_image.tag, oci_cache, run_dir)
    proc = _srun(run_dir, argv, env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    logs = [(run_dir / "logs" / f"rank{r}.log").read_text() for r in (0, 1)]
    for rank, log in enumerate(logs):
        assert f"launcher: rank {rank} on node{rank + 1}: inside the image" in log, log
        assert "(/etc/launcher-image: launcher-image)" in log
    params = [json.loads((run_dir / f"params-rank{r}.json").read_text()) for r in (0, 1)]
    assert params[0]["world_size"] == 2
    assert params[0]["sha256"] == params[1]["sha256"]
    assert {json.loads(p.read_text())["exit_code"] for p in (run_dir / "exits").glob("*")} == {0}


@pytest.mark.slurm
@pytest.mark.docker
@pytest.mark.xdist_group("slurm")
def test_a_container_that_did_not_apply_fails_every_rank_with_the_cause(
    oci_cluster, project_image, oci_cache, tmp_path
):
    # Slurm without an oci.conf ignores --container and runs the step bare: the same step
    # line with the flag left out is exactly that.
    run_dir = tmp_path / "runs" / "bare"
    _, argv, env = _oci_job(project_image.tag, oci_cache, run_dir)
    bare = [a for a in argv if not a.startswith("--container=")]
    proc = _srun(run_dir, bare, env)
    assert proc.returncode != 0
    for rank in (0, 1):
        log = (run_dir / "logs" / f"rank{rank}.log").read_text()
        assert f"rank {rank}: not inside the image {project_image.tag}" in log, log
        record = json.loads((run_dir / "exits" / f"rank{rank}.json").read_text())
        assert record["exit_code"] == C.GUARD_EXIT_CODE
    assert not list(run_dir.glob("params-rank*.json"))


@pytest.mark.slurm
@pytest.mark.docker
@pytest.mark.xdist_group("slurm")
def test_ranks_given_one_stale_rank_number_are_stopped(
    oci_cluster, project_image, oci_cache, tmp_path
):
    # What Slurm 22.05 does without the RunTimeRun wrapper under sbatch: every task sees the
    # batch shell's SLURM_PROCID=0. Made here by overriding it in front of the guard.
    run_dir = tmp_path / "runs" / "stale"
    _, argv, env = _oci_job(project_image.tag, oci_cache, run_dir)
    flags = [a for a in argv if a.startswith("--container=")]
    proc = _srun(run_dir, [*flags, "env", "SLURM_PROCID=0", *argv[len(flags) :]], env)
    assert proc.returncode != 0
    logs = "".join((run_dir / "logs" / f"rank{r}.log").read_text() for r in (0, 1))
    assert "another task of this step is rank 0 too" in logs, logs
    assert not list(run_dir.glob("params-rank*.json"))


@pytest.mark.slurm
@pytest.mark.docker
@pytest.mark.xdist_group("slurm")
@pytest.mark.timeout(1500)
def test_trainer_preempted_inside_the_container_resumes_from_its_checkpoint(
    oci_cluster, project_image, oci_cache, tmp_path
):
    """The built-in trainer on 2 nodes in the image, preempted by a job in `high`: it
    checkpoints on the signal inside the container, Slurm requeues the job, and the next
    attempt (in the container again) resumes from that checkpoint."""
    steps = 1500
    run_dir = tmp_path / "runs" / "preempt"
    spec, argv, env = _oci_job(
        project_image.tag,
        oci_cache,
        run_dir,
        "entrypoint.script=null",
        "entrypoint.args=[]",
        "train.model=mlp",
        f"train.steps={steps}",
        "train.global_batch_size=8",
        "train.checkpoint_every=50",
        "train.log_every=100",
        "loader.num_workers=0",
    )
    assert spec.entrypoint.kind == "trainer"
    step = shlex.join(
        [
            "srun",
            "--ntasks-per-node=1",
            f"--output={run_dir}/logs/rank%t.log",
            "--open-mode=append",
            *argv,
        ]
    )
    # The batch shell stays on the host. A rank that stopped for requeue exits 75 (its exit
    # file says so); the shell then waits for Slurm's requeue instead of ending the job.
    script = run_dir / "job.sh"
    script.write_text(
        "#!/bin/bash\n"
        f"{step}\n"
        "rc=$?\n"
        f"if grep -qs '\"exit_code\": 75' {shlex.quote(str(run_dir))}/exits/rank*.json; then\n"
        "    sleep 120\n"
        "fi\n"
        "exit $rc\n"
    )
    env = {**env, "MASTER_PORT": str(22000 + os.getpid() % 5000)}
    out = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "-N2",
            "-p",
            "debug",
            "--exclusive",
            "--requeue",
            "--signal=USR2@30",
            "-t",
            "10",
            f"--output={run_dir}/batch.log",
            "--open-mode=append",
            str(script),
        ],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    job_id = out.stdout.strip().split(";")[0]
    try:
        # The cluster is shared: the queue wait is not the test's to bound tightly.
        _wait(lambda: _job_state(job_id) == "R", 600, f"job {job_id} running")
        _wait(lambda: list((run_dir / "checkpoints").glob("step-*.pt")), 180, "a checkpoint")
        subprocess.run(
            ["sbatch", "-p", "high", "-N1", "--exclusive", "-o", "/dev/null", "--wrap", "sleep 2"],
            check=True,
            capture_output=True,
        )
        _wait(lambda: _end_step(run_dir) == steps, 420, f"step {steps}")
        _wait(lambda: _job_gone(job_id), 120, f"end of job {job_id}")
    finally:
        subprocess.run(["scancel", job_id], capture_output=True)
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    resumed = [e for e in events if e.get("event") == "resume"]
    assert resumed and resumed[0]["step"] > 0, "requeued, it must resume from its checkpoint"
    for rank in (0, 1):
        log = (run_dir / "logs" / f"rank{rank}.log").read_text()
        # Both attempts of each rank ran inside the image.
        assert log.count(f"launcher: rank {rank} on node") >= 2, log
        assert log.count("inside the image") >= 2
    records = [json.loads(p.read_text()) for p in (run_dir / "exits").glob("rank*.json")]
    assert len(records) == 2
    assert all(r["restart"] >= 1 and r["exit_code"] == 0 for r in records), records


def _end_step(run_dir: Path) -> int | None:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    # Only whole lines: the trainer may be writing the last one.
    lines = path.read_text().splitlines(keepends=True)
    events = [json.loads(line) for line in lines if line.endswith("\n")]
    ends = [e for e in events if e.get("event") == "end"]
    return ends[-1]["step"] if ends else None


def _job_state(job_id: str) -> str | None:
    """squeue's compact state (PD, R, CG, ...); "" once the job has left the queue."""
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%t"], capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else None


def _job_gone(job_id: str) -> bool:
    return _job_state(job_id) == ""


def _wait(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(1)
    raise AssertionError(f"no {what} after {timeout:.0f}s")


@pytest.mark.slurm
@pytest.mark.docker
@pytest.mark.xdist_group("slurm")
def test_conversion_happens_once_per_tag(oci_cluster, project_image, tmp_path):
    cache = tmp_path / "cache"
    spec = _spec("oci", image=project_image.tag)
    try:
        _check_converted_once(spec, cache, project_image)
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def _check_converted_once(spec: JobSpec, cache: Path, project_image) -> None:
    # Two submissions of the same tag at once: one converts, the other waits and reuses it.
    with ThreadPoolExecutor(2) as pool:
        both = list(pool.map(lambda _: C.prepare_image(spec, cache), range(2)))
    assert sorted(p.converted for p in both) == [False, True]
    first = next(p for p in both if p.converted)
    again = C.prepare_image(spec, cache)
    assert not again.converted
    assert again.seconds < 0.5 < first.seconds
    rootfs = first.artifact.rootfs
    assert (rootfs / "etc" / "launcher-image").read_text().strip() == "launcher-image"
    assert first.info["tag"] == project_image.tag and first.info["id"] == project_image.image_id
    # No half-made artifact or lock is left looking like an image.
    assert sorted(
        p.name for p in first.artifact.path.parent.iterdir() if not p.name.startswith(".")
    ) == [first.artifact.path.name]


def test_pyxis_takes_a_registry_image_as_it_is(tmp_path):
    # enroot imports a registry image on each node itself: nothing to convert on this host.
    spec = _spec("pyxis", image="registry.example.com/team/train:abc")
    C.check_runtime(spec, tmp_path / "cache")
    r = C.render(spec, tmp_path / "run", {}, tmp_path / "cache")
    assert "--container-image=registry.example.com/team/train:abc" in r.srun_flags
    assert "not converted here" in C.describe(spec, tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


@pytest.mark.slurm
@pytest.mark.docker
@pytest.mark.xdist_group("slurm")
def test_launcher_run_puts_every_rank_of_a_two_node_job_in_the_image(
    oci_cluster, project_image, oci_cache, tmp_path
):
    """The whole path through `launcher run`: converted at submit, one log per rank on the
    host, both ranks inside the image, identical parameters."""
    runs_dir = tmp_path / "runs"
    argv = [
        sys.executable,
        "-m",
        "launcher",
        "run",
        str(ROOT / "configs" / "quickstart.yaml"),
        "name=oci-run",
        "backend=slurm",
        f"runs_dir={runs_dir}",
        f"workdir={ROOT}",
        "resources.nodes=2",
        "resources.procs_per_node=1",
        "slurm.container.runtime=oci",
        f"slurm.container.image={project_image.tag}",
        f"slurm.container.cache_dir={oci_cache}",
    ]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    (run_dir,) = list((runs_dir / "oci-run").iterdir())
    deadline = time.monotonic() + 240
    state = None
    while time.monotonic() < deadline:
        status = subprocess.run(
            [sys.executable, "-m", "launcher", "status", str(run_dir), "--json"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        state = json.loads(status.stdout)[0]["state"]
        if state in ("COMPLETED", "FAILED", "CANCELLED"):
            break
        time.sleep(3)
    assert state == "COMPLETED", (run_dir / "logs").iterdir()
    for rank in (0, 1):
        log = (run_dir / "logs" / f"rank{rank}.log").read_text()
        assert f"launcher: rank {rank} on node{rank + 1}: inside the image" in log, log
    params = [json.loads((run_dir / f"params-rank{r}.json").read_text()) for r in (0, 1)]
    assert params[0]["sha256"] == params[1]["sha256"]
