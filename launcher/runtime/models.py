"""Built-in models with matching synthetic datasets (no downloads), and the user hooks.

A model for the trainer is an `nn.Module` whose `forward(batch)` returns the loss: a 0-dim
tensor, a mapping with key "loss", or an object with a `.loss` attribute. A user's model comes
from `build_model(**train.model_kwargs) -> nn.Module`, its data from
`build_dataset(**train.dataset_kwargs) -> Dataset` (map-style, with `__len__`).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from launcher.errors import ConfigError
from launcher.runtime.loader import pad_collate
from launcher.spec import TrainSpec

IGNORE_INDEX = -100


# --- datasets ----------------------------------------------------------------------------


class SyntheticClassification(Dataset):
    """Vectors labelled by a fixed random linear teacher: learnable, deterministic by index."""

    def __init__(
        self,
        size: int = 1024,
        in_features: int = 32,
        num_classes: int = 8,
        noise: float = 0.1,
        seed: int = 1234,
    ) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(size, in_features, generator=g)
        teacher = torch.randn(in_features, num_classes, generator=g)
        logits = self.x @ teacher + noise * torch.randn(size, num_classes, generator=g)
        self.y = logits.argmax(dim=1)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


class SyntheticImages(Dataset):
    """Noisy copies of one random template per class."""

    def __init__(
        self,
        size: int = 1024,
        channels: int = 3,
        image_size: int = 16,
        num_classes: int = 8,
        noise: float = 1.0,
        seed: int = 1234,
    ) -> None:
        g = torch.Generator().manual_seed(seed)
        templates = torch.randn(num_classes, channels, image_size, image_size, generator=g)
        self.y = torch.randint(0, num_classes, (size,), generator=g)
        shape = (size, channels, image_size, image_size)
        self.x = templates[self.y] + noise * torch.randn(*shape, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


class SyntheticSequences(Dataset):
    """Variable-length arithmetic token sequences (start + stride * t mod vocab).

    Next-token prediction on these is learnable from the first two tokens, and the lengths
    vary, so batches need dynamic padding: `collate_fn` pads inputs with 0, labels with -100.
    """

    def __init__(
        self,
        size: int = 1024,
        vocab: int = 64,
        min_len: int = 8,
        max_len: int = 32,
        max_stride: int = 4,
        seed: int = 1234,
    ) -> None:
        if not 2 <= min_len <= max_len:
            raise ConfigError(
                f"need 2 <= min_len <= max_len, got {min_len} and {max_len}",
                key="train.dataset_kwargs",
            )
        g = torch.Generator().manual_seed(seed)
        lengths = torch.randint(min_len, max_len + 1, (size,), generator=g)
        starts = torch.randint(0, vocab, (size,), generator=g)
        strides = torch.randint(1, max_stride + 1, (size,), generator=g)
        self.seqs = [
            (int(a) + int(d) * torch.arange(int(n) + 1)) % vocab
            for a, d, n in zip(starts, strides, lengths, strict=True)
        ]
        self.collate_fn = functools.partial(
            pad_collate, pad_value={"input_ids": 0, "labels": IGNORE_INDEX}
        )

    def __len__(self) -> int:
        return len(self.seqs)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        seq = self.seqs[i]
        return {"input_ids": seq[:-1], "labels": seq[1:]}


# --- models ------------------------------------------------------------------------------


class MLP(nn.Module):
    """Classifier over vectors; forward(batch=(x, y)) returns the cross-entropy loss."""

    def __init__(
        self,
        in_features: int = 32,
        hidden: int = 64,
        layers: int = 2,
        num_classes: int = 8,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        width = in_features
        for _ in range(layers):
            blocks += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(dropout)]
            width = hidden
        self.body = nn.Sequential(*blocks)
        self.head = nn.Linear(width, num_classes)

    def forward(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.head(self.body(x)), y)


class SmallCNN(nn.Module):
    """Two conv blocks and a linear head. GroupNorm, not BatchNorm: no per-rank batch stats."""

    def __init__(
        self, channels: int = 3, image_size: int = 16, num_classes: int = 8, width: int = 16
    ) -> None:
        super().__init__()
        del image_size  # any size works (global pooling); accepted to match the dataset
        self.block1 = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.GroupNorm(4, width), nn.ReLU()
        )
        self.block2 = nn.Sequential(
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.GroupNorm(4, 2 * width),
            nn.ReLU(),
        )
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        h = self.block2(self.block1(x)).mean(dim=(2, 3))
        return F.cross_entropy(self.head(h), y)


class TinyTransformer(nn.Module):
    """Causal pre-norm transformer over padded token batches from `pad_collate`."""

    def __init__(
        self,
        vocab: int = 64,
        d_model: int = 64,
        heads: int = 4,
        layers: int = 2,
        ff: int = 128,
        max_positions: int = 128,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(max_positions, d_model)
        layer = nn.TransformerEncoderLayer(
            d_model, heads, ff, dropout, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        ids = batch["input_ids"]
        length = ids.shape[1]
        positions = torch.arange(length, device=ids.device)
        h = self.embed(ids) + self.pos(positions)
        causal = torch.ones(length, length, dtype=torch.bool, device=ids.device).triu(1)
        pad = ~batch["attention_mask"]
        h = self.encoder(h, mask=causal, src_key_padding_mask=pad)
        logits = self.head(self.norm(h))
        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(),
            batch["labels"].reshape(-1),
            ignore_index=IGNORE_INDEX,
        )


# (model class, dataset class, model kwargs the dataset shares)
BUILTINS: dict[str, tuple[type[nn.Module], type[Dataset], tuple[str, ...]]] = {
    "mlp": (MLP, SyntheticClassification, ("in_features", "num_classes")),
    "cnn": (SmallCNN, SyntheticImages, ("channels", "image_size", "num_classes")),
    "transformer": (TinyTransformer, SyntheticSequences, ("vocab",)),
}


# --- hooks -------------------------------------------------------------------------------


def load_callable(ref: str, key: str) -> Callable[..., Any]:
    """'pkg.mod:fn' -> fn, importable from the job's working directory."""
    module_name, _, attr = ref.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import module {module_name!r}: {exc}", key=key) from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"module {module_name!r} has no function {attr!r}", key=key)
    return fn


