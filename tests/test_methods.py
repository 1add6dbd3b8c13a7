import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from lowshot.config import AugConfig
from lowshot.methods import SimCLR, simclr_views


def test_ntxent_falls_on_a_toy_problem() -> None:
    """SimCLR with lightly's NT-Xent learns to match two noisy views of 64 random 'images'."""
    torch.manual_seed(0)
    data = torch.randn(64, 32)
    backbone = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32))
    model = SimCLR(backbone, 32, 64, 16, temperature=0.2)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def loss_now() -> float:
        with torch.no_grad():
            torch.manual_seed(1)
            return float(model(data + 0.5 * torch.randn_like(data), data + 0.5 * torch.randn_like(data)))

    start = loss_now()
    for _ in range(150):
        loss = model(data + 0.5 * torch.randn_like(data), data + 0.5 * torch.randn_like(data))
        opt.zero_grad()
        loss.backward()
        opt.step()
    end = loss_now()
    assert end < 0.5 * start
    assert end < 0.3 * np.log(2 * 64 - 1)  # far below chance, log(#candidates per anchor)


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


def test_negatives_are_gathered_across_two_cpu_processes() -> None:
    script = Path(__file__).with_name("dist_ntxent.py")
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            "29533",
            str(script),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])
    assert res["world_size"] == 2 and "MULTI_CPU" in res["distributed"]
    assert res["gathered"] == pytest.approx(res["full"], rel=1e-5)
    assert abs(res["alone"] - res["full"]) > 0.1  # without gathering the loss would differ
