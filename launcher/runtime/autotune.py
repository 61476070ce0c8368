"""`num_workers: auto`: race a few DataLoader settings on the job's own batches, step running.

Why measure: the best `num_workers` moves with the cost of a sample, the size of a batch and
the cost of the training step that shares the CPUs with the workers (bench/loader_auto.py:
on one 2-CPU machine the best of a full grid moved between 0 and 4 workers across workloads),
so no fixed rule is right everywhere.

How, in short:
- Candidates: the fixed rule's pick first (also the fallback), then 0, 1, CPUs/2, CPUs and
  2 x CPUs per process, within the memory and /dev/shm caps (`hardware.worker_candidates`).
- Slots: each candidate loads a slot of consecutive batches *of the job's own sample order*
  (a DataLoader over the next slice of the sampler's indices), and the consumer trains on
  them. A run with `auto` therefore sees the same batches in the same order as a run with the
  chosen value set by hand: nothing is skipped or seen twice, and exact resume holds.
- Rate: samples/s between handing out batches, i.e. loader wait + the real step, after the
  first `1 + workers` batches of the slot (worker start-up and the head start their first
  batches get while the consumer waits).
- Successive halving: a probe slot with the rule's pick sizes the timed window (at least
  MIN_WINDOW_S on the fastest node, the race within half the job's remaining batches); round r
  gives every surviving candidate one slot of window x 2^r timed batches; after a round, the
  slower half and anything under CLEARLY_WORSE of the best leave; the last two race A B B A.
- Choice: the fewest workers within TOLERANCE of the best pooled rate (memory, /dev/shm and
  fork cost argue for fewer). Out of budget or batches: the best measured so far, or the rule.
- Ranks: every rank runs the same slots (their lengths are a function of the round only), and
  after each slot all ranks all-gather their slot times on the control group; each node's
  figure is its slowest rank, so all ranks of a node take the same setting, and each node
  decides for its own ranks. Every rank follows every node's race from the same numbers, so
  they all know when the race is over and nobody waits on a collective that never comes.
- Cache: the choice is kept in ~/.cache/launcher/loader-picks.json (LAUNCHER_LOADER_CACHE),
  keyed by dataset identity, batch size, world and local world size, the step's identity and
  the hardware; a later run or sweep point with the same key skips the race.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import socket
import statistics
import time
import warnings
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence, Sized
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from launcher.hardware import Hardware, LoaderPicks, worker_candidates
from launcher.runs import atomic_write_json

CACHE_ENV = "LAUNCHER_LOADER_CACHE"
CACHE_VERSION = 1
# Within this share of the best counts as a tie, and the fewer workers win.
TOLERANCE = 0.04
# Under this share of the best after a round: out at once (halving or not).
CLEARLY_WORSE = 0.75
FIRST_WINDOW = 12  # timed batches per candidate in round 0 at least; doubles each round
# Round 0's timed window lasts this long at least (doubling each round): a window of a few
# milliseconds measures the machine's other load, not the setting.
MIN_WINDOW_S = 0.4
MAX_WINDOW = 4096
MAX_ROUNDS = 4
# Default budget: this share of the job's time limit, within [BUDGET_MIN_S, BUDGET_MAX_S].
BUDGET_SHARE = 0.02
BUDGET_MIN_S, BUDGET_MAX_S = 10.0, 120.0
# pinned must beat pageable host-to-device copies by this factor to be chosen.
PIN_GAIN = 0.9

log = logging.getLogger("launcher.runtime.autotune")


def default_budget_s(time_min: float | None) -> float:
    """A small share of the job's time limit (12 s of a 10-minute job)."""
    if time_min is None:
        return BUDGET_MIN_S
    return min(BUDGET_MAX_S, max(BUDGET_MIN_S, BUDGET_SHARE * time_min * 60))


# --- identity and cache ------------------------------------------------------------------


