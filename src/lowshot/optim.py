"""The optimizer and the learning-rate schedule, one place for pretraining and fine-tuning: timm's
``create_optimizer_v2`` (AdamW, Adam, SGD) with no weight decay on norms and biases, and per-step
warmup + cosine (or step decay) schedules."""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from timm.optim import create_optimizer_v2
from torch import nn

from .config import TrainConfig


def make_optimizer(
    model: nn.Module | list[dict[str, Any]], name: str, lr: float, weight_decay: float, momentum: float = 0.9
) -> torch.optim.Optimizer:
    """AdamW, Adam or SGD (Nesterov) through timm's ``create_optimizer_v2``. Given a model, 1-d parameters
    (norm weights, biases) go in a group without weight decay; given ``param_groups``, those are kept."""
    kwargs: dict[str, Any] = {"momentum": momentum, "nesterov": True} if name == "sgd" else {}
    return create_optimizer_v2(model, opt=name, lr=lr, weight_decay=weight_decay, **kwargs)


def lr_schedule(
    optimizer: torch.optim.Optimizer, tc: TrainConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """The per-step schedule of ``train.schedule``: warmup + cosine, or step decay (lr x gamma at each
    milestone, given as fractions of the epochs: MedMNIST's x0.1 at 50% and 75%)."""
    if tc.schedule == "step":
        marks = sorted(round(f * tc.epochs) * steps_per_epoch for f in tc.milestones)
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, marks, tc.gamma)
    return warmup_cosine(
        optimizer, tc.warmup_epochs * steps_per_epoch, tc.epochs * steps_per_epoch, tc.min_lr_ratio
    )


def warmup_cosine(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_ratio: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step schedule: linear warmup from ~0 to each group's lr over ``warmup_steps``, then cosine
    decay to ``min_ratio`` x lr at ``total_steps`` (Loshchilov & Hutter, 2017, without restarts). A warmup
    as long as training (e.g. 3 warmup epochs of 2) would never decay: it is cut to a quarter of training."""
    if warmup_steps >= total_steps > 0:
        warnings.warn(
            f"warmup ({warmup_steps} steps) is not shorter than training ({total_steps} steps), so the lr would never "
            f"decay: warming up over {total_steps // 4} steps instead (lower the warmup_epochs setting)",
            stacklevel=2,
        )
        warmup_steps = total_steps // 4

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
