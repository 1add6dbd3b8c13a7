"""Augmentation, batched, on tensors where the images already are (GPU or CPU): one draw of per-sample
parameters, one resample for the whole geometry, colour operations as batched arithmetic.

It reproduces the per-image PIL pipelines lowshot uses elsewhere, distribution for distribution:
lightly's ``SimCLRTransform`` (random resized crop, flips, 90° rotation, colour jitter in a random
order, random grayscale, Gaussian blur, normalisation) and the supervised ``views.train_transform``
(crop, flips, rotation by any angle, brightness/contrast). Crop boxes follow torchvision's
``RandomResizedCrop.get_params`` (10 tries, then the centre fallback), jitter factors torchvision's
``ColorJitter.get_params`` (with a per-sample random order of the four operations). Images are
(B, C, H, W) uint8 in, (B, C, S, S) float normalised out; C is 1 (grayscale) or 3.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .views import ViewSpec


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


def _geometry(x: torch.Tensor, p: dict[str, torch.Tensor], size: int, rotate: bool) -> torch.Tensor:
    """Crop box → (size, size), then flips, then rotation, as one affine ``grid_sample`` (bilinear).
    x: (B, C, H, W) float. ``rotate``: arbitrary angles are drawn, so corners beyond the image are black."""
    height, width = x.shape[2:]
    # Output coordinates u (right), v (down) in [-1, 1] map to crop coordinates through the inverse of
    # the rotation, then the flips; the crop maps [-1, 1] onto its box in the input's [-1, 1].
    angle = torch.deg2rad(p["angle"] + 90.0 * p["rot90"].float())
    cos, sin = torch.cos(angle), torch.sin(angle)
    fx = 1.0 - 2.0 * p["hflip"].float()
    fy = 1.0 - 2.0 * p["vflip"].float()
    sx, sy = p["w"] / width, p["h"] / height
    cx = (2 * p["left"] + p["w"]) / width - 1.0
    cy = (2 * p["top"] + p["h"]) / height - 1.0
    # counter-clockwise on screen (v points down): the output point (u, v) reads the point rotated back.
    # The grid written out (affine_grid's batched matmul with an inner size of 3 is ~5x slower on CPU):
    # u, v at the output pixel centres (align_corners=False); grid (B, S, S, 2) as (x, y).
    centres = (torch.arange(size, device=x.device, dtype=x.dtype) * 2 + 1) / size - 1.0
    u, v = centres.view(1, 1, size), centres.view(1, size, 1)

    def col(t: torch.Tensor) -> torch.Tensor:
        return t.to(x.dtype).view(-1, 1, 1)

    gx = col(sx * fx * cos) * u - col(sx * fx * sin) * v + col(cx)
    gy = col(sy * fy * sin) * u + col(sy * fy * cos) * v + col(cy)
    grid = torch.stack([gx, gy], -1)
    # Within half a pixel outside the image, repeat the edge (as a crop + resize does); farther out,
    # where only a rotation reaches, black (torchvision's fill=0).
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if rotate:  # decided by the spec, not by the drawn angles: no host sync, one graph for torch.compile
        inside = (gx.abs() <= 1 + 1 / width) & (gy.abs() <= 1 + 1 / height)  # (B, S, S)
        out = out * inside.unsqueeze(1).to(out.dtype)
    return out


def _gray(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) → (B, 1, H, W) luma (ITU-R 601, as torchvision's rgb_to_grayscale)."""
    if x.shape[1] == 1:
        return x
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]).to(x.dtype)


def _codes(p: dict[str, torch.Tensor], spec: ViewSpec, channels: int) -> torch.Tensor:
    """(B, 4): the jitter operation of each sample in each of the four slots of its random order: 0
    brightness, 1 contrast, 2 saturation, 3 hue, -1 none (no jitter drawn, or the operation is off)."""
    on = [bool(spec.brightness), bool(spec.contrast), bool(spec.saturation), bool(spec.hue)]
    on[2:] = [f and channels == 3 for f in on[2:]]  # no saturation or hue on one channel
    # Built from comparisons, not from a host list: a host→GPU copy would wait for the GPU's queue.
    enabled = torch.zeros_like(p["order"], dtype=torch.bool)
    for op in (op for op, f in enumerate(on) if f):
        enabled = enabled | (p["order"] == op)
    return torch.where(enabled & p["jitter"].view(-1, 1), p["order"], -1)