def dataset_identity(dataset: Any, fingerprint: str | None = None) -> str:
    """Class, length and a fingerprint: the user's, the dataset's `fingerprint` attribute, or
    the shapes and dtypes of sample 0 (a cheap stand-in that changes with the data's format)."""
    cls = type(dataset)
    name = f"{cls.__module__}.{cls.__qualname__}"
    size = len(cast(Sized, dataset))
    fp = fingerprint or getattr(dataset, "fingerprint", None)
    if fp is None:
        try:
            fp = _shape_of(dataset[0])
        except Exception as exc:  # a dataset that cannot show sample 0 still gets a key
            fp = f"sample 0 unreadable: {type(exc).__name__}"
    return f"{name}:{size}:{fp}"


def _shape_of(sample: Any) -> str:
    if isinstance(sample, torch.Tensor):
        return f"{sample.dtype}{list(sample.shape)}"
    if isinstance(sample, Mapping):
        return "{" + ",".join(f"{k}:{_shape_of(v)}" for k, v in sorted(sample.items())) + "}"
    if isinstance(sample, (list, tuple)):
        return "(" + ",".join(_shape_of(v) for v in sample) + ")"
    return type(sample).__name__


def cache_key_parts(
    *,
    dataset: str,
    batch_size: int,
    world_size: int,
    local_world_size: int,
    hw: Hardware,
    workload: str = "",
) -> dict[str, Any]:
    """What a remembered result depends on; any change measures again."""
    return {
        "version": CACHE_VERSION,
        "dataset": dataset,
        "batch_size": batch_size,
        "world_size": world_size,
        "local_world_size": local_world_size,
        # The step shares the CPUs with the workers: a different model is a different figure.
        "workload": workload,
        "cpus": hw.cpus,
        "mem_gib": None if hw.mem_bytes is None else round(hw.mem_bytes / 1024**3),
        "shm_gib": None if hw.shm_bytes is None else round(hw.shm_bytes / 1024**3, 1),
        "gpus": list(hw.gpu_names) if hw.gpu_names else hw.gpus,
    }


