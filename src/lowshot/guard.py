"""The divergence guard: a run whose loss or weights blow up stops with a clear message, saves nothing
from the diverged weights, selects nothing and never opens the test split.

Checked once per epoch (the epoch's mean loss is reduced over processes anyway, so the check adds no
synchronisation to the steps): a non-finite mean loss, non-finite weights, or weights whose global L2
norm grew more than ``GROWTH``-fold since the start. The last is the quiet failure: at ``ssl.lr=1e6`` the
contrastive loss stays finite at its chance value while the weights reach ~1e28, and without the guard a
"successful" run saved them.
"""

from __future__ import annotations

import math

import torch
from torch import nn

# Healthy runs barely move the global weight norm: the 60 backbone checkpoints of bench/ssl_pretraining.py
# (five SSL methods from ImageNet and from scratch, fine-tunes from ImageNet, SSL and random init) ended at
# 0.62-1.00x their starting norm. 1000x is far outside that and far below fp32 overflow.
GROWTH = 1000.0


class DivergenceError(RuntimeError):
    """Training diverged; the message says where, at what lr, and what to try."""


def weight_norm(model: nn.Module) -> float:
    """Global L2 norm of every parameter (float64 accumulation; inf or nan if any weight is)."""
    with torch.no_grad():
        sq = sum(
            (p.detach().double().pow(2).sum() for p in model.parameters()),
            torch.zeros((), dtype=torch.float64),
        )
    return float(sq.sqrt())


def check_epoch(loss: float, model: nn.Module, start_norm: float, where: str, lr: float, knob: str) -> None:
    """Raise :class:`DivergenceError` if the epoch's mean ``loss`` or the weights of ``model`` diverged.

    ``where``: e.g. "pretraining epoch 3/50"; ``lr``: the current learning rate; ``knob``: the setting to
    lower (``ssl.lr`` or ``train.lr``)."""
    norm = weight_norm(model)
    if math.isfinite(loss) and math.isfinite(norm) and norm <= GROWTH * max(start_norm, 1e-12):
        return
    what = (
        f"the mean training loss is {loss}"
        if not math.isfinite(loss)
        else f"the weights are not finite (norm {norm})"
        if not math.isfinite(norm)
        else f"the weights' norm grew {norm / start_norm:.3g}-fold (from {start_norm:.3g} to {norm:.3g})"
    )
    raise DivergenceError(
        f"{where}: training diverged ({what}, lr {lr:.3g}). Nothing was saved from these weights, no model was "
        f"selected from them and the test split stays sealed. Try a 10x lower {knob} ({knob}={lr / 10:.3g}), "
        f"a longer warmup, or mixed_precision=no."
    )
