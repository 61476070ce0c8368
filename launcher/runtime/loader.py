"""DataLoader factory and dynamic-padding collate, for the trainer and for users' own scripts.

`make_loader` shards with a DistributedSampler (which can start mid-epoch, for exact resume),
takes num_workers / pin_memory / persistent_workers / prefetch_factor from the launcher's
hardware picks (the config wins), and gives the loader its own seeded generator so creating
an iterator never consumes the global torch RNG (that would shift dropout masks on resume).
`num_workers="auto"` measures a few settings first (launcher.runtime.autotune).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from numbers import Number
from typing import Any, Literal

import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torch.utils.data._utils.collate import default_collate

from launcher.hardware import AUTO, Hardware, LoaderPicks, detect, pick_loader, picks_from_env
from launcher.runtime import autotune
from launcher.spec import LoaderSpec

LENGTHS = "lengths"
MASK = "attention_mask"


class ResumableSampler(DistributedSampler):
    """DistributedSampler that can skip the first `start` indices of this rank's epoch.

    Same order as DistributedSampler (seeded by seed + epoch, independent of the rank
    count), so one process and N processes see the same global batches.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.start = 0

    def set_start(self, start: int) -> None:
        """Skip this many of this rank's samples in the coming epoch (set to 0 afterwards)."""
        self.start = max(0, int(start))

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.start :])

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start)


def _world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def resolve_picks(
    loader_spec: LoaderSpec | None = None,
    *,
    local_world_size: int | None = None,
    uses_gpu: bool | None = None,
    trainer: bool = False,
) -> LoaderPicks:
    """The launcher's picks (from the environment) or fresh ones; explicit config values win.

    `trainer`: the built-in trainer, for which an unset `num_workers` means `auto`.
    """
    loader_spec = loader_spec or LoaderSpec()
    if local_world_size is None:
        local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    picks = picks_from_env()
    if picks is None:
        picks = pick_loader(
            detect(), local_world_size, loader_spec, uses_gpu=uses_gpu, trainer=trainer
        )
    else:
        reasons = dict(picks.reasons)
        unset = loader_spec.num_workers is None
        if loader_spec.num_workers == AUTO or (unset and trainer):
            picks = replace(picks, measure_workers=True, measure_pin=picks.pin_memory)
        elif isinstance(loader_spec.num_workers, int):
            picks = replace(picks, num_workers=loader_spec.num_workers, measure_workers=False)
            reasons["num_workers"] = "set in the config"
        if isinstance(loader_spec.pin_memory, bool):
            picks = replace(picks, pin_memory=loader_spec.pin_memory, measure_pin=False)
        if loader_spec.persistent_workers is not None:
            picks = replace(picks, persistent_workers=loader_spec.persistent_workers)
        if loader_spec.prefetch_factor is not None:
            picks = replace(picks, prefetch_factor=loader_spec.prefetch_factor)
        picks = replace(picks, reasons=reasons)
    if picks.num_workers == 0:
        picks = replace(picks, persistent_workers=False, prefetch_factor=None)
    if uses_gpu is False and (picks.pin_memory or picks.measure_pin):
        reasons = {**picks.reasons, "pin_memory": "training on the CPU: nothing to pin for"}
        picks = replace(picks, pin_memory=False, measure_pin=False, reasons=reasons)
    return picks


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool = True,
    seed: int = 0,
    drop_last: bool = True,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    picks: LoaderPicks | None = None,
    loader_spec: LoaderSpec | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    generator: torch.Generator | None = None,
    uses_gpu: bool | None = None,
    num_workers: int | Literal["auto"] | None = None,
    budget_s: float | None = None,
    fingerprint: str | None = None,
) -> DataLoader:
    """A DataLoader over this rank's shard with the hardware picks.

    Call `loader.sampler.set_epoch(epoch)` at the start of each epoch (or use `batches`),
    or every epoch repeats the first one's order.

    `num_workers="auto"` (or the launcher's `num_workers: auto`) measures the loader alone
    before returning: a few worker counts race on batches of this dataset that are thrown
    away (at most `budget_s`, 10 s by default); the training step is *not* in that figure, so
    a script whose step is CPU-heavy may want fewer workers than it picks. The result is
    remembered by dataset identity (`fingerprint`, else class, length and sample 0's shapes),
    batch size, world size and hardware, and is in `loader.measured` (`autotune.Measured`).
    The built-in trainer measures with its step running instead.
    """
    if rank is None or world_size is None:
        rank, world_size = _world()
    if uses_gpu is None:
        uses_gpu = torch.cuda.is_available()
    if num_workers is not None:
        loader_spec = replace(loader_spec or LoaderSpec(), num_workers=num_workers)
        picks = None
    picks = picks or resolve_picks(loader_spec, uses_gpu=uses_gpu)
    sampler = ResumableSampler(
        dataset,
        num_replicas=world_size,
        rank=rank,
        shuffle=shuffle,
        seed=seed,
        drop_last=drop_last,
    )
    if generator is None:
        generator = torch.Generator()
        generator.manual_seed(seed * 1_000_003 + rank)
    if picks.measure_workers or (picks.measure_pin and uses_gpu):
        return _measured_loader(
            dataset,
            batch_size,
            sampler=sampler,
            picks=picks,
            drop_last=drop_last,
            collate_fn=collate_fn,
            generator=generator,
            uses_gpu=uses_gpu,
            world_size=world_size,
            budget_s=autotune.BUDGET_MIN_S if budget_s is None else budget_s,
            fingerprint=fingerprint,
        )
    kwargs: dict[str, Any] = {}
    if picks.num_workers > 0:
        kwargs["persistent_workers"] = picks.persistent_workers
        if picks.prefetch_factor:
            kwargs["prefetch_factor"] = picks.prefetch_factor
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=picks.num_workers,
        pin_memory=picks.pin_memory and uses_gpu,
        drop_last=drop_last,
        collate_fn=collate_fn,
        generator=generator,
        **kwargs,
    )


