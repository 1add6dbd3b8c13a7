"""Batched augmentation on tensors where the images already are (GPU or CPU): one draw of per-sample
parameters, one resample for the whole geometry, colour operations as batched arithmetic.

It reproduces the per-image PIL pipelines lowshot uses elsewhere, distribution for distribution:
lightly's ``SimCLRTransform`` (random resized crop, flips, 90° rotation, colour jitter in a random
order, random grayscale, Gaussian blur, normalisation) and the supervised ``data.train_transform``
(crop, flips, rotation by any angle, brightness/contrast). Crop boxes follow torchvision's
``RandomResizedCrop.get_params`` (10 tries, then the centre fallback), jitter factors torchvision's
``ColorJitter.get_params`` (with a per-sample random order of the four operations). Images are
(B, C, H, W) uint8 in, (B, C, S, S) float normalised out; C is 1 (grayscale) or 3.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from kornia.color import hsv_to_rgb, rgb_to_hsv

from .config import AugConfig, TrainConfig
from .data import Store, balanced_draw_weights


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
    """The SimCLR views of ``methods.simclr_views`` (same keys, same grayscale rules)."""
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
    """The supervised augmentation of ``data.train_transform``."""
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


def _u(n: int, lo: float, hi: float, g: torch.Generator, shape: tuple[int, ...] = ()) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand((n, *shape), generator=g, device=g.device)


def _factor(n: int, x: float, g: torch.Generator) -> torch.Tensor:
    """torchvision's jitter factor: uniform in [max(0, 1 - x), 1 + x]; exactly 1 when x is 0."""
    return _u(n, max(0.0, 1.0 - x), 1.0 + x, g)


def sample_params(
    n: int, height: int, width: int, spec: ViewSpec, g: torch.Generator
) -> dict[str, torch.Tensor]:
    """Per-sample parameters of ``n`` views of (height, width) images, on ``g``'s device.

    Crop boxes (top, left, h, w) in whole pixels as in ``RandomResizedCrop.get_params``; booleans
    for flips, 90° turns, jitter, grayscale and blur; jitter factors, the (n, 4) order of the
    jitter operations, the rotation angle (degrees, counter-clockwise) and the blur sigma (px)."""
    area = height * width
    target = area * _u(n, spec.min_scale, 1.0, g, (10,))
    aspect = torch.exp(_u(n, math.log(spec.ratio[0]), math.log(spec.ratio[1]), g, (10,)))
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = ok.float().argmax(1)  # the first of 10 tries that fits, as torchvision
    pick = torch.arange(n, device=g.device)
    w, h, found = w[pick, first], h[pick, first], ok.any(1)
    # torchvision's fallback: the whole image, clamped to the ratio range, centred
    in_ratio, fw, fh = width / height, width, height
    if in_ratio < spec.ratio[0]:
        fw, fh = width, round(width / spec.ratio[0])
    elif in_ratio > spec.ratio[1]:
        fw, fh = round(height * spec.ratio[1]), height
    w = torch.where(found, w, torch.full_like(w, fw))
    h = torch.where(found, h, torch.full_like(h, fh))
    top = torch.floor(torch.rand(n, generator=g, device=g.device) * (height - h + 1))
    left = torch.floor(torch.rand(n, generator=g, device=g.device) * (width - w + 1))
    top = torch.where(found, top, torch.div(height - h, 2, rounding_mode="floor"))
    left = torch.where(found, left, torch.div(width - w, 2, rounding_mode="floor"))

    def coin(p: float) -> torch.Tensor:
        return torch.rand(n, generator=g, device=g.device) < p

    return {
        "top": top,
        "left": left,
        "h": h,
        "w": w,
        "hflip": coin(spec.hflip),
        "vflip": coin(spec.vflip),
        "rot90": coin(spec.rot90),
        "angle": _u(n, -spec.degrees, spec.degrees, g),
        "jitter": coin(spec.cj_prob),
        "brightness": _factor(n, spec.brightness, g),
        "contrast": _factor(n, spec.contrast, g),
        "saturation": _factor(n, spec.saturation, g),
        "hue": _u(n, -spec.hue, spec.hue, g),
        "order": torch.argsort(torch.rand(n, 4, generator=g, device=g.device), dim=1),
        "gray": coin(spec.gray_prob),
        "blur": coin(spec.blur_prob),
        "sigma": _u(n, spec.sigma[0], spec.sigma[1], g),
    }


