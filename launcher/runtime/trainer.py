"""The built-in trainer: one loop with what every DDP job needs, driven by `train:` in the config.

distributed init -> seed -> model/dataset (built-in or the user's hooks) -> optimizer groups and
LR schedule -> resume from the newest checkpoint -> steps of `global_batch_size` samples made of
micro batches (`no_sync` on all but the last), bf16/fp16/fp32 -> metrics per step, atomic
checkpoints, and on SIGUSR1/SIGUSR2/SIGTERM: finish the step, checkpoint, return `preempted`.

Stopping is agreed between ranks without a blocking collective per step: about every 0.25 s
of training the ranks all-reduce [stop flag, step times, losses of the steps since] in one
asynchronous call on a gloo side group that hides behind a step's compute (`_Control`), so all
ranks stop after the same step. One process acts on a signal after the step in progress;
several ranks within about 0.25 s of training plus one step.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist
from torch.nn.parallel import DistributedDataParallel

from launcher.errors import ConfigError
from launcher.runtime import EXIT_OK, REQUEUE_EXIT_CODE, STOP_SIGNALS, dist, models
from launcher.runtime import checkpoint as ckpt
from launcher.runtime.loader import make_loader, resolve_picks
from launcher.runtime.optim import (
    apply_activation_checkpointing,
    build_optimizer,
    build_scheduler,
)
from launcher.runtime.seed import (
    configure_determinism,
    get_rng_state,
    rank_seed,
    seed_everything,
    set_rng_state,
)
from launcher.schema import to_dict
from launcher.spec import JobSpec, TrainSpec

METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"


@dataclass(frozen=True)
class TrainResult:
    """How a call to `train` ended; `exit_code` is what `python -m launcher.runtime` returns."""

    steps_done: int
    final_loss: float | None
    preempted: bool
    checkpoint: Path | None
    resumed_from: Path | None
    world_size: int
    samples_per_s: float | None
    signal: str | None = None

    @property
    def exit_code(self) -> int:
        return REQUEUE_EXIT_CODE if self.preempted else EXIT_OK


class StopRequest:
    """Set by a stop signal (or by calling `request()`); the loop checks it between steps."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __call__(self, signum: int, frame: Any = None) -> None:
        if self.signum is None:
            self.signum = signum

    def request(self, signum: int = signal.SIGTERM) -> None:
        self(signum)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str | None:
        return None if self.signum is None else signal.Signals(self.signum).name

    def install(self) -> dict[int, Any]:
        """Handle the stop signals (main thread only; elsewhere the caller must stop us)."""
        if threading.current_thread() is not threading.main_thread():
            return {}
        previous = {}
        for name in STOP_SIGNALS:
            signum = getattr(signal, name)
            previous[signum] = signal.signal(signum, self)
        return previous

    @staticmethod
    def restore(previous: dict[int, Any]) -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class MetricsLog:
    """metrics.jsonl in the run dir, rank 0 only: one JSON object per line, flushed per line.

    Step lines: {"step", "epoch", "loss", "lr", "samples_per_s", "step_time_s", "time"}.
    Event lines carry "event": start, resume, checkpoint, stop, end. After a crash the steps
    since the last checkpoint are trained (and logged) again: readers keep the last line of
    each step.
    """

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path = path
        self.fh = None
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.fh = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def write(self, *records: dict[str, Any]) -> None:
        """Append whole lines and flush once (a reader never sees half a batch for long)."""
        if self.fh is not None and records:
            self.fh.write("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
            self.fh.flush()

    def event(self, name: str, **fields: Any) -> None:
        self.write({"event": name, "time": round(time.time(), 3), **fields})

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()
            self.fh = None


def batch_plan(train: TrainSpec, world_size: int) -> tuple[int, int]:
    """(micro batch per process, micro steps per optimizer step) for the global batch."""
    g = train.global_batch_size
    if train.micro_batch_size is None:
        if g % world_size:
            raise ConfigError(
                f"must be divisible by the world size ({world_size}), got {g}",
                key="train.global_batch_size",
            )
        return g // world_size, 1
    b = train.micro_batch_size
    if g % (b * world_size):
        raise ConfigError(
            f"global_batch_size ({g}) must be a multiple of micro_batch_size x world size "
            f"({b} x {world_size})",
            key="train.micro_batch_size",
        )
    return b, g // (b * world_size)


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 / fp16 autocast on this device (CPU or CUDA); fp32 runs as written."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def to_device(batch: Any, device: torch.device, non_blocking: bool = False) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device, non_blocking) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        moved = [to_device(v, device, non_blocking) for v in batch]
        return tuple(moved) if isinstance(batch, tuple) else moved
    return batch


# How often the ranks exchange the stop flag and the losses of the steps since the last time.
CONTROL_PERIOD_S = 0.25
MAX_CONTROL_INTERVAL = 100


class _Control:
    """Every `interval` steps the ranks all-reduce [stop flag, step times, losses of the last
    steps] in one asynchronous call on the gloo side group: posted at the start of a step,
    waited for at its end, so it hides behind that step's compute.

    A collective per step would cost more than a small model's step (0.5-1 ms each with gloo
    on a busy CPU), so the interval adapts to about CONTROL_PERIOD_S of training. Every rank
    computes it from the same reduced numbers, so all ranks post at the same steps. With one
    process nothing is sent; losses still leave the device once per window, not per step.
    """

    def __init__(self, ctx: dist.DistContext) -> None:
        self.group = ctx.control
        self.world = ctx.env.world_size
        self.on = ctx.distributed
        self.interval = 1
        self.window: list[tuple[dict[str, Any], torch.Tensor]] = []
        self.flight: tuple[Any, torch.Tensor, list[dict[str, Any]]] | None = None

    def add(self, record: dict[str, Any], loss: torch.Tensor) -> None:
        self.window.append((record, loss))

    def _post(self, flag: bool, async_op: bool) -> None:
        records = [r for r, _ in self.window]
        losses = [loss.reshape(1) for _, loss in self.window]
        self.window = []
        head = torch.tensor(
            [1.0 if flag else 0.0, sum(r["step_time_s"] for r in records), len(records)],
            dtype=torch.float64,
        )
        data = torch.cat([head, torch.cat(losses).double().cpu()]) if losses else head
        work = None
        if self.on:
            work = tdist.all_reduce(data, group=self.group, async_op=async_op)
        self.flight = (work, data, records)

    def maybe_post(self, flag: bool) -> None:
        if self.flight is None and len(self.window) >= self.interval:
            self._post(flag, async_op=True)

    def finish(self) -> tuple[bool, list[tuple[dict[str, Any], float]]]:
        """Wait for the exchange in flight: (any rank asked to stop, [(record, mean loss)])."""
        if self.flight is None:
            return False, []
        work, data, records = self.flight
        self.flight = None
        if work is not None:
            work.wait()
        count = float(data[2])
        if count:
            step_s = float(data[1]) / count
            self.interval = max(1, min(MAX_CONTROL_INTERVAL, int(CONTROL_PERIOD_S / step_s)))
        losses = (data[3:] / (self.world if self.on else 1)).tolist()
        return bool(data[0] > 0), list(zip(records, losses, strict=True))

    def flush(self, flag: bool = False) -> tuple[bool, list[tuple[dict[str, Any], float]]]:
        """Exchange now (all ranks at the same step): before a checkpoint and at the end."""
        flagged, done = self.finish()
        self._post(flag, async_op=False)
        flagged2, more = self.finish()
        return flagged or flagged2, done + more


def _maybe_fetch_data(spec: JobSpec, ctx: dist.DistContext) -> None:
    """Fetch `data.sources` once per node before training (issue 7's launcher.data)."""
    if not (spec.data.sources and spec.data.fetch_at_start):
        return
    try:
        import launcher.data as data_mod
    except ImportError:
        ctx.logger.warning("data.sources given but launcher.data is not available; skipping")
        return
    fetch_all = getattr(data_mod, "fetch_all", None)
    if fetch_all is None:
        ctx.logger.warning("launcher.data has no fetch_all(); not fetching data.sources")
        return
    if ctx.env.local_rank == 0:
        fetch_all(spec.data)
    if ctx.distributed:
        tdist.barrier(group=ctx.control)


def _agree_on_checkpoint(folder: Path, ctx: dist.DistContext) -> tuple[Path, dict[str, Any]] | None:
    """Rank 0 picks the newest complete checkpoint; every rank loads that same file."""
    found = ckpt.load_latest(folder, ctx.device, ctx.logger) if ctx.is_main else None
    choice: list[str | None] = [str(found[0]) if found else None]
    if ctx.distributed:
        tdist.broadcast_object_list(choice, src=0, group=ctx.control)
    if choice[0] is None:
        return None
    if found is not None:
        return found
    path = Path(choice[0])
    return path, ckpt.load(path, ctx.device)


def train(
    spec: JobSpec,
    run_dir: str | Path,
    *,
    environ: Mapping[str, str] | None = None,
    handle_signals: bool = True,
    stop: StopRequest | None = None,
) -> TrainResult:
    """Train (or resume) the job described by `spec.train`, writing into `run_dir`.

    Ranks come from the environment (torchrun or Slurm variables, else one process). With
    `handle_signals`, SIGUSR1/SIGUSR2/SIGTERM stop the run cleanly with a checkpoint; from
    another thread, pass a `StopRequest` and call its `request()` instead.
    """
    run_dir = Path(run_dir)
    stop = stop or StopRequest()
    # Before any DataLoader worker forks: workers inherit the handlers, so a signal sent to
    # the whole process group (scancel --signal) does not kill them.
    previous = stop.install() if handle_signals else {}
    try:
        configure_determinism(spec.train.deterministic)  # before CUDA does any work
        ctx = dist.init(timeout_s=spec.train.dist_timeout_s, environ=environ)
        try:
            _maybe_fetch_data(spec, ctx)
            return _train(spec, run_dir, ctx, stop)
        finally:
            dist.teardown(ctx)
    finally:
        StopRequest.restore(previous)


def _train(spec: JobSpec, run_dir: Path, ctx: dist.DistContext, stop: StopRequest) -> TrainResult:
    train = spec.train
    log = ctx.logger
    device = ctx.device
    world, rank = ctx.env.world_size, ctx.env.rank
    micro, accum = batch_plan(train, world)

    # Same seed on every rank for the model's initial weights.
    seed_everything(train.seed)
    built = models.build(train)
    model = built.model.to(device)
    wrapped = apply_activation_checkpointing(model, train.activation_checkpointing)
    optimizer = build_optimizer(model, train.optimizer)
    scheduler = build_scheduler(optimizer, train.schedule, train.steps)
    scaler = torch.amp.GradScaler(device.type) if train.precision == "fp16" else None

    uses_gpu = device.type == "cuda"
    picks = resolve_picks(spec.loader, local_world_size=ctx.env.local_world_size, uses_gpu=uses_gpu)
    generator = torch.Generator()
    loader = make_loader(
        built.dataset,
        micro,
        seed=train.seed,
        collate_fn=built.collate_fn,
        picks=picks,
        rank=rank,
        world_size=world,
        generator=generator,
        uses_gpu=uses_gpu,
    )
    sampler = loader.sampler
    micro_per_epoch = sampler.num_samples // micro
    if micro_per_epoch < accum:
        raise ConfigError(
            f"the dataset has {len(built.dataset)} samples, fewer than one step needs "
            f"({train.global_batch_size})",
            key="train.global_batch_size",
        )

    folder = run_dir / CHECKPOINT_DIR
    step = epoch = samples_in_epoch = 0
    resumed_from: Path | None = None
    rng: dict[str, Any] | None = None
    resumed_loss: float | None = None
    found = _agree_on_checkpoint(folder, ctx) if train.resume else None
    if found is not None:
        resumed_from, state = found
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        step, epoch = int(state["step"]), int(state["epoch"])
        samples_in_epoch = int(state["samples_in_epoch"])
        resumed_loss = state.get("loss")
        if len(state["rng"]) == world:
            rng = state["rng"][rank]
        else:
            log.warning(
                "checkpoint was written by %d ranks, now %d: RNG streams restart from the seed",
                len(state["rng"]),
                world,
            )
        del state

    ddp = model
    if ctx.distributed:
        ddp = DistributedDataParallel(
            model,
            device_ids=[device.index] if uses_gpu else None,
            gradient_as_bucket_view=True,
        )
    # Per-rank random streams (dropout differs between ranks), or the saved ones on resume.
    if rng is not None:
        set_rng_state(rng)
    else:
        seed_everything(rank_seed(train.seed, rank, step), hash_seed=False)

    metrics = MetricsLog(run_dir / METRICS_FILE, ctx.is_main)
    n_params = sum(p.numel() for p in model.parameters())
    if ctx.is_main:
        log.info(
            "%s: %.2fM parameters, %d ranks x micro batch %d x %d accumulation = %d per step, "
            "%s, loader %s",
            built.description,
            n_params / 1e6,
            world,
            micro,
            accum,
            train.global_batch_size,
            train.precision,
            {k: getattr(picks, k) for k in ("num_workers", "pin_memory", "prefetch_factor")},
        )
        if wrapped:
            log.info("activation checkpointing on %s", ", ".join(wrapped))
    if resumed_from is not None:
        if ctx.is_main:
            log.info("resuming from %s (step %d, epoch %d)", resumed_from, step, epoch)
        metrics.event("resume", step=step, epoch=epoch, checkpoint=str(resumed_from))
    else:
        metrics.event(
            "start",
            world_size=world,
            micro_batch_size=micro,
            accumulation=accum,
            parameters=n_params,
            train=to_dict(train),
        )

    control = _Control(ctx)
    last_loss: float | None = resumed_loss
    last_path: Path | None = resumed_from
    stopping = False
    run_samples, run_time = 0, 0.0
    non_blocking = picks.pin_memory and uses_gpu

    def emit(done: list[tuple[dict[str, Any], float]]) -> None:
        nonlocal last_loss
        for record, loss in done:
            record["loss"] = last_loss = loss
            if not ctx.is_main:
                continue
            if not math.isfinite(loss) and scaler is None:
                log.warning("step %d: loss is %s", record["step"], loss)
            if record["step"] % train.log_every == 0 or record["step"] == 1:
                log.info(
                    "step %d/%d loss %.4f lr %.3g %.0f samples/s",
                    record["step"],
                    train.steps,
                    loss,
                    record["lr"],
                    record["samples_per_s"],
                )
        metrics.write(*(record for record, _ in done))

    def save_checkpoint() -> Path:
        rngs: list[Any] = [None] * world
        if ctx.distributed:
            tdist.all_gather_object(rngs, get_rng_state(), group=ctx.control)
        else:
            rngs[0] = get_rng_state()
        path = ckpt.path_for(folder, step)
        if ctx.is_main:
            state = {
                "step": step,
                "epoch": epoch,
                "samples_in_epoch": samples_in_epoch,
                "world_size": world,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "rng": rngs,
                "loss": last_loss,
                "train": to_dict(train),
            }
            path = ckpt.save(folder, step, state, keep_last=train.keep_last)
            metrics.event("checkpoint", step=step, path=str(path))
        return path

    try:
        while step < train.steps and not stopping:
            start = samples_in_epoch // world
            micro_left = micro_per_epoch - start // micro
            if micro_left < accum:
                epoch, samples_in_epoch = epoch + 1, 0
                continue
            sampler.set_epoch(epoch)
            sampler.set_start(start)
            # Worker seeds depend on (seed, rank, epoch) only, never on the global RNG.
            generator.manual_seed(rank_seed(train.seed, rank, epoch))
            batches = iter(loader)
            while step < train.steps and micro_left >= accum and not stopping:
                t0 = time.perf_counter()
                control.maybe_post(stop.requested)
                total: torch.Tensor | None = None
                for i in range(accum):
                    batch = next(batches)
                    if device.type != "cpu":
                        batch = to_device(batch, device, non_blocking)
                    sync = ddp.no_sync() if ctx.distributed and i < accum - 1 else None
                    with sync or contextlib.nullcontext():
                        with autocast(train.precision, device):
                            if train.batch_as_kwargs and isinstance(batch, Mapping):
                                out = ddp(**batch)
                            else:
                                out = ddp(batch)
                            loss = models.loss_of(out)
                        # Mean over the micro batches; no extra graph node without accumulation.
                        scaled = loss.float() / accum if accum > 1 else loss.float()
                        if scaler is not None:
                            scaler.scale(scaled).backward()
                        else:
                            scaled.backward()
                    part = loss.detach().float()
                    total = part if total is None else total + part
                if train.grad_clip is not None:
                    if scaler is not None:
                        scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                lr = optimizer.param_groups[0]["lr"]
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                micro_left -= accum
                samples_in_epoch += train.global_batch_size
                flagged, done = control.finish()
                dt = time.perf_counter() - t0
                if step > 1 or resumed_from is not None:
                    run_samples += train.global_batch_size
                    run_time += dt
                record = {
                    "step": step,
                    "epoch": epoch,
                    "lr": lr,
                    "samples_per_s": train.global_batch_size / dt,
                    "step_time_s": dt,
                    "time": round(time.time(), 3),
                }
                control.add(record, total / accum if accum > 1 else total)
                emit(done)
                stopping = flagged if ctx.distributed else stop.requested
                if stopping or step % train.checkpoint_every == 0 or step == train.steps:
                    flagged, done = control.flush(stop.requested)
                    emit(done)
                    # Every rank sees the same reduced flag: stopping stays agreed.
                    stopping = stopping or (flagged if ctx.distributed else stop.requested)
                    last_path = save_checkpoint()
            if micro_left < accum and not stopping:
                epoch, samples_in_epoch = epoch + 1, 0
        if stopping:
            if ctx.distributed:
                tdist.barrier(group=ctx.control)  # nobody exits before the checkpoint is in place
            log.info(
                "stopped by %s after step %d; checkpoint %s",
                stop.name or "another rank",
                step,
                last_path,
            )
            metrics.event(
                "stop", step=step, signal=stop.name or "another rank", checkpoint=str(last_path)
            )
        else:
            metrics.event("end", step=step, loss=last_loss)
    finally:
        metrics.close()
        # Drop DDP (its Reducer holds the process group) and in-flight work now, also when
        # an exception's traceback keeps this frame alive: a gloo group destroyed later from
        # a Reducer's destructor can deadlock on the GIL with its own worker threads.
        ddp = control = batches = out = loss = scaled = None  # noqa: F841
    return TrainResult(
        steps_done=step,
        final_loss=last_loss,
        preempted=stopping and step < train.steps,
        checkpoint=last_path,
        resumed_from=resumed_from,
        world_size=world,
        samples_per_s=(run_samples / run_time) if run_time > 0 else None,
        signal=stop.name,
    )


def run_from_environ(environ: Mapping[str, str] | None = None) -> TrainResult:
    """What `python -m launcher.runtime` does: config and run dir from LAUNCHER_* variables."""
    from launcher.config import load_resolved

    environ = os.environ if environ is None else environ
    config = environ.get("LAUNCHER_CONFIG")
    if not config:
        raise ConfigError(
            "LAUNCHER_CONFIG is not set (the path of the run's resolved config.yaml)",
            file="<environment>",
        )
    run_dir = environ.get("LAUNCHER_RUN_DIR") or str(Path(config).parent)
    spec = load_resolved(config)
    try:
        return train(spec, Path(run_dir), environ=environ)
    except ConfigError as exc:
        if exc.file is not None:
            raise
        # Found while building the job (a pattern that matches nothing, a bad kwarg):
        # name the config file it came from.
        where = f"<config>: {exc.key}: " if exc.key else "<config>: "
        message = str(exc).removeprefix(where)
        raise ConfigError(message, file=config, key=exc.key) from None
