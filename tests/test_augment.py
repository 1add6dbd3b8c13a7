"""Batched device augmentation against the per-image pipelines it replaces: the parameter
distributions (crop area, aspect and position, flip/rotation/jitter/grayscale/blur rates, jitter and
blur ranges) on many samples, each operation on images against torchvision, and the views' seeding."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from lightly.transforms import SimCLRTransform
from PIL import Image
from scipy import stats
from torchvision import transforms as T

from lowshot.augment import (
    DeviceLoader,
    ViewSpec,
    compiled_render,
    render,
    sample_params,
    simclr_spec,
    train_spec,
    views,
)
from lowshot.config import AugConfig, TrainConfig

N = 20000
ID = {"mean": [0.0], "std": [1.0]}


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rate_ok(flags: torch.Tensor, p: float) -> bool:
    """The observed rate lies within 4 binomial standard errors of p."""
    return abs(flags.float().mean().item() - p) <= 4 * math.sqrt(p * (1 - p) / len(flags)) + 1e-9


def identity(n: int, h: int, w: int) -> dict[str, torch.Tensor]:
    p = sample_params(n, h, w, ViewSpec(size=w, mean=[0.0], std=[1.0]), gen())
    p |= {
        "top": torch.zeros(n),
        "left": torch.zeros(n),
        "h": torch.full((n,), float(h)),
        "w": torch.full((n,), float(w)),
    }
    return p


def test_crop_boxes_follow_torchvisions_random_resized_crop() -> None:
    for h, w, min_scale in ((64, 64, 0.08), (48, 64, 0.3)):
        p = sample_params(4000, h, w, ViewSpec(size=32, mean=[0.0], std=[1.0], min_scale=min_scale), gen())
        torch.manual_seed(0)
        img = torch.empty(1, h, w)
        ref = np.array(
            [T.RandomResizedCrop.get_params(img, [min_scale, 1.0], [3 / 4, 4 / 3]) for _ in range(4000)]
        )
        ours = torch.stack([p["top"], p["left"], p["h"], p["w"]], 1).numpy()
        top, left, hh, ww = ours.T
        assert ((top >= 0) & (left >= 0) & (top + hh <= h) & (left + ww <= w)).all()
        area = (ours[:, 2] * ours[:, 3] / (h * w), ref[:, 2] * ref[:, 3] / (h * w))
        aspect = (np.log(ours[:, 3] / ours[:, 2]), np.log(ref[:, 3] / ref[:, 2]))
        centre = ((ours[:, 1] + ours[:, 3] / 2) / w, (ref[:, 1] + ref[:, 3] / 2) / w)
        for name, (a, b) in {"area": area, "aspect": aspect, "centre": centre}.items():
            assert stats.ks_2samp(a, b).pvalue > 1e-3, name
        assert area[0].min() >= min_scale * 0.9 and area[0].max() <= 1.0


def test_rates_and_ranges_of_every_random_choice() -> None:
    spec = simclr_spec(
        AugConfig(vflip=0.3, rotate=0.25), 32, grayscale=False, norm={"mean": [0.0] * 3, "std": [1.0] * 3}
    )
    p = sample_params(N, 32, 32, spec, gen())
    assert rate_ok(p["hflip"], 0.5) and rate_ok(p["vflip"], 0.3) and rate_ok(p["rot90"], 0.25)
    assert rate_ok(p["jitter"], 0.8) and rate_ok(p["gray"], 0.2) and rate_ok(p["blur"], 0.5)
    for key, x in (("brightness", 0.4), ("contrast", 0.4), ("saturation", 0.4)):  # strength 0.5 x 0.8
        assert stats.kstest(p[key].numpy(), stats.uniform(loc=1 - x, scale=2 * x).cdf).pvalue > 1e-3, key
    assert stats.kstest(p["hue"].numpy(), stats.uniform(loc=-0.1, scale=0.2).cdf).pvalue > 1e-3
    assert stats.kstest(p["sigma"].numpy(), stats.uniform(loc=0.1, scale=0.9).cdf).pvalue > 1e-3
    # each of the 24 jitter orders equally often (torchvision draws a random permutation per call)
    counts = np.unique(p["order"].numpy(), axis=0, return_counts=True)[1]
    assert len(counts) == 24 and stats.chisquare(counts).pvalue > 1e-3
    gray = simclr_spec(AugConfig(), 32, grayscale=True, norm=ID)
    assert gray.saturation == gray.hue == gray.gray_prob == 0.0  # as augment.simclr_views
    sup = train_spec(TrainConfig(rotate=10, brightness=0.2, contrast=0.3, crop_min_scale=0.7), 32, ID)
    q = sample_params(N, 32, 32, sup, gen())
    assert q["angle"].abs().max() <= 10 and q["angle"].std() > 5 and q["jitter"].all() and not q["blur"].any()
    assert q["brightness"].min() >= 0.8 and q["contrast"].max() <= 1.3


def test_geometry_matches_torchvision_on_images() -> None:
    torch.manual_seed(0)
    img = (torch.rand(2, 3, 16, 16) * 255).round().to(torch.uint8)
    x = img.float() / 255
    p = identity(2, 16, 16)
    assert torch.allclose(render(img, p, ViewSpec(size=16, mean=[0.0] * 3, std=[1.0] * 3)), x, atol=1e-5)
    spec = ViewSpec(size=16, mean=[0.0] * 3, std=[1.0] * 3)
    flipped = render(
        img, p | {"hflip": torch.tensor([True, False]), "vflip": torch.tensor([False, True])}, spec
    )
    assert torch.allclose(flipped[0], x[0].flip(-1), atol=1e-5) and torch.allclose(
        flipped[1], x[1].flip(-2), atol=1e-5
    )
    turned = render(img, p | {"rot90": torch.tensor([True, True])}, spec)
    assert torch.allclose(turned, TF.rotate(x, 90), atol=1e-5)  # counter-clockwise, as torchvision
    angle = render(img, p | {"angle": torch.tensor([20.0, -20.0])}, spec)
    ref = torch.stack(
        [
            TF.rotate(x[0], 20.0, T.InterpolationMode.BILINEAR),
            TF.rotate(x[1], -20.0, T.InterpolationMode.BILINEAR),
        ]
    )
    assert (angle - ref)[..., 4:12, 4:12].abs().max() < 0.05  # same rotation; edges differ by interpolation
    # a crop box upsampled to the view size: torchvision's resized_crop (bilinear, no antialias needed)
    box = p | {
        "top": torch.tensor([2.0, 5.0]),
        "left": torch.tensor([3.0, 0.0]),
        "h": torch.tensor([8.0, 10.0]),
        "w": torch.tensor([10.0, 8.0]),
    }
    out = render(img, box, ViewSpec(size=24, mean=[0.0] * 3, std=[1.0] * 3))
    for i, (top, left, h, w) in enumerate(((2, 3, 8, 10), (5, 0, 10, 8))):
        ref = TF.resized_crop(x[i], top, left, h, w, [24, 24], T.InterpolationMode.BILINEAR, antialias=False)
        # the outer 2 px differ: torchvision clamps to the crop's edge pixels, the resample reads the true
        # neighbours outside the box (half an input pixel)
        assert torch.allclose(out[i][:, 2:-2, 2:-2], ref[:, 2:-2, 2:-2], atol=1e-4)


def test_colour_operations_match_torchvision() -> None:
    torch.manual_seed(1)
    img = (torch.rand(4, 3, 8, 8) * 255).round().to(torch.uint8)
    x = img.float() / 255
    spec = ViewSpec(
        size=8,
        mean=[0.0] * 3,
        std=[1.0] * 3,
        cj_prob=1.0,
        brightness=0.5,
        contrast=0.5,
        saturation=0.5,
        hue=0.2,
    )
    p = identity(4, 8, 8) | {"jitter": torch.ones(4, dtype=torch.bool)}
    f = torch.tensor([0.6, 1.4, 1.0, 0.8])
    one = {
        "brightness": torch.ones(4),
        "contrast": torch.ones(4),
        "saturation": torch.ones(4),
        "hue": torch.zeros(4),
    }
    for key, fn in (
        ("brightness", TF.adjust_brightness),
        ("contrast", TF.adjust_contrast),
        ("saturation", TF.adjust_saturation),
    ):
        out = render(img, p | one | {key: f}, spec)
        ref = torch.stack([fn(x[i], float(f[i])) for i in range(4)])
        assert torch.allclose(out, ref, atol=1e-4), key
    h = torch.tensor([0.1, -0.2, 0.05, 0.0])
    out = render(img, p | one | {"hue": h}, spec)
    ref = torch.stack([TF.adjust_hue(x[i], float(h[i])) for i in range(4)])
    assert torch.allclose(out, ref, atol=2e-3)
    # the order matters (contrast after brightness differs from before): each sample uses its own
    both = p | one | {"brightness": torch.full((4,), 1.5), "contrast": torch.full((4,), 0.5)}
    order = torch.tensor([[0, 1, 2, 3], [1, 0, 2, 3], [0, 1, 2, 3], [1, 0, 2, 3]])
    out = render(img, both | {"order": order}, spec)
    b_then_c = TF.adjust_contrast(TF.adjust_brightness(x, 1.5), 0.5)
    c_then_b = TF.adjust_brightness(TF.adjust_contrast(x, 0.5), 1.5)
    assert torch.allclose(out[0], b_then_c[0], atol=1e-4) and torch.allclose(out[1], c_then_b[1], atol=1e-4)
    gray = render(
        img,
        p | one | {"jitter": torch.zeros(4, dtype=torch.bool), "gray": torch.ones(4, dtype=torch.bool)},
        ViewSpec(size=8, mean=[0.0] * 3, std=[1.0] * 3, gray_prob=1.0),
    )
    assert torch.allclose(gray, TF.rgb_to_grayscale(x, 3), atol=1e-4)


def test_blur_smooths_by_its_sigma_and_normalisation() -> None:
    torch.manual_seed(2)
    img = (torch.rand(3, 1, 32, 32) * 255).round().to(torch.uint8)
    spec = ViewSpec(size=32, mean=[0.5], std=[0.25], blur_prob=1.0, sigma=(0.1, 2.0))
    p = identity(3, 32, 32) | {
        "blur": torch.tensor([True, True, False]),
        "sigma": torch.tensor([0.5, 2.0, 2.0]),
    }
    out = render(img, p, spec) * 0.25 + 0.5
    x = img.float() / 255
    ref = TF.gaussian_blur(x[1], [13, 13], [2.0, 2.0])
    assert (out[1] - ref)[..., 6:-6, 6:-6].abs().max() < 1e-3  # same kernel away from the borders
    assert out[1].std() < out[0].std() < x[0].std() and torch.allclose(out[2], x[2], atol=1e-5)


def test_two_views_differ_and_a_seed_reproduces_them() -> None:
    img = (torch.rand(5, 1, 24, 24, generator=gen(3)) * 255).to(torch.uint8)
    spec = simclr_spec(AugConfig(), 24, grayscale=True, norm=ID)
    a = views(img, spec, gen(7), n_views=2)
    assert a.shape == (10, 1, 24, 24)
    assert not torch.allclose(a[:5], a[5:])
    assert torch.equal(a, views(img, spec, gen(7), n_views=2)) and not torch.equal(
        a, views(img, spec, gen(8), n_views=2)
    )


def test_views_have_lightlys_intensity_distribution() -> None:
    """Per-view mean and spread of intensity over 600 views of one image: batched vs lightly's PIL views."""
    yy, xx = np.mgrid[0:48, 0:48]
    rng = np.random.default_rng(0)
    arr = np.clip(
        120 + 80 * np.sin(xx / 5.0) * np.cos(yy / 7.0) + rng.normal(0, 20, (48, 48)), 0, 255
    ).astype(np.uint8)
    aug = AugConfig()
    lightly = SimCLRTransform(
        input_size=48,
        cj_prob=aug.cj_prob,
        cj_strength=aug.cj_strength,
        cj_bright=aug.brightness,
        cj_contrast=aug.contrast,
        cj_sat=0.0,
        cj_hue=0.0,
        min_scale=aug.min_scale,
        random_gray_scale=0.0,
        gaussian_blur=aug.blur_prob,
        sigmas=tuple(aug.blur_sigma),
        hf_prob=aug.hflip,
        normalize=None,
    )
    torch.manual_seed(0)
    np.random.seed(0)
    ref = torch.stack([lightly(Image.fromarray(arr))[0] for _ in range(600)])
    ours = views(
        torch.from_numpy(arr)[None, None].expand(600, 1, 48, 48), simclr_spec(aug, 48, True, ID), gen(0)
    )
    for stat in (lambda v: v.mean((1, 2, 3)), lambda v: v.std((1, 2, 3))):
        a, b = stat(ours).numpy(), stat(ref).numpy()
        assert stats.ks_2samp(a, b).pvalue > 1e-3
        assert np.abs(np.quantile(a, [0.1, 0.5, 0.9]) - np.quantile(b, [0.1, 0.5, 0.9])).max() < 0.03


