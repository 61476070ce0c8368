"""DataLoader samples/s with launcher.hardware's picks vs every num_workers and pin_memory.

    python bench/loader_picks.py [--batches 60] [--repeats 2] [--step-ms 0]

A CPU-heavy synthetic dataset (PIL decode-like work per sample: random image, bicubic resize,
rotate, blur, to tensor). For 1 process, and for 2 processes loading at the same time (each
with its own loader, as 2 local ranks do), measures samples/s for num_workers 0..2 x CPUs
(split per process) with pin_memory off/on, and where the picks (`pick_loader(detect(), ...)`)
land. `--step-ms` makes the consuming process busy for that long per batch (a stand-in for
the training step that shares the CPUs with the workers). Target: picks >= 95% of the best.
The fixed rule found here is `num_workers: auto`'s first candidate; bench/loader_auto.py
measures auto itself against a full grid on several workloads.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class HeavyImages:
    """Map-style dataset whose samples cost a few ms of CPU each, like decoding + augmenting."""

    def __init__(self, size: int = 100_000, side: int = 128) -> None:
        self.size, self.side = size, side

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int):
        import numpy as np
        import torch
        from PIL import Image, ImageFilter

        rng = np.random.default_rng(i)
        pixels = rng.integers(0, 255, (self.side, self.side, 3), dtype=np.uint8)
        img = Image.fromarray(pixels).resize((160, 160), Image.BICUBIC)
        img = img.rotate(int(i % 30)).filter(ImageFilter.GaussianBlur(2))
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return x, i % 10


def busy(ms: float) -> None:
    end = time.perf_counter() + ms / 1000
    while time.perf_counter() < end:
        pass


def measure(workers: int, pin: bool, batches: int, batch_size: int, step_ms: float) -> float:
    """Samples/s over `batches` batches in steady state.

    The clock starts after the batches the workers could have prefetched while starting
    (2 per worker) have been drained, so more workers do not get a head start for free.
    """
    import warnings

    import torch
    from torch.utils.data import DataLoader

    warnings.filterwarnings("ignore", message=".*pin_memory.*")
    warnings.filterwarnings("ignore", message=".*worker processes in total.*")
    kwargs = {"persistent_workers": True, "prefetch_factor": 2} if workers else {}
    loader = DataLoader(
        HeavyImages(),
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        pin_memory=pin,
        drop_last=True,
        generator=torch.Generator().manual_seed(0),
        **kwargs,
    )
    it = iter(loader)
    for _ in range(1 + 2 * workers):
        next(it)
        if step_ms:
            busy(step_ms)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
        if step_ms:
            busy(step_ms)
    rate = batches * batch_size / (time.perf_counter() - t0)
    del it
    return rate


def child(args: argparse.Namespace) -> None:
    rate = measure(args.workers, args.pin, args.batches, args.batch_size, args.step_ms)
    print(json.dumps({"rate": rate}), flush=True)


def run_group(procs: int, workers: int, pin: bool, args: argparse.Namespace) -> float:
    """Total samples/s of `procs` processes, each with its own loader, started together."""
    argv = [sys.executable, __file__, "--child", "--workers", str(workers)]
    argv += ["--batches", str(args.batches), "--batch-size", str(args.batch_size)]
    argv += ["--step-ms", str(args.step_ms)] + (["--pin"] if pin else [])
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    # Same thread split a launched rank gets (the trainer divides CPUs by local ranks).
    env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // procs))
    running = [
        subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, text=True) for _ in range(procs)
    ]
    rates = [json.loads(p.communicate()[0].splitlines()[-1])["rate"] for p in running]
    return sum(rates)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--step-ms", type=float, default=0.0)
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--pin", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return 0

    from launcher.hardware import detect, pick_loader

    hw = detect()
    print(
        f"{hw.cpus} CPUs ({hw.cpus_source}), GPUs {hw.gpus}, batch {args.batch_size}, "
        f"{args.batches} batches in steady state, best of {args.repeats}, "
        f"training step stand-in {args.step_ms:g} ms/batch"
    )
    HeavyImages()[0]  # imports
    t0 = time.perf_counter()
    for i in range(20):
        HeavyImages()[i]
    per_sample = (time.perf_counter() - t0) / 20
    print(f"one sample costs {per_sample * 1000:.1f} ms of CPU in this process")
    summary = []
    for procs in args.procs:
        picks = pick_loader(hw, procs)
        max_workers = 2 * hw.cpus // procs
        table: dict[tuple[int, bool], float] = {}
        for workers in range(max_workers + 1):
            for pin in (False, True):
                runs = [run_group(procs, workers, pin, args) for _ in range(args.repeats)]
                table[(workers, pin)] = max(runs)
        best_key = max(table, key=table.get)
        best = table[best_key]
        pick_key = (picks.num_workers, picks.pin_memory)
        if pick_key not in table:
            runs = [run_group(procs, *pick_key, args) for _ in range(args.repeats)]
            table[pick_key] = max(runs)
        print(f"\n{procs} process(es) loading at once; total samples/s (best of {args.repeats}):")
        print(f"  {'num_workers':>11} {'pin off':>9} {'pin on':>9}")
        for workers in range(max_workers + 1):
            marks = "".join(f" {table[(workers, pin)]:>9.0f}" for pin in (False, True))
            note = "  <- picks" if workers == picks.num_workers else ""
            note += "  <- best" if workers == best_key[0] else ""
            print(f"  {workers:>11}{marks}{note}")
        ratio = table[pick_key] / best
        print(
            f"  picks: num_workers={picks.num_workers} pin_memory={picks.pin_memory} "
            f"-> {table[pick_key]:.0f} samples/s = {ratio:.0%} of best "
            f"(num_workers={best_key[0]}, pin={best_key[1]}: {best:.0f})"
        )
        print(f"  why: {picks.reasons['num_workers']}")
        summary.append((procs, ratio))
    print("\nverdict: " + ", ".join(
        f"{p} proc: picks {r:.0%} of best ({'ok' if r >= 0.95 else 'below 95%'})"
        for p, r in summary
    ))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
