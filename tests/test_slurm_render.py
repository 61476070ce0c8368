"""The sbatch script --dry-run prints: equal to submitit's, stored, quoted, cluster-free."""

from __future__ import annotations

import json
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


@pytest.mark.parametrize(
    ("source", "signal_name"),
    [
        ("import lightning as L\ntrainer = L.Trainer()\n", "USR1"),
        ("from lightning import Trainer\n", "USR1"),
        ("from lightning.pytorch import Trainer\n", "USR1"),
        ("import pytorch_lightning as pl\npl.Trainer()\n", "USR1"),
        ("from lightning.pytorch.cli import LightningCLI\nLightningCLI()\n", "USR1"),
        # a helper from Lightning, not its Trainer: the script saves on TERM itself
        ("from lightning.pytorch import seed_everything\nseed_everything(0)\n", "TERM"),
        ("import lightning\n", "TERM"),
        ("from lightning.fabric import Fabric\n", "TERM"),  # no auto-requeue handler
        ("import torch\n", "TERM"),
        ("import lightning(\n", "TERM"),  # does not parse: never run, just TERM
    ],
)
def test_stop_signal_auto_reads_the_script_imports(tmp_path, source, signal_name):
    from launcher.entrypoint import stop_signal

    (tmp_path / "train.py").write_text(source)
    spec = config.load(
        ROOT / "configs/slurm-2nodes.yaml",
        [f"workdir={tmp_path}", "entrypoint.script=train.py", "entrypoint.args=[]"],
    ).spec
    assert stop_signal(spec, slurm_env=True) == signal_name
    assert stop_signal(spec) == "TERM"  # off Slurm Lightning has no USR1 handler
    step = BACKEND.plan(spec, run_id="R", run_dir=tmp_path / "run", config_file=None).payload.step
    assert step is not None and f"--stop-signal={signal_name}" in step
    # Lightning's stop: USR1 to rank 0 alone, Slurm's TERM blocked (test_rank_wrapper_lightning)
    assert (("--stop-ranks=first" in step) and ("--block-term" in step)) == (signal_name == "USR1")
    if signal_name == "USR1":
        given = config.load(
            ROOT / "configs/slurm-2nodes.yaml",
            [f"workdir={tmp_path}", "entrypoint.script=train.py", "entrypoint.stop_signal=USR1"],
        ).spec
        plan = BACKEND.plan(given, run_id="R", run_dir=tmp_path / "run", config_file=None)
        assert plan.payload.step is not None and "--stop-signal=USR1" in plan.payload.step
        assert "--block-term" not in plan.payload.step  # written out: every rank gets it


@pytest.mark.parametrize(
    ("files", "signal_name"),
    [
        # train.py imports the project's own module, which imports Lightning
        (
            {
                "train.py": "from mytrainer import fit\n",
                "mytrainer.py": "import lightning as L\nL.Trainer()\n",
            },
            "USR1",
        ),
        (
            {
                "train.py": "import pkg.loop\n",
                "pkg/__init__.py": "",
                "pkg/loop.py": "from lightning.pytorch import Trainer\n",
            },
            "USR1",
        ),
        (
            {
                "train.py": "from pkg import loop\n",
                "pkg/__init__.py": "",
                "pkg/loop.py": "from . import deep\n",
                "pkg/deep.py": "import pytorch_lightning\npytorch_lightning.Trainer()\n",
            },
            "USR1",
        ),
        # under workdir, not next to the script (the callable's and -m's sys.path)
        (
            {
                "scripts/train.py": "import common\n",
                "common.py": "import lightning\nlightning.Trainer\n",
            },
            "USR1",
        ),
        ({"train.py": "import mytools\n", "mytools.py": "import torch\n"}, "TERM"),
        ({"train.py": "import a\n", "a.py": "import b\n", "b.py": "import a\n"}, "TERM"),  # a cycle
    ],
)
def test_stop_signal_auto_follows_the_projects_own_imports(tmp_path, files, signal_name):
    from launcher.entrypoint import stop_signal

    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    script = next(name for name in files if name.endswith("train.py"))
    spec = config.load(
        ROOT / "configs/slurm-2nodes.yaml",
        [f"workdir={tmp_path}", f"entrypoint.script={script}", "entrypoint.args=[]"],
    ).spec
    assert stop_signal(spec, slurm_env=True) == signal_name