@pytest.mark.parametrize("device", ["cpu", *(["cuda"] if torch.cuda.is_available() else [])])
def test_runs_where_the_images_are(device: str) -> None:
    img = torch.randint(0, 255, (4, 3, 20, 20), dtype=torch.uint8, device=device)
    g = torch.Generator(device).manual_seed(0)
    out = views(img, simclr_spec(AugConfig(), 16, False, {"mean": [0.5] * 3, "std": [0.5] * 3}), g, n_views=2)
    assert out.device.type == device and out.shape == (8, 3, 16, 16) and torch.isfinite(out).all()


def test_device_loader_epochs_shards_and_labels() -> None:
    n = 40
    # each image's pixels hold its index, so a view's mean tells which image it came from
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 8, 8, 1).contiguous() * 5
    labels = torch.arange(n) % 4
    spec = ViewSpec(size=8, mean=[0.0], std=[1.0])  # geometry only, no colour: pixel values survive
    seen = []
    for rank in (0, 1):
        dl = DeviceLoader(
            images, labels, spec, 8, torch.device("cpu"), gen(rank), seed=3, n_views=2, rank=rank, world=2
        )
        assert len(dl) == 2 and dl.batch_size == 8
        batches = list(dl)
        for (x0, x1), y in batches:
            idx = torch.round(x0.mean((1, 2, 3)) * 255 / 5).long()
            assert torch.equal(idx, torch.round(x1.mean((1, 2, 3)) * 255 / 5).long()) and torch.equal(
                y, idx % 4
            )
            seen += idx.tolist()
        second = [torch.round(x0.mean((1, 2, 3)) * 255 / 5).long() for (x0, _), _ in dl]
        assert not all(
            torch.equal(a, b)
            for a, b in zip(
                second, [torch.round(b[0][0].mean((1, 2, 3)) * 255 / 5).long() for b in batches], strict=True
            )
        )
    assert len(seen) == len(set(seen)) == 32  # one shared permutation, disjoint shares, full batches only
    one = DeviceLoader(images, labels, spec, 8, torch.device("cpu"), gen(0), n_views=1, channels=3)
    x, y = next(iter(one))
    assert x.shape == (8, 3, 8, 8) and torch.equal(x[:, 0], x[:, 2])  # grayscale replicated after augmenting
    skewed = torch.tensor([0] * 36 + [1] * 4)
    bal = DeviceLoader(images, skewed, spec, 8, torch.device("cpu"), gen(0), n_views=1, balance=True)
    drawn = torch.cat([y for _ in range(30) for _, y in bal])
    assert 0.4 < drawn.float().mean() < 0.6  # the 10% class drawn half of the time