def cache_key(parts: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def default_cache_path(environ: Mapping[str, str] | None = None) -> Path | None:
    """LAUNCHER_LOADER_CACHE (empty or "off": no cache), else the user's cache folder."""
    environ = os.environ if environ is None else environ
    if CACHE_ENV in environ:
        value = environ[CACHE_ENV].strip()
        return None if value in ("", "off", "0") else Path(value)
    base = environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "launcher" / "loader-picks.json"


class PicksCache:
    """One JSON file of measured choices by key; written atomically, read leniently."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def _read(self) -> dict[str, Any]:
        if self.path is None:
            return {}
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def get(self, key: str) -> dict[str, Any] | None:
        entry = self._read().get(key)
        if isinstance(entry, dict) and isinstance(entry.get("num_workers"), int):
            return entry
        return None

    def put(self, key: str, entry: Mapping[str, Any]) -> None:
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            data = self._read()  # merge: another node or run may have added its own keys
            data[key] = dict(entry)
            atomic_write_json(self.path, data)
        except OSError as exc:  # a read-only home must not fail the job
            log.warning("could not remember the loader measurement in %s: %s", self.path, exc)


# --- the race (pure logic: the same on every rank) -------------------------------------


@dataclass
class Race:
    """One node's successive-halving race over worker counts, fed (batches, seconds) per slot."""

    candidates: list[int]
    tolerance: float = TOLERANCE
    survivors: list[int] = field(default_factory=list)
    queue: list[int] = field(default_factory=list)
    round: int = 0
    decided: int | None = None
    why: str = ""
    # (round, workers, batches, seconds) of every measured slot, in order.
    slots: list[tuple[int, int, int, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.survivors:
            self.survivors = list(self.candidates)
        if len(self.candidates) == 1:
            self.decide(self.candidates[0], "the only candidate")
        elif not self.queue and self.decided is None:
            self.queue = list(self.survivors)

    def decide(self, workers: int, why: str) -> None:
        self.decided, self.why, self.queue = workers, why, []

    @property
    def leader(self) -> int:
        """The setting to use when not measuring: the decision, else the best so far."""
        if self.decided is not None:
            return self.decided
        rates = self.rates()
        return self.choose(rates) if rates else self.candidates[0]

    def rates(self, survivors_only: bool = False) -> dict[int, float]:
        """Pooled samples-per-batch rate (batches / seconds) per candidate."""
        batches: dict[int, int] = {}
        seconds: dict[int, float] = {}
        for _, w, n, s in self.slots:
            if survivors_only and w not in self.survivors:
                continue
            batches[w] = batches.get(w, 0) + n
            seconds[w] = seconds.get(w, 0.0) + s
        return {w: batches[w] / seconds[w] for w in batches if seconds[w] > 0}

    def choose(self, rates: Mapping[int, float]) -> int:
        """The fewest workers within `tolerance` of the best rate."""
        best = max(rates.values())
        return min(w for w, r in rates.items() if r >= best * (1 - self.tolerance))

    def next_slot(self) -> int | None:
        """The candidate to measure in the next slot of this round; None when the round is done."""
        return self.queue.pop(0) if self.queue else None

    def record(self, workers: int, batches: int, seconds: float) -> None:
        self.slots.append((self.round, workers, batches, seconds))

    def end_round(self) -> None:
        """Halve the field (and drop the clearly worse), or decide."""
        if self.decided is not None:
            return
        this = {w: n / s for r, w, n, s in self.slots if r == self.round and s > 0}
        pooled = self.rates(survivors_only=True)
        if not this:
            self.decide(self.leader, "nothing measured")
            return
        best = max(pooled.values())
        ranked = sorted(pooled, key=lambda w: -pooled[w])
        keep = ranked[: max(2, math.ceil(len(ranked) / 2))]
        # The clearly worse leave at once, but the best two always race again: one short
        # window on a busy machine can be off by more than CLEARLY_WORSE.
        keep = keep[:2] + [w for w in keep[2:] if pooled[w] >= best * CLEARLY_WORSE]
        if len(self.survivors) <= 2 and self.round >= 1 or len(keep) == 1:
            self.survivors = keep
            chosen = self.choose({w: pooled[w] for w in keep})
            self.decide(chosen, self._why(pooled, chosen))
            return
        if self.round + 1 >= MAX_ROUNDS:
            chosen = self.choose({w: pooled[w] for w in keep})
            self.decide(chosen, self._why(pooled, chosen))
            return
        self.survivors = keep
        self.round += 1
        # Alternate the order each round, so a slow drift of the machine does not favour one;
        # the last two race A B B A for the same reason.
        order = sorted(keep) if self.round % 2 == 0 else sorted(keep, reverse=True)
        self.queue = order + order[::-1] if len(order) <= 2 else order

    def stop(self, why: str) -> None:
        """Out of budget or batches: the best measured so far, or the rule's pick."""
        if self.decided is not None:
            return
        rates = self.rates()
        if rates:
            chosen = self.choose(rates)
            self.decide(chosen, f"{why}; best measured so far: {self._why(rates, chosen)}")
        else:
            self.decide(self.candidates[0], f"{why}; nothing measured, the rule's pick")

    def _why(self, rates: Mapping[int, float], chosen: int) -> str:
        best_w = max(rates, key=lambda w: rates[w])
        if best_w == chosen:
            return f"fastest ({rates[chosen]:.3g} batches/s)"
        return (
            f"within {self.tolerance:.0%} of the fastest ({best_w} workers, "
            f"{rates[best_w]:.3g} batches/s) with fewer workers"
        )

    def table(self) -> list[dict[str, Any]]:
        """Per candidate: slots, batches, seconds and the pooled rate (for records)."""
        rows = []
        for w in self.candidates:
            mine = [(n, s) for _, ww, n, s in self.slots if ww == w]
            n = sum(b for b, _ in mine)
            s = sum(t for _, t in mine)
            rows.append(
                {
                    "num_workers": w,
                    "slots": len(mine),
                    "batches": n,
                    "seconds": round(s, 4),
                    "batches_per_s": round(n / s, 3) if s > 0 else None,
                }
            )
        return rows


# --- rank exchange ---------------------------------------------------------------------


class Exchange:
    """The ranks' numbers after each slot; one process: just its own."""

    def __init__(self, group: Any = None, distributed: bool = False) -> None:
        self.group = group
        self.on = distributed
        self.world = torch.distributed.get_world_size() if distributed else 1

    def objects(self, obj: Any) -> list[Any]:
        if not self.on:
            return [obj]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj, group=self.group)
        return out

    def floats(self, values: Sequence[float]) -> list[list[float]]:
        if not self.on:
            return [list(values)]
        mine = torch.tensor(list(values), dtype=torch.float64)
        out = [torch.empty_like(mine) for _ in range(self.world)]
        torch.distributed.all_gather(out, mine, group=self.group)
        return [t.tolist() for t in out]


# --- the loader that races -------------------------------------------------------------


class _Slice(Sampler[int]):
    """Indices given in order: one slot's slice of the rank's epoch."""

    def __init__(self, indices: Sequence[int]) -> None:
        self.indices = indices

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def _warmup(workers: int) -> int:
    """Batches not timed at the start of a slot: start-up and the workers' head start."""
    return 1 + workers


@dataclass
class Measured:
    """What a tuner chose and why, for metrics.jsonl, `launcher status` and the cache."""

    num_workers: int
    pin_memory: bool
    source: str  # "measured", "cache", "rule"
    why: str
    table: list[dict[str, Any]] = field(default_factory=list)
    pin: dict[str, Any] | None = None
    seconds: float = 0.0  # wall time from the first raced batch to the choice
    overhead_s: float | None = None  # that time minus the same batches at the best rate
    batches: int = 0  # batches trained while racing
    key: str = ""
    nodes: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_workers": self.num_workers,
            "pin_memory": self.pin_memory,
            "source": self.source,
            "why": self.why,
            "table": self.table,
            "pin": self.pin,
            "seconds": round(self.seconds, 3),
            "overhead_s": None if self.overhead_s is None else round(self.overhead_s, 3),
            "batches": self.batches,
            "key": self.key,
            "nodes": self.nodes,
        }


class LoaderTuner:
    """A DataLoader stand-in that races worker counts on the first batches, then settles.

    `iterate()` is `iter(loader)` for the sampler's current epoch and start: during the race
    its batches come from one loader per slot over consecutive slices of the same indices; once
    every node has decided, from one DataLoader with the chosen setting (`self.loader`). Call
    it once per epoch, after `sampler.set_epoch` / `set_start`, as the trainer does. All ranks
    must build it at the same point and iterate the same number of batches (DDP does).
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        *,
        sampler: Any,
        picks: LoaderPicks,
        hw: Hardware,
        local_world_size: int,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        generator: torch.Generator | None = None,
        drop_last: bool = True,
        uses_gpu: bool = False,
        device: torch.device | None = None,
        budget_s: float = BUDGET_MIN_S,
        batches_left: int | None = None,
        accum: int = 1,
        cache: PicksCache | None = None,
        key_parts: Mapping[str, Any] | None = None,
        exchange: Exchange | None = None,
        local_rank: int = 0,
        candidates: list[int] | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        self.dataset, self.batch_size, self.sampler = dataset, batch_size, sampler
        self.base = picks
        self.collate_fn, self.generator, self.drop_last = collate_fn, generator, drop_last
        self.uses_gpu, self.device = uses_gpu, device
        self.budget_s, self.accum = budget_s, max(1, accum)
        # Micro batches the job will still consume; set it after a resume (None: unbounded).
        self.batches_left = batches_left
        self.cache = cache or PicksCache(None)
        self.key_parts = dict(key_parts or {})
        self.key = cache_key(self.key_parts) if key_parts else ""
        self.exchange = exchange or Exchange()
        self.log = logger or log
        self.local_rank = local_rank
        own = candidates if candidates is not None else worker_candidates(hw, local_world_size)
        if not picks.measure_workers:
            own = [picks.num_workers]
        cached = self.cache.get(self.key) if self.key and local_rank == 0 else None
        self._cached_table = list(cached.get("table") or []) if cached else []
        self.loader: DataLoader | None = None
        self.result: Measured | None = None
        self._t0: float | None = None
        self._batches = 0
        self._last_batch: Any = None
        self._pin_figures: dict[str, Any] | None = None
        self.window0: int | None = None  # round 0's timed batches, sized by the probe
        # Usable batches in a whole epoch (the same on every rank): no slot is longer, since a
        # slot never spans two epochs (None until the first epoch starts).
        self.epoch_batches: int | None = None
        self._setup(own, cached, picks.measure_pin and uses_gpu)
        if self.done:
            self._settle()

    # --- the ranks agree on who races what ---

    def _setup(self, own: list[int], cached: dict[str, Any] | None, measure_pin: bool) -> None:
        info = {
            "host": socket.gethostname(),
            "local_rank": self.local_rank,
            "candidates": own,
            "cached": None if cached is None else cached["num_workers"],
            "cached_pin": None if cached is None else cached.get("pin_memory"),
        }
        everyone = self.exchange.objects(info)
        hosts: list[str] = []
        for peer in everyone:
            if peer["host"] not in hosts:
                hosts.append(peer["host"])
        self.hosts = hosts
        self.node_of = [hosts.index(p["host"]) for p in everyone]
        rank = torch.distributed.get_rank() if self.exchange.on else 0
        self.my_node = self.node_of[rank]
        self.races: list[Race] = []
        self.from_cache = False
        self.pin_choice: bool | None = None
        pin_unknown = False
        for node in range(len(hosts)):
            # The node's lowest local rank speaks for it (candidates and cache are per node).
            lead = min(
                (p for p, n in zip(everyone, self.node_of, strict=True) if n == node),
                key=lambda p: p["local_rank"],
            )
            race = Race(list(lead["candidates"]))
            if lead["cached"] is not None and race.decided is None:
                race.decide(int(lead["cached"]), "remembered from an earlier run with this key")
            if node == self.my_node and lead["cached"] is not None:
                self.from_cache = True
                if isinstance(lead["cached_pin"], bool):
                    self.pin_choice = lead["cached_pin"]
            pin_unknown = pin_unknown or not isinstance(lead["cached_pin"], bool)
            self.races.append(race)
        # The same on every rank (it is a collective): pin is measured when any node does not
        # remember it; a node that does takes part and keeps its own.
        self.measure_pin = measure_pin and pin_unknown
        self.max_workers = max(max(r.candidates) for r in self.races)

    @property
    def race(self) -> Race:
        return self.races[self.my_node]

    @property
    def done(self) -> bool:
        return all(r.decided is not None for r in self.races) and not self.measure_pin

    def slot_length(self, round_: int) -> int:
        """Batches per slot in this round: the same on every rank of every node."""
        window = max((self.window0 or FIRST_WINDOW) * 2**round_, 2 * self.max_workers)
        length = _warmup(self.max_workers) + window
        length += (-length) % self.accum
        if self.epoch_batches is not None and length > self.epoch_batches:
            length = self.epoch_batches - self.epoch_batches % self.accum
        return length

    def _fits(self, length: int) -> bool:
        """A slot of `length` leaves at least FIRST_WINDOW timed batches after its warm-up."""
        return length - _warmup(self.max_workers) >= FIRST_WINDOW

    def _after_probe(self, measured: int, seconds: float) -> None:
        """Size round 0's window from the probe: MIN_WINDOW_S on the fastest node, and the
        whole race within half the job's remaining batches (same numbers on every rank)."""
        mine = seconds / measured if measured > 0 and seconds > 0 else -1.0
        per_batch = [row[0] for row in self.exchange.floats([mine]) if row[0] > 0]
        window = FIRST_WINDOW
        if per_batch:
            window = max(window, math.ceil(MIN_WINDOW_S / min(per_batch)))
        if self.batches_left is not None:
            n = max(len(r.candidates) for r in self.races)
            warm = _warmup(self.max_workers)
            # Round 0 is n slots of w, the last two race A B B A with 2w: (n + 8) w in all.
            room = (self.batches_left - self._batches) / 2 - (n + 4) * warm
            window = min(window, max(FIRST_WINDOW, int(room // (n + 8))))
        self.window0 = min(window, MAX_WINDOW)

    # --- loaders ---

    def _pin(self) -> bool:
        pin = self.base.pin_memory if self.pin_choice is None else self.pin_choice
        return pin and self.uses_gpu

    def _loader(self, workers: int, sampler: Any, persistent: bool) -> DataLoader:
        kwargs: dict[str, Any] = {}
        if workers > 0:
            kwargs["prefetch_factor"] = self.base.prefetch_factor or 2
            kwargs["persistent_workers"] = persistent
        with warnings.catch_warnings():
            # PyTorch warns about more workers than CPUs; racing such a candidate is the point.
            warnings.filterwarnings("ignore", message=".*worker processes in total.*")
            return DataLoader(
                self.dataset,
                batch_size=self.batch_size,
                sampler=sampler,
                num_workers=workers,
                pin_memory=self._pin(),
                drop_last=self.drop_last,
                collate_fn=self.collate_fn,
                generator=self.generator,
                **kwargs,
            )

    def _settle(self) -> None:
        """Build the DataLoader of the chosen setting over the real sampler, record the result."""
        workers = self.race.leader
        persistent = self.base.persistent_workers or self.base.measure_workers
        self.loader = self._loader(workers, self.sampler, persistent)
        source = "cache" if self.from_cache else "measured" if self.race.slots else "rule"
        if not self.base.measure_workers:
            source = (
                "config"
                if self.base.reasons.get("num_workers") == "set in the config"
                else ("rule")
            )
        seconds = 0.0 if self._t0 is None else time.perf_counter() - self._t0
        rates = self.race.rates()
        overhead = None
        if rates and self._batches:
            # What the race cost: its time minus the same batches at the best measured rate.
            overhead = max(0.0, seconds - self._batches / max(rates.values()))
        nodes = {
            host: {"num_workers": race.leader, "why": race.why, "table": race.table()}
            for host, race in zip(self.hosts, self.races, strict=True)
        }
        self.result = Measured(
            num_workers=workers,
            pin_memory=self._pin(),
            source=source,
            why=self.race.why,
            table=self._cached_table if source == "cache" else self.race.table(),
            pin=self._pin_figures,
            seconds=seconds,
            overhead_s=overhead,
            batches=self._batches,
            key=self.key,
            nodes=nodes if len(nodes) > 1 else {},
        )
        if source == "measured" and self.local_rank == 0 and self.key:
            self.cache.put(
                self.key,
                {
                    "num_workers": workers,
                    "pin_memory": self.pin_choice,
                    "parts": self.key_parts,
                    "table": self.race.table(),
                    "why": self.race.why,
                    "time": round(time.time(), 3),
                },
            )

    @property
    def picks(self) -> LoaderPicks:
        """The settings in use now (the chosen ones once settled)."""
        workers = self.race.leader
        reasons = dict(self.base.reasons)
        if self.result is not None and self.base.measure_workers:
            reasons["num_workers"] = f"{self.result.source}: {self.result.why}"
        return replace(
            self.base,
            num_workers=workers,
            pin_memory=self._pin(),
            persistent_workers=workers > 0,
            prefetch_factor=(self.base.prefetch_factor or 2) if workers else None,
            reasons=reasons,
        )

    # --- iterating ---

    def iterate(self) -> Iterator[Any]:
        """This epoch's batches from the sampler's start, as `iter(loader)` would give them."""
        if self.done and self.loader is not None:
            return iter(self.loader)
        return self._racing()

    def __iter__(self) -> Iterator[Any]:
        return self.iterate()

    def _racing(self) -> Iterator[Any]:
        if self._t0 is None:
            self._t0 = time.perf_counter()
        start = int(getattr(self.sampler, "start", 0))
        indices = list(self.sampler)
        b = self.batch_size
        available = len(indices) // b if self.drop_last else math.ceil(len(indices) / b)
        usable = available - available % self.accum
        if self.epoch_batches is None:
            # The whole epoch, also when a resume starts it part-way (the same on every rank).
            whole = start + len(indices)
            full = whole // b if self.drop_last else math.ceil(whole / b)
            self.epoch_batches = full - full % self.accum
        pos = 0
        if not self.races_done and not self._fits(self.slot_length(self.round)):
            for race in self.races:
                race.stop(f"epochs of {self.epoch_batches} batches are too short to time a slot")
        while not self.races_done and self.window0 is None:
            # A probe with the leader (the rule's pick): how long a batch takes here.
            length = _warmup(self.max_workers) + FIRST_WINDOW
            length += (-length) % self.accum
            if pos + length > usable:
                yield from self._run(self.race.leader, indices[pos * b : usable * b])
                return
            seconds = yield from self._run(self.race.leader, indices[pos * b : (pos + length) * b])
            pos += length
            self._after_probe(length - _warmup(self.race.leader), seconds)
        while not self.races_done:
            self._stop_if_no_room()
            if self.races_done:
                break
            length = self.slot_length(self.round)
            if pos + length > usable:
                # The slot does not fit in this epoch: the leader loads the rest, unmeasured,
                # and the slot starts with the next epoch (every rank sees the same counts).
                yield from self._run(self.race.leader, indices[pos * b : usable * b])
                return
            mine = self.race.next_slot() if self.race.decided is None else None
            workers = self.race.leader if mine is None else mine
            seconds = yield from self._run(workers, indices[pos * b : (pos + length) * b])
            pos += length
            self._after_slot(mine, length, seconds)
        if self.measure_pin:
            if self._last_batch is None and pos + self.accum <= usable:
                # One step's batches to copy (only when the race measured nothing here).
                yield from self._run(self.race.leader, indices[pos * b : (pos + self.accum) * b])
                pos += self.accum
            self._measure_pin()
        # Settled: the rest of the epoch from the chosen loader, at the same sampler position.
        self._settle()
        if hasattr(self.sampler, "set_start"):
            self.sampler.set_start(start + pos * b)
        assert self.loader is not None
        yield from self.loader

    @property
    def races_done(self) -> bool:
        return all(r.decided is not None for r in self.races)

    @property
    def round(self) -> int:
        """The round in progress: the same on every node (rounds end together)."""
        return max(r.round for r in self.races if r.decided is None)

    def _run(self, workers: int, indices: Sequence[int]) -> Generator[Any, None, float]:
        """Yield one slot's batches; return the seconds after its warm-up batches."""
        if not indices:
            return 0.0
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*worker processes in total.*")
            it = iter(self._loader(workers, _Slice(indices), persistent=False))
        marks: list[float] = []
        try:
            for batch in it:
                marks.append(time.perf_counter())
                self._last_batch = batch
                self._batches += 1
                yield batch
            marks.append(time.perf_counter())  # the consumer is done with the last batch
        finally:
            shutdown = getattr(it, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
        warm = _warmup(workers)
        return marks[-1] - marks[warm] if len(marks) > warm + 1 else 0.0

    def _stop_if_no_room(self) -> None:
        """At a round's start: no round that does not fit in the job's remaining batches."""
        pending = [r for r in self.races if r.decided is None]
        if any(len(r.queue) < len(r.survivors) for r in pending):
            return
        if not self._fits(self.slot_length(self.round)):
            for race in pending:
                race.stop(f"epochs of {self.epoch_batches} batches are too short for another round")
            return
        if self.batches_left is None:
            return
        slots = max(len(r.queue) for r in pending)
        if self._batches + slots * self.slot_length(self.round) > self.batches_left:
            for race in pending:
                race.stop("too few steps left in the job for another round")

    def _after_slot(self, mine: int | None, length: int, seconds: float) -> None:
        """Every rank: the node's slot time is its slowest rank's; advance every node's race."""
        elapsed = time.perf_counter() - (self._t0 or 0.0)
        rows = self.exchange.floats([seconds if mine is not None else -1.0, elapsed])
        node_seconds: dict[int, float] = {}
        node_elapsed: dict[int, float] = {}
        for rank, (sec, el) in enumerate(rows):
            node = self.node_of[rank]
            node_seconds[node] = max(node_seconds.get(node, -1.0), sec)
            node_elapsed[node] = max(node_elapsed.get(node, 0.0), el)
        for node, race in enumerate(self.races):
            if race.decided is not None:
                continue
            # Every rank pops the other nodes' slots too, to follow their races in step.
            w = mine if node == self.my_node else race.next_slot()
            if w is not None and node_seconds[node] > 0:
                race.record(w, length - _warmup(w), node_seconds[node])
            if node_elapsed[node] > self.budget_s:
                race.stop(f"budget of {self.budget_s:g} s spent")
        if not any(r.queue for r in self.races):
            for race in self.races:
                race.end_round()

    # --- pin_memory ---

    def _measure_pin(self) -> None:
        """Pinned vs pageable host-to-device copies of a batch of the job's own, per node."""
        figures = [math.nan, math.nan]
        batch = self._last_batch
        remembered = self.pin_choice
        if batch is not None and remembered is None:
            device = self.device or torch.device("cuda", torch.cuda.current_device())
            pageable = _map_tensors(batch, lambda t: t.clone())
            pinned = _map_tensors(batch, lambda t: t.pin_memory())
            times: list[list[float]] = [[], []]
            for _ in range(5):
                for i, src, nb in ((0, pinned, True), (1, pageable, False)):
                    torch.cuda.synchronize(device)
                    t0 = time.perf_counter()
                    _to(src, device, nb)
                    torch.cuda.synchronize(device)
                    times[i].append(time.perf_counter() - t0)
            figures = [statistics.median(t) for t in times]
        rows = self.exchange.floats(figures)
        node = [r for rank, r in enumerate(rows) if self.node_of[rank] == self.my_node]
        pinned_s, pageable_s = max(r[0] for r in node), max(r[1] for r in node)
        self.measure_pin = False
        if remembered is not None:
            return
        # NaN (no batch to copy) compares false: pageable, as without a measurement.
        self.pin_choice = bool(pinned_s < PIN_GAIN * pageable_s)
        self._pin_figures = {
            "pinned_copy_s": pinned_s,
            "pageable_copy_s": pageable_s,
            "pin_memory": self.pin_choice,
        }


def _to(batch: Any, device: torch.device, non_blocking: bool) -> Any:
    return _map_tensors(batch, lambda t: t.to(device, non_blocking=non_blocking))


def _map_tensors(batch: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, Mapping):
        return {k: _map_tensors(v, fn) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        moved = [_map_tensors(v, fn) for v in batch]
        return tuple(moved) if isinstance(batch, tuple) else moved
    return batch


# --- `launcher hw --measure CONFIG` ----------------------------------------------------


def measure_candidates(
    dataset: Dataset,
    batch_size: int,
    candidates: Sequence[int],
    *,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    batches: int = 24,
    repeats: int = 3,
) -> list[dict[str, Any]]:
    """Every candidate's loader-alone batches/s (median of `repeats`, alternating order).

    The training step is not in these figures: they are what the loader can deliver, the
    ceiling the trainer's own measurement (with its step) works under.
    """
    size = len(cast(Sized, dataset))
    rates: dict[int, list[float]] = {w: [] for w in candidates}
    for r in range(repeats):
        order = list(candidates) if r % 2 == 0 else list(candidates)[::-1]
        for w in order:
            need = (_warmup(w) + batches) * batch_size
            indices = [i % size for i in range(r * need, (r + 1) * need)]
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*worker processes in total.*")
                loader = DataLoader(
                    dataset,
                    batch_size=batch_size,
                    sampler=_Slice(indices),
                    num_workers=w,
                    collate_fn=collate_fn,
                    drop_last=True,
                )
                it = iter(loader)
            try:
                for _ in range(_warmup(w)):
                    next(it)
                t0 = time.perf_counter()
                for _ in range(batches):
                    next(it)
                rates[w].append(batches / (time.perf_counter() - t0))
            finally:
                shutdown = getattr(it, "_shutdown_workers", None)
                if shutdown is not None:
                    shutdown()
    return [
        {
            "num_workers": w,
            "batches_per_s": round(statistics.median(v), 2),
            "samples_per_s": round(statistics.median(v) * batch_size, 1),
            "runs": [round(x, 2) for x in v],
        }
        for w, v in rates.items()
    ]
