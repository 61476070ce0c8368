"""Optimizer with parameter groups, LR schedule, and activation checkpointing, from the config."""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from launcher.errors import ConfigError
from launcher.spec import OptimizerSpec, ScheduleSpec


def _no_decay(name: str, param: torch.Tensor, spec: OptimizerSpec) -> bool:
    lowered = name.lower()
    if any(part.lower() in lowered for part in spec.no_decay):
        return True
    return spec.no_decay_1d and param.dim() <= 1


def param_groups(model: nn.Module, spec: OptimizerSpec) -> list[dict[str, Any]]:
    """Split parameters into optimizer groups.

    The first `groups` pattern (fnmatch on the parameter name) that matches sets lr and
    weight decay; otherwise biases, norms and 1-D parameters get no weight decay.
    """
    buckets: dict[tuple[str, float, float], dict[str, Any]] = {}
    used = [False] * len(spec.groups)
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        lr, wd = spec.lr, (0.0 if _no_decay(name, param, spec) else spec.weight_decay)
        label = "no_decay" if wd == 0.0 else "decay"
        for i, group in enumerate(spec.groups):
            if fnmatch.fnmatchcase(name, group.pattern):
                used[i] = True
                label = group.pattern
                lr = group.lr if group.lr is not None else lr
                wd = group.weight_decay if group.weight_decay is not None else wd
                break
        bucket = buckets.setdefault(
            (label, lr, wd),
            {"params": [], "names": [], "lr": lr, "weight_decay": wd, "group": label},
        )
        bucket["params"].append(param)
        bucket["names"].append(name)
    for i, was_used in enumerate(used):
        if not was_used:
            sample = ", ".join(n for n, _ in list(model.named_parameters())[:4])
            raise ConfigError(
                f"pattern {spec.groups[i].pattern!r} matches no parameter (names look like "
                f"{sample}, ...)",
                key=f"train.optimizer.groups[{i}].pattern",
            )
    groups = list(buckets.values())
    if not groups:
        raise ConfigError("the model has no trainable parameters", key="train.model")
    return groups


def build_optimizer(model: nn.Module, spec: OptimizerSpec) -> torch.optim.Optimizer:
    groups = param_groups(model, spec)
    if spec.name == "sgd":
        return torch.optim.SGD(groups, lr=spec.lr, momentum=spec.momentum)
    cls = torch.optim.AdamW if spec.name == "adamw" else torch.optim.Adam
    return cls(groups, lr=spec.lr, betas=(spec.betas[0], spec.betas[1]))


def lr_factor(schedule: ScheduleSpec, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the base lr after `step` optimizer steps: linear warmup, then the decay."""
    warmup = schedule.warmup_steps

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule.name == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return schedule.min_lr_ratio + (1.0 - schedule.min_lr_ratio) * cosine

    return factor


def build_scheduler(
    optimizer: torch.optim.Optimizer, schedule: ScheduleSpec, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(schedule, total_steps))


def apply_activation_checkpointing(model: nn.Module, patterns: tuple[str, ...]) -> list[str]:
    """Recompute the forward of matching submodules in backward (less memory, more compute).

    Only the outermost match is wrapped ('layers.*' wraps each layer, not its children).
    Non-reentrant checkpointing: works with DDP, no_sync and keyword arguments, and
    restores the RNG state so dropout masks match the first forward.
    """
    wrapped: list[str] = []
    for i, pattern in enumerate(patterns):
        hits = [
            (name, module)
            for name, module in model.named_modules()
            if name and fnmatch.fnmatchcase(name, pattern)
        ]
        if not hits:
            sample = ", ".join(n for n, _ in list(model.named_modules())[1:6])
            raise ConfigError(
                f"{pattern!r} matches no submodule (names look like {sample}, ...)",
                key=f"train.activation_checkpointing[{i}]",
            )
        for name, module in hits:
            if any(name == w or name.startswith(w + ".") for w in wrapped):
                continue
            original = module.forward

            def forward(*args: Any, _original: Callable = original, **kwargs: Any) -> Any:
                return checkpoint(_original, *args, use_reentrant=False, **kwargs)

            module.forward = forward
            wrapped.append(name)
    return wrapped
