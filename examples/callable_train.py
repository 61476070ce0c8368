"""A callable entrypoint (`entrypoint.callable: examples.callable_train:train`): it gets the
resolved config, the torchrun variables are set, and it saves on SIGTERM like a script."""

import json
import os
import signal
import time
from pathlib import Path


def train(spec) -> int:
    import torch
    import torch.distributed as dist

    steps = int(spec.env.get("TRAIN_STEPS", "100"))
    step_s = float(spec.env.get("TRAIN_STEP_S", "0"))
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    run_dir = Path(os.environ["LAUNCHER_RUN_DIR"])
    ckpt = run_dir / "callable-ckpt.json"
    step = json.loads(ckpt.read_text())["step"] if ckpt.exists() else 0

    def log(event: str) -> None:
        if rank == 0:
            with open(run_dir / "progress.jsonl", "a") as fh:
                restart = os.environ.get("SLURM_RESTART_COUNT")
                fh.write(json.dumps({"event": event, "step": step, "restart": restart}) + "\n")

    log("start")
    while step < steps:
        time.sleep(step_s)
        step += 1
        flag = torch.tensor([1.0 if stop else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item():
            break
    if rank == 0:
        tmp = ckpt.with_suffix(".tmp")
        tmp.write_text(json.dumps({"step": step}))
        os.replace(tmp, ckpt)
    log("stop" if step < steps else "end")
    dist.barrier()
    dist.destroy_process_group()
    return 0
