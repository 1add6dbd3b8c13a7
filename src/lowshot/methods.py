"""Self-supervised methods as blocks: a method is a loss + heads (+ a momentum copy) over two views.

The registry is a plain dict of classes, ``METHODS[name](backbone, feat_dim, cfg.ssl) -> model``. Every model has the same surface, so ``ssl/pretrain.py`` runs them all alike:

- ``model(x0, x1)`` takes two (B, C, H, W) views and returns the scalar loss (fp32 loss arithmetic);
- ``model.encoder()`` is the backbone that the kNN monitor scores and the checkpoint keeps;
- ``model.after_step(step, total_steps)``, called after each optimizer step, moves momentum copies
  (nothing for SimCLR and VICReg).

Multi-process semantics (Accelerate/DDP; each process holds B images of a global batch of P*B):

- SimCLR: negatives are gathered from every process (2PB - 2 per anchor), so the loss is the
  one-process loss on P*B images.
- MoCo: negatives come from a memory bank of past keys (``ssl.memory_bank``), the same on every process:
  each step's keys are gathered from all processes before they are enqueued, so the negatives depend
  neither on the batch size nor on the process count (the point of MoCo on small GPUs).
- BYOL: no negatives; the per-image loss is averaged, DDP averages gradients, and the target network
  moves from identical online weights, so it stays identical on every process.
- VICReg: the variance and covariance terms use the gathered global batch; invariance is per image.
- DINO: the teacher's centre is updated with the mean over all processes (lightly all-reduces it).

tests/dist_methods.py checks each of these with 2 CPU processes against one process on the whole batch.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from lightly.loss import DINOLoss, NegativeCosineSimilarity, NTXentLoss, VICRegLoss
from lightly.models.modules import (
    BYOLPredictionHead,
    BYOLProjectionHead,
    DINOProjectionHead,
    MoCoProjectionHead,
    SimCLRProjectionHead,
)
from lightly.models.modules.heads import VICRegProjectionHead
from lightly.models.utils import deactivate_requires_grad, update_momentum
from lightly.utils.scheduler import cosine_schedule
from torch import nn

from .config import Config, SSLConfig


def _frozen_copy(module: nn.Module) -> nn.Module:
    """A momentum (EMA) copy: same weights, no gradients; moved only by ``update_momentum``."""
    twin = copy.deepcopy(module)
    deactivate_requires_grad(twin)
    return twin


def _fp32(device: torch.device) -> torch.autocast:
    # Loss arithmetic (similarity logits / temperatures ~0.1, softmaxes over thousands of prototypes,
    # covariances) overflows or loses precision in bf16/fp16.
    return torch.autocast(device_type=device.type, enabled=False)


def momentum_at(step: int, total_steps: int, start: float) -> float:
    """EMA decay of the momentum copies at ``step``: cosine from ``start`` to 1 over training (BYOL,
    Grill et al., 2020, §3.2; also used for MoCo v3 and DINO's teacher), lightly's ``cosine_schedule``."""
    return cosine_schedule(step, total_steps, start, 1.0)


def _follow(model: Any, step: int, total_steps: int) -> None:
    """Move a method's momentum copies (``backbone_m``, ``head_m``) towards its online ``backbone`` and
    ``head`` with the decay of ``momentum_at`` (MoCo, BYOL, DINO)."""
    m = momentum_at(step, total_steps, model.m0)
    update_momentum(model.backbone, model.backbone_m, m)
    update_momentum(model.head, model.head_m, m)


@torch.no_grad()
def _targets(model: Any, x0: torch.Tensor, x1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The momentum copies' outputs for both views, fp32, no gradients: MoCo's keys, BYOL's targets,
    DINO's teacher."""
    t0, t1 = model.head_m(model.backbone_m(torch.cat([x0, x1]))).float().chunk(2)
    return t0, t1


class SimCLR(nn.Module):
    """SimCLR (Chen et al., 2020, "A Simple Framework for Contrastive Learning of Visual
    Representations"): backbone → 2-layer projection head → NT-Xent between two views.

    Both views go through the backbone as one (2B, C, H, W) batch (one pass, BatchNorm statistics over
    both). ``gather_distributed=True`` makes every process's embeddings negatives for every anchor.
    """

    def __init__(self, backbone: nn.Module, feat_dim: int, s: SSLConfig) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = SimCLRProjectionHead(feat_dim, s.proj_hidden_dim, s.proj_dim)
        self.criterion = NTXentLoss(temperature=s.temperature, gather_distributed=True)

    def encoder(self) -> nn.Module:
        return self.backbone

    def after_step(self, step: int, total_steps: int) -> None:
        pass

    def forward(self, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        z = self.head(self.backbone(torch.cat([x0, x1])))  # (2B, out_dim)
        z0, z1 = z.float().chunk(2)
        with _fp32(z.device):
            return self.criterion(z0, z1)


class MoCo(nn.Module):
    """MoCo v2 (Chen et al., 2020, "Improved Baselines with Momentum Contrastive Learning"; He et al.,
    2020): queries from the online backbone + MLP head, keys from their momentum copy, InfoNCE against a
    memory bank of ``bank_size`` past keys (lightly's NT-Xent with a ``MemoryBankModule``), symmetrised
    over the two views. Without shuffled BatchNorm (it needs several GPUs): the key encoder's
    BatchNorm sees its own batch, as in most single-GPU reproductions."""

    def __init__(self, backbone: nn.Module, feat_dim: int, s: SSLConfig) -> None:
        super().__init__()
        self.backbone, self.head = backbone, MoCoProjectionHead(feat_dim, s.proj_hidden_dim, s.proj_dim)
        self.backbone_m, self.head_m = _frozen_copy(backbone), _frozen_copy(self.head)
        self.criterion = NTXentLoss(
            temperature=s.temperature, memory_bank_size=(s.memory_bank, s.proj_dim), gather_distributed=True
        )
        self.m0 = s.momentum

    def encoder(self) -> nn.Module:
        return self.backbone

    def after_step(self, step: int, total_steps: int) -> None:
        _follow(self, step, total_steps)

    def forward(self, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        q0, q1 = self.head(self.backbone(torch.cat([x0, x1]))).float().chunk(2)
        k0, k1 = _targets(self, x0, x1)
        with _fp32(q0.device):  # each call also enqueues its keys (gathered from all processes)
            return 0.5 * (self.criterion(q0, k1) + self.criterion(q1, k0))


class BYOL(nn.Module):
    """BYOL (Grill et al., 2020, "Bootstrap Your Own Latent"): online backbone → projector → predictor
    regresses the target (momentum) projection of the other view; negative cosine similarity,
    symmetrised. No negatives, so no dependence on the batch size beyond BatchNorm."""

    def __init__(self, backbone: nn.Module, feat_dim: int, s: SSLConfig) -> None:
        super().__init__()
        self.backbone, self.head = backbone, BYOLProjectionHead(feat_dim, s.proj_hidden_dim, s.proj_dim)
        self.predictor = BYOLPredictionHead(s.proj_dim, s.proj_hidden_dim, s.proj_dim)
        self.backbone_m, self.head_m = _frozen_copy(backbone), _frozen_copy(self.head)
        self.criterion = NegativeCosineSimilarity()
        self.m0 = s.momentum

    def encoder(self) -> nn.Module:
        return self.backbone

    def after_step(self, step: int, total_steps: int) -> None:
        _follow(self, step, total_steps)

    def forward(self, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        p0, p1 = self.predictor(self.head(self.backbone(torch.cat([x0, x1])))).float().chunk(2)
        t0, t1 = _targets(self, x0, x1)
        with _fp32(p0.device):
            return 0.5 * (self.criterion(p0, t1) + self.criterion(p1, t0))


class VICReg(nn.Module):
    """VICReg (Bardes et al., 2022, "Variance-Invariance-Covariance Regularization"): a 3-layer expander,
    then invariance (MSE between views) + variance (hinge on each dimension's std) + covariance
    (off-diagonal) terms, weights 25 / 25 / 1. No negatives, no momentum copy."""

    def __init__(self, backbone: nn.Module, feat_dim: int, s: SSLConfig) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = VICRegProjectionHead(feat_dim, s.wide_dim, s.wide_dim, num_layers=3)
        self.criterion = VICRegLoss(gather_distributed=True)

    def encoder(self) -> nn.Module:
        return self.backbone

    def after_step(self, step: int, total_steps: int) -> None:
        pass

    def forward(self, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        z0, z1 = self.head(self.backbone(torch.cat([x0, x1]))).float().chunk(2)
        with _fp32(z0.device):
            return self.criterion(z0, z1)


class DINO(nn.Module):
    """DINO (Caron et al., 2021, "Emerging Properties in Self-Supervised Vision Transformers"): student
    and momentum teacher (backbone + DINO head with ``prototypes`` outputs); the student's softmax (temp.
    0.1) matches the teacher's centred, sharpened softmax (``ssl.teacher_temp``) of the other view. Two
    global views here (the shared views of every method; no local crops). The teacher is what the
    paper evaluates, so it is the encoder the monitor scores and the checkpoint keeps."""

    def __init__(self, backbone: nn.Module, feat_dim: int, s: SSLConfig) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = DINOProjectionHead(feat_dim, s.proj_hidden_dim, s.proj_dim, s.dino_prototypes)
        # The head's weight-normalised last layer cannot be deep-copied: a second head, same weights.
        self.head_m = DINOProjectionHead(feat_dim, s.proj_hidden_dim, s.proj_dim, s.dino_prototypes)
        self.head_m.load_state_dict(self.head.state_dict())
        deactivate_requires_grad(self.head_m)
        self.backbone_m = _frozen_copy(backbone)
        self.criterion = DINOLoss(
            output_dim=s.dino_prototypes, teacher_temp=s.teacher_temp, center_momentum=s.center_momentum
        )
        self.m0 = s.momentum

    def encoder(self) -> nn.Module:
        return self.backbone_m

    def after_step(self, step: int, total_steps: int) -> None:
        _follow(self, step, total_steps)

    def forward(self, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        s0, s1 = self.head(self.backbone(torch.cat([x0, x1]))).float().chunk(2)
        t0, t1 = _targets(self, x0, x1)
        with _fp32(s0.device):  # the centre moves towards the teacher mean of all processes
            return self.criterion([t0, t1], [s0, s1])


# One entry per method: the class, built as ``METHODS[name](backbone, feat_dim, cfg.ssl)``.
METHODS: dict[str, Callable[[nn.Module, int, SSLConfig], nn.Module]] = {
    "simclr": SimCLR,
    "moco": MoCo,
    "byol": BYOL,
    "vicreg": VICReg,
    "dino": DINO,
}


def build_method(cfg: Config, backbone: nn.Module) -> nn.Module:
    """``cfg.ssl.method`` around ``backbone`` (B, C, H, W) → (B, backbone.num_features). Every method trains
    on the same two views (``lowshot.augment``: ``simclr_views`` per image, ``simclr_spec`` batched)."""
    feat_dim: int = backbone.num_features  # type: ignore[assignment]  # timm models set it
    return METHODS[cfg.ssl.method](backbone, feat_dim, cfg.ssl)


def negatives_per_anchor(cfg: Config, global_batch: int) -> int:
    """How many negatives each anchor is contrasted with: 2PB - 2 (SimCLR), the bank (MoCo), 0 (others)."""
    return {"simclr": 2 * global_batch - 2, "moco": cfg.ssl.memory_bank}.get(cfg.ssl.method, 0)
