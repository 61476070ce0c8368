"""Distributed setup from the environment: torchrun variables, Slurm variables, or one process.

One function reads the environment into a `DistEnv` (pure, testable without torch.distributed);
`init()` turns it into a process group on the right device; `teardown()` undoes it.
"""

from __future__ import annotations

import datetime as dt
import gc
import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from launcher.errors import BackendError
from launcher.hardware import detect_cpus

DEFAULT_MASTER_ADDR = "127.0.0.1"
DEFAULT_MASTER_PORT = 29500
# Under Slurm without MASTER_PORT, every task derives the same port from the job id.
SLURM_PORT_BASE = 15000
SLURM_PORT_SPAN = 20000
LOGGER_NAME = "launcher.runtime"


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job, and how it finds rank 0."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    master_addr: str = DEFAULT_MASTER_ADDR
    master_port: int = DEFAULT_MASTER_PORT
    # "torchrun", "slurm" or "single": which variables it came from.
    source: str = "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _int(environ: Mapping[str, str], name: str, default: int | None = None) -> int:
    text = environ.get(name)
    if text is None or text == "":
        if default is None:
            raise BackendError(f"environment variable {name} is not set")
        return default
    try:
        return int(text)
    except ValueError:
        raise BackendError(
            f"environment variable {name}: expected an integer, got {text!r}"
        ) from None


def _split_top(text: str) -> list[str]:
    """Split a Slurm host list on the commas that are not inside brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p for p in parts if p]


def parse_first_host(nodelist: str) -> str:
    """First host of a Slurm node list: 'gpu[07-09,12],cpu1' -> 'gpu07' (padding kept)."""
    entries = _split_top(nodelist.strip())
    if not entries:
        raise BackendError(f"SLURM_NODELIST: expected a host list, got {nodelist!r}")

    def first_of(match: re.Match[str]) -> str:
        return match.group(1).split(",")[0].split("-")[0]

    return re.sub(r"\[([^\]]*)\]", first_of, entries[0])


def first_host(
    nodelist: str,
    *,
    run: Callable[[list[str]], str] | None = None,
    scontrol: str | None = None,
) -> str:
    """First host of a node list: `scontrol show hostnames` when present, else our parser."""
    scontrol = scontrol if scontrol is not None else shutil.which("scontrol")
    if scontrol:
        runner = run or _run_text
        try:
            lines = runner([scontrol, "show", "hostnames", nodelist]).split()
        except (OSError, subprocess.SubprocessError):
            lines = []
        if lines:
            return lines[0]
    return parse_first_host(nodelist)


def _run_text(argv: list[str]) -> str:
    return subprocess.run(argv, capture_output=True, text=True, timeout=10, check=True).stdout


def _slurm_tasks_per_node(environ: Mapping[str, str], world: int) -> int:
    for name in ("SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE", "SLURM_STEP_TASKS_PER_NODE"):
        # '4' or '4(x2)' or '4(x2),3': the first count is this layout's tasks per node.
        match = re.match(r"\d+", environ.get(name, ""))
        if match and int(match.group()) > 0:
            return int(match.group())
    nodes = _int(environ, "SLURM_JOB_NUM_NODES", _int(environ, "SLURM_NNODES", 1))
    return max(1, world // max(1, nodes))


def from_environ(
    environ: Mapping[str, str] | None = None, *, host_of: Callable[[str], str] = first_host
) -> DistEnv:
    """Ranks from torchrun-style variables, else from Slurm's (one task per GPU), else single."""
    environ = os.environ if environ is None else environ
    if "RANK" in environ and "WORLD_SIZE" in environ:
        world = _int(environ, "WORLD_SIZE")
        rank = _int(environ, "RANK")
        local_world = _int(environ, "LOCAL_WORLD_SIZE", world)
        local_rank = _int(environ, "LOCAL_RANK", rank % max(1, local_world))
        env = DistEnv(
            rank=rank,
            local_rank=local_rank,
            world_size=world,
            local_world_size=local_world,
            master_addr=environ.get("MASTER_ADDR") or DEFAULT_MASTER_ADDR,
            master_port=_int(environ, "MASTER_PORT", DEFAULT_MASTER_PORT),
            source="torchrun",
        )
    elif "SLURM_PROCID" in environ and ("SLURM_NTASKS" in environ or "SLURM_NPROCS" in environ):
        world = _int(environ, "SLURM_NTASKS", _int(environ, "SLURM_NPROCS", 1))
        rank = _int(environ, "SLURM_PROCID")
        local_world = _slurm_tasks_per_node(environ, world)
        local_rank = _int(environ, "SLURM_LOCALID", rank % local_world)
        addr = environ.get("MASTER_ADDR")
        if not addr:
            nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST")
            nodelist = nodelist or environ.get("SLURM_NODELIST")
            addr = host_of(nodelist) if nodelist else DEFAULT_MASTER_ADDR
        if environ.get("MASTER_PORT"):
            port = _int(environ, "MASTER_PORT")
        else:
            job_id = _int(environ, "SLURM_JOB_ID", 0)
            port = SLURM_PORT_BASE + job_id % SLURM_PORT_SPAN
        env = DistEnv(rank, local_rank, world, local_world, addr, port, "slurm")
    else:
        return DistEnv()
    if not 0 <= env.rank < env.world_size:
        raise BackendError(f"rank {env.rank} is outside world size {env.world_size}")
    if not 0 <= env.local_rank < max(env.local_world_size, 1):
        raise BackendError(
            f"local rank {env.local_rank} is outside local world size {env.local_world_size}"
        )
    return env


