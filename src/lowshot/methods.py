"""Self-supervised methods as blocks: a method is a loss + a projection head + a view transform.

The registry is a plain dict, ``METHODS[name](backbone, cfg, ...) -> (model, transform)``, so adding
BYOL or DINO later is one function, not a class hierarchy.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from lightly.loss import NTXentLoss
from lightly.models.modules import SimCLRProjectionHead
from lightly.transforms import SimCLRTransform
from torch import nn

from .config import AugConfig, Config


class SimCLR(nn.Module):
    """SimCLR (Chen et al., 2020, "A Simple Framework for Contrastive Learning of Visual
    Representations"): backbone → 2-layer projection head → NT-Xent between two views.

    ``forward(x0, x1)`` takes two (B, C, H, W) views and returns the scalar loss. Both views go
    through the backbone as one (2B, C, H, W) batch (one pass, BatchNorm statistics over both).
    ``gather_distributed=True`` makes every process's embeddings negatives for every anchor, so the
    loss with P processes of B images equals the single-process loss on P*B images.
    """

    def __init__(self, backbone: nn.Module, feat_dim: int, hidden_dim: int, out_dim: int, temperature: float):
        super().__init__()
        self.backbone = backbone
        self.head = SimCLRProjectionHead(feat_dim, hidden_dim, out_dim)
        self.criterion = NTXentLoss(temperature=temperature, gather_distributed=True)

    def forward(self, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        z = self.head(self.backbone(torch.cat([x0, x1])))  # (2B, out_dim)
        z0, z1 = z.float().chunk(2)
        # The similarity logits (divided by a temperature ~0.1) overflow bf16/fp16 precision: fp32.
        with torch.autocast(device_type=z.device.type, enabled=False):
            return self.criterion(z0, z1)


def simclr_views(aug: AugConfig, size: int, grayscale: bool, norm: dict[str, list[float]]) -> Callable:
    """lightly's ``SimCLRTransform`` (PIL → [view0, view1]) for medical images: no hue, saturation or
    random-grayscale on grayscale data, a milder crop scale and optional flips (see AugConfig)."""
    return SimCLRTransform(
        input_size=size,
        cj_prob=aug.cj_prob,
        cj_strength=aug.cj_strength,
        cj_bright=aug.brightness,
        cj_contrast=aug.contrast,
        cj_sat=0.0 if grayscale else aug.saturation,
        cj_hue=0.0 if grayscale else aug.hue,
        min_scale=aug.min_scale,
        random_gray_scale=0.0 if grayscale else aug.gray_prob,
        gaussian_blur=aug.blur_prob,
        sigmas=(aug.blur_sigma[0], aug.blur_sigma[1]),
        vf_prob=aug.vflip,
        hf_prob=aug.hflip,
        rr_prob=aug.rotate,
        normalize=norm,
    )


def build_simclr(
    backbone: nn.Module, feat_dim: int, cfg: Config, grayscale: bool, norm: dict[str, list[float]]
) -> tuple[nn.Module, Callable]:
    model = SimCLR(backbone, feat_dim, cfg.ssl.proj_hidden_dim, cfg.ssl.proj_dim, cfg.ssl.temperature)
    return model, simclr_views(cfg.aug, cfg.data.size, grayscale, norm)


METHODS: dict[str, Callable[..., tuple[nn.Module, Callable]]] = {"simclr": build_simclr}