def tuner_for(
    dataset: Dataset,
    batch_size: int,
    *,
    sampler: ResumableSampler,
    picks: LoaderPicks,
    world_size: int,
    local_world_size: int,
    local_rank: int = 0,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    generator: torch.Generator | None = None,
    drop_last: bool = True,
    uses_gpu: bool = False,
    device: torch.device | None = None,
    budget_s: float = autotune.BUDGET_MIN_S,
    accum: int = 1,
    workload: str = "",
    fingerprint: str | None = None,
    exchange: autotune.Exchange | None = None,
    hw: Hardware | None = None,
    cache: autotune.PicksCache | None = None,
) -> autotune.LoaderTuner:
    """A `LoaderTuner` keyed and cached the standard way (the trainer's and make_loader's)."""
    hw = hw or detect()
    parts = autotune.cache_key_parts(
        dataset=autotune.dataset_identity(dataset, fingerprint),
        batch_size=batch_size,
        world_size=world_size,
        local_world_size=local_world_size,
        hw=hw,
        workload=workload,
    )
    return autotune.LoaderTuner(
        dataset,
        batch_size,
        sampler=sampler,
        picks=picks,
        hw=hw,
        local_world_size=local_world_size,
        collate_fn=collate_fn,
        generator=generator,
        drop_last=drop_last,
        uses_gpu=uses_gpu,
        device=device,
        budget_s=budget_s,
        accum=accum,
        cache=cache or autotune.PicksCache(autotune.default_cache_path()),
        key_parts=parts,
        exchange=exchange,
        local_rank=local_rank,
    )


def _measured_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    sampler: ResumableSampler,
    picks: LoaderPicks,
    world_size: int,
    budget_s: float,
    fingerprint: str | None,
    **kwargs: Any,
) -> DataLoader:
    """make_loader's `auto`: race on batches that are thrown away, return the chosen loader.

    Ranks of one script measure alone (no collective: a script may not have a process group,
    or may build its loaders at different times); each remembers its own result.
    """
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    tuner = tuner_for(
        dataset,
        batch_size,
        sampler=sampler,
        picks=picks,
        world_size=world_size,
        local_world_size=local_world_size,
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        budget_s=budget_s,
        fingerprint=fingerprint,
        workload="loader alone",
        **kwargs,
    )
    epoch = 0
    while tuner.loader is None or tuner.result is None:
        sampler.set_epoch(epoch)
        for _ in tuner.iterate():
            if tuner.result is not None:
                break
        epoch += 1
        if epoch > 1000:  # a dataset smaller than a slot: keep what is measured
            tuner.race.stop("the dataset is too small to measure")
    sampler.set_epoch(0)
    sampler.set_start(0)
    loader = tuner.loader
    assert loader is not None
    loader.measured = tuner.result
    return loader


