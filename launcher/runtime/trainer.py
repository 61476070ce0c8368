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
from collections.abc import Iterator, Mapping, Sized
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.distributed as tdist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from launcher.errors import ConfigError
from launcher.runtime import EXIT_OK, REQUEUE_EXIT_CODE, STOP_SIGNALS, autotune, dist, models
from launcher.runtime import checkpoint as ckpt
from launcher.runtime.loader import ResumableSampler, make_loader, resolve_picks, tuner_for
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

if TYPE_CHECKING:
    from launcher.hardware import LoaderPicks

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
        tdist.barrier(group=_control_group(ctx))


def _agree_on_checkpoint(folder: Path, ctx: dist.DistContext) -> tuple[Path, dict[str, Any]] | None:
    """Rank 0 picks the newest complete checkpoint; every rank loads that same file."""
    found = ckpt.load_latest(folder, ctx.device, ctx.logger) if ctx.is_main else None
    choice: list[str | None] = [str(found[0]) if found else None]
    if ctx.distributed:
        tdist.broadcast_object_list(choice, src=0, group=_control_group(ctx))
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
            return _Trainer(spec, run_dir, ctx, stop).run()
        finally:
            dist.teardown(ctx)
    finally:
        StopRequest.restore(previous)


class _Trainer:
    """One rank's run: the parts built from `spec.train`, and the loop state in fields.

    After torchtitan's `Trainer`: `resume()` restores a checkpoint, `train_step()` is one
    optimizer step, `save()` writes `state_dict()` atomically, `run()` loops to the last step
    or to a stop all ranks agreed on. Building happens in `__init__`, in the order the random
    streams need: the model's weights from the shared seed, then the loader, the checkpoint,
    DDP and last the per-rank streams.
    """

    def __init__(
        self, spec: JobSpec, run_dir: Path, ctx: dist.DistContext, stop: StopRequest
    ) -> None:
        self.spec, self.train, self.ctx, self.stop = spec, spec.train, ctx, stop
        self.log, self.device = ctx.logger, ctx.device
        self.world, self.rank = ctx.env.world_size, ctx.env.rank
        self.micro, self.accum = batch_plan(self.train, self.world)
        self.uses_gpu = self.device.type == "cuda"
        self.folder = run_dir / CHECKPOINT_DIR
        # Loop state: what a checkpoint holds, and this call's totals for samples_per_s.
        self.step = self.epoch = self.samples_in_epoch = 0
        self.last_loss: float | None = None
        self.resumed_from: Path | None = None
        self.last_path: Path | None = None
        self.stopping = False
        self.run_samples, self.run_time = 0, 0.0

        self.build_model()
        self.generator = torch.Generator()  # reseeded per epoch in `epoch_batches`
        self.tuner: autotune.LoaderTuner | None = None
        self.loader_reported = False
        self.picks, self.loader = self.build_loader()
        self.sampler = cast(ResumableSampler, self.loader.sampler)
        if self.picks.measure_workers or self.picks.measure_pin:
            self.tuner = self.build_tuner()
            if self.tuner.result is not None:  # remembered: known before the first step
                self.picks = self.tuner.picks
        self.micro_per_epoch = self.sampler.num_samples // self.micro
        if self.micro_per_epoch < self.accum:
            raise ConfigError(
                f"the dataset has {len(cast(Sized, self.built.dataset))} samples, fewer than "
                f"one step needs ({self.train.global_batch_size})",
                key="train.global_batch_size",
            )
        rng = self.resume() if self.train.resume else None
        self.ddp = self.wrap()
        # Per-rank random streams (dropout differs between ranks), or the saved ones on resume.
        if rng is not None:
            set_rng_state(rng)
        else:
            seed_everything(rank_seed(self.train.seed, self.rank, self.step), hash_seed=False)
        self.metrics = MetricsLog(run_dir / METRICS_FILE, ctx.is_main)
        self.announce()
        self.control = _Control(ctx)
        # Non-blocking copies are harmless from pageable memory, so a measured pin may go on.
        self.non_blocking = (self.picks.pin_memory or self.picks.measure_pin) and self.uses_gpu

    # --- building ------------------------------------------------------------------------

    def build_model(self) -> None:
        """Model, optimizer, schedule and scaler; the same seed on every rank for the weights."""
        train = self.train
        seed_everything(train.seed)
        self.built = models.build(train)
        self.model = self.built.model.to(self.device)
        self.wrapped = apply_activation_checkpointing(self.model, train.activation_checkpointing)
        self.optimizer = build_optimizer(self.model, train.optimizer)
        self.scheduler = build_scheduler(self.optimizer, train.schedule, train.steps)
        self.scaler = torch.amp.GradScaler(self.device.type) if train.precision == "fp16" else None

    def build_loader(self) -> tuple[LoaderPicks, DataLoader]:
        """The loader picks and this rank's DataLoader over its shard, micro batches long."""
        picks = resolve_picks(
            self.spec.loader,
            local_world_size=self.ctx.env.local_world_size,
            uses_gpu=self.uses_gpu,
            trainer=True,
        )
        # With `auto` this loader only holds the sampler: the tuner builds the ones that load.
        fixed = replace(picks, measure_workers=False, measure_pin=False)
        loader = make_loader(
            self.built.dataset,
            self.micro,
            seed=self.train.seed,
            collate_fn=self.built.collate_fn,
            picks=fixed,
            rank=self.rank,
            world_size=self.world,
            generator=self.generator,
            uses_gpu=self.uses_gpu,
        )
        return picks, loader

    def build_tuner(self) -> autotune.LoaderTuner:
        """`num_workers: auto`: race worker counts on this job's first steps (every rank)."""
        spec_loader = self.spec.loader
        budget = spec_loader.measure_budget_s
        if budget is None:
            budget = autotune.default_budget_s(self.spec.resources.time_min)
        t = self.train
        # What the step costs depends on: another model or precision measures again.
        workload = json.dumps(
            {
                "model": t.model,
                "model_kwargs": t.model_kwargs,
                "dataset": t.dataset,
                "dataset_kwargs": t.dataset_kwargs,
                "collate": t.collate,
                "precision": t.precision,
                "accumulation": self.accum,
                "activation_checkpointing": list(t.activation_checkpointing),
                "optimizer": t.optimizer.name,
                "device": self.device.type,
            },
            sort_keys=True,
            default=str,
        )
        return tuner_for(
            self.built.dataset,
            self.micro,
            sampler=self.sampler,
            picks=self.picks,
            world_size=self.world,
            local_world_size=self.ctx.env.local_world_size,
            local_rank=self.ctx.env.local_rank,
            collate_fn=self.built.collate_fn,
            generator=self.generator,
            uses_gpu=self.uses_gpu,
            device=self.device,
            budget_s=budget,
            accum=self.accum,
            workload=workload,
            fingerprint=spec_loader.fingerprint,
            exchange=autotune.Exchange(self.ctx.control, self.ctx.distributed),
        )

    def wrap(self) -> torch.nn.Module:
        """The module the steps call: DDP around the model when there are several ranks."""
        if not self.ctx.distributed:
            return self.model
        return DistributedDataParallel(
            self.model,
            device_ids=[self.device.index] if self.uses_gpu else None,
            gradient_as_bucket_view=True,
        )

    # --- checkpoints ---------------------------------------------------------------------

    def resume(self) -> dict[str, Any] | None:
        """Load the newest checkpoint all ranks agree on; returns this rank's saved RNG state.

        None when there is no checkpoint, or when it was written by another number of ranks.
        """
        found = _agree_on_checkpoint(self.folder, self.ctx)
        if found is None:
            return None
        self.resumed_from, state = found
        self.load_state_dict(state)
        rngs = state["rng"]
        if len(rngs) == self.world:
            return rngs[self.rank]
        self.log.warning(
            "checkpoint was written by %d ranks, now %d: RNG streams restart from the seed",
            len(rngs),
            self.world,
        )
        return None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Model, optimizer, schedule, scaler and loop position from a checkpoint's state."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        self.samples_in_epoch = int(state["samples_in_epoch"])
        self.last_loss = state.get("loss")

    def state_dict(self, rngs: list[Any]) -> dict[str, Any]:
        """What a checkpoint holds; `rngs` are every rank's RNG states, in rank order."""
        return {
            "step": self.step,
            "epoch": self.epoch,
            "samples_in_epoch": self.samples_in_epoch,
            "world_size": self.world,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": rngs,
            "loss": self.last_loss,
            "train": to_dict(self.train),
        }

    def save(self) -> Path:
        """Gather the ranks' RNG states; rank 0 writes the checkpoint. Every rank: its path."""
        rngs: list[Any] = [None] * self.world
        if self.ctx.distributed:
            tdist.all_gather_object(rngs, get_rng_state(), group=_control_group(self.ctx))
        else:
            rngs[0] = get_rng_state()
        path = ckpt.path_for(self.folder, self.step)
        if self.ctx.is_main:
            state = self.state_dict(rngs)
            path = ckpt.save(self.folder, self.step, state, keep_last=self.train.keep_last)
            self.metrics.event("checkpoint", step=self.step, path=str(path))
        return path

    # --- the loop ------------------------------------------------------------------------

    def run(self) -> TrainResult:
        """Train to `train.steps` or to an agreed stop; the last step is always checkpointed."""
        try:
            self.loop()
            self.report_end()
        except BaseException as exc:
            _clear_own_frames(exc.__traceback__)
            raise
        finally:
            self.metrics.close()
            # Drop DDP (its Reducer holds the process group) and in-flight work now, also when
            # an exception's traceback keeps this object alive: a gloo group destroyed later
            # from a Reducer's destructor can deadlock on the GIL with its own worker threads.
            del self.ddp, self.control
        return self.result()

    def loop(self) -> None:
        """Epochs of steps; an epoch ends when fewer micro batches are left than a step needs."""
        train = self.train
        if self.tuner is not None:
            # The race never plans past the job's last step (known only after a resume).
            self.tuner.batches_left = (train.steps - self.step) * self.accum
        while self.step < train.steps and not self.stopping:
            start = self.samples_in_epoch // self.world
            micro_left = self.micro_per_epoch - start // self.micro
            if micro_left < self.accum:
                self.epoch, self.samples_in_epoch = self.epoch + 1, 0
                continue
            batches = self.epoch_batches(start)
            while self.step < train.steps and micro_left >= self.accum and not self.stopping:
                self.train_step(batches)
                micro_left -= self.accum
            if micro_left < self.accum and not self.stopping:
                self.epoch, self.samples_in_epoch = self.epoch + 1, 0

    def epoch_batches(self, start: int) -> Iterator[Any]:
        """This epoch's micro batches from this rank's `start` sample on (a resume mid-epoch)."""
        self.sampler.set_epoch(self.epoch)
        self.sampler.set_start(start)
        # Worker seeds depend on (seed, rank, epoch) only, never on the global RNG.
        self.generator.manual_seed(rank_seed(self.train.seed, self.rank, self.epoch))
        if self.tuner is not None:
            return self.tuner.iterate()
        return iter(self.loader)

    def train_step(self, batches: Iterator[Any]) -> None:
        """One optimizer step, the control exchange around it, and a checkpoint when due."""
        t0 = time.perf_counter()
        self.control.maybe_post(self.stop.requested)
        loss = self.forward_backward(batches)
        lr = self.optimizer_step()
        self.step += 1
        self.samples_in_epoch += self.train.global_batch_size
        flagged, done = self.control.finish()
        self.record(lr, loss, time.perf_counter() - t0)
        self.emit(done)
        if self.tuner is not None and self.tuner.result is not None and not self.loader_reported:
            self.report_loader(self.tuner.result)
        self.stopping = flagged if self.ctx.distributed else self.stop.requested
        if (
            self.stopping
            or self.step % self.train.checkpoint_every == 0
            or self.step == self.train.steps
        ):
            flagged, done = self.control.flush(self.stop.requested)
            self.emit(done)
            # Every rank sees the same reduced flag: stopping stays agreed.
            self.stopping = self.stopping or (
                flagged if self.ctx.distributed else self.stop.requested
            )
            self.last_path = self.save()

    def forward_backward(self, batches: Iterator[Any]) -> torch.Tensor:
        """`accum` micro batches forward and backward; their mean loss, detached."""
        total = self.micro_step(next(batches), 0)
        for i in range(1, self.accum):
            total = total + self.micro_step(next(batches), i)
        return total / self.accum if self.accum > 1 else total

    def micro_step(self, batch: Any, i: int) -> torch.Tensor:
        """Forward and backward of micro batch `i`; gradients sync only on the last one."""
        if self.device.type != "cpu":
            batch = to_device(batch, self.device, self.non_blocking)
        last = i == self.accum - 1
        ddp = cast(DistributedDataParallel, self.ddp)
        with ddp.no_sync() if self.ctx.distributed and not last else contextlib.nullcontext():
            with autocast(self.train.precision, self.device):
                if self.train.batch_as_kwargs and isinstance(batch, Mapping):
                    out = self.ddp(**batch)
                else:
                    out = self.ddp(batch)
                loss = models.loss_of(out)
            # Mean over the micro batches; no extra graph node without accumulation.
            scaled = loss.float() / self.accum if self.accum > 1 else loss.float()
            if self.scaler is not None:
                self.scaler.scale(scaled).backward()
            else:
                scaled.backward()
        return loss.detach().float()

    def optimizer_step(self) -> float:
        """Clip, step (through the fp16 scaler), advance the schedule; the step's LR."""
        if self.train.grad_clip is not None:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.train.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return lr

    # --- metrics -------------------------------------------------------------------------

    def record(self, lr: float, loss: torch.Tensor, dt: float) -> None:
        """Queue this step's record; its loss leaves the device with the next exchange."""
        batch = self.train.global_batch_size
        if self.step > 1 or self.resumed_from is not None:  # step 1 pays the warm-up
            self.run_samples += batch
            self.run_time += dt
        record = {
            "step": self.step,
            "epoch": self.epoch,
            "lr": lr,
            "samples_per_s": batch / dt,
            "step_time_s": dt,
            "time": round(time.time(), 3),
        }
        self.control.add(record, loss)

    def emit(self, done: list[tuple[dict[str, Any], float]]) -> None:
        """Log and write the steps whose all-reduced losses just arrived."""
        for record, loss in done:
            record["loss"] = self.last_loss = loss
            if self.ctx.is_main:
                self.log_step(record, loss)
        self.metrics.write(*(record for record, _ in done))

    def log_step(self, record: dict[str, Any], loss: float) -> None:
        """Rank 0: every `log_every` steps (and the first) a line; a warning for inf/nan."""
        if not math.isfinite(loss) and self.scaler is None:
            self.log.warning("step %d: loss is %s", record["step"], loss)
        if record["step"] % self.train.log_every == 0 or record["step"] == 1:
            self.log.info(
                "step %d/%d loss %.4f lr %.3g %.0f samples/s",
                record["step"],
                self.train.steps,
                loss,
                record["lr"],
                record["samples_per_s"],
            )

    def announce(self) -> None:
        """The run's shape in the log, and a start (or resume) event in metrics.jsonl."""
        n_params = sum(p.numel() for p in self.model.parameters())
        if self.ctx.is_main:
            self.log.info(
                "%s: %.2fM parameters, %d ranks x micro batch %d x %d accumulation = %d per "
                "step, %s, loader %s",
                self.built.description,
                n_params / 1e6,
                self.world,
                self.micro,
                self.accum,
                self.train.global_batch_size,
                self.train.precision,
                {
                    k: getattr(self.picks, k)
                    for k in ("num_workers", "pin_memory", "prefetch_factor")
                },
            )
            if self.wrapped:
                self.log.info("activation checkpointing on %s", ", ".join(self.wrapped))
        if self.resumed_from is not None:
            if self.ctx.is_main:
                self.log.info(
                    "resuming from %s (step %d, epoch %d)", self.resumed_from, self.step, self.epoch
                )
            self.metrics.event(
                "resume", step=self.step, epoch=self.epoch, checkpoint=str(self.resumed_from)
            )
        else:
            self.metrics.event(
                "start",
                world_size=self.world,
                micro_batch_size=self.micro,
                accumulation=self.accum,
                parameters=n_params,
                train=to_dict(self.train),
            )

    def report_loader(self, result: autotune.Measured) -> None:
        """The measured loader settings: a log line and a `loader` event in metrics.jsonl."""
        self.loader_reported = True
        assert self.tuner is not None
        self.picks = self.tuner.picks
        if self.ctx.is_main:
            overhead = "" if result.overhead_s is None else f", {result.overhead_s:.1f} s lost"
            self.log.info(
                "loader: num_workers=%d pin_memory=%s (%s: %s; %d batches in %.1f s%s)",
                result.num_workers,
                result.pin_memory,
                result.source,
                result.why,
                result.batches,
                result.seconds,
                overhead,
            )
        self.metrics.event("loader", step=self.step, **result.to_dict())

    def report_end(self) -> None:
        """An end event, or after a stop: wait for every rank, then log and record the stop."""
        if not self.stopping:
            self.metrics.event("end", step=self.step, loss=self.last_loss)
            return
        if self.ctx.distributed:
            # Nobody exits before the checkpoint is in place.
            tdist.barrier(group=_control_group(self.ctx))
        by = self.stop.name or "another rank"
        self.log.info("stopped by %s after step %d; checkpoint %s", by, self.step, self.last_path)
        self.metrics.event("stop", step=self.step, signal=by, checkpoint=str(self.last_path))

    def result(self) -> TrainResult:
        """How this call ended, from the loop state."""
        return TrainResult(
            steps_done=self.step,
            final_loss=self.last_loss,
            preempted=self.stopping and self.step < self.train.steps,
            checkpoint=self.last_path,
            resumed_from=self.resumed_from,
            world_size=self.world,
            samples_per_s=(self.run_samples / self.run_time) if self.run_time > 0 else None,
            signal=self.stop.name,
        )


def _clear_own_frames(tb: TracebackType | None) -> None:
    """Clear the locals (DDP outputs, the batch iterator) of this module's finished frames in
    a traceback, as the GIL note in `_Trainer.run` needs; frames still running are skipped."""
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == __file__:
            with contextlib.suppress(RuntimeError):
                tb.tb_frame.clear()
        tb = tb.tb_next


def _control_group(ctx: dist.DistContext) -> tdist.ProcessGroup | None:
    """The gloo side group, typed (DistContext keeps it as an object)."""
    return cast("tdist.ProcessGroup | None", ctx.control)


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
