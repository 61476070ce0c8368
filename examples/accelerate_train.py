"""A Hugging Face accelerate script started as plain `python train.py`: Accelerator reads
the torchrun variables (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) that launcher sets on
every backend. It saves its state (accelerate's save_state) when SIGTERM comes, every rank
stopping after the same step, and resumes from it when started again. Progress goes to
<ckpt-dir>/progress.jsonl.

    python examples/accelerate_train.py --steps 200
"""

import argparse
import json
import os
import signal
import time
from pathlib import Path

import torch
from accelerate import Accelerator

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=200)
parser.add_argument("--step-s", type=float, default=0.0, help="extra seconds per step")
parser.add_argument("--ckpt-dir", default=os.environ.get("LAUNCHER_RUN_DIR", "."))
args = parser.parse_args()

stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
accelerator = Accelerator(cpu=True)
torch.manual_seed(0)
model = torch.nn.Linear(16, 1)
opt = torch.optim.SGD(model.parameters(), lr=0.01)
model, opt = accelerator.prepare(model, opt)
state_dir = Path(args.ckpt_dir) / "accelerate-state"
step_file = Path(args.ckpt_dir) / "accelerate-step.txt"  # written after the state: its step
step = 0
if step_file.exists():
    accelerator.load_state(str(state_dir))
    step = int(step_file.read_text())


def log(event: str) -> None:
    if accelerator.is_main_process:
        with open(Path(args.ckpt_dir) / "progress.jsonl", "a") as fh:
            line = {"event": event, "step": step, "processes": accelerator.num_processes}
            fh.write(json.dumps(line) + "\n")


log("start")
while step < args.steps:
    gen = torch.Generator().manual_seed(
        step * accelerator.num_processes + accelerator.process_index
    )
    x = torch.randn(8, 16, generator=gen)
    loss = model(x).pow(2).mean()
    opt.zero_grad()
    accelerator.backward(loss)  # DDP all-reduces the gradients
    opt.step()
    step += 1
    time.sleep(args.step_s)
    # Every process stops after the same step, as soon as one of them got SIGTERM.
    flag = accelerator.reduce(torch.tensor([1.0 if stop else 0.0]), reduction="sum")
    if flag.item():
        break
accelerator.save_state(str(state_dir))
accelerator.wait_for_everyone()
if accelerator.is_main_process:
    tmp = step_file.with_suffix(".tmp")
    tmp.write_text(str(step))
    os.replace(tmp, step_file)
log("stop" if step < args.steps else "end")
weights = sum(p.detach().double().sum().item() for p in model.parameters())
print(
    f"process {accelerator.process_index}/{accelerator.num_processes}: "
    f"{'saved at' if step < args.steps else 'done at'} step {step}, weights {weights!r}",
    flush=True,
)
accelerator.end_training()
