"""Steps/s of the built-in trainer vs a plain hand-written DDP loop on the same model.

    python bench/trainer_overhead.py [--procs 2] [--steps 200] [--repeats 4]

Starts N >= 2 ranks (torchrun-style variables, gloo on CPU). Every rank runs the plain loop
and `launcher.runtime.trainer.train` on the same model, data, batch, optimizer and DDP
settings. Both read the wall clock and the process CPU clock (all threads) at the start of
every step; a step costs (reading at step warmup+steps - reading at step warmup) / steps, so
setup, process-group init and the final checkpoint are outside the window. The kinds
alternate between repeats so drifting machine load hits both; medians over repeats.
Prints one table; target: overhead <= 5%.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

MODELS = {
    # name: train.model_kwargs; per-rank batch from --batch
    "mlp-small": {"in_features": 32, "hidden": 64, "layers": 2, "num_classes": 8},
    "mlp-1M": {"in_features": 256, "hidden": 1024, "layers": 2, "num_classes": 16},
    "transformer": {"d_model": 64, "layers": 2, "ff": 128, "dropout": 0.0},
}


def spec_for(model: str, steps: int, batch: int, world: int, size: int):
    from launcher import schema
    from launcher.spec import JobSpec

    name = "transformer" if model == "transformer" else "mlp"
    return schema.build(
        JobSpec,
        {
            "name": "bench",
            "loader": {"num_workers": 0},
            "train": {
                "model": name,
                "model_kwargs": MODELS[model],
                "dataset_kwargs": {"size": size},
                "steps": steps,
                "global_batch_size": batch * world,
                "checkpoint_every": 10**6,
                "log_every": 10**6,
                "schedule": {"name": "constant"},
                "optimizer": {"weight_decay": 0.0, "no_decay": [], "no_decay_1d": False},
            },
        },
    )


def next_port() -> None:
    """A fresh rendezvous port per process group: a second group on the port of the first
    one, in the same processes, hangs (the first group's store still answers there)."""
    os.environ["MASTER_PORT"] = str(int(os.environ["MASTER_PORT"]) + 1)


def mark(marks: list[tuple[float, float]]) -> None:
    marks.append((time.perf_counter(), time.process_time()))


def plain_loop(spec) -> list[tuple[float, float]]:
    """The loop a user would write by hand: DDP, DistributedSampler, AdamW.

    Returns (wall, CPU) clock readings taken at the start of every step.
    """
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data import DataLoader, DistributedSampler

    from launcher.runtime.models import build

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{os.environ['MASTER_PORT']}",
        rank=rank,
        world_size=world,
    )
    torch.manual_seed(spec.train.seed)
    built = build(spec.train)
    # Same DDP settings as the trainer, so the difference is the loop and its bookkeeping.
    model = DistributedDataParallel(built.model, gradient_as_bucket_view=True)
    sampler = DistributedSampler(built.dataset, num_replicas=world, rank=rank, seed=0)
    loader = DataLoader(
        built.dataset,
        batch_size=spec.train.global_batch_size // world,
        sampler=sampler,
        collate_fn=built.collate_fn,
        drop_last=True,
    )
    opt = torch.optim.AdamW(model.parameters(), lr=spec.train.optimizer.lr, weight_decay=0.0)
    sampler.set_epoch(0)
    marks: list[tuple[float, float]] = []
    for step, batch in enumerate(loader, start=1):
        mark(marks)
        loss = model(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step == spec.train.steps:
            break
    mark(marks)
    # DDP must go before its process group, or the Reducer's destructor tears the gloo
    # group down later while holding the GIL, and can deadlock with gloo's threads.
    del model, opt, loss
    gc.collect()
    dist.destroy_process_group()
    return marks


def trainer_run(spec) -> list[tuple[float, float]]:
    """The built-in trainer on the same job, with the same clock readings.

    The trainer asks its StopRequest once per step, at the step's start, when it runs with
    several ranks: a StopRequest that reads the clocks there times the steps from inside.
    """
    from launcher.runtime.trainer import StopRequest, train

    marks: list[tuple[float, float]] = []

    class Clock(StopRequest):
        @property
        def requested(self) -> bool:
            mark(marks)
            return False

    with tempfile.TemporaryDirectory() as tmp:
        train(spec, Path(tmp), stop=Clock(), handle_signals=False)
    return marks


def worker(args: argparse.Namespace) -> None:
    import torch

    world = int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    total = args.warmup + args.steps
    results: dict[str, dict[str, list[list[float]]]] = {}
    for model in args.models:
        spec = spec_for(model, total + 1, args.batch, world, args.batch * world * (total + 2))
        res = results.setdefault(model, {"plain": [], "trainer": []})
        for rep in range(args.repeats):
            kinds = ("plain", "trainer") if rep % 2 == 0 else ("trainer", "plain")
            for kind in kinds:
                next_port()
                marks = (plain_loop if kind == "plain" else trainer_run)(spec)
                (w0, c0), (w1, c1) = marks[args.warmup], marks[total]
                res[kind].append([(w1 - w0) / args.steps, (c1 - c0) / args.steps])
    out = Path(args.out) / f"rank{os.environ['RANK']}.json"
    out.write_text(json.dumps(results))


def free_port_range(span: int) -> int:
    """A base port with `span` free ports above it."""
    for base in range(23000, 60000, span + 1):
        try:
            for port in range(base, base + span + 1):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError("no free port range")


def med(per_rank: list[dict], model: str, kind: str, i: int) -> float:
    """Mean over ranks of each repeat, then the median over repeats."""
    reps = zip(*(r[model][kind] for r in per_rank), strict=True)
    return statistics.median(statistics.mean(x[i] for x in rep) for rep in reps)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=200, help="measured steps")
    parser.add_argument("--warmup", type=int, default=20, help="steps before the clock starts")
    parser.add_argument("--batch", type=int, default=32, help="per-rank batch")
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return 0

    out_dir = tempfile.mkdtemp(prefix="trainer-overhead-")
    argv = [sys.executable, __file__, "--worker", "--steps", str(args.steps), "--out", out_dir]
    argv += ["--warmup", str(args.warmup), "--batch", str(args.batch)]
    argv += ["--repeats", str(args.repeats), "--models", *args.models]
    if args.procs < 2:
        parser.error("--procs must be >= 2 (the trainer is timed through its multi-rank path)")
    port = free_port_range(2 * args.repeats * len(args.models) + 1)
    load_before = os.getloadavg()[0]
    procs = []
    for rank in range(args.procs):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "LAUNCHER_"))}
        env.update(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(args.procs),
            LOCAL_WORLD_SIZE=str(args.procs),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            # Both loops get the same thread count: the trainer then leaves it alone.
            OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // args.procs)),
            PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        )
        procs.append(subprocess.Popen(argv, env=env, stderr=subprocess.DEVNULL))
    codes = [p.wait() for p in procs]
    if any(codes):
        print(f"ranks failed with exit codes {codes}", file=sys.stderr)
        return 1
    per_rank = [json.loads(p.read_text()) for p in sorted(Path(out_dir).glob("rank*.json"))]

    print(
        f"{args.procs} ranks, gloo on CPU, per-rank batch {args.batch}, {args.steps} measured "
        f"steps after {args.warmup}, {args.repeats} repeats, load average "
        f"{load_before:.1f} -> {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    print(
        f"{'model':<12} {'plain steps/s':>13} {'trainer':>8} {'wall ovh':>9}"
        f" {'plain CPU ms/step':>18} {'trainer':>8} {'CPU ovh':>8}"
    )
    for model in args.models:
        p_wall, t_wall = med(per_rank, model, "plain", 0), med(per_rank, model, "trainer", 0)
        p_cpu, t_cpu = med(per_rank, model, "plain", 1), med(per_rank, model, "trainer", 1)
        print(
            f"{model:<12} {1 / p_wall:>13.1f} {1 / t_wall:>8.1f} {t_wall / p_wall - 1:>9.1%}"
            f" {p_cpu * 1000:>18.2f} {t_cpu * 1000:>8.2f} {t_cpu / p_cpu - 1:>8.1%}"
        )
        for kind in ("plain", "trainer"):
            reps = zip(*(r[model][kind] for r in per_rank), strict=True)
            each = [
                f"{1 / statistics.mean(x[0] for x in rep):.1f}/"
                f"{1000 * statistics.mean(x[1] for x in rep):.2f}"
                for rep in reps
            ]
            print(f"{'':<12}   {kind} per repeat (steps/s / CPU ms): {', '.join(each)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
