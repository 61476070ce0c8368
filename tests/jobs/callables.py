"""Callables for `entrypoint.callable` tests."""

import json
import os
from pathlib import Path


def ddp_sum(spec):
    """Joins a gloo group and all-reduces its rank: every rank must see the same sum."""
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    value = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(value)
    out = Path(os.environ["LAUNCHER_RUN_DIR"]) / f"callable-rank{dist.get_rank()}.json"
    out.write_text(
        json.dumps({"sum": value.item(), "name": spec.name, "world": dist.get_world_size()})
    )
    dist.destroy_process_group()
    return 0
