"""A plain torchrun-style DDP script that saves a checkpoint when asked to stop.

Nothing launcher-specific: SIGTERM (and SIGINT, SIGUSR1, SIGUSR2) set a flag; the ranks agree
on it every step (an all-reduce), so they stop at the same step; rank 0 then saves
`checkpoints/stopped.pt` (model, optimizer, step, the signal) atomically and every rank
exits 0. It trains for `--steps` (default: practically forever) and writes `ready-rank<N>`
after its first step, so a test knows when to stop it.
"""

import argparse
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=10**9)
parser.add_argument("--step-s", type=float, default=0.05)
args = parser.parse_args()

asked: list[str] = []
for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2):
    signal.signal(sig, lambda signum, _frame: asked.append(signal.Signals(signum).name))

dist.init_process_group("gloo")
rank = dist.get_rank()
out = Path(os.environ.get("LAUNCHER_RUN_DIR", "."))
torch.manual_seed(0)
model = DDP(nn.Linear(8, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.01)
step = 0
while step < args.steps:
    x = torch.randn(16, 8)
    loss = model(x).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    step += 1
    if step == 1:
        (out / f"ready-rank{rank}").write_text(str(os.getpid()))
    flag = torch.tensor([1.0 if asked else 0.0])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item():
        break
    time.sleep(args.step_s)

if rank == 0:
    ckpt = out / "checkpoints"
    ckpt.mkdir(exist_ok=True)
    state = {
        "model": model.module.state_dict(),
        "optimizer": opt.state_dict(),
        "step": step,
        "signal": asked[0] if asked else None,
    }
    torch.save(state, ckpt / ".stopped.pt.tmp")
    os.replace(ckpt / ".stopped.pt.tmp", ckpt / "stopped.pt")
print(f"rank {rank}: {asked[0] if asked else 'done'} at step {step}; saved", flush=True)
dist.destroy_process_group()
sys.exit(0)