def _geometry(x: torch.Tensor, p: dict[str, torch.Tensor], size: int) -> torch.Tensor:
    """Crop box → (size, size), then flips, then rotation, as one affine ``grid_sample`` (bilinear).
    x: (B, C, H, W) float."""
    b, _, height, width = x.shape
    # Output coordinates u (right), v (down) in [-1, 1] map to crop coordinates through the inverse of
    # the rotation, then the flips; the crop maps [-1, 1] onto its box in the input's [-1, 1].
    angle = torch.deg2rad(p["angle"] + 90.0 * p["rot90"].float())
    cos, sin = torch.cos(angle), torch.sin(angle)
    fx = 1.0 - 2.0 * p["hflip"].float()
    fy = 1.0 - 2.0 * p["vflip"].float()
    sx, sy = p["w"] / width, p["h"] / height
    cx = (2 * p["left"] + p["w"]) / width - 1.0
    cy = (2 * p["top"] + p["h"]) / height - 1.0
    # counter-clockwise on screen (v points down): the output point (u, v) reads the point rotated back
    theta = torch.stack(
        [
            torch.stack([sx * fx * cos, -sx * fx * sin, cx], 1),
            torch.stack([sy * fy * sin, sy * fy * cos, cy], 1),
        ],
        1,
    )
    grid = F.affine_grid(theta, [b, x.shape[1], size, size], align_corners=False)
    # Within half a pixel outside the image, repeat the edge (as a crop + resize does); farther out,
    # where only a rotation reaches, black (torchvision's fill=0).
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if bool((p["angle"] != 0).any()):
        tol = torch.tensor([1 + 1 / width, 1 + 1 / height], device=x.device, dtype=grid.dtype)
        out = out * (grid.abs() <= tol).all(-1, keepdim=True).permute(0, 3, 1, 2).to(out.dtype)
    return out


def _gray(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) → (B, 1, H, W) luma (ITU-R 601, as torchvision's rgb_to_grayscale)."""
    if x.shape[1] == 1:
        return x
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]).to(x.dtype)


def _jitter(x: torch.Tensor, p: dict[str, torch.Tensor], spec: ViewSpec, masked: bool) -> torch.Tensor:
    """torchvision ColorJitter per sample: the four operations in that sample's random order."""
    ops = []
    if spec.brightness:
        ops.append((0, lambda y, f: (y * f).clamp(0, 1), p["brightness"]))
    if spec.contrast:
        ops.append(
            (
                1,
                lambda y, f: (f * y + (1 - f) * _gray(y).mean((1, 2, 3), keepdim=True)).clamp(0, 1),
                p["contrast"],
            )
        )
    if spec.saturation and x.shape[1] == 3:
        ops.append((2, lambda y, f: (f * y + (1 - f) * _gray(y)).clamp(0, 1), p["saturation"]))
    if spec.hue and x.shape[1] == 3:
        ops.append((3, _shift_hue, p["hue"]))
    for slot in range(4):  # each sample meets each operation once, in its own order
        for op, fn, f in ops:
            take = p["jitter"] & (p["order"][:, slot] == op)
            if masked:  # whole batch, no host sync: the GPU queue keeps running ahead
                x = torch.where(take.view(-1, 1, 1, 1), fn(x, f.view(-1, 1, 1, 1)), x)
            else:  # only the samples concerned: 4x less arithmetic where it is what costs (CPU)
                sel = torch.nonzero(take).squeeze(1)
                if len(sel):
                    x = x.index_copy(
                        0, sel, fn(x.index_select(0, sel), f.index_select(0, sel).view(-1, 1, 1, 1))
                    )
    return x