def test_stop_signal_for_the_trainer_and_a_written_out_one(tmp_path):
    from launcher.entrypoint import stop_signal

    trainer = config.load(ROOT / "configs/trainer.yaml", ["backend=slurm"]).spec
    assert stop_signal(trainer, slurm_env=True) == "USR2"
    given = config.load(ROOT / "configs/lightning.yaml", ["entrypoint.stop_signal=INT"]).spec
    assert stop_signal(given, slurm_env=True) == "INT"
    bad = launcher_cmd("run", "configs/plain.yaml", "entrypoint.stop_signal=KILL", "--dry-run")
    assert bad.returncode == 2 and "entrypoint.stop_signal" in bad.stderr, bad
    late = launcher_cmd(
        "run", "configs/plain.yaml", "backend=slurm", "entrypoint.stop_grace_s=60", "--dry-run"
    )
    assert late.returncode == 2 and "entrypoint.stop_grace_s" in late.stderr, late
    assert "Traceback" not in late.stderr


def _shim(tmp_path, monkeypatch, *argv: str, job="42", array=None):
    """Run the scontrol shim with a stand-in `scontrol` after it on PATH (records its args)."""
    from launcher.backends.slurm.batch import requeue_requests, write_shim

    run_dir = tmp_path / "run"
    shim = write_shim(run_dir)
    real = tmp_path / "real"
    real.mkdir(exist_ok=True)
    (real / "scontrol").write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$OUT"\n')
    (real / "scontrol").chmod(0o755)
    env = {
        "PATH": f"{shim.parent}:{real}:/usr/bin:/bin",
        "OUT": str(tmp_path / "real.out"),
        "SLURM_JOB_ID": job,
        "SLURM_PROCID": "0",
        "SLURM_RESTART_COUNT": "2",
        "LAUNCHER_RUN_DIR": str(run_dir),
        **(array or {}),
    }
    record = tmp_path / "real.out"
    record.unlink(missing_ok=True)
    out = subprocess.run([str(shim), *argv], env=env, capture_output=True, text=True)
    passed = record.read_text().split() if record.exists() else None
    return out, passed, requeue_requests(run_dir, 2)


def test_scontrol_shim_turns_a_requeue_of_this_job_into_a_request(tmp_path, monkeypatch):
    out, passed, asked = _shim(tmp_path, monkeypatch, "requeue", "42")
    assert out.returncode == 0 and passed is None and asked == [0], out
    assert "passed to launcher's host task" in out.stderr


def test_scontrol_shim_passes_everything_else_to_the_real_one(tmp_path, monkeypatch):
    out, passed, asked = _shim(tmp_path, monkeypatch, "show", "job", "42")
    assert out.returncode == 0 and passed == ["show", "job", "42"] and asked == []
    out, passed, asked = _shim(tmp_path, monkeypatch, "requeue", "43")  # another job
    assert passed == ["requeue", "43"] and asked == []


def test_scontrol_shim_knows_array_task_ids(tmp_path, monkeypatch):
    array = {"SLURM_ARRAY_JOB_ID": "40", "SLURM_ARRAY_TASK_ID": "2"}
    out, passed, asked = _shim(tmp_path, monkeypatch, "requeue", "40_2", array=array)
    assert out.returncode == 0 and passed is None and asked == [0], out


def test_rank_wrapper_sends_one_stop_signal_and_drops_repeats(tmp_path):
    """TERM twice (Slurm at preemption: the step and srun), then the host's stop file: the
    script gets the configured signal once, and the exit file says what stopped it."""
    import signal as sig
    import time as t

    script = tmp_path / "child.py"
    script.write_text(
        "import signal, sys, time, pathlib\n"
        "got = []\n"
        "for s in (signal.SIGUSR1, signal.SIGTERM):\n"
        "    signal.signal(s, lambda n, f: got.append(signal.Signals(n).name))\n"
        "pathlib.Path(sys.argv[1], 'ready').write_text('1')\n"
        "while not got: time.sleep(0.05)\n"
        "time.sleep(1.0)\n"
        "pathlib.Path(sys.argv[1], 'got').write_text(','.join(got))\n"
        "sys.exit(75)\n"
    )
    run_dir = tmp_path / "run"
    (run_dir / "logs").mkdir(parents=True)
    env = {**os.environ, "LAUNCHER_RUN_DIR": str(run_dir), "SLURM_PROCID": "0"}
    env.pop("SLURM_RESTART_COUNT", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "launcher.backends.slurm.rank", "--stop-signal=USR1", "--"]
        + [sys.executable, str(script), str(tmp_path)],
        env=env,
        cwd=ROOT,
    )
    deadline = t.monotonic() + 60
    while not (tmp_path / "ready").exists():
        assert t.monotonic() < deadline and proc.poll() is None
        t.sleep(0.05)
    proc.send_signal(sig.SIGTERM)
    proc.send_signal(sig.SIGTERM)
    (run_dir / "stop-restart0").write_text("1")
    assert proc.wait(timeout=60) == 0  # stopped to be requeued: not a failure for srun
    assert (tmp_path / "got").read_text() == "SIGUSR1"  # once, not TERM
    exit_file = json.loads((run_dir / "exits" / "rank0.json").read_text())
    assert exit_file["exit_code"] == 75 and exit_file["stop_signal"] == "USR1"
    assert exit_file["stopped_by"] == "SIGTERM"


