"""GPU figures for the runtime, in one run of under 10 minutes (prepared for a GPU session).

    python bench/gpu_runtime.py [--budget-s 480] [--out DIR]

1. Step time of a ~100M-parameter transformer (the built-in TinyTransformer, scaled up) and
   a wide MLP in fp32, fp32 with TF32 matmuls, bf16 autocast and fp16 autocast + GradScaler.
2. Host-to-device copies from pageable vs pinned memory (1 MiB .. 256 MiB), and whether a
   pinned non_blocking copy overlaps a matmul.
3. The built-in trainer end to end on one GPU (`train()`): bf16 vs fp32, loader
   pin_memory on vs off, samples/s from its TrainResult.
4. The `gpu`-marked tests of tests/test_runtime*.py.

Each section checks the time left and is skipped (said so) when the budget is spent.
Results print as a table and go to DIR/gpu_runtime.json (DIR: --out, else $OUT if set).
Without CUDA it runs sections 1 and 3 at toy size on the CPU to prove the code path and
exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from launcher import schema  # noqa: E402
from launcher.runtime.models import MLP, TinyTransformer  # noqa: E402
from launcher.runtime.trainer import autocast, train  # noqa: E402
from launcher.spec import JobSpec  # noqa: E402


class Budget:
    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def allows(self, seconds: float, what: str, results: dict) -> bool:
        if self.left() >= seconds:
            return True
        print(f"  skipped {what}: {self.left():.0f}s left, needs ~{seconds:.0f}s")
        results.setdefault("skipped", []).append(what)
        return False


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_time(model_fn, batch_fn, precision: str, device: torch.device, steps: int) -> float:
    """Mean seconds per training step (forward, backward, AdamW) after 5 warm-up steps."""
    torch.manual_seed(0)
    model = model_fn().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    batch = batch_fn(device)
    tf32 = precision == "tf32"
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
    mode = "fp32" if precision == "tf32" else precision

    def one() -> None:
        with autocast(mode, device):
            loss = model(batch)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(5):
        one()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        one()
    sync(device)
    elapsed = (time.perf_counter() - t0) / steps
    model = opt = None  # free the memory before the next variant
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.cuda.empty_cache()
    return elapsed


def section_precision(device: torch.device, budget: Budget, results: dict, big: bool) -> None:
    print("\n1. step time by precision")
    if big:
        vocab, d, layers, seq, bsz = 32000, 1024, 8, 512, 16
        mlp_in, mlp_hidden, mlp_bsz, steps = 4096, 8192, 512, 20
    else:
        vocab, d, layers, seq, bsz = 64, 32, 1, 16, 4
        mlp_in, mlp_hidden, mlp_bsz, steps = 32, 64, 16, 3

    def transformer() -> torch.nn.Module:
        return TinyTransformer(
            vocab=vocab, d_model=d, heads=max(1, d // 64), layers=layers, ff=4 * d,
            max_positions=seq, dropout=0.0,
        )  # fmt: skip

    def tokens(dev: torch.device) -> dict:
        ids = torch.randint(0, vocab, (bsz, seq), device=dev)
        return {
            "input_ids": ids,
            "labels": ids.roll(-1, dims=1),
            "attention_mask": torch.ones(bsz, seq, dtype=torch.bool, device=dev),
        }

    def mlp() -> torch.nn.Module:
        return MLP(in_features=mlp_in, hidden=mlp_hidden, layers=3, num_classes=1000)

    def vectors(dev: torch.device) -> tuple:
        x = torch.randn(mlp_bsz, mlp_in, device=dev)
        return x, torch.randint(0, 1000, (mlp_bsz,), device=dev)

    precisions = ["fp32", "tf32", "bf16", "fp16"] if device.type == "cuda" else ["fp32", "bf16"]
    table = results.setdefault("step_time_ms", {})
    for name, model_fn, batch_fn in (("transformer", transformer, tokens), ("mlp", mlp, vectors)):
        params = sum(p.numel() for p in model_fn().parameters())
        row = table.setdefault(name, {"params_M": round(params / 1e6, 1)})
        for precision in precisions:
            if not budget.allows(25, f"{name} {precision}", results):
                continue
            row[precision] = round(
                1000 * step_time(model_fn, batch_fn, precision, device, steps), 2
            )
        base = row.get("fp32")
        speedups = {p: round(base / row[p], 2) for p in precisions if base and row.get(p)}
        row["speedup_vs_fp32"] = speedups
        print(f"  {name} ({row['params_M']}M params): {row}")


def section_copies(device: torch.device, budget: Budget, results: dict) -> None:
    print("\n2. host-to-device copies: pageable vs pinned")
    out = results.setdefault("h2d_GBps", {})
    for mib in (1, 8, 64, 256):
        if not budget.allows(10, f"copy {mib} MiB", results):
            break
        n = mib * 1024 * 1024 // 4
        pageable = torch.randn(n)
        pinned = torch.randn(n).pin_memory()
        row = {}
        for label, src, non_blocking in (("pageable", pageable, False), ("pinned", pinned, True)):
            dst = torch.empty(n, device=device)
            for _ in range(3):
                dst.copy_(src, non_blocking=non_blocking)
            sync(device)
            reps = max(5, 2048 // mib)
            t0 = time.perf_counter()
            for _ in range(reps):
                dst.copy_(src, non_blocking=non_blocking)
            sync(device)
            row[label] = round(reps * mib / 1024 / (time.perf_counter() - t0), 2)
        row["pinned_speedup"] = round(row["pinned"] / row["pageable"], 2)
        out[f"{mib}MiB"] = row
        print(f"  {mib:>4} MiB: {row}")
    if budget.allows(10, "copy/compute overlap", results):
        a = torch.randn(8192, 8192, device=device)
        pinned = torch.randn(64 * 1024 * 1024 // 4).pin_memory()
        dst = torch.empty_like(pinned, device=device)
        stream = torch.cuda.Stream(device)

        def timed(overlap: bool) -> float:
            sync(device)
            t0 = time.perf_counter()
            for _ in range(10):
                if overlap:
                    with torch.cuda.stream(stream):
                        dst.copy_(pinned, non_blocking=True)
                else:
                    dst.copy_(pinned, non_blocking=True)
                    sync(device)
                a @ a
            sync(device)
            return (time.perf_counter() - t0) / 10 * 1000

        timed(True)
        serial, overlapped = timed(False), timed(True)
        out["overlap_64MiB_with_8k_matmul_ms"] = {
            "serial": round(serial, 2),
            "overlapped": round(overlapped, 2),
        }
        print(f"  64 MiB pinned copy + 8k matmul per iteration: serial {serial:.2f} ms, "
              f"copy on a side stream {overlapped:.2f} ms")  # fmt: skip


def section_trainer(device: torch.device, budget: Budget, results: dict, big: bool) -> None:
    print("\n3. built-in trainer, one process")
    steps, gbs = (60, 256) if big else (5, 16)
    kwargs = {"d_model": 512, "layers": 6, "ff": 2048, "heads": 8} if big else {}
    out = results.setdefault("trainer_samples_per_s", {})
    for precision in ("fp32", "bf16"):
        for pin in (False, True):
            what = f"trainer {precision} pin_memory={pin}"
            if not budget.allows(40, what, results):
                continue
            spec = schema.build(
                JobSpec,
                {
                    "name": "gpu-bench",
                    "loader": {"pin_memory": pin},
                    "train": {
                        "model": "transformer",
                        "model_kwargs": kwargs,
                        "dataset_kwargs": {"size": gbs * (steps + 1), "max_len": 128},
                        "steps": steps,
                        "global_batch_size": gbs,
                        "precision": precision,
                        "checkpoint_every": 10**6,
                        "log_every": 10**6,
                    },
                },
            )
            with tempfile.TemporaryDirectory() as tmp:
                result = train(spec, Path(tmp))
            out[what] = round(result.samples_per_s or 0.0, 1)
            print(f"  {what}: {out[what]} samples/s, final loss {result.final_loss:.3f}")


def section_tests(budget: Budget, results: dict) -> None:
    print("\n4. gpu-marked tests")
    if not budget.allows(60, "gpu tests", results):
        return
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/test_runtime.py",
         "tests/test_runtime_dist.py"],
        cwd=ROOT, capture_output=True, text=True, timeout=max(30, budget.left() - 10),
    )  # fmt: skip
    tail = done.stdout.strip().splitlines()[-1:] or [done.stderr.strip()[-200:]]
    results["gpu_tests"] = {"exit_code": done.returncode, "summary": tail[0]}
    print(f"  exit {done.returncode}: {tail[0]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-s", type=float, default=480)
    parser.add_argument("--out", default=os.environ.get("OUT"))
    args = parser.parse_args()
    budget = Budget(args.budget_s)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    results: dict = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu",
        "python": platform.python_version(),
    }
    print(f"torch {results['torch']} (CUDA {results['cuda']}) on {results['device']}")
    if not cuda:
        print("no CUDA device: GPU figures skipped; running the code paths at toy size on CPU")
    section_precision(device, budget, results, big=cuda)
    if cuda:
        section_copies(device, budget, results)
    section_trainer(device, budget, results, big=cuda)
    if cuda:
        section_tests(budget, results)
    results["seconds"] = round(args.budget_s - budget.left(), 1)
    if args.out:
        path = Path(args.out) / "gpu_runtime.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nwrote {path}")
    print(f"done in {results['seconds']}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