def batches(loader: DataLoader, epoch: int, *, start: int = 0) -> Iterator[Any]:
    """Iterate one epoch: sets the sampler's epoch (new shuffle) and optional start sample."""
    sampler = loader.sampler
    if isinstance(sampler, DistributedSampler):
        sampler.set_epoch(epoch)
    if isinstance(sampler, ResumableSampler):
        sampler.set_start(start)
    try:
        yield from loader
    finally:
        if isinstance(sampler, ResumableSampler):
            sampler.set_start(0)


# --- dynamic padding -------------------------------------------------------------------


def _as_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if (
        isinstance(value, (list, tuple))
        and value
        and all(isinstance(v, Number) and not isinstance(v, bool) for v in value)
    ):
        return torch.tensor(value)
    return None


def _is_sequence(value: Any) -> bool:
    tensor = _as_tensor(value)
    return tensor is not None and tensor.dim() >= 1


def _pad_value(pad_value: float | Mapping[Any, float], key: Any) -> float:
    if isinstance(pad_value, Mapping):
        return pad_value.get(key, 0)
    return pad_value


def _pad(values: list[Any], value: float) -> tuple[torch.Tensor, torch.Tensor]:
    tensors = []
    for v in values:
        tensor = _as_tensor(v)
        if tensor is None:
            raise TypeError(f"pad_collate: cannot pad a {type(v).__name__} with sequences")
        tensors.append(tensor)
    lengths = torch.tensor([t.shape[0] for t in tensors], dtype=torch.long)
    return pad_sequence(tensors, batch_first=True, padding_value=value), lengths


def _mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    return torch.arange(max_len).unsqueeze(0) < lengths.unsqueeze(1)


def pad_collate(
    samples: Sequence[Any],
    *,
    pad_value: float | Mapping[Any, float] = 0,
    seq_keys: Sequence[Any] | None = None,
) -> Any:
    """Batch variable-length samples: pad each sequence field to the longest in the batch.

    Samples may be dicts, tuples/lists, or single tensors. Sequence fields are tensors (or
    lists of numbers) with at least one dimension, unless `seq_keys` names them; the rest
    are batched by the default collate. `pad_value` is one number or a mapping by key/index
    (e.g. {"labels": -100}). Returns the padded fields plus `lengths` (long, [B]) and
    `attention_mask` (bool, [B, L], True on real tokens), taken from the first sequence
    field: as extra keys for dicts, as two extra trailing items for tuples and tensors.
    """
    if not samples:
        raise ValueError("pad_collate got an empty batch")
    first = samples[0]
    if isinstance(first, Mapping):
        if LENGTHS in first or MASK in first:
            raise ValueError(f"samples already hold {LENGTHS!r} or {MASK!r}; rename those keys")
        keys = list(first)
        seq = [k for k in keys if _is_sequence(first[k])] if seq_keys is None else list(seq_keys)
        out: dict[str, Any] = {}
        lengths = None
        for key in keys:
            values = [s[key] for s in samples]
            if key in seq:
                out[key], lens = _pad(values, _pad_value(pad_value, key))
                lengths = lens if lengths is None else lengths
            else:
                out[key] = default_collate(values)
        if lengths is None:
            raise ValueError("pad_collate found no sequence field in the samples")
        out[LENGTHS] = lengths
        out[MASK] = _mask(lengths, int(lengths.max()))
        return out
    if isinstance(first, (tuple, list)) and not _is_sequence(first):
        idx = range(len(first))
        seq = [i for i in idx if _is_sequence(first[i])] if seq_keys is None else list(seq_keys)
        fields: list[Any] = []
        lengths = None
        for i in idx:
            values = [s[i] for s in samples]
            if i in seq:
                padded, lens = _pad(values, _pad_value(pad_value, i))
                fields.append(padded)
                lengths = lens if lengths is None else lengths
            else:
                fields.append(default_collate(values))
        if lengths is None:
            raise ValueError("pad_collate found no sequence field in the samples")
        return (*fields, lengths, _mask(lengths, int(lengths.max())))
    padded, lengths = _pad(list(samples), _pad_value(pad_value, 0))
    return padded, lengths, _mask(lengths, padded.shape[1])
