"""The exit runner every rank starts a script through (entrypoint.RANK_MAIN, on local, Docker
and Slurm): a script leaves as `python script.py` would (exit codes, messages, atexit, threads,
files), only without interpreter finalization. Real interpreters, real processes; the last
tests inject the gloo exit race that aborted ranks and show the runner survives it."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from launcher import runs
from launcher.entrypoint import RANK_MAIN, exit_note, rank_argv
from launcher.ports import free_port
from tests.conftest import ROOT, launcher_cmd

# name -> script body; each is run by plain python and through the runner, and must give the
# same exit code, stdout, last stderr line and files.
CASES = {
    "returns": "print('hello')",
    "sys-exit-3": "import sys\nprint('before')\nsys.exit(3)",
    "sys-exit-message": "import sys\nsys.exit('bye: no data')",
    "sys-exit-none": "raise SystemExit(None)",
    "sys-exit-263": "raise SystemExit(263)",
    "sys-exit-minus-1": "raise SystemExit(-1)",
    "raises": "def f():\n    raise ValueError('boom')\nf()",
    "keyboard-interrupt": "raise KeyboardInterrupt",
    "atexit-order": textwrap.dedent(
        """\
        import atexit, sys
        atexit.register(print, 'registered first, runs last')
        atexit.register(print, 'registered last, runs first')
        sys.exit(4)
        """
    ),
    "thread-joined": textwrap.dedent(
        """\
        import threading, time
        threading.Thread(target=lambda: (time.sleep(0.3), print('thread done'))).start()
        print('main done')
        """
    ),
    # An executor never shut down: python's threading atexit stops its idle workers.
    "executor-left-open": textwrap.dedent(
        """\
        import atexit, concurrent.futures, time
        pool = concurrent.futures.ThreadPoolExecutor(2)
        pool.submit(lambda: (time.sleep(0.3), print('task done', flush=True)))
        atexit.register(lambda: print('atexit after the executor'))
        """
    ),
    # Written, never closed or flushed: finalization closes it (here: clearing the globals).
    "file-left-open": textwrap.dedent(
        """\
        import atexit
        log = open('out.txt', 'w')
        log.write('kept')
        atexit.register(lambda: None)
        def f():
            return log
        """
    ),
    "identity": textwrap.dedent(
        """\
        import sys, os
        print(__name__, __file__, __package__, __spec__, sys.argv)
        print(os.path.realpath(sys.path[0]), __doc__, sys.modules['__main__'].__file__)
        import pickle
        class Point:
            pass
        print(type(pickle.loads(pickle.dumps(Point()))).__qualname__)
        """
    ),
    "stdout-buffered": "import sys\nsys.stdout.write('no newline, no flush')",
    # An object that warns when its __class__ is looked at, alive at exit (as torch's
    # deprecated `torch.distributed.reduce_op`): python says nothing, so neither may the runner.
    "warns-on-class": textwrap.dedent(
        """\
        import builtins, warnings
        class Loud:
            def __getattribute__(self, name):
                if name == '__class__':
                    warnings.warn('looked at', FutureWarning)
                return object.__getattribute__(self, name)
        builtins.kept = Loud()
        """
    ),
}


def _run(argv: list[str], cwd: Path) -> tuple[int, str, str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=60, env=env)
    out = cwd / "out.txt"
    files = out.read_text() if out.exists() else ""
    err = [line for line in proc.stderr.splitlines() if line.strip()]
    return proc.returncode, proc.stdout, err[-1] if err else "", files


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_runner_leaves_as_python_does(tmp_path, case):
    script = tmp_path / "job.py"
    script.write_text(CASES[case] + "\n")
    results = []
    for how in ("python", "runner"):
        cwd = tmp_path / how
        cwd.mkdir()
        argv = [sys.executable, str(script), "--flag", "x"]
        wrapped = rank_argv(argv)
        assert (wrapped != argv) == (how == "runner") or how == "python"
        results.append(_run(wrapped if how == "runner" else argv, cwd))
    assert results[0] == results[1]


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_runner_runs_a_module_as_python_m_does(tmp_path, case):
    # The built-in trainer and callables start as `python -m MODULE`: the same cases, as a
    # module in the working folder (both runs in that folder, one after the other).
    (tmp_path / "jobmod.py").write_text(CASES[case] + "\n")
    argv = [sys.executable, "-m", "jobmod", "--flag", "x"]
    results = []
    for run in (argv, rank_argv(argv)):
        code, out, err, files = _run(run, tmp_path)
        # The module's spec prints its loader's address, which differs between any two runs.
        results.append((code, re.sub(r" at 0x[0-9a-f]+", "", out), err, files))
        (tmp_path / "out.txt").unlink(missing_ok=True)
    assert rank_argv(argv) != argv and results[0] == results[1]


def test_a_missing_module_fails_as_python_m_does(tmp_path):
    argv = [sys.executable, "-m", "no_such_module_here"]
    assert _run(rank_argv(argv), tmp_path) == _run(argv, tmp_path)


def test_what_the_runner_wraps():
    py = sys.executable
    assert rank_argv([py, "train.py", "--lr", "1"]) == [
        py,
        "-c",
        RANK_MAIN,
        "train.py",
        "--lr",
        "1",
    ]
    assert rank_argv([py, "-m", "launcher.runtime"]) == [
        py,
        "-c",
        RANK_MAIN,
        "-m",
        "launcher.runtime",
    ]
    for argv in ([py, "-u", "train.py"], ["./train"], [py], [py, "-m"]):
        assert rank_argv(argv) == argv
        assert exit_note(argv) is None
    assert "os._exit" in (exit_note([py, "train.py"]) or "")


def test_a_missing_script_fails_as_python_says_it(tmp_path):
    missing = str(tmp_path / "nope.py")
    plain = subprocess.run([sys.executable, missing], capture_output=True, text=True)
    ours = subprocess.run(rank_argv([sys.executable, missing]), capture_output=True, text=True)
    assert (ours.returncode, ours.stderr) == (plain.returncode, plain.stderr) == (2, plain.stderr)


def test_slurm_rank_wrapper_starts_the_script_through_the_runner(tmp_path):
    """rank.py (every Slurm task) runs `python script.py` through the runner; its exit code
    comes back as the task's."""
    script = tmp_path / "job.py"
    script.write_text(
        "import os, sys\n"
        "open(os.environ['LAUNCHER_RUN_DIR'] + '/argv', 'w').write(repr(sys.orig_argv))\n"
        "sys.exit(3)\n"
    )
    env = {**os.environ, "LAUNCHER_RUN_DIR": str(tmp_path), "SLURM_PROCID": "0"}
    env["LAUNCHER_NUM_WORKERS"] = "0"
    argv = [sys.executable, "-m", "launcher.backends.slurm.rank", "--stop-signal=TERM", "--"]
    proc = subprocess.run([*argv, sys.executable, str(script)], env=env, cwd=ROOT, timeout=60)
    assert proc.returncode == 3
    seen = (tmp_path / "argv").read_text()
    assert "'-c'" in seen and "os._exit" in seen, seen
    assert runs_exit_code(tmp_path) == 3


