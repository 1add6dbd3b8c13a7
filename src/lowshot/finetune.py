"""Blocks for fine-tuning a backbone on labels (the linear probe on cached embeddings: lowshot.probe).

Fine-tuning is ``nn.Sequential(backbone, head)``; ``train.strategy`` decides which of the backbone's
stage groups (timm's coarse ``group_matcher``: stem, stages) train at each epoch, ``param_groups``
gives every group its own lr (layer-wise decay, discriminative backbone factor) with no weight decay
on norms/biases, and ``train_epoch`` adds the regularisers: mixup/cutmix (timm ``Mixup``), an L1
penalty, class weights, EMA weights (timm ``ModelEmaV3``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from timm.data import Mixup
from timm.models import group_parameters
from timm.optim import param_groups_layer_decay
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .config import Config, TrainConfig
from .data.cache import save_safetensors_atomic
from .evaluation import auroc, nll
from .models import save_checkpoint
from .resume import States


def classifier(backbone: nn.Module, num_classes: int, drop_rate: float) -> nn.Sequential:
    """``backbone`` (B, C, H, W) → (B, D) followed by dropout and a linear head (B, D) → (B, K).

    The dropout sits in the head, not in timm's backbone, so it also acts when the backbone is frozen."""
    head = nn.Sequential(nn.Dropout(drop_rate), nn.Linear(backbone.num_features, num_classes))  # type: ignore[arg-type]
    return nn.Sequential(backbone, head)


def stage_groups(backbone: nn.Module) -> list[list[str]]:
    """The backbone's parameter names in stage groups, input side first (stem, stage 1, ...), from timm's
    coarse ``group_matcher``; a model without one gives one group per top-level child with parameters."""
    matcher = getattr(backbone, "group_matcher", None)
    if callable(matcher):
        grouped = group_parameters(backbone, matcher(coarse=True))
        return [list(names) for _, names in sorted(grouped.items())]
    groups: dict[str, list[str]] = {}
    for name, _ in backbone.named_parameters():
        groups.setdefault(name.split(".")[0], []).append(name)
    return list(groups.values())


def param_groups(model: nn.Sequential, tc: TrainConfig) -> list[dict[str, Any]]:
    """Optimizer groups for ``classifier(...)``: each of the backbone's layers (timm's fine group_matcher)
    at lr x backbone_lr_scale x layer_decay^(depth below the head), the head at lr; no weight decay on
    1-d parameters. Every parameter is included (frozen or not), so unfreezing needs no new optimizer;
    torch optimizers skip parameters without gradients, decay included."""
    backbone, head = model[0], model[1]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    for p in frozen:  # timm leaves out parameters that do not require grad
        p.requires_grad_(True)
    skip = getattr(backbone, "no_weight_decay", None)  # e.g. a ViT's pos_embed and cls_token
    no_decay = skip() if callable(skip) else ()
    groups = param_groups_layer_decay(
        backbone, tc.weight_decay, no_weight_decay_list=no_decay, layer_decay=tc.layer_decay
    )
    for p in frozen:
        p.requires_grad_(False)
    for g in groups:
        # timm's deepest backbone layer gets scale 1; one more step of decay puts the head above it.
        g["lr"] = tc.lr * tc.backbone_lr_scale * g.pop("lr_scale") * tc.layer_decay
    decay = [p for p in head.parameters() if p.ndim > 1]
    keep = [p for p in head.parameters() if p.ndim <= 1]
    groups += [
        {"params": decay, "weight_decay": tc.weight_decay, "lr": tc.lr},
        {"params": keep, "weight_decay": 0.0, "lr": tc.lr},
    ]
    return groups