@pytest.mark.parametrize("rank", ["0", "1"])
def test_rank_wrapper_lightning_stop(tmp_path, rank):
    """Lightning's stop (`--stop-ranks=first --block-term`): the script starts with TERM
    blocked, so a TERM sent to it (Slurm's, at preemption's end or an administrator's requeue)
    stays pending instead of starting Lightning's handler; the host's stop file makes the
    wrapper send USR1 to rank 0 alone."""
    import signal as sig
    import time as t

    script = tmp_path / "child.py"
    script.write_text(
        "import os, signal, sys, time, pathlib\n"
        "out = pathlib.Path(sys.argv[1])\n"
        "got = []\n"
        "def handler(n, f):\n"
        "    got.append(signal.Signals(n).name)\n"
        "    if n == signal.SIGUSR1:  # as Lightning does: a checkpoint in the cwd, atomically\n"
        "        pathlib.Path('.tmp.ckpt').write_text('x')\n"
        "        os.replace('.tmp.ckpt', 'hpc_ckpt_2.ckpt')\n"
        "for s in (signal.SIGUSR1, signal.SIGTERM):\n"
        "    signal.signal(s, handler)\n"
        "status = pathlib.Path('/proc/self/status').read_text()\n"
        "blocked = int(status.split('SigBlk:')[1].split()[0], 16)\n"
        "(out / 'blocked').write_text(str(bool(blocked & (1 << (signal.SIGTERM - 1)))))\n"
        "(out / 'pid').write_text(str(os.getpid()))\n"
        "end = time.monotonic() + 4\n"
        "while time.monotonic() < end: time.sleep(0.05)\n"
        "(out / 'got').write_text(','.join(got))\n"
    )
    run_dir = tmp_path / "run"
    (run_dir / "logs").mkdir(parents=True)
    work = tmp_path / "work"  # the script's cwd: Lightning's default_root_dir by default
    work.mkdir()
    (work / "hpc_ckpt_1.ckpt").write_text("from an earlier attempt")
    env = {**os.environ, "LAUNCHER_RUN_DIR": str(run_dir), "SLURM_PROCID": rank}
    env.pop("SLURM_RESTART_COUNT", None)
    env["PYTHONPATH"] = str(ROOT)
    argv = [sys.executable, "-m", "launcher.backends.slurm.rank", "--stop-signal=USR1"]
    proc = subprocess.Popen(
        [*argv, "--stop-ranks=first", "--block-term", "--", sys.executable, str(script)]
        + [str(tmp_path)],
        env=env,
        cwd=work,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = t.monotonic() + 60
    while not (tmp_path / "pid").exists():
        assert t.monotonic() < deadline and proc.poll() is None
        t.sleep(0.05)
    os.kill(int((tmp_path / "pid").read_text()), sig.SIGTERM)  # Slurm's TERM, straight to it
    (run_dir / "stop-restart0").write_text("1")
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert (tmp_path / "blocked").read_text() == "True"
    assert (tmp_path / "got").read_text() == ("SIGUSR1" if rank == "0" else ""), stderr
    exit_file = json.loads((run_dir / "exits" / f"rank{rank}.json").read_text())
    assert exit_file["exit_code"] == 0 and exit_file["stopped_by"] == "SIGUSR2"
    # Rank 0 saw the new checkpoint and asked the host task, as Lightning's own `scontrol
    # requeue` would had its barrier passed; the old one did not count.
    request = run_dir / "requeue" / f"rank{rank}-restart0"
    assert request.exists() == (rank == "0"), stderr
    if rank == "0":
        assert f"saved {work / 'hpc_ckpt_2.ckpt'}" in stderr, stderr