def call_with(fn: Callable[..., Any], kwargs: dict[str, Any], key: str) -> Any:
    """Call a builder with config kwargs; a wrong argument is a config error naming the key."""
    try:
        inspect.signature(fn).bind(**kwargs)
    except TypeError as exc:
        name = getattr(fn, "__qualname__", repr(fn))
        raise ConfigError(f"{name}: {exc}", key=key) from None
    except ValueError:
        pass  # no signature (builtins): let the call itself complain
    return fn(**kwargs)


@dataclass
class Built:
    """What the trainer trains: a model, its dataset and how to batch it."""

    model: nn.Module
    dataset: Dataset
    collate_fn: Callable[[list[Any]], Any] | None
    description: str


def pick_collate(train: TrainSpec, dataset: Dataset) -> Callable[[list[Any]], Any] | None:
    if train.collate == "pad":
        return pad_collate
    if train.collate == "default":
        return None
    if train.collate == "auto":
        return getattr(dataset, "collate_fn", None)
    return load_callable(train.collate, "train.collate")


def build(train: TrainSpec) -> Built:
    """The model and dataset a TrainSpec names (built-in or the user's hooks)."""
    if train.model in BUILTINS:
        model_cls, data_cls, shared = BUILTINS[train.model]
        model = call_with(model_cls, dict(train.model_kwargs), "train.model_kwargs")
        desc = f"built-in {train.model}"
    else:
        fn = load_callable(train.model, "train.model")
        model = call_with(fn, dict(train.model_kwargs), "train.model_kwargs")
        if not isinstance(model, nn.Module):
            raise ConfigError(
                f"{train.model} returned {type(model).__name__}, expected a torch.nn.Module",
                key="train.model",
            )
        data_cls, shared = None, ()
        desc = train.model
    if train.dataset is None:
        if data_cls is None:
            raise ConfigError("a custom model needs a dataset", key="train.dataset")
        kwargs = {k: v for k, v in train.model_kwargs.items() if k in shared}
        kwargs.update(train.dataset_kwargs)
        dataset = call_with(data_cls, kwargs, "train.dataset_kwargs")
        desc += f", synthetic {data_cls.__name__}"
    else:
        fn = load_callable(train.dataset, "train.dataset")
        dataset = call_with(fn, dict(train.dataset_kwargs), "train.dataset_kwargs")
        desc += f", dataset {train.dataset}"
    try:
        size = len(dataset)
    except TypeError:
        raise ConfigError(
            "the dataset must be map-style (have __len__ and __getitem__)", key="train.dataset"
        ) from None
    if size == 0:
        raise ConfigError("the dataset is empty", key="train.dataset")
    return Built(model, dataset, pick_collate(train, dataset), desc)


def loss_of(output: Any) -> torch.Tensor:
    """The loss from a model's output: a tensor, a mapping with 'loss', or `.loss`."""
    if isinstance(output, torch.Tensor):
        loss = output
    elif isinstance(output, dict) and "loss" in output:
        loss = output["loss"]
    elif hasattr(output, "loss"):
        loss = output.loss
    else:
        raise TypeError(
            "the model's forward(batch) must return the loss (a tensor, a mapping with 'loss' "
            f"or an object with .loss), got {type(output).__name__}"
        )
    if loss.dim() != 0:
        loss = loss.mean()
    return loss