def _slot(
    x: torch.Tensor,
    code: torch.Tensor,
    p: dict[str, torch.Tensor],
    spec: ViewSpec,
    ops: tuple[int, ...] = (0, 1, 2, 3),
) -> torch.Tensor:
    """One slot of the jitter, each sample its own operation ``code`` (B,): brightness, contrast and
    saturation are one blend ``clamp(a x + b mean(gray x) + c gray(x))`` with per-sample a, b, c
    (torchvision's ``_blend`` for each; a = 1, b = c = 0 where the code is another), then the hue turn
    where the code is 3. ``ops``: the codes that can occur (terms for the others are skipped).
    x: (B, C, H, W) in [0, 1]."""

    def col(t: torch.Tensor) -> torch.Tensor:
        return t.view(-1, 1, 1, 1)

    if ops == (3,):  # only hue turns here: no blend to compute
        return _shift_hue(x, col(p["hue"]))
    one, zero = torch.ones_like(p["brightness"]), torch.zeros_like(p["brightness"])
    a = torch.where(code == 0, p["brightness"], one)
    a = torch.where(code == 1, p["contrast"], torch.where(code == 2, p["saturation"], a))
    y = col(a) * x
    if 1 in ops and spec.contrast:  # towards the image's mean gray level
        y = y + col(torch.where(code == 1, 1 - p["contrast"], zero)) * _gray(x).mean((1, 2, 3), keepdim=True)
    if 2 in ops and spec.saturation and x.shape[1] == 3:  # towards the pixel's gray level
        y = y + col(torch.where(code == 2, 1 - p["saturation"], zero)) * _gray(x)
    y = y.clamp(0, 1)
    if 3 in ops and spec.hue and x.shape[1] == 3:
        y = torch.where(col(code == 3), _shift_hue(x, col(p["hue"])), y)
    return y


def _jitter(x: torch.Tensor, p: dict[str, torch.Tensor], spec: ViewSpec, fused: bool) -> torch.Tensor:
    """torchvision ColorJitter per sample: the four operations in that sample's random order.

    ``fused``: every slot on the whole batch, selection by masks (no host sync, so the GPU queue runs
    ahead; under torch.compile each slot is one or two kernels). Otherwise (eager CPU) each operation
    of each slot touches only the samples drawn for it."""
    codes = _codes(p, spec, x.shape[1])
    x = x if fused else x.clone()  # written in place below: one copy, not one per operation
    for slot in range(4):
        code = codes[:, slot]
        if fused:
            x = _slot(x, code, p, spec)
            continue
        for op in range(4):
            sel = torch.nonzero(code == op).squeeze(1)
            if len(sel):
                sub = {k: p[k].index_select(0, sel) for k in ("brightness", "contrast", "saturation", "hue")}
                y = _slot(x.index_select(0, sel), code.index_select(0, sel), sub, spec, (op,))
                x.index_copy_(0, sel, y)
    return x


