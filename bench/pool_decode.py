"""Decoding an unlabelled pool of PNG files: images per second on this machine, first run and cached.

    LOWSHOT_DATA_ROOT=../shared/data python bench/pool_decode.py [--n 20000] [--size 64]

Writes ``--n`` 64 px PNGs (crops of BUSI images, each one distinct) into a temporary folder, then times
``lowshot.data.pool.load_pool`` on it twice: the first run decodes, fingerprints and thumbnails every
file on all cores into the memory-mapped cache; the second maps the cache. Appends a row to
bench/results/pool_decode.md.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from lowshot.config import DataConfig
from lowshot.data.pool import load_pool

OUT = Path(__file__).resolve().parent / "results" / "pool_decode.md"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--size", type=int, default=64)
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
    row = (
        f"| {a.n:,} PNGs at {a.size} px | {os.cpu_count()} cores | first run {first:.1f} s = "
        f"{a.n / first:,.0f} images/s | cached {second:.2f} s | {len(pool.skipped)} skipped |"
    )
    if not OUT.exists():
        OUT.write_text(
            "| pool | machine | decode + fingerprints + thumbnails | second run (mapped) | |\n|---|---|---|---|---|\n"
        )
    with open(OUT, "a") as f:
        f.write(row + "\n")
    print(row)


if __name__ == "__main__":
    main()