def test_fused_and_compiled_render_equal_the_eager_path() -> None:
    """The GPU form (every operation on the whole batch under masks, blur as shifted sums), and that form
    through torch.compile, give what the eager per-subset path gives for the same parameters and images
    (all operations on: crop, flips, 90° turns, jitter in random orders with hue, grayscale, blur)."""
    spec = simclr_spec(
        AugConfig(vflip=0.5, rotate=0.5), 16, grayscale=False, norm={"mean": [0.5] * 3, "std": [0.25] * 3}
    )
    img = (torch.rand(64, 3, 20, 20, generator=gen(5)) * 255).to(torch.uint8)
    p = sample_params(64, 20, 20, spec, gen(6))
    assert p["jitter"].any() and p["blur"].any() and p["gray"].any() and (p["order"][:, 0] == 3).any()
    eager = render(img, p, spec, fused=False)
    assert torch.allclose(render(img, p, spec, fused=True), eager, atol=1e-5)
    compiled = compiled_render()(img, p, spec, 3, channels_last=True)
    assert compiled.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(compiled, eager, atol=1e-4)


def test_a_failed_compile_falls_back_to_the_same_eager_views() -> None:
    img = (torch.rand(6, 8, 8, 1, generator=gen(1)) * 255).to(torch.uint8)
    spec = simclr_spec(AugConfig(), 8, grayscale=True, norm=ID)
    dl = DeviceLoader(img, torch.zeros(6, dtype=torch.long), spec, 6, torch.device("cpu"), gen(4), n_views=1)
    ref = next(iter(dl))[0]

    def broken(*args: object, **kwargs: object) -> torch.Tensor:
        raise RuntimeError("inductor: no C++ compiler")

    dl = DeviceLoader(img, torch.zeros(6, dtype=torch.long), spec, 6, torch.device("cpu"), gen(4), n_views=1)
    dl.renderer, dl.compiled = broken, True
    with pytest.warns(UserWarning, match="no C\\+\\+ compiler"):
        out = next(iter(dl))[0]
    assert torch.equal(out, ref) and dl.renderer is render


def test_a_batch_larger_than_the_images_is_said(
    data_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """ssl.batch_size=1000 on 128 training images: batches of 128, and the run says so (config.yaml keeps
    the 1000 asked for; issue 41)."""
    from accelerate import Accelerator

    from lowshot.augment import pretraining_loader
    from lowshot.config import parse_args
    from lowshot.data import load_store

    args = [f"data.root={data_root}", f"data.cache_dir={tmp_path}", "data.size=28", "data.limit=128"]
    cfg, _ = parse_args([*args, "ssl.batch_size=1000"])
    store = load_store(cfg.data)
    loader = pretraining_loader(store, cfg, Accelerator(cpu=True), 1, {"mean": [0.5], "std": [0.25]})
    assert loader.batch_size == (store.split == "train").sum() < 1000
    assert any("ssl.batch_size=1000" in r.getMessage() for r in caplog.records)
