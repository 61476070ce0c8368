"""`num_workers: auto` against a full grid, the fixed rule and Lightning's rule, in one run.

    python bench/loader_auto.py [--repeats 3] [--cycles 4] [--procs 1 2] [--workloads ...]

Four workloads that differ in per-sample cost, sample size and step cost (this file's
`build_model` / `build_dataset`), each for 1 process and for 2 processes (two gloo ranks with
DDP on this machine, as 2 local ranks of a job):
- the grid: every num_workers from 0 to 2 x CPUs per process, measured by this file's own
  training loop (not the tuner's code), interleaved: `--cycles` rounds through the grid in
  alternating order, then the auto runs, then `--cycles` more; each segment times 0.5 s of
  loader + step after its warm-up; the median per setting;
- auto: `--repeats` real built-in-trainer jobs with `num_workers: auto` and time_min 10 (so
  the default budget of a 10-minute job, 12 s), remembering nothing
  (LAUNCHER_LOADER_CACHE=off), each stopped once it has chosen.
Reported per workload: the grid's medians (and min-max), the best, and as a share of the
best: auto's choices (median and worst), the fixed rule (2 per CPU, none under 2 CPUs per
process) and Lightning's (CPUs per process - 1); the race's seconds and the seconds it lost
against the best measured rate. Target: auto >= 95% of the best on every workload.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent

# name: (dataset kwargs, model kwargs, micro batch, steps); step cost from the model width.
WORKLOADS: dict[str, dict] = {
    # CPU-heavy decode-like samples, a tiny step: workers help.
    "decode": {"data": {"kind": "decode", "work": 6}, "model": {"width": 32}, "batch": 16},
    # In-memory samples, a heavy step: workers only add copies and steal the step's CPUs.
    "memory": {"data": {"kind": "memory"}, "model": {"width": 384}, "batch": 64},
    # Big samples (192 KiB each), cheap to make: the cost is moving them between processes.
    "big": {"data": {"kind": "big"}, "model": {"width": 64}, "batch": 32},
    # Some per-sample work and a step of about the same cost: the CPUs are contended.
    "balanced": {"data": {"kind": "decode", "work": 5}, "model": {"width": 512}, "batch": 16},
}
# Every job is a 10-minute job (time_min: 10, so auto's default budget, 12 s, applies) with
# steps enough for that, stopped early by a StopRequest as a preemption would: a fixed setting
# after FIXED_S seconds (the second half of its steps is timed), auto once it has chosen.
FIXED_S = 4.0
AUTO_MAX_S = 60.0
STEPS = 1_000_000
SEGMENT_S = 0.5  # timed seconds per grid segment


# --- the workloads (imported by the trainer as `loader_auto:build_...`) ---------------------


class BenchData:
    """Map-style dataset; every sample a function of its index (exact resume holds)."""

    def __init__(self, kind: str = "decode", size: int = 4096, work: int = 4, dim: int = 64):
        self.kind, self.size, self.work, self.dim = kind, size, work, dim
        import torch

        g = torch.Generator().manual_seed(0)
        if kind == "memory":
            self.x = torch.randn(size, dim, generator=g)
        if kind == "big":
            self.base = torch.randn(3, 128, 128, generator=g)
        self.y = torch.randint(0, 8, (size,), generator=g)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int):
        import numpy as np
        import torch

        if self.kind == "memory":
            return self.x[i], self.y[i]
        if self.kind == "big":
            x = self.base * (1.0 + (i % 7) * 0.01)
            return x, self.y[i]
        # decode-like: repeated small image ops on a 64x64 float image, `work` rounds.
        rng = np.random.default_rng(i)
        img = rng.random((64, 64), dtype=np.float32)
        for _ in range(self.work):
            img = np.sqrt(np.abs(np.fft.ifft2(np.fft.fft2(img) * 0.5)).astype(np.float32) + 0.1)
        feat = torch.from_numpy(img[:8, :8].reshape(-1).copy())
        return feat, self.y[i]


def build_dataset(**kwargs):
    return BenchData(**kwargs)


def build_model(width: int = 64, kind: str = ""):
    import torch

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.width = width
            self.net = torch.nn.Sequential(
                torch.nn.LazyLinear(width),
                torch.nn.ReLU(),
                torch.nn.Linear(width, width),
                torch.nn.ReLU(),
                torch.nn.Linear(width, 8),
            )

        def forward(self, batch):
            x, y = batch
            if x.dim() == 4:  # big images: pooled first, so moving them is the cost
                x = torch.nn.functional.adaptive_avg_pool2d(x, 16)
            x = x.reshape(x.shape[0], -1)
            return torch.nn.functional.cross_entropy(self.net(x), y)

    net = Net()
    probe = {"big": 3 * 16 * 16}.get(kind, 64)
    net.net(torch.zeros(1, probe))  # materialise the lazy layer before the optimizer sees it
    return net


# --- one process of a group: a list of jobs in order ---------------------------------------


def steady_rate(metrics: Path) -> float:
    """samples/s over the second half of the steps (after start-up and any race)."""
    steps = {}
    for line in metrics.read_text().splitlines():
        rec = json.loads(line)
        if "event" not in rec and "step" in rec:
            steps[rec["step"]] = rec
    last = max(steps)
    window = [steps[s] for s in sorted(steps) if s > last // 2]
    batch = window[0]["samples_per_s"] * window[0]["step_time_s"]
    return len(window) * batch / sum(r["step_time_s"] for r in window)


def _chosen(metrics: Path) -> bool:
    try:
        return '"event": "loader"' in metrics.read_text()
    except OSError:
        return False


def child(args: argparse.Namespace) -> None:
    import threading

    from launcher import schema
    from launcher.runtime.trainer import StopRequest, train
    from launcher.spec import JobSpec

    sys.path.insert(0, str(HERE))
    jobs = json.loads(args.jobs)
    w = WORKLOADS[args.workload]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    base_port = int(os.environ.get("MASTER_PORT", "29500"))
    rank = int(os.environ.get("RANK", "0"))
    for n, workers in enumerate(jobs):
        auto = workers == "auto"
        data = {"size": 65536} | w["data"]
        config = {
            "name": "bench",
            "resources": {"time_min": 10},
            "loader": {"num_workers": workers},
            "train": {
                "model": "loader_auto:build_model",
                "model_kwargs": w["model"] | {"kind": w["data"]["kind"]},
                "dataset": "loader_auto:build_dataset",
                "dataset_kwargs": data,
                "steps": STEPS,
                "global_batch_size": w["batch"] * world,
                "checkpoint_every": 10_000,
                "log_every": 10_000,
            },
        }
        spec = schema.build(JobSpec, config, file="bench.yaml")
        run_dir = Path(args.out) / f"job{n}"
        environ = dict(os.environ, MASTER_PORT=str(base_port + 1 + n))
        metrics = run_dir / "metrics.jsonl"
        stop = StopRequest()
        done = threading.Event()

        def stopper(auto: bool = auto, metrics: Path = metrics, done=done, stop=stop) -> None:
            """Rank 0 stops the job (the others follow, as after a signal to one rank)."""
            t0 = time.monotonic()
            while not done.is_set():
                elapsed = time.monotonic() - t0
                if not auto and elapsed > FIXED_S:
                    break
                if auto and (elapsed > AUTO_MAX_S or _chosen(metrics)):
                    break
                time.sleep(0.05)
            stop.request()

        watcher = threading.Thread(target=stopper, daemon=True)
        if rank == 0:
            watcher.start()
        t0 = time.perf_counter()
        train(spec, run_dir, environ=environ, handle_signals=False, stop=stop)
        wall = time.perf_counter() - t0
        done.set()
        if rank != 0:
            continue
        out: dict = {"workers": workers, "rate": steady_rate(metrics), "wall_s": wall}
        if auto:
            for line in metrics.read_text().splitlines():
                rec = json.loads(line)
                if rec.get("event") == "loader":
                    out["chosen"] = rec["num_workers"]
                    out["race_s"] = rec["seconds"]
                    out["overhead_s"] = rec["overhead_s"]
                    out["batches"] = rec["batches"]
                    out["table"] = rec["table"]
        print(json.dumps(out), flush=True)


def grid_child(args: argparse.Namespace) -> None:
    """The reference: every grid setting in turn, `--cycles` times, in one training process
    group (DDP over gloo with 2 ranks), with its own loop (not the tuner's code): each
    segment builds a DataLoader over the next slice of this rank's shard, trains on
    1 + 2 x workers batches untimed (start-up and prefetch head start), then times the next
    SEGMENT_S seconds' worth of batches of loader + step. Interleaving cancels the slow drift
    of a shared machine's load, which separate runs of a few seconds each do not."""
    import torch
    import torch.distributed as tdist
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data import DataLoader

    from launcher.runtime.dist import distributed

    w = WORKLOADS[args.workload]
    grid = json.loads(args.jobs)
    batch = w["batch"]
    with distributed() as ctx:
        rank, world = ctx.env.rank, ctx.env.world_size
        data = BenchData(**({"size": 65536} | w["data"]))
        torch.manual_seed(0)
        model = build_model(**w["model"], kind=w["data"]["kind"])
        opt = torch.optim.AdamW(model.parameters())
        net = DistributedDataParallel(model) if world > 1 else model
        shard = list(range(rank, len(data), world))
        pos = 0

        def segment(workers: int, timed: int) -> float:
            """Trains warm-up + `timed` batches; seconds of the timed part."""
            nonlocal pos
            warm = 1 + 2 * workers
            n = (warm + timed) * batch
            idx = [shard[(pos + i) % len(shard)] for i in range(n)]
            pos += n
            kwargs = {"prefetch_factor": 2} if workers else {}
            loader = DataLoader(
                data, batch_size=batch, sampler=idx, num_workers=workers, drop_last=True, **kwargs
            )
            marks = []
            it = iter(loader)
            for b in it:
                marks.append(time.perf_counter())
                loss = net(b)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            marks.append(time.perf_counter())
            getattr(it, "_shutdown_workers", lambda: None)()
            return marks[-1] - marks[warm]

        def agree(value: float) -> float:
            t = torch.tensor([value], dtype=torch.float64)
            if world > 1:
                tdist.all_reduce(t, op=tdist.ReduceOp.MAX, group=ctx.control)
            return float(t[0])

        probe = 10
        per_batch = agree(segment(0, probe) / probe)
        timed = max(10, min(2000, int(SEGMENT_S / per_batch)))
        rates: dict[int, list[float]] = {g: [] for g in grid}
        for cycle in range(args.cycles):
            order = grid if cycle % 2 == 0 else grid[::-1]
            for g in order:
                seconds = agree(segment(g, timed))  # the job runs at its slowest rank's pace
                rates[g].append(timed * batch * world / seconds)
        if rank == 0:
            print(json.dumps({"grid": rates, "timed_batches": timed}), flush=True)


def run_group(
    procs: int, workload: str, jobs: list, port: int, threads: int, extra: list[str] | None = None
) -> list[dict]:
    """`procs` ranks run the same jobs in the same order; rank 0's results."""
    out = tempfile.mkdtemp(prefix="loader_auto.")
    argv = [sys.executable, __file__, "--child", "--workload", workload]
    argv += ["--jobs", json.dumps(jobs), "--out", out] + (extra or [])
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env["LAUNCHER_LOADER_CACHE"] = "off"
    env.pop("LAUNCHER_NUM_WORKERS", None)
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(procs))
    env["LOCAL_WORLD_SIZE"] = str(procs)
    if threads:
        # On a machine shared with other jobs, two intra-op threads of a small step spend most
        # of their time waiting for each other (10-30 ms steps instead of 1-2 ms, and wild
        # swings between runs); one thread keeps the step's cost steady between runs.
        env["OMP_NUM_THREADS"] = str(threads)
    else:
        env.pop("OMP_NUM_THREADS", None)
    running = []
    for rank in range(procs):
        renv = dict(env, RANK=str(rank), LOCAL_RANK=str(rank))
        running.append(
            subprocess.Popen(
                argv, env=renv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
            )
        )
    outs = [p.communicate()[0] for p in running]
    if any(p.returncode for p in running):
        raise SystemExit(f"{workload} x {procs}: a rank failed ({[p.returncode for p in running]})")
    return [json.loads(line) for line in outs[0].splitlines() if line.startswith("{")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS))
    parser.add_argument(
        "--step-threads",
        type=int,
        default=1,
        help="intra-op threads of each rank's step (0: the trainer's split of the CPUs)",
    )
    parser.add_argument("--json-out", help="write every run's figures here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workload", help=argparse.SUPPRESS)
    parser.add_argument("--jobs", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--grid", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--cycles", type=int, default=4, help="grid cycles before and after the auto runs"
    )
    args = parser.parse_args()
    if args.child and args.grid:
        grid_child(args)
        return 0
    if args.child:
        child(args)
        return 0

    from launcher.hardware import detect, lightning_rule, rule_workers

    hw = detect()
    load = os.getloadavg()
    print(
        f"{hw.cpus} CPUs ({hw.cpus_source}), GPUs {hw.gpus}; load average at start "
        f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; grid {2 * args.cycles} cycles, "
        f"{args.repeats} auto jobs per workload"
    )
    port = 31000 + os.getpid() % 1000 * 20
    rows = []
    for procs in args.procs:
        grid = list(range(2 * hw.cpus // procs + 1))
        rule = rule_workers(hw, procs)[0]
        light = lightning_rule(hw, procs)
        for workload in args.workloads:
            rates: dict[int, list[float]] = {w: [] for w in grid}
            autos: list[dict] = []
            # Grid, then the auto runs, then the grid again (so drift hits both alike).
            for phase in ("grid", "auto", "grid"):
                port += 2 + args.repeats
                if phase == "grid":
                    extra = ["--grid", "--cycles", str(args.cycles)]
                    (res,) = run_group(procs, workload, grid, port, args.step_threads, extra)
                    for g, values in res["grid"].items():
                        rates[int(g)] += values
                else:
                    jobs = ["auto"] * args.repeats
                    autos += run_group(procs, workload, jobs, port, args.step_threads)
            med = {w: statistics.median(v) for w, v in rates.items()}
            best_w = max(med, key=lambda w: med[w])
            best = med[best_w]
            shares = [med[a["chosen"]] / best for a in autos]
            rows.append(
                {
                    "procs": procs,
                    "workload": workload,
                    "runs": rates,
                    "auto_runs": autos,
                    "grid": med,
                    "best": best_w,
                    "auto": [a["chosen"] for a in autos],
                    "auto_share_median": statistics.median(shares),
                    "auto_share_worst": min(shares),
                    "rule": rule,
                    "rule_share": med[rule] / best,
                    "lightning": light,
                    "lightning_share": med[light] / best,
                    "race_s": statistics.median(a["race_s"] for a in autos),
                    "overhead_s": statistics.median(a["overhead_s"] or 0.0 for a in autos),
                }
            )
            row = rows[-1]
            spread = statistics.median(
                (max(v) - min(v)) / statistics.median(v) for v in rates.values()
            )
            row["spread"] = spread
            print(
                f"\n{workload} x {procs} proc(s): samples/s by num_workers (median [min-max]) "
                + "  ".join(
                    f"{w}:{med[w]:.0f} [{min(rates[w]):.0f}-{max(rates[w]):.0f}]" for w in grid
                )
            )
            print(
                f"  best {best_w} ({best:.0f}/s); auto chose {row['auto']} -> "
                f"{row['auto_share_median']:.0%} (worst {row['auto_share_worst']:.0%}); "
                f"rule {rule} -> {row['rule_share']:.0%}; lightning {light} -> "
                f"{row['lightning_share']:.0%}; race {row['race_s']:.1f} s, "
                f"{row['overhead_s']:.1f} s lost",
                flush=True,
            )
    load = os.getloadavg()
    print(f"\nload average at end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(
        "\n| workload | procs | best of grid | auto picks | auto (median / worst) | "
        "rule (2/CPU) | Lightning (CPUs-1) | race s | lost s | grid spread |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['workload']} | {row['procs']} | {row['best']} | "
            f"{','.join(map(str, row['auto']))} | {row['auto_share_median']:.0%} / "
            f"{row['auto_share_worst']:.0%} | {row['rule']}: {row['rule_share']:.0%} | "
            f"{row['lightning']}: {row['lightning_share']:.0%} | {row['race_s']:.1f} | "
            f"{row['overhead_s']:.1f} | {row['spread']:.0%} |"
        )
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=1, default=str))
    ok = all(row["auto_share_worst"] >= 0.95 for row in rows)
    print(f"\nverdict: auto >= 95% of the best on every workload: {'yes' if ok else 'NO'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