def _shift_hue(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Hue rotation by f turns (f in [-0.5, 0.5]), through HSV (kornia: hue in radians)."""
    hsv = rgb_to_hsv(x)
    h = torch.remainder(hsv[:, 0:1] + f * 2 * math.pi, 2 * math.pi)
    return hsv_to_rgb(torch.cat([h, hsv[:, 1:]], 1)).clamp(0, 1)


def _blur(x: torch.Tensor, p: dict[str, torch.Tensor], spec: ViewSpec) -> torch.Tensor:
    """Gaussian blur with a per-sample sigma (px) on the samples drawn for it: separable, reflect padding,
    radius 3 sigma_max; one grouped convolution per axis for the whole batch."""
    b, c, hh, ww = x.shape
    radius = max(1, math.ceil(3 * spec.sigma[1]))
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    sigma = p["sigma"].to(x.dtype).view(-1, 1)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum(1, keepdim=True)
    delta = (t == 0).to(x.dtype).expand(b, -1)
    k = torch.where(p["blur"].view(-1, 1), k, delta).repeat_interleave(c, 0)  # (B*C, 2r+1)
    y = F.pad(x.reshape(1, b * c, hh, ww), (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, k.view(b * c, 1, 1, -1), groups=b * c)
    y = F.conv2d(y, k.view(b * c, 1, -1, 1), groups=b * c)
    return y.view(b, c, hh, ww)


def render(
    images: torch.Tensor, p: dict[str, torch.Tensor], spec: ViewSpec, channels: int = 0
) -> torch.Tensor:
    """(B, C, H, W) uint8 → (B, C, S, S) float views for parameters ``p`` (see ``sample_params``);
    ``channels=3`` replicates grayscale views before normalising (data.channels=replicate)."""
    x = _geometry(images.float() / 255.0, p, spec.size)
    if spec.cj_prob and (spec.brightness or spec.contrast or spec.saturation or spec.hue):
        x = _jitter(x, p, spec, masked=x.is_cuda)
    if spec.gray_prob and x.shape[1] == 3:
        x = torch.where(p["gray"].view(-1, 1, 1, 1), _gray(x).expand_as(x), x)
    if spec.blur_prob and bool(p["blur"].any()):
        x = _blur(x, p, spec)
    if channels > x.shape[1]:
        x = x.expand(-1, channels, -1, -1)
    mean = torch.tensor(spec.mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - mean) / std


def views(
    images: torch.Tensor, spec: ViewSpec, g: torch.Generator, n_views: int = 1, channels: int = 0
) -> torch.Tensor:
    """``n_views`` independent views of each image: (B, C, H, W) uint8 → (n_views * B, C', S, S), the
    views of image i at rows i, B + i, ...; one parameter draw and one resample for all of them.
    Grayscale is augmented on its one channel and replicated to ``channels`` at the end."""
    x = images.repeat(n_views, 1, 1, 1) if n_views > 1 else images
    return render(x, sample_params(len(x), images.shape[2], images.shape[3], spec, g), spec, channels)


class DeviceLoader:
    """Batches of augmented views drawn from a uint8 store that lives on the device (or, when it does not
    fit in a quarter of the free GPU memory, in pinned host memory, copied batch by batch).

    Each pass is one epoch: a permutation shared by all processes (seeded by ``seed`` and the epoch),
    this process's ``rank::world`` share of it, full batches only. Yields ``((x0, x1), y)`` for
    ``n_views=2`` (SimCLR, like the DataLoader of lightly's transform) and ``(x, y)`` for 1; the
    augmentation draws from ``generator`` (seed it per process). ``balance`` draws items with
    replacement at 1 / (K n_class) instead of a permutation.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        spec: ViewSpec,
        batch_size: int,
        device: torch.device,
        generator: torch.Generator,
        seed: int = 0,
        n_views: int = 2,
        channels: int = 0,
        rank: int = 0,
        world: int = 1,
        balance: bool = False,
    ) -> None:
        # (N, H, W, C) numpy layout → (N, C, H, W)
        images = images.permute(0, 3, 1, 2).contiguous() if images.shape[-1] in (1, 3) else images
        fits = device.type != "cuda" or images.numel() < 0.25 * torch.cuda.mem_get_info(device)[0]
        self.images = images.to(device) if fits else images.pin_memory()
        self.labels = labels.to(self.images.device)
        self.spec, self.device, self.generator, self.seed = spec, device, generator, seed
        self.n_views, self.channels, self.rank, self.world = n_views, channels, rank, world
        self.batch_size = max(1, min(batch_size, len(images) // world))
        self.balance, self.epoch = balance, 0

    def __len__(self) -> int:
        return (len(self.images) // self.world) // self.batch_size

    def __iter__(self) -> Iterator[Any]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)  # the same on every process
        self.epoch += 1
        n = len(self.images)
        if self.balance:
            weights = torch.from_numpy(balanced_draw_weights(self.labels.cpu().numpy())).float()
            order = torch.multinomial(weights, n, replacement=True, generator=g)
        else:
            order = torch.randperm(n, generator=g)
        mine = order[self.rank :: self.world].to(self.images.device)
        for step in range(len(self)):
            idx = mine[step * self.batch_size : (step + 1) * self.batch_size]
            x = self.images[idx].to(self.device, non_blocking=True)
            v = views(x, self.spec, self.generator, self.n_views, self.channels)
            y = self.labels[idx].to(self.device, non_blocking=True)
            yield (tuple(v.chunk(self.n_views)), y) if self.n_views > 1 else (v, y)


def use_batched(path: str, device: torch.device) -> bool:
    """data.augment_path: batched on a GPU for "auto"."""
    return path == "batched" or (path == "auto" and device.type == "cuda")


def store_loader_on_device(
    store: Store,
    splits: tuple[str, ...],
    spec: ViewSpec,
    batch_size: int,
    accelerator: Accelerator,
    seed: int,
    n_views: int,
    channels: int,
    balance: bool = False,
) -> DeviceLoader:
    """A ``DeviceLoader`` over the store rows of ``splits`` for this process; each process draws its own
    augmentations (generator seeded by seed and process index) from a shared permutation."""
    rows = store.indices(*splits)
    rank = accelerator.process_index
    g = torch.Generator(accelerator.device).manual_seed(seed * 1000 + rank)
    images, labels = torch.from_numpy(store.images[rows]), torch.from_numpy(store.labels[rows])
    return DeviceLoader(
        images,
        labels,
        spec,
        batch_size,
        accelerator.device,
        g,
        seed,
        n_views,
        channels,
        rank,
        accelerator.num_processes,
        balance,
    )