def trainable_stages(tc: TrainConfig, epoch: int, n_groups: int) -> int:
    """How many of the ``n_groups`` backbone stage groups (counted from the head) train in ``epoch``
    (0-based): all for full, none for head, ``stages`` for partial; gradual adds one every
    ``unfreeze_every`` epochs after a head-only phase, up to ``stages`` (0 = all)."""
    cap = n_groups if tc.stages == 0 else min(tc.stages, n_groups)
    if tc.strategy == "full":
        return n_groups
    if tc.strategy == "head":
        return 0
    if tc.strategy == "partial":
        return cap
    return min(cap, epoch // tc.unfreeze_every)


def unfreezing_done(tc: TrainConfig, epoch: int, n_groups: int) -> bool:
    """Whether the trainable set no longer grows after ``epoch`` (early stopping waits for this)."""
    return tc.strategy != "gradual" or trainable_stages(tc, epoch, n_groups) == trainable_stages(
        tc, epoch + 10**6, n_groups
    )


def set_trainable(backbone: nn.Module, groups: list[list[str]], n: int) -> int:
    """Let the last ``n`` stage groups train and freeze the rest; returns the trainable parameter count
    of the backbone. Frozen groups' BatchNorm layers are put in eval mode by ``freeze_batchnorm``."""
    train_names = {name for g in groups[len(groups) - n :] for name in g} if n else set()
    count = 0
    for name, p in backbone.named_parameters():
        p.requires_grad_(name in train_names)
        count += p.numel() if name in train_names else 0
    return count


def freeze_batchnorm(model: nn.Module) -> None:
    """Eval mode (running statistics used, not updated) for BatchNorm layers whose parameters are all
    frozen: a frozen stage must not drift with the small data's batch statistics. Call after ``train()``."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            params = list(m.parameters())
            if params and not any(p.requires_grad for p in params):
                m.eval()


def class_weights(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """(K,) inverse-frequency weights N / (K * n_k), 1 on balanced data (King & Zeng's 'balanced')."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    if (counts == 0).any():
        raise ValueError(f"class counts {counts.tolist()}: a class has no training image; cannot weight it")
    return torch.tensor(len(labels) / (num_classes * counts), dtype=torch.float32)


def make_criterion(tc: TrainConfig, train_labels: np.ndarray, num_classes: int) -> nn.CrossEntropyLoss:
    """Cross-entropy with train.label_smoothing, weighted by inverse class frequency for
    train.balance=loss. Takes hard labels (B,) or the (B, K) soft targets of mixup/cutmix."""
    weight = class_weights(train_labels, num_classes) if tc.balance == "loss" else None
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=tc.label_smoothing)


def make_mixup(tc: TrainConfig, num_classes: int) -> Mixup | None:
    """timm's ``Mixup`` for train.mixup / train.cutmix alphas (soft targets carry the label smoothing)."""
    if not (tc.mixup or tc.cutmix):
        return None
    return Mixup(
        mixup_alpha=tc.mixup,
        cutmix_alpha=tc.cutmix,
        label_smoothing=tc.label_smoothing,
        num_classes=num_classes,
    )


def make_ema(model: nn.Module, tc: TrainConfig) -> ModelEmaV3 | None:
    """timm's ``ModelEmaV3`` of ``model`` for train.ema (None when 0), with or without timm's warmup
    (train.ema_warmup): the decay used at optimizer step s is ``ema.get_decay(s)``."""
    return ModelEmaV3(model, decay=tc.ema, use_warmup=tc.ema_warmup) if tc.ema else None


def l1_penalty(model: nn.Module) -> torch.Tensor:
    """Sum of |w| over trainable weight matrices/kernels (not norms or biases), a scalar."""
    return sum(
        (p.abs().sum() for p in model.parameters() if p.requires_grad and p.ndim > 1),
        torch.zeros((), device=next(model.parameters()).device),
    )


def train_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    criterion: nn.Module,
    accelerator: Accelerator,
    tc: TrainConfig,
    mixup: Mixup | None = None,
    ema: ModelEmaV3 | None = None,
    desc: str = "",
    states: States | None = None,
) -> dict[str, float]:
    """One pass over ``loader`` (x: (B, C, H, W), y: (B,)); returns the mean training loss (with
    penalties) and the accuracy on the augmented (and mixed) batches against the original labels.
    ``states``: the run's ``lowshot.resume.States``, which gives the batches (from a saved position on)
    and is told of every step with the epoch's running sums."""
    model.train()
    freeze_batchnorm(model)
    sums = (states.sums if states is not None else None) or {
        "total": torch.zeros((), device=accelerator.device),
        "correct": 0,
        "seen": 0,
        "skipped": 0,
    }
    total, correct, seen = sums["total"].to(accelerator.device), sums["correct"], sums["seen"]
    skipped = sums["skipped"]
    batches = states.batches(states.epoch) if states is not None else loader
    start = states.position if states is not None else 0
    hidden = not accelerator.is_local_main_process
    for x, y in tqdm(batches, desc=desc, total=len(loader), initial=start, disable=hidden, leave=False):
        # timm's batch-mode mixup pairs the batch with its reverse, so it needs an even batch size.
        x, target = mixup(x, y) if mixup is not None and len(y) % 2 == 0 else (x, y)
        logits = model(x)
        loss = criterion(logits.float(), target)
        if tc.l1:
            loss = loss + tc.l1 * l1_penalty(model)
        accelerator.backward(loss)
        optimizer.step()
        skipped += accelerator.optimizer_step_was_skipped  # fp16: the grad scaler skipped an overflow step
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:  # the step drives ModelEmaV3's warmup: decay grows towards train.ema
            ema.update(accelerator.unwrap_model(model), step=scheduler.last_epoch)
        total += loss.detach() * len(y)
        correct += int((logits.argmax(1) == y).sum())
        seen += len(y)
        if states is not None:
            states.after_step({"total": total, "correct": correct, "seen": seen, "skipped": skipped})
    return {
        "train/loss": float(accelerator.reduce(total / seen, reduction="mean")),
        "train/accuracy_augmented": correct / seen,
        "train/skipped_steps": skipped,
    }


