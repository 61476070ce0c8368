"""A PyTorch Lightning script, nothing launcher-specific: on Slurm its SLURMEnvironment
saves hpc_ckpt_*.ckpt on SIGUSR1 (launcher's stop signal for Lightning scripts there) and
`fit` resumes from it after the requeue.

    python examples/lightning_train.py --max-steps 200
"""

import argparse
import json
import os
import time
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

parser = argparse.ArgumentParser()
parser.add_argument("--max-steps", type=int, default=200)
parser.add_argument("--step-s", type=float, default=0.0, help="extra seconds per step")
args = parser.parse_args()
root = os.environ.get("LAUNCHER_RUN_DIR", "lightning_runs")


class Model(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(16, 1)

    def training_step(self, batch, _):
        time.sleep(args.step_s)
        (x,) = batch
        return self.net(x).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class Progress(L.Callback):
    """Where each fit started and ended (rank 0), in <root>/progress.jsonl."""

    def _log(self, trainer, event):
        if trainer.is_global_zero:
            with open(Path(root) / "progress.jsonl", "a") as fh:
                line = {"event": event, "step": trainer.global_step}
                fh.write(json.dumps({**line, "restart": os.environ.get("SLURM_RESTART_COUNT")}))
                fh.write("\n")

    def on_train_start(self, trainer, _):
        self._log(trainer, "start")

    def on_train_end(self, trainer, _):
        self._log(trainer, "end")


data = DataLoader(TensorDataset(torch.randn(4096, 16)), batch_size=8)
local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
trainer = L.Trainer(
    accelerator="cpu",
    devices=local,
    num_nodes=int(os.environ.get("WORLD_SIZE", "1")) // local,
    strategy="ddp" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "auto",
    max_steps=args.max_steps,
    default_root_dir=root,
    callbacks=[Progress()],
    enable_progress_bar=False,
    enable_model_summary=False,
    logger=False,
    enable_checkpointing=False,
)
trainer.fit(Model(), data)
