"""A tiny torchrun-style DDP training: what `configs/quickstart.yaml` runs.

Plain PyTorch, nothing launcher-specific: it reads RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT
from the environment (set by launcher or torchrun), trains a small MLP on synthetic data
that differs per rank, and writes a checksum of its final parameters per rank plus a
checkpoint from rank 0. DDP all-reduces the gradients, so every rank must end identical.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--out", default=os.environ.get("LAUNCHER_RUN_DIR", "."))
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # same initial weights everywhere (DDP also broadcasts them)
    model = DDP(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 1)))
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    data_gen = torch.Generator().manual_seed(1000 + rank)  # different data on every rank
    true_w = torch.randn(16, 1, generator=torch.Generator().manual_seed(7))
    start = time.perf_counter()
    for step in range(args.steps):
        x = torch.randn(64, 16, generator=data_gen)
        y = x @ true_w
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()  # DDP all-reduces (averages) gradients across ranks here
        opt.step()
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:3d} loss {loss.item():.4f}", flush=True)
    flat = torch.cat([p.detach().flatten() for p in model.module.parameters()])
    digest = hashlib.sha256(flat.numpy().tobytes()).hexdigest()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"params-rank{rank}.json").write_text(
        json.dumps(
            {
                "rank": rank,
                "world_size": world,
                "sha256": digest,
                "final_loss": loss.item(),
                "seconds": time.perf_counter() - start,
            }
        )
    )
    if rank == 0:
        ckpt = out / "checkpoints"
        ckpt.mkdir(exist_ok=True)
        tmp = ckpt / ".final.pt.tmp"
        torch.save({"model": model.module.state_dict(), "step": args.steps}, tmp)
        os.replace(tmp, ckpt / "final.pt")
    print(f"rank {rank}/{world} done: params sha256 {digest[:16]}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
