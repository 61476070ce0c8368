"""The sbatch script --dry-run prints: equal to submitit's, stored, quoted, cluster-free."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from launcher import config
from launcher.backends.slurm.backend import BACKEND
from launcher.backends.slurm.sbatch import render_sbatch, submitit_command
from tests.conftest import ROOT, launcher_cmd
from tests.slurm_helpers import require_cluster

EXPECTED = Path(__file__).parent / "expected"
# On one line: what may go into the sbatch script (a newline there is refused, not rewritten).
HOSTILE_LINE = (
    'it\'s "q" $(touch /tmp/pwned-sub) `touch /tmp/pwned-tick`; touch /tmp/pwned-semi # x'
)
# With a newline: data for argv and the environment, which never pass through a shell.
HOSTILE = HOSTILE_LINE + "\ntouch /tmp/pwned-newline"


def _plan(cfg: str | Path, *overrides: str, tmp: Path):
    spec = config.load(cfg, list(overrides)).spec
    return BACKEND.plan(spec, run_id="RUNID", run_dir=tmp / "run", config_file=str(cfg))


def _normalize(text: str, run_dir: Path) -> str:
    return (
        text.replace(str(run_dir), "<RUN_DIR>")
        .replace(sys.executable, "<PYTHON>")
        .replace(str(ROOT), "<ROOT>")
    )


@pytest.mark.parametrize(
    "overrides",
    [
        (),
        (
            "entrypoint.callable=tests.jobs.callables:ddp_sum",
            "entrypoint.script=null",
            "entrypoint.args=[]",
            "slurm.srun_args=[--cpu-bind=none]",
        ),
        (
            "resources.gpus_per_node=4",
            "resources.procs_per_node=null",
            "slurm.exclusive=true",
            "slurm.account=acc",
            "slurm.qos=q",
            "slurm.constraint=h100",
            "slurm.setup=[module load x]",
            "slurm.extra={mail-type: END}",
        ),
    ],
)
def test_render_equals_submitit(overrides, tmp_path):
    """Our pure renderer must print exactly what submitit will write and sbatch."""
    from submitit.slurm.slurm import _make_sbatch_string

    plan = _plan(ROOT / "configs/slurm-2nodes.yaml", *overrides, tmp=tmp_path)
    params = plan.payload.params
    folder = Path(plan.payload.folder)
    step = plan.payload.step is not None
    ours = render_sbatch(submitit_command(folder, step), folder, params)
    theirs = _make_sbatch_string(command=submitit_command(folder, step), folder=folder, **params)
    assert ours == theirs
    array = render_sbatch("cmd", folder, {**params, "array_parallelism": 7}, map_count=120)
    assert array == _make_sbatch_string(
        command="cmd", folder=folder, map_count=120, **{**params, "array_parallelism": 7}
    )
    assert "#SBATCH --array=0-119%7" in array


def test_dry_run_matches_the_stored_expected_file(tmp_path):
    plan = _plan(ROOT / "configs/slurm-2nodes.yaml", tmp=tmp_path)
    got = _normalize(plan.render(), plan.run_dir) + "\n"
    expected = EXPECTED / "slurm-2nodes.dry-run.txt"
    if os.environ.get("LAUNCHER_UPDATE_EXPECTED") == "1":
        expected.write_text(got)
    assert got == expected.read_text(), "update on purpose with LAUNCHER_UPDATE_EXPECTED=1"


def test_dry_run_needs_no_slurm_and_no_submitit(tmp_path):
    """A laptop without srun/sinfo/sbatch: PATH holds only the interpreter's folder."""
    env = {"PATH": str(Path(sys.executable).parent), "HOME": os.environ.get("HOME", "/root")}
    code = (
        "import sys; from launcher.cli import main; rc = main(sys.argv[1:]); "
        "assert 'submitit' not in sys.modules and 'torch' not in sys.modules; sys.exit(rc)"
    )
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            "run",
            "configs/slurm-2nodes.yaml",
            f"runs_dir={tmp_path}",
            "--dry-run",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    assert "#SBATCH --nodes=2" in out.stdout and "srun --unbuffered" in out.stdout
    assert not any(tmp_path.iterdir())


