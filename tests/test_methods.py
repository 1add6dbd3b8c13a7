import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import HANG_S
from PIL import Image
from torch import nn

from lowshot.augment import simclr_views
from lowshot.config import AugConfig, ConfigError, SSLConfig, parse_args
from lowshot.methods import METHODS, momentum_at


def _retrieval(encoder: nn.Module, data: torch.Tensor, noise: float) -> float:
    """Top-1 accuracy of finding each item's other noisy view among all items' views (cosine)."""
    with torch.no_grad():
        g = torch.Generator().manual_seed(5)
        a = encoder(data + noise * torch.randn(data.shape, generator=g))
        b = encoder(data + noise * torch.randn(data.shape, generator=g))
        sim = nn.functional.normalize(a, dim=1) @ nn.functional.normalize(b, dim=1).T
        return float((sim.argmax(1) == torch.arange(len(a))).float().mean())


@pytest.mark.parametrize("name", sorted(METHODS))
def test_each_loss_falls_on_a_toy_problem(name: str) -> None:
    """Every method (lightly's losses and heads) learns to match two noisy views of 64 random 'images':
    its loss falls and the encoder's view-to-view retrieval improves over the untrained encoder."""
    torch.manual_seed(0)
    data, noise = torch.randn(64, 32), 0.7
    backbone = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32))
    s = SSLConfig(
        method=name, proj_hidden_dim=64, proj_dim=16, memory_bank=256, wide_dim=64, dino_prototypes=64
    )
    model = METHODS[name](backbone, 32, s)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def views() -> tuple[torch.Tensor, torch.Tensor]:
        return data + noise * torch.randn_like(data), data + noise * torch.randn_like(data)

    def loss_now() -> float:
        with torch.no_grad():
            torch.manual_seed(1)
            return float(model(*views()))

    for _ in range(8):  # MoCo: fill the memory bank with real keys first (a random bank is easy)
        model(*views())
    start, before = loss_now(), _retrieval(model.encoder(), data, noise)
    for step in range(300):
        loss = model(*views())
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.after_step(step, 300)
    end, after = loss_now(), _retrieval(model.encoder(), data, noise)
    assert end < start - 0.05 * abs(start), (start, end)
    assert after >= before + 0.05, (before, after)  # measured: 0.67 → 0.77 (DINO, VICReg) to 0.94 (MoCo)


def test_momentum_schedule_and_update() -> None:
    """The momentum copies follow BYOL's rule: decay cosine-scheduled from ssl.momentum to 1, and
    target ← m target + (1 - m) online after every step (lightly's update_momentum)."""
    ms = [momentum_at(k, 100, 0.99) for k in range(100)]
    assert ms[0] == pytest.approx(0.99) and ms[-1] == pytest.approx(1.0)
    assert all(b >= a for a, b in itertools.pairwise(ms)) and ms[50] == pytest.approx(0.995, abs=1e-4)
    torch.manual_seed(0)
    model = METHODS["byol"](nn.Linear(8, 8), 8, SSLConfig(method="byol", proj_hidden_dim=8, proj_dim=4))
    assert torch.equal(model.backbone.weight, model.backbone_m.weight)  # starts as a copy
    assert not model.backbone_m.weight.requires_grad
    with torch.no_grad():
        model.backbone.weight.add_(1.0)
    target = model.backbone_m.weight.detach().clone()
    model.after_step(30, 100)
    m = momentum_at(30, 100, 0.99)
    assert torch.allclose(model.backbone_m.weight, m * target + (1 - m) * model.backbone.weight)
    model.after_step(99, 100)  # m = 1 at the end: the target stays
    assert torch.allclose(model.backbone_m.weight, m * target + (1 - m) * model.backbone.weight)


def test_dino_evaluates_the_teacher_and_others_the_online_encoder() -> None:
    s = SSLConfig(proj_hidden_dim=8, proj_dim=4, dino_prototypes=16, memory_bank=32, wide_dim=8)
    for name, cls in METHODS.items():
        model = cls(nn.Linear(8, 8), 8, s)
        assert model.encoder() is (model.backbone_m if name == "dino" else model.backbone)


@pytest.mark.parametrize(("rgb", "channels"), [(True, 3), (False, 1)])
def test_views_of_grayscale_image(rgb: bool, channels: int) -> None:
    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8), "L")
    norm = {"mean": [0.5] * channels, "std": [0.25] * channels}
    views = simclr_views(AugConfig(), 32, grayscale=True, norm=norm)
    torch.manual_seed(0)
    v0, v1 = views(im.convert("RGB") if rgb else im)
    assert v0.shape == v1.shape == (channels, 32, 32)
    assert not torch.equal(v0, v1)
    if rgb:  # no hue/saturation jitter on grayscale: the channels stay equal
        assert torch.allclose(v0[0], v0[1]) and torch.allclose(v0[1], v0[2])


@pytest.mark.slow  # processes of their own: a new interpreter each
def test_negatives_are_gathered_across_two_cpu_processes() -> None:
    res = _two_cpu_processes(Path(__file__).with_name("dist_ntxent.py"), 29533)
    assert res["world_size"] == 2 and "MULTI_CPU" in res["distributed"]
    assert res["gathered"] == pytest.approx(res["full"], rel=1e-5)
    assert abs(res["alone"] - res["full"]) > 0.1  # without gathering the loss would differ


def _two_cpu_processes(script: Path, port: int) -> dict:
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
    out = subprocess.run([*cmd, str(script)], capture_output=True, text=True, env=env, timeout=HANG_S)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])


@pytest.mark.slow  # processes of their own: a new interpreter each
def test_every_method_is_the_same_on_two_processes_as_on_one() -> None:
    """Two CPU processes on halves of each batch vs one process on the whole batch, 3 steps: the same
    losses, online and momentum weights, MoCo memory bank and DINO centre (so SimCLR's negatives and
    VICReg's variance/covariance are gathered, MoCo enqueues every process's keys, DINO's centre is the
    global mean), and each of them identical on both processes."""
    script = Path(__file__).with_name("dist_methods.py")
    two = _two_cpu_processes(script, 29534)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=HANG_S)
    assert out.returncode == 0, out.stderr[-2000:]
    one = json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])
    assert two["world_size"] == 2 and "MULTI_CPU" in two["distributed"] and one["world_size"] == 1
    expected = {"simclr": {"online"}, "vicreg": {"online"}, "byol": {"online", "momentum"}}
    expected |= {"moco": {"online", "momentum", "bank"}, "dino": {"online", "momentum", "center"}}
    for name, keys in expected.items():
        a, b = two[name], one[name]
        assert a["same_on_every_process"], name
        assert a["losses"] == pytest.approx(b["losses"], rel=1e-5), name
        assert keys <= set(a)
        for k in keys:
            assert np.allclose(a[k], b[k], atol=1e-6), (name, k)
    assert two["moco"]["losses"] != two["simclr"]["losses"]


def test_method_keys_are_checked() -> None:
    for name in METHODS:  # the config's list of choices is the registry's
        assert parse_args([f"ssl.method={name}"])[0].ssl.method == name
    with pytest.raises(ConfigError, match=r"ssl\.method"):
        parse_args(["ssl.method=swav"])
    with pytest.raises(ConfigError, match=r"ssl\.momentum"):
        parse_args(["ssl.momentum=1.5"])
