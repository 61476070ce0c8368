"""A plain torchrun-style DDP script that saves on SIGTERM: runs unchanged under torchrun,
`launcher run` (local, Docker, Slurm) or `srun`.

It reads the torchrun variables (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), checkpoints
to --ckpt-dir when SIGTERM comes (every rank agrees on the step to stop at), and resumes
from that checkpoint when started again. Progress goes to <ckpt-dir>/progress.jsonl.

    python examples/plain_train.py --steps 200
"""

import argparse
import json
import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=200)
parser.add_argument("--step-s", type=float, default=0.0, help="extra seconds per step")
parser.add_argument("--ckpt-dir", default=os.environ.get("LAUNCHER_RUN_DIR", "."))
args = parser.parse_args()

stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(True))

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(16, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.01)
ckpt = Path(args.ckpt_dir) / "plain-ckpt.pt"
step = 0
if ckpt.exists():
    state = torch.load(ckpt)
    model.module.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    step = state["step"]


def log(event: str) -> None:
    if rank == 0:
        with open(Path(args.ckpt_dir) / "progress.jsonl", "a") as fh:
            line = {"event": event, "step": step, "restart": os.environ.get("SLURM_RESTART_COUNT")}
            fh.write(json.dumps(line) + "\n")


log("start")
while step < args.steps:
    gen = torch.Generator().manual_seed(step * world + rank)
    x = torch.randn(8, 16, generator=gen)
    loss = model(x).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    step += 1
    time.sleep(args.step_s)
    # Every rank stops after the same step, as soon as one of them got SIGTERM.
    flag = torch.tensor([1.0 if stop else 0.0])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item():
        break
if rank == 0:
    tmp = ckpt.with_suffix(".tmp")
    torch.save({"model": model.module.state_dict(), "opt": opt.state_dict(), "step": step}, tmp)
    os.replace(tmp, ckpt)
log("stop" if step < args.steps else "end")
dist.barrier()
dist.destroy_process_group()
print(f"rank {rank}: {'saved at' if step < args.steps else 'done at'} step {step}", flush=True)
