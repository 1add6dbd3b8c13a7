"""Decoding an unlabelled pool of PNG files: images per second on this machine, first run and cached;
and, with ``--pretrain STEPS``, what share of a pretraining epoch on that pool waits for data.

    LOWSHOT_DATA_ROOT=../shared/data python bench/pool_decode.py [--n 20000] [--size 64] [--pretrain 30]

Writes ``--n`` 64 px PNGs (crops of BUSI images, each one distinct) into a temporary folder, then times
``lowshot.data.pool.load_pool`` on it twice: the first run decodes, fingerprints and thumbnails every
file on all cores into the memory-mapped cache; the second maps the cache. Appends a row to
bench/results/pool_decode/decode.md. ``--pretrain``: then ``accelerate launch ssl/pretrain.py`` (the defaults:
SimCLR, ResNet-18, batch 128, batched views) on BreastMNIST's training split plus that pool for STEPS
optimizer steps, through the pool guard; the epoch's ``data_time_frac`` (time spent waiting for the
next batch of views / epoch time) and pairs/s, and the run's wall time with the guard, are appended to
bench/results/pool_decode/pretrain.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from lowshot.config import DataConfig
from lowshot.data.pool import load_pool

OUT = Path(__file__).resolve().parent / "results" / "pool_decode" / "decode.md"
OUT_PRETRAIN = OUT.with_name("pretrain.md")
REPO = Path(__file__).resolve().parents[1]


def pretrain(tmp: str, n: int, size: int, steps: int, root: Path) -> None:
    """One real pretraining run on BreastMNIST's training split plus the pool in ``tmp`` (its cache reused),
    ``steps`` optimizer steps; appends the epoch's data-wait share to OUT_PRETRAIN."""
    run = Path(tmp) / "runs" / "pool-pretrain"
    args = [
        f"data.source={root.resolve() / 'breastmnist.npz'}",
        f"ssl.unlabelled=[{Path(tmp) / 'pool'}]",
        f"data.size={size}",
        f"data.cache_dir={Path(tmp) / 'cache'}",
        f"ssl.steps={steps}",
        "check.leakage=warn",  # BreastMNIST's own cross-split copies: not what this measures
        # the pool is cut from BUSI, BreastMNIST's source images: the guard finds copies of its val/test
        # images among them (2,809 of 100,000), which are left out
        "check.pool_leakage=drop",
        "track.log_with=none",
        f"out_dir={run.parent}",
        "name=pool-pretrain",
    ]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1"]
    t0 = time.perf_counter()
    p = subprocess.run([*cmd, "ssl/pretrain.py", *args], cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode:
        raise SystemExit(f"pretraining failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    m = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    res = json.loads((run / "results.json").read_text())
    row = (
        f"| {n:,} PNGs at {size} px + BreastMNIST train | {os.cpu_count()} cores | {res.get('pretrain_images', '?'):,} "
        f"images | {steps} steps of 128 | {m['pairs_per_s']:.1f} pairs/s | data wait {100 * m['data_time_frac']:.1f} % "
        f"of the epoch | {wall:.0f} s in all (start, pool guard, steps, save) |"
    )
    append(OUT_PRETRAIN, ["pool", "machine", "pretraining set", "length", "speed", "data", "run"], row)


def append(path: Path, head: list[str], row: str) -> None:
    """One row added to the markdown table at ``path`` (its header written first when it is new)."""
    if not path.exists():
        path.write_text("| " + " | ".join(head) + " |\n|" + "---|" * len(head) + "\n")
    with open(path, "a") as f:
        f.write(row + "\n")
    print(row)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--pretrain", type=int, default=0, help="then pretrain for this many steps on the pool")
    a = ap.parse_args()
    root = Path(os.environ.get("LOWSHOT_DATA_ROOT", "../shared/data"))
    src = [np.asarray(Image.open(f).convert("L")) for f in sorted((root / "busi").rglob("*.png"))]
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "pool"
        for k in range(a.n):  # 100 files a folder, as an export would nest them
            a_ = src[k % len(src)]
            y, x = rng.integers(0, 64, 2)
            crop = Image.fromarray(a_[y : y + 192, x : x + 192]).resize(
                (a.size, a.size), Image.Resampling.BILINEAR
            )
            (folder / f"{k // 100:04d}").mkdir(parents=True, exist_ok=True)
            crop.save(folder / f"{k // 100:04d}" / f"{k}.png")
        cfg = DataConfig(root=tmp, size=a.size, cache_dir=str(Path(tmp) / "cache"))
        t0 = time.perf_counter()
        pool = load_pool(["pool"], cfg, channels=1)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        load_pool(["pool"], cfg, channels=1)
        second = time.perf_counter() - t0
        if a.pretrain:
            pretrain(tmp, a.n, a.size, a.pretrain, root)
    row = (
        f"| {a.n:,} PNGs at {a.size} px | {os.cpu_count()} cores | first run {first:.1f} s = "
        f"{a.n / first:,.0f} images/s | cached {second:.2f} s | {len(pool.skipped)} skipped |"
    )
    append(OUT, ["pool", "machine", "decode + fingerprints + thumbnails", "second run (mapped)", ""], row)


if __name__ == "__main__":
    main()
