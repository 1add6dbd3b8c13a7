"""Augmentation, per image: lightly's ``SimCLRTransform`` views for pretraining and the supervised
transform for fine-tuning (PIL → normalised tensor, in DataLoader workers), and the :class:`ViewSpec`
that tells their batched twins (:mod:`.batched`) to draw the same distributions.

Each per-image pipeline has one spec function beside it (``simclr_views`` ↔ ``simclr_spec``,
``train_transform`` ↔ ``train_spec``), reading the same settings under the same rules; tests/test_augment.py
checks that the twins draw the same parameter distributions and produce the same intensity statistics.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from lightly.transforms import SimCLRTransform
from PIL import Image
from torchvision import transforms as T

from ..config import AugConfig, TrainConfig


def simclr_views(aug: AugConfig, size: int, grayscale: bool, norm: dict[str, list[float]]) -> Callable:
    """lightly's ``SimCLRTransform`` (PIL → [view0, view1]) for medical images: no hue, saturation or
    random-grayscale on grayscale data, a milder crop scale and optional flips (see AugConfig). Every
    method uses these views (and the batched path draws the same distributions)."""
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


def train_transform(
    size: int, tc: TrainConfig, norm: dict[str, list[float]]
) -> Callable[[Image.Image], torch.Tensor]:
    """Supervised augmentation for grayscale modalities: random resized crop, optional flips (off where
    laterality matters), small rotations, brightness/contrast jitter; never hue or saturation."""
    return T.Compose(
        [
            T.RandomResizedCrop(size, scale=(tc.crop_min_scale, 1.0), antialias=True),
            T.RandomHorizontalFlip(tc.hflip),
            T.RandomVerticalFlip(tc.vflip),
            T.RandomRotation(tc.rotate),
            T.ColorJitter(brightness=tc.brightness, contrast=tc.contrast),
            T.ToTensor(),
            T.Normalize(norm["mean"], norm["std"]),
        ]
    )


@dataclass
class ViewSpec:
    """What one view draws. ``rot90``: probability of a 90° counter-clockwise turn (lightly's
    ``rr_prob``); ``degrees``: a uniform angle in [-degrees, degrees] (torchvision RandomRotation)."""

    size: int
    mean: list[float]
    std: list[float]
    min_scale: float = 0.08
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.0
    vflip: float = 0.0
    rot90: float = 0.0
    degrees: float = 0.0
    cj_prob: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0
    gray_prob: float = 0.0
    blur_prob: float = 0.0
    sigma: tuple[float, float] = (0.1, 2.0)


def simclr_spec(aug: AugConfig, size: int, grayscale: bool, norm: dict[str, list[float]]) -> ViewSpec:
    """The batched twin of :func:`simclr_views` (same keys, same grayscale rules)."""
    s = aug.cj_strength
    return ViewSpec(
        size=size,
        mean=norm["mean"],
        std=norm["std"],
        min_scale=aug.min_scale,
        hflip=aug.hflip,
        vflip=aug.vflip,
        rot90=aug.rotate,
        cj_prob=aug.cj_prob,
        brightness=s * aug.brightness,
        contrast=s * aug.contrast,
        saturation=0.0 if grayscale else s * aug.saturation,
        hue=0.0 if grayscale else s * aug.hue,
        gray_prob=0.0 if grayscale else aug.gray_prob,
        blur_prob=aug.blur_prob,
        sigma=(aug.blur_sigma[0], aug.blur_sigma[1]),
    )


def train_spec(tc: TrainConfig, size: int, norm: dict[str, list[float]]) -> ViewSpec:
    """The batched twin of :func:`train_transform`."""
    return ViewSpec(
        size=size,
        mean=norm["mean"],
        std=norm["std"],
        min_scale=tc.crop_min_scale,
        hflip=tc.hflip,
        vflip=tc.vflip,
        degrees=tc.rotate,
        cj_prob=1.0,
        brightness=tc.brightness,
        contrast=tc.contrast,
    )
