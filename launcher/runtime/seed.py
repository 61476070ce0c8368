"""Seeding and RNG state: same seed and config give the same loss curve, run to run and across
a resume. Every source of randomness the trainer touches is seeded here and saved in checkpoints.
"""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch

# cuBLAS needs this before its first use to pick deterministic kernels (CUDA >= 10.2).
CUBLAS_DETERMINISTIC = ":4096:8"


def seed_everything(seed: int, *, hash_seed: bool = True) -> None:
    """Seed python `random`, numpy and torch (CPU and every CUDA device) with one number.

    PYTHONHASHSEED only affects interpreters started after this (DataLoader workers under
    spawn, subprocesses); the launcher also sets it in each rank's environment.
    """
    if hash_seed:
        os.environ["PYTHONHASHSEED"] = str(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def rank_seed(seed: int, rank: int, *salt: int) -> int:
    """A seed per (seed, rank, salt...) that never collides for small inputs and fits numpy."""
    value = seed
    for part in (rank, *salt):
        value = (value * 1_000_003 + part + 1) % 2**63
    return value % 2**32


def configure_determinism(deterministic: bool) -> None:
    """Deterministic kernels (slower) or the fast defaults; call before CUDA does any work."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_DETERMINISTIC)
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    else:
        torch.use_deterministic_algorithms(False)


def get_rng_state() -> dict[str, Any]:
    """Every RNG this process uses, in a form `torch.load(weights_only=True)` accepts."""
    np_state: tuple[Any, ...] = tuple(np.random.get_state())
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "kind": str(np_state[0]),
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Undo `get_rng_state`: after this the next random numbers match the saved run's."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npst = state["numpy"]
    np.random.set_state(
        (
            npst["kind"],
            npst["keys"].numpy().astype(np.uint32),
            npst["pos"],
            npst["has_gauss"],
            npst["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
