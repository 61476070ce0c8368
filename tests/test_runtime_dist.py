"""The built-in trainer as the backends start it: `python -m launcher.runtime` in 2 real
processes joined by gloo (torchrun-style or Slurm-style variables), real signals, real kill -9.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from launcher import config, schema
from launcher.runtime import REQUEUE_EXIT_CODE
from launcher.runtime import checkpoint as ckpt
from launcher.runtime.trainer import train
from launcher.spec import JobSpec

ROOT = Path(__file__).resolve().parent.parent
# Variables of an outer launcher that must not leak into the ranks we start.
SCRUB = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def spec_of(num_workers: int = 0, **train: object) -> JobSpec:
    return schema.build(
        JobSpec,
        {"name": "dist", "loader": {"num_workers": num_workers}, "train": train},
        file="test.yaml",
    )


def new_run(path: Path, spec: JobSpec) -> Path:
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(config.dump(spec))
    return path


def free_port(lo: int = 20000, hi: int = 60000) -> int:
    for _ in range(200):
        port = random.randrange(lo, hi)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port")


def base_env(run_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SCRUB and not k.startswith("SLURM_")}
    env.update(
        LAUNCHER_CONFIG=str(run_dir / "config.yaml"),
        LAUNCHER_RUN_DIR=str(run_dir),
        PYTHONUNBUFFERED="1",
        PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
    )
    return env


def launch(run_dir: Path, nprocs: int = 2, *, style: str = "torchrun") -> list[subprocess.Popen]:
    """Start the ranks the way a backend does; each rank logs to run_dir/logs/rank<N>.log."""
    port = free_port(15000, 35000)
    (run_dir / "logs").mkdir(exist_ok=True)
    procs = []
    for rank in range(nprocs):
        env = base_env(run_dir)
        if style == "torchrun":
            env.update(
                RANK=str(rank),
                LOCAL_RANK=str(rank),
                WORLD_SIZE=str(nprocs),
                LOCAL_WORLD_SIZE=str(nprocs),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
            )
        else:  # what srun gives each task; the port comes from the job id
            env.update(
                SLURM_PROCID=str(rank),
                SLURM_LOCALID=str(rank),
                SLURM_NTASKS=str(nprocs),
                SLURM_TASKS_PER_NODE=f"{nprocs}",
                SLURM_JOB_NODELIST="localhost",
                SLURM_JOB_ID=str(port - 15000 + 20000 * 7),
            )
        log = open(run_dir / "logs" / f"rank{rank}.log", "ab")  # noqa: SIM115
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "launcher.runtime"],
                cwd=run_dir,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group: signal a rank with its workers
            )
        )
        log.close()
    return procs


def logs(run_dir: Path, tail: int | None = 3000) -> str:
    """The ranks' logs (their ends, for assertion messages; all of them with tail=None)."""
    return "\n".join(
        f"--- {p.name}\n{p.read_text(errors='replace')[-(tail or 0) :]}"
        for p in sorted((run_dir / "logs").glob("*.log"))
    )


def wait_all(procs: list[subprocess.Popen], run_dir: Path, timeout: float = 240) -> list[int]:
    deadline = time.monotonic() + timeout
    codes = []
    try:
        for p in procs:
            codes.append(p.wait(timeout=max(1, deadline - time.monotonic())))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return codes


def step_losses(run_dir: Path) -> dict[int, float]:
    out = {}
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line being written right now
        if "step" in record and "event" not in record:
            out[record["step"]] = record["loss"]
    return out


def final_model(run_dir: Path) -> dict[str, torch.Tensor]:
    found = ckpt.load_latest(run_dir / "checkpoints")
    assert found is not None, logs(run_dir)
    return found[1]["model"]


def test_two_processes_equal_one_process_at_same_global_batch(tmp_path: Path) -> None:
    """DDP over 2 gloo ranks (started with Slurm's variables) == 1 process, same batch."""
    common = dict(model="mlp", steps=12, global_batch_size=32, dataset_kwargs={"size": 256}, seed=3)
    one = train(spec_of(**common), tmp_path / "one")
    assert one.world_size == 1
    run = new_run(tmp_path / "two", spec_of(**common))
    codes = wait_all(launch(run, 2, style="slurm"), run)
    assert codes == [0, 0], logs(run)
    assert "rank 1/2 (local 1/2) on cpu via localhost" in logs(run, None)
    assert "(slurm)" in logs(run, None)
    a, b = final_model(tmp_path / "one"), final_model(run)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
    la, lb = step_losses(tmp_path / "one"), step_losses(run)
    assert sorted(lb) == list(range(1, 13))
    assert [round(la[s], 4) for s in la] == [round(lb[s], 4) for s in la]
    # Only rank 0 wrote shared files.
    assert len(list((run / "checkpoints").glob("step-*.pt"))) == 1


