"""A DataLoader whose worker batches need far more than Docker's default 64 MB /dev/shm.

Reads the launcher's loader settings from the environment; each sample is 4 MiB.
"""

import os

import torch
from torch.utils.data import DataLoader, Dataset


class Big(Dataset):
    def __len__(self) -> int:
        return 96

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.full((1024 * 1024,), float(i))  # 4 MiB of float32


workers = int(os.environ["LAUNCHER_NUM_WORKERS"])
prefetch = int(os.environ["LAUNCHER_PREFETCH_FACTOR"]) or None
loader = DataLoader(Big(), batch_size=8, num_workers=workers, prefetch_factor=prefetch)
total = sum(float(batch[:, 0].sum()) for batch in loader)
assert total == sum(range(96)), total
print(f"read 96 samples with {workers} workers, prefetch {prefetch}: ok", flush=True)