@torch.no_grad()
def predict(model: nn.Module, loader: DataLoader, accelerator: Accelerator) -> tuple[np.ndarray, np.ndarray]:
    """(N, K) softmax probabilities and (N,) labels of a prepared loader, gathered over all processes."""
    model.eval()
    probs, ys = [], []
    for x, y in loader:
        p = model(x).float().softmax(1)
        p, y = accelerator.gather_for_metrics((p, y))
        probs.append(p.cpu())
        ys.append(y.cpu())
    return torch.cat(probs).numpy(), torch.cat(ys).numpy()


def val_metrics(model: nn.Module, loader: DataLoader, accelerator: Accelerator) -> dict[str, float]:
    """Validation loss (NLL), AUROC and accuracy of ``model`` after an epoch."""
    prob, y = predict(model, loader, accelerator)
    return {
        "val/loss": nll(prob, y),
        "val/auroc": auroc(y, prob),
        "val/accuracy": float((prob.argmax(1) == y).mean()),
    }


def clean_train_metrics(model: nn.Module, loader: DataLoader, accelerator: Accelerator) -> dict[str, float]:
    """The training images without augmentation or dropout (eval mode): the curve to read overfitting from,
    beside the running loss on augmented batches."""
    prob, y = predict(model, loader, accelerator)
    return {
        "train/loss_clean": nll(prob, y),
        "train/accuracy_clean": float((prob.argmax(1) == y).mean()),
        "train/auroc_clean": auroc(y, prob),
    }


def save_classifier(directory: Path, model: nn.Sequential, cfg: Config, meta: dict[str, Any]) -> Path:
    """A fine-tuned ``classifier``: its backbone as a lowshot checkpoint (``backbone.safetensors``,
    ``config.yaml``, ``meta.json``) and its dropout + linear head beside it (``head.safetensors``)."""
    save_checkpoint(directory, model[0], cfg, meta)
    return save_safetensors_atomic(directory / "head.safetensors", model[1].state_dict())


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

    def state_dict(self) -> dict[str, Any]:  # saved in a run's states (lowshot.resume)
        return {"score": self.best_score, "epoch": self.best_epoch, "weights": self.best_state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_score, self.best_epoch, self.best_state = state["score"], state["epoch"], state["weights"]
