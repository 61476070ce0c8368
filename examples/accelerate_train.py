"""A Hugging Face accelerate script started as plain `python train.py`: Accelerator reads
the torchrun variables (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) that launcher sets on
every backend. It saves its state on SIGTERM and resumes from it.

    python examples/accelerate_train.py --steps 200
"""

import argparse
import os
import signal
from pathlib import Path

import torch
from accelerate import Accelerator

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=200)
parser.add_argument("--ckpt-dir", default=os.environ.get("LAUNCHER_RUN_DIR", "."))
args = parser.parse_args()

stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
accelerator = Accelerator(cpu=True)
model = torch.nn.Linear(16, 1)
opt = torch.optim.SGD(model.parameters(), lr=0.01)
model, opt = accelerator.prepare(model, opt)
state_dir = Path(args.ckpt_dir) / "accelerate-state"
step_file = state_dir / "step.txt"
step = 0
if step_file.exists():
    accelerator.load_state(str(state_dir))
    step = int(step_file.read_text())
while step < args.steps:
    x = torch.randn(8, 16, device=accelerator.device)
    loss = model(x).pow(2).mean()
    opt.zero_grad()
    accelerator.backward(loss)
    opt.step()
    step += 1
    flag = accelerator.reduce(torch.tensor([1.0 if stop else 0.0]), reduction="sum")
    if flag.item():
        break
accelerator.save_state(str(state_dir))
if accelerator.is_main_process:
    step_file.write_text(str(step))
accelerator.wait_for_everyone()
accelerator.print(f"{'saved at' if step < args.steps else 'done at'} step {step}")