def runs_exit_code(run_dir: Path) -> int:
    from launcher.backends.slurm.rank import read_exits

    return read_exits(run_dir)[0]["exit_code"]


# --- The exit race, injected (tests/jobs/holdwork.c): the gloo worker that ran the last
# backward allreduce keeps that work until the script's main() returned, then is descheduled
# 300 ms just before it takes the GIL to drop it. A rank finalizing the interpreter meanwhile
# aborts; the runner has left by then.


@pytest.fixture(scope="module")
def holdwork(tmp_path_factory) -> Path:
    if not shutil.which("gcc"):
        pytest.skip("needs gcc to build the fault injector")
    lib = tmp_path_factory.mktemp("inject") / "holdwork.so"
    src = ROOT / "tests" / "jobs" / "holdwork.c"
    subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-o", str(lib), str(src), "-ldl"], check=True)
    return lib


def race_config(folder: Path, holdwork: Path, script: str, **top: str) -> Path:
    """The quickstart (5 steps) under the injected race; `script` runs it (exit_race.py)."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [
        "name: exit-race",
        f"workdir: {ROOT}",
        "entrypoint:",
        f"  script: {script}",
        '  args: ["examples/quickstart_ddp.py", "--steps", "5"]',
        "resources: {nodes: 1, procs_per_node: 2, time_min: 5}",
        "env:",
        f"  LD_PRELOAD: {holdwork}",
        '  HOLD_WORK: "10"',
        f"  HOLD_FLAG: {folder / 'flag'}",
        '  SLOW_GIL_MS: "300"',
        f"runs_dir: {folder / 'runs'}",
    ]
    lines += [f"{key}: {value}" for key, value in top.items()]
    path = folder / "job.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def unwrapped_copy(folder: Path) -> str:
    """exit_race.py under a name without `.py`: python runs it, the runner does not wrap it."""
    folder.mkdir(parents=True, exist_ok=True)
    plain = folder / "exit_race_unwrapped"
    shutil.copy(ROOT / "tests" / "jobs" / "exit_race.py", plain)
    return str(plain)


def _only_record(folder: Path) -> dict:
    found = list(runs.iter_run_dirs(folder / "runs"))
    assert len(found) == 1, found
    return dict(runs.read_record(found[0]))


def test_injected_exit_race_aborts_an_unwrapped_rank_and_not_the_runner(tmp_path, holdwork):
    """The control first: the same race, the same script not run through the runner, aborts
    rank 0 (so the injection still reproduces the abort); through the runner: COMPLETED."""
    control = race_config(tmp_path / "control", holdwork, unwrapped_copy(tmp_path / "control"))
    out = launcher_cmd("run", str(control), timeout=240)
    record = _only_record(tmp_path / "control")
    assert out.returncode != 0 and record["state"] == "FAILED", (out.stderr, record)
    assert "aborted (SIGABRT)" in (record.get("error") or ""), record
    assert "terminate called" in (record.get("error") or ""), record

    ours = race_config(tmp_path / "runner", holdwork, "tests/jobs/exit_race.py")
    out = launcher_cmd("run", str(ours), timeout=240)
    record = _only_record(tmp_path / "runner")
    assert out.returncode == 0 and record["state"] == "COMPLETED", (out.stderr, record)
    run_dir = next(runs.iter_run_dirs(tmp_path / "runner" / "runs"))
    for rank in (0, 1):
        assert (tmp_path / "runner" / f"flag.{rank}").exists()  # main() returned, then it left
        log = (run_dir / "logs" / f"rank{rank}.log").read_text()
        assert "keeps finished work 10" in log and "terminate called" not in log, log
    sums = {
        (run_dir / f"params-rank{r}.json").read_text().split('"sha256": ')[1][:66] for r in (0, 1)
    }
    assert len(sums) == 1


def test_torchrun_is_not_immune_to_the_injected_race(tmp_path, holdwork):
    """The README says torchrun is not immune: under the same injection it aborts too."""
    env = {**os.environ, "LD_PRELOAD": str(holdwork), "HOLD_WORK": "10", "SLOW_GIL_MS": "300"}
    env["HOLD_FLAG"] = str(tmp_path / "flag")
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    argv += [f"--master_port={free_port()}", "tests/jobs/exit_race.py"]
    argv += ["examples/quickstart_ddp.py", "--steps", "5", "--out", str(tmp_path)]
    proc = subprocess.Popen(
        argv,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out = proc.communicate(timeout=180)[0]
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # torchrun's workers too, if anything is left
        except ProcessLookupError:
            pass
    assert proc.returncode != 0, out
    assert "terminate called" in out and "SIGABRT" in out, out


LIGHTNING_JOB = textwrap.dedent(
    """\
    import atexit, os, sys
    import torch
    import torch.distributed as dist
    atexit.register(lambda: print("atexit ran, group up:", dist.is_initialized()))
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    class Model(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(4, 1)

        def training_step(self, batch, _):
            if os.environ["MODE"] == "raise":
                raise ValueError("boom in training_step")
            return self.net(batch[0]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = L.Trainer(
        accelerator="cpu", devices=1, strategy="ddp", max_steps=2, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=os.getcwd(),
    )
    trainer.fit(Model(), DataLoader(TensorDataset(torch.randn(8, 4)), batch_size=4))
    print("fitted", trainer.global_step, "group up:", dist.is_initialized())
    if os.environ["MODE"] == "exit3":
        sys.exit(3)
    """
)


@pytest.mark.parametrize("mode", ["exit3", "raise"])
def test_a_lightning_script_leaves_the_runner_as_it_leaves_python(tmp_path, mode):
    """A Lightning fit (ddp, gloo) leaves the runner as it leaves python: the same exit code
    (0, sys.exit(3), 1 for an exception inside fit, its traceback printed), the same output,
    atexit handlers run. (Lightning registers its own atexit teardown only for NCCL.)"""
    pytest.importorskip("lightning")
    script = tmp_path / "fit.py"
    script.write_text(LIGHTNING_JOB)
    seen = []
    for how in ("python", "runner"):
        cwd = tmp_path / how
        cwd.mkdir()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK"))}
        env.update(MODE=mode, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        argv = [sys.executable, str(script)]
        proc = subprocess.run(
            rank_argv(argv) if how == "runner" else argv,
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        marks = [line for line in proc.stdout.splitlines() if "group up" in line]
        seen.append((proc.returncode, marks, "ValueError: boom in training_step" in proc.stderr))
    code = {"exit3": 3, "raise": 1}[mode]  # 0: the accelerate test and the matrix
    assert seen[0] == seen[1], seen
    assert seen[1][0] == code, seen
    fitted = [] if mode == "raise" else ["fitted 2 group up: True"]
    assert seen[1][1:] == ([*fitted, "atexit ran, group up: True"], mode == "raise"), seen