def test_signal_mid_epoch_then_resume_is_bitwise_equal_to_uninterrupted(tmp_path: Path) -> None:
    """SIGUSR1 to one rank (and its loader worker) only: both ranks stop after the same step,
    checkpoint and exit 75; the resumed run ends bitwise equal to an uninterrupted one
    (dropout on, one loader worker per rank)."""
    common = dict(
        model="mlp",
        model_kwargs={"dropout": 0.2, "hidden": 128},
        steps=480,
        global_batch_size=16,
        # 400 steps per epoch: the stop (ranks exchange the flag every ~0.25 s of steps)
        # lands mid-epoch 0, and the resumed run crosses into epoch 1.
        dataset_kwargs={"size": 6400},
        checkpoint_every=1000,
        seed=11,
    )
    whole = new_run(tmp_path / "whole", spec_of(num_workers=1, **common))
    assert wait_all(launch(whole), whole) == [0, 0], logs(whole)

    run = new_run(tmp_path / "stopped", spec_of(num_workers=1, **common))
    procs = launch(run)
    deadline = time.monotonic() + 180
    while len(step_losses(run)) < 4:
        assert time.monotonic() < deadline, logs(run)
        assert all(p.poll() is None for p in procs), logs(run)
        time.sleep(0.005)
    # Like `scancel --signal`: rank 1 and its DataLoader worker get it, rank 0 does not.
    os.killpg(procs[1].pid, signal.SIGUSR1)
    assert wait_all(procs, run) == [REQUEUE_EXIT_CODE, REQUEUE_EXIT_CODE], logs(run)
    (stopped_at, _), *_ = ckpt.list_checkpoints(run / "checkpoints")[::-1]
    assert 4 < stopped_at < 400, f"stopped at {stopped_at}: expected mid-epoch 0"
    assert f"[rank 1] INFO stopped by SIGUSR1 after step {stopped_at}" in logs(run, None)
    assert f"[rank 0] INFO stopped by another rank after step {stopped_at}" in logs(run, None)

    assert wait_all(launch(run), run) == [0, 0], logs(run)
    resumed = f"resuming from {run / 'checkpoints' / f'step-{stopped_at:09d}.pt'}"
    assert resumed in logs(run, None)
    a, b = final_model(whole), final_model(run)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # Same seed, same loss curve, step by step (across the stop and restart too).
    assert step_losses(run) == step_losses(whole)
    assert len(step_losses(whole)) == 480


def test_kill_9_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoints"
    writer = (
        "import sys, torch\n"
        "from launcher.runtime import checkpoint as c\n"
        "folder = sys.argv[1]\n"
        "c.save(folder, 1, {'w': torch.arange(10.0)}, keep_last=3)\n"
        "c.save(folder, 2, {'w': torch.randn(96 * 1024 * 1024)}, keep_last=3)\n"  # 384 MiB
    )
    proc = subprocess.Popen([sys.executable, "-c", writer, str(folder)])
    deadline = time.monotonic() + 120
    tmp = None
    while tmp is None:
        assert proc.poll() is None, "the writer finished before it could be killed"
        assert time.monotonic() < deadline
        temps = list(folder.glob(".step-000000002.*.tmp")) if folder.is_dir() else []
        if temps and temps[0].stat().st_size > 0:
            tmp = temps[0]
        else:
            time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert tmp.exists(), "killed mid-write: the partial temp file is still there"
    assert [s for s, _ in ckpt.list_checkpoints(folder)] == [1]
    path, state = ckpt.load_latest(folder)
    assert path.name == "step-000000001.pt"
    assert torch.equal(state["w"], torch.arange(10.0))
    ckpt.save(folder, 3, {"w": torch.zeros(1)}, keep_last=3)
    assert not tmp.exists(), "the next save removes the dead writer's temp file"


def test_runtime_errors_are_one_line_with_exit_code_2(tmp_path: Path) -> None:
    run = new_run(
        tmp_path / "bad", spec_of(model="mlp", optimizer={"groups": [{"pattern": "encoder.*"}]})
    )
    env = base_env(run)
    done = subprocess.run(
        [sys.executable, "-m", "launcher.runtime"],
        env=env,
        cwd=run,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if "error" in line]
    assert errors == [
        f"launcher.runtime: rank 0: error: {run / 'config.yaml'}: "
        "train.optimizer.groups[0].pattern: "
        "pattern 'encoder.*' matches no parameter (names look like body.0.weight, body.0.bias, "
        "body.3.weight, body.3.bias, ...)"
    ]
    env.pop("LAUNCHER_CONFIG")
    done = subprocess.run(
        [sys.executable, "-m", "launcher.runtime"], env=env, capture_output=True, text=True
    )
    assert done.returncode == 2 and "LAUNCHER_CONFIG is not set" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


@pytest.mark.gpu
def test_two_processes_on_cuda_use_nccl(tmp_path: Path) -> None:
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA devices")
    run = new_run(tmp_path / "nccl", spec_of(model="mlp", steps=5, global_batch_size=16))
    assert wait_all(launch(run), run) == [0, 0], logs(run)
    assert "joined nccl group" in logs(run)