def _shift_hue(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Hue turned by f turns (f in [-0.5, 0.5]), as torchvision's ``adjust_hue`` (HSV round trip), in
    closed form: the hue h in sixths as in its ``_rgb2hsv``, and back by the standard
    ``v - c clamp(min(k, 4 - k), 0, 1)`` with ``k = (n + h) mod 6``, n = 5, 3, 1 for R, G, B (v: max,
    c: chroma). About 15 whole-tensor operations where an RGB→HSV→RGB library round trip takes ~50.
    x: (B, 3, H, W) in [0, 1]; f: (B, 1, 1, 1)."""
    maxc, minc = x.amax(1, keepdim=True), x.amin(1, keepdim=True)
    chroma = maxc - minc
    rc, gc, bc = ((maxc - x) / torch.where(chroma > 0, chroma, 1.0)).split(1, 1)
    r, g = x[:, 0:1], x[:, 1:2]
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    n = torch.arange(5.0, 0.0, -2.0, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)  # 5, 3, 1
    k = torch.remainder(n + h + 6.0 * f, 6.0)
    return maxc - chroma * torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0)


def _blur(x: torch.Tensor, p: dict[str, torch.Tensor], spec: ViewSpec, fused: bool) -> torch.Tensor:
    """Gaussian blur with a per-sample sigma (px) on the samples drawn for it: separable, reflect padding,
    radius 3 sigma_max. ``fused``: the whole batch (the identity kernel where no blur was drawn) as a
    sum of 2r + 1 shifted copies per axis, which torch.compile turns into one kernel each; eager: the
    drawn samples only, one grouped convolution per axis."""
    radius = max(1, math.ceil(3 * spec.sigma[1]))
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)

    def kernels(sigma: torch.Tensor) -> torch.Tensor:  # (n,) px → (n, 2r+1), each summing to 1
        k = torch.exp(-0.5 * (t / sigma.to(x.dtype).view(-1, 1)) ** 2)
        return k / k.sum(1, keepdim=True)

    if fused:
        _, _, hh, ww = x.shape
        k = torch.where(p["blur"].view(-1, 1), kernels(p["sigma"]), (t == 0).to(x.dtype))
        kk = k.view(len(x), 1, 1, -1)
        y = F.pad(x, (radius, radius, 0, 0), mode="reflect")
        acc = kk[..., 0:1] * y[..., 0:ww]
        for i in range(1, 2 * radius + 1):
            acc = acc + kk[..., i : i + 1] * y[..., i : i + ww]
        y = F.pad(acc, (0, 0, radius, radius), mode="reflect")
        acc = kk[..., 0:1] * y[..., 0:hh, :]
        for i in range(1, 2 * radius + 1):
            acc = acc + kk[..., i : i + 1] * y[..., i : i + hh, :]
        return acc
    sel = torch.nonzero(p["blur"]).squeeze(1)
    if not len(sel):
        return x
    sub = x.index_select(0, sel)
    b, c, hh, ww = sub.shape
    k = kernels(p["sigma"].index_select(0, sel)).repeat_interleave(c, 0)  # (b*C, 2r+1)
    y = F.pad(sub.reshape(1, b * c, hh, ww), (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, k.view(b * c, 1, 1, -1), groups=b * c)
    y = F.conv2d(y, k.view(b * c, 1, -1, 1), groups=b * c)
    return x.index_copy(0, sel, y.view(b, c, hh, ww))


def render(
    images: torch.Tensor,
    p: dict[str, torch.Tensor],
    spec: ViewSpec,
    channels: int = 0,
    fused: bool | None = None,
    channels_last: bool = False,
) -> torch.Tensor:
    """(B, C, H, W) uint8 → (B, C, S, S) float views for parameters ``p`` (see ``sample_params``);
    ``channels=3`` replicates grayscale views before normalising (data.channels=replicate).

    ``fused`` (default: on a GPU): whole-batch masked operations with no data-dependent branch or host
    sync, the form ``torch.compile`` fuses (see ``compiled_render``); otherwise each operation touches
    only the samples drawn for it. ``channels_last``: the output in NHWC, as the model takes it."""
    fused = images.is_cuda if fused is None else fused
    x = _geometry(images.float() / 255.0, p, spec.size, rotate=spec.degrees > 0)
    if spec.cj_prob and (spec.brightness or spec.contrast or spec.saturation or spec.hue):
        x = _jitter(x, p, spec, fused)
    if spec.gray_prob and x.shape[1] == 3:
        x = torch.where(p["gray"].view(-1, 1, 1, 1), _gray(x).expand_as(x), x)
    if spec.blur_prob:
        x = _blur(x, p, spec, fused)
    if channels > x.shape[1]:
        x = x.expand(-1, channels, -1, -1)
    # per-channel constants by fills, not host lists: a blocking host→GPU copy would drain the queue
    mean = torch.cat([x.new_full((1, 1, 1, 1), m) for m in spec.mean], 1)
    std = torch.cat([x.new_full((1, 1, 1, 1), s) for s in spec.std], 1)
    x = (x - mean) / std
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@functools.cache
def compiled_render() -> Callable[..., torch.Tensor]:
    """``render`` through torch.compile (inductor): the ~100 whole-batch eager kernels of the fused form
    (four jitter slots, each with a hue turn; 2 x 13 blur taps) become about a dozen, which is what lets
    the augmentation keep up with the model on a GPU (60,445 vs 7,950 views-only pairs/s on an H200,
    bench/simclr_throughput.py). Shapes are fixed per loader (full batches only), so it compiles once
    per spec. Own operations rather than kornia's: its batched pipeline reached ~0.5 of the model's
    speed on an H100 (issue #6), and its HSV round trip is ~3x the operations of the closed form here."""
    return torch.compile(functools.partial(render, fused=True), dynamic=False)


def views(
    images: torch.Tensor,
    spec: ViewSpec,
    g: torch.Generator,
    n_views: int = 1,
    channels: int = 0,
    renderer: Callable[..., torch.Tensor] = render,
    channels_last: bool = False,
) -> torch.Tensor:
    """``n_views`` independent views of each image: (B, C, H, W) uint8 → (n_views * B, C', S, S), the
    views of image i at rows i, B + i, ...; one parameter draw and one resample for all of them.
    Grayscale is augmented on its one channel and replicated to ``channels`` at the end. ``renderer``:
    ``render`` or ``compiled_render()``."""
    x = images.repeat(n_views, 1, 1, 1) if n_views > 1 else images
    p = sample_params(len(x), images.shape[2], images.shape[3], spec, g)
    return renderer(x, p, spec, channels, channels_last=channels_last)