def test_hostile_strings_stay_data(tmp_path):
    cfg = tmp_path / "hostile.yaml"
    import yaml

    cfg.write_text(
        yaml.safe_dump(
            {
                "name": HOSTILE_LINE,
                "backend": "slurm",
                "workdir": str(ROOT),
                "entrypoint": {"script": "tests/jobs/env_dump.py", "args": [HOSTILE, "--x"]},
                "env": {"CUSTOM": HOSTILE},
                "slurm": {"partition": HOSTILE_LINE, "extra": {"comment": HOSTILE_LINE}},
            }
        )
    )
    plan = _plan(cfg, tmp=tmp_path)
    script = plan.payload.script
    lines = script.splitlines()
    # No line of the script may start with the payload: newlines cannot break out.
    assert not any(line.lstrip().startswith("touch") for line in lines)
    name_lines = [line for line in lines if line.startswith("#SBATCH --job-name=")]
    assert len(name_lines) == 1 and shlex.split(name_lines[0])[1] == f"--job-name={HOSTILE_LINE}"
    assert plan.payload.step[-2:] == [HOSTILE, "--x"]  # argv: the newline stays, as data
    # The script is valid shell and running its parameter section executes nothing.
    header = "\n".join(line for line in lines if not line.startswith("exec "))
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)
    subprocess.run(["bash", "-c", header], check=True, capture_output=True)
    assert not list(Path("/tmp").glob("pwned-*"))
    # The printed plan quotes the env too: run as shell, it gives back the exact value.
    text = plan.render()
    exports = text[text.index("export LAUNCHER_RUN_DIR") : text.index("# and starts")]
    out = subprocess.run(
        ["bash", "-c", exports + '\nprintf %s "$CUSTOM"'],
        check=True,
        capture_output=True,
        text=True,
    )
    assert out.stdout == HOSTILE
    assert not list(Path("/tmp").glob("pwned-*"))


def test_container_is_rendered_for_pyxis(tmp_path):
    plan = _plan(
        ROOT / "configs/slurm-2nodes.yaml",
        "slurm.container.image=registry/train:abc",
        "slurm.container.mounts=[/data:/data:ro]",
        tmp=tmp_path,
    )
    step = plan.payload.step
    assert step is not None
    assert "--container-image=registry/train:abc" in step
    mounts = next(a for a in step if a.startswith("--container-mounts="))
    assert "/data:/data:ro" in mounts and str(plan.run_dir) in mounts
    assert step[step.index("--") + 1] == "python3"  # the image's interpreter
    assert "--container-image=registry/train:abc" in plan.render()
    assert "#SBATCH --signal=B:USR2@30" in plan.payload.script  # requeue stays on the host
    callable_cfg = (
        "entrypoint.callable=tests.jobs.callables:ddp_sum",
        "entrypoint.script=null",
        "entrypoint.args=[]",
    )
    # A callable is one more srun step like a script: it runs in the container too.
    plan = _plan(
        ROOT / "configs/slurm-2nodes.yaml", *callable_cfg, "slurm.container.image=x", tmp=tmp_path
    )
    step = plan.payload.step
    assert step[-4:] == ["python3", "-m", "launcher.call", "tests.jobs.callables:ddp_sum"]
    assert "--container-image=x" in step


def test_sbatch_test_only_accepts_every_example_config(tmp_path):
    require_cluster()
    configs = sorted((ROOT / "configs").glob("*.yaml"))
    assert len(configs) >= 2
    for cfg in configs:
        overrides = ["backend=slurm"]
        spec = config.load(cfg, overrides).spec
        if spec.resources.gpus_per_node:
            overrides.append("resources.gpus_per_node=0")  # no GPUs in the test cluster
        plan = _plan(cfg, *overrides, tmp=tmp_path / cfg.stem)
        script = tmp_path / f"{cfg.stem}.sbatch"
        script.write_text(plan.payload.script)
        out = subprocess.run(
            [shutil.which("sbatch") or "sbatch", "--test-only", str(script)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, f"{cfg.name}: {out.stderr}"
        assert "to start at" in out.stderr, f"{cfg.name}: {out.stderr}"
