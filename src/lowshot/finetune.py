"""Blocks for adapting a backbone to labels: the cached linear probe and the fine-tuning pieces
(optimizer with no decay on norms/biases, warmup + cosine schedule, early stopping that keeps a copy
of the best weights)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from timm.optim import create_optimizer_v2
from torch import nn

from .config import TrainConfig
from .evaluation import auroc


def fit_probe(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    cs: list[float],
    seed: int = 0,
) -> tuple[Pipeline, float, list[dict[str, float]]]:
    """Multinomial logistic regression (L-BFGS) on frozen features, L2 strength chosen on validation.

    x_*: (N, D) embeddings; y_*: (N,) labels. Features are standardised with training statistics.
    For each inverse strength C in ``cs`` a probe is fitted on train and scored on val by AUROC
    (ties → the stronger regularisation, i.e. the smaller C). Returns the selected fitted pipeline,
    its C, and the validation curve ``[{"C", "val_auroc", "val_accuracy"}, ...]``.
    """
    curve = []
    best: tuple[float, Pipeline, float] | None = None
    for c in sorted(cs):
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000, random_state=seed))
        clf.fit(x_train, y_train)
        prob = clf.predict_proba(x_val)
        score = auroc(y_val, prob)
        score = -1.0 if math.isnan(score) else score
        curve.append({"C": c, "val_auroc": score, "val_accuracy": float((prob.argmax(1) == y_val).mean())})
        if best is None or score > best[0] + 1e-12:
            best = (score, clf, c)
    assert best is not None, "probe_cs is empty"
    return best[1], best[2], curve


def make_optimizer(
    model: nn.Module, name: str, lr: float, weight_decay: float, momentum: float = 0.9
) -> torch.optim.Optimizer:
    """AdamW, Adam or SGD (Nesterov) through timm's ``create_optimizer_v2``, which puts 1-d parameters
    (norm weights, biases) in a group without weight decay."""
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
    decay to ``min_ratio`` x lr at ``total_steps`` (Loshchilov & Hutter, 2017, without restarts)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class EarlyStopping:
    """Tracks the best validation score and keeps a *copy* of the weights that reached it (a
    ``state_dict()`` alone holds references that later optimizer steps overwrite)."""

    def __init__(self, patience: int):
        self.patience = patience
        self.best_score = -math.inf
        self.best_epoch = -1
        self.best_state: dict[str, torch.Tensor] | None = None

    def step(self, score: float, epoch: int, model: nn.Module) -> bool:
        """Record an epoch's score; returns True when training should stop."""
        if not math.isnan(score) and score > self.best_score:
            self.best_score, self.best_epoch = score, epoch
            self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return epoch - self.best_epoch >= self.patience

    def restore(self, model: nn.Module) -> None:
        if self.best_state is not None:
            model.load_state_dict(self.best_state)