class _RankFormatter(logging.Formatter):
    def __init__(self, rank: int) -> None:
        super().__init__(f"%(asctime)s [rank {rank}] %(levelname)s %(message)s", "%H:%M:%S")


def get_logger(rank: int = 0) -> logging.Logger:
    """The runtime's logger, every line prefixed with the rank (logs of ranks get merged)."""
    logger = logging.getLogger(LOGGER_NAME)
    handler = next((h for h in logger.handlers if getattr(h, "_launcher", False)), None)
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler._launcher = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.propagate = False
    handler.setFormatter(_RankFormatter(rank))
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
    return logger


@dataclass
class DistContext:
    """The process group this process joined, its device and a side group for control messages."""

    env: DistEnv
    device: torch.device
    backend: str | None
    logger: logging.Logger
    # A gloo group for small CPU messages (stop flag, loss, RNG states), also under nccl.
    control: Any = None  # torch ProcessGroup (gloo side group); Any keeps torch out
    owns_group: bool = False
    cpu_threads: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def is_main(self) -> bool:
        return self.env.is_main

    @property
    def distributed(self) -> bool:
        return self.env.distributed


def pick_device(env: DistEnv) -> torch.device:
    """cuda:LOCAL_RANK when CUDA is there (modulo the visible GPUs), else the CPU."""
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        return torch.device("cuda", env.local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def _cpu_threads(env: DistEnv, environ: Mapping[str, str]) -> int | None:
    """Split this machine's CPUs between the local ranks unless OMP_NUM_THREADS says otherwise.

    Without this, every rank starts one thread per core and N ranks fight over N cores.
    """
    if environ.get("OMP_NUM_THREADS"):
        return None
    cpus, _ = detect_cpus(environ)
    return max(1, cpus // max(1, env.local_world_size))


def init(
    env: DistEnv | None = None,
    *,
    timeout_s: float = 1800,
    environ: Mapping[str, str] | None = None,
) -> DistContext:
    """Join the job's process group (nccl with CUDA, else gloo) and pick this rank's device."""
    environ = os.environ if environ is None else environ
    env = env or from_environ(environ)
    logger = get_logger(env.rank)
    device = pick_device(env)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    threads = _cpu_threads(env, environ)
    if threads is not None and device.type == "cpu":
        torch.set_num_threads(threads)
    ctx = DistContext(env=env, device=device, backend=None, logger=logger, cpu_threads=threads)
    if not env.distributed:
        return ctx
    timeout = dt.timedelta(seconds=timeout_s)
    if dist.is_available() and dist.is_initialized():
        ctx.backend = dist.get_backend()
        ctx.notes.append("process group was already initialized by the caller")
    else:
        backend = "nccl" if device.type == "cuda" else "gloo"
        host = f"[{env.master_addr}]" if ":" in env.master_addr else env.master_addr
        kwargs: dict = {}
        if backend == "nccl":
            kwargs["device_id"] = device
        dist.init_process_group(
            backend,
            init_method=f"tcp://{host}:{env.master_port}",
            rank=env.rank,
            world_size=env.world_size,
            timeout=timeout,
            **kwargs,
        )
        ctx.backend = backend
        ctx.owns_group = True
    ctx.control = dist.new_group(backend="gloo", timeout=timeout)
    logger.info(
        "joined %s group: rank %d/%d (local %d/%d) on %s via %s:%d (%s)",
        ctx.backend,
        env.rank,
        env.world_size,
        env.local_rank,
        env.local_world_size,
        device,
        env.master_addr,
        env.master_port,
        env.source,
    )
    return ctx


def teardown(ctx: DistContext) -> None:
    """Leave the process group if we made it (a caller's group is the caller's to close)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    # Free unreachable DDP modules first: their Reducers must let go of the group before it
    # is destroyed (see the trainer's note on the GIL deadlock).
    gc.collect()
    if ctx.owns_group:
        dist.destroy_process_group()
        ctx.owns_group = False
    elif ctx.control is not None:
        dist.destroy_process_group(ctx.control)
    ctx.control = None


@contextmanager
def distributed(env: DistEnv | None = None, *, timeout_s: float = 1800) -> Iterator[DistContext]:
    """`with distributed() as ctx:` for user scripts: init on entry, teardown on exit."""
    ctx = init(env, timeout_s=timeout_s)
    try:
        yield ctx
    finally:
        teardown(ctx)
