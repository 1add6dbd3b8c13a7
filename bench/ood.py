"""How well does `lowshot predict`'s "unlike the training data" flag find images a model should not be
trusted on, and how often does it cry wolf on images like its own?

    LOWSHOT_DATA_ROOT=../shared/data python bench/ood.py [--data breastmnist busi retinamnist]
        [--jobs probe finetune] [--size 64] [--epochs 20]

For each training set a run is trained as a user would (finetune/train.py: the ImageNet Lite0 probe, and
the recommended fine-tune recipe for --epochs), then lowshot.inference scores, with the run's own
preprocessing:

- in distribution: the run's sealed test split (never seen in training or selection);
- the same images exported again (BUSI's 256 px PNGs for a BreastMNIST model and the reverse): a
  resolution change, not a new kind of image; a flag here is a false alarm;
- another modality (RetinaMNIST fundus photographs for the ultrasound models; BreastMNIST and BUSI
  ultrasound for the RetinaMNIST model);
- scikit-image's bundled photographs (each whole and as its four quarters), LFW faces, and gray texture
  crops (brick, grass, gravel: speckle-like, the hardest of these);
- uniform noise, and the test split with Gaussian noise (sigma 25 grey levels: reported, not counted
  as either).

Per set: the share flagged at the 95th percentile of the familiar images' scores (recall for the
unfamiliar sets, the false-alarm rate for the familiar ones), the AUROC of the score against the test
split, and precision on the test split + that set. Scores compared: the cosine distance to the k-th
nearest training embedding of the frozen starting backbone ("start", lowshot's) for k = 1, 5, 10, with
its yardstick from the validation images, the training images' leave-one-out distances, or both
(lowshot's); the same distance in the fine-tuned backbone's own embedding; and the maximum softmax
probability (Hendrycks & Gimpel, ICLR 2017, the usual baseline; flag below its 5th validation
percentile). Wilson 95% intervals on the shares. Writes bench/results/ood/table.md and table.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from lowshot import ensemble, inference
from lowshot.config import parse_args
from lowshot.data import load_store
from lowshot.evaluation import auroc

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "results" / "ood"
RUNS = REPO / "runs" / "ood"
DATA = {
    "breastmnist": ["data.source=breastmnist.npz", "check.leakage=drop"],
    "busi": ["--config", "configs/busi.yaml"],
    "retinamnist": ["--config", "configs/retinamnist.yaml"],
}
KS = (1, 5, 10)


def wilson(x: int, n: int) -> tuple[float, float]:
    if n == 0:
        return float("nan"), float("nan")
    p, z = x / n, 1.96
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return c - h, c + h


def train(data: str, job: str, a: argparse.Namespace) -> Path:
    run = RUNS / f"{data}-{job}-{a.size}px"
    if (run / "results.json").is_file():
        return run
    args = [*DATA[data], f"data.size={a.size}", f"out_dir={RUNS}", f"name={run.name}", "track.log_with=none"]
    if job == "probe":
        args = ["--probe", *args, "model.name=tf_efficientnet_lite0", "model.weights=efficientnet-lite0"]
    else:
        args = ["--config", "configs/recipes/lowshot-recommended.yaml", *args, f"train.epochs={a.epochs}"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1"]
    subprocess.run([*cmd, "finetune/train.py", *args], check=True, cwd=REPO)
    return run


def natural_images() -> dict[str, list[np.ndarray]]:
    """scikit-image's bundled photographs (whole and in quarters), faces and texture crops, as uint8."""
    import skimage.data as d

    def u8(a: np.ndarray) -> np.ndarray:
        a = np.asarray(a)
        if a.dtype != np.uint8:
            a = (255 * (a - a.min()) / max(1e-9, float(a.max() - a.min()))).astype(np.uint8)
        a = a[..., :3] if a.ndim == 3 else a[..., None]
        return np.ascontiguousarray(a)

    photos = []
    for name in (
        "astronaut", "camera", "coffee", "chelsea", "coins", "moon", "page", "text", "rocket", "clock",
        "hubble_deep_field", "immunohistochemistry", "retina", "microaneurysms", "cat", "shepp_logan_phantom",
    ):  # fmt: skip
        a = u8(getattr(d, name)())
        h, w = a.shape[:2]
        photos += [
            a,
            a[: h // 2, : w // 2],
            a[: h // 2, w // 2 :],
            a[h // 2 :, : w // 2],
            a[h // 2 :, w // 2 :],
        ]
    faces = [u8(f) for f in d.lfw_subset()]
    textures = []
    for name in ("brick", "grass", "gravel"):
        a = u8(getattr(d, name)())
        textures += [a[i : i + 128, j : j + 128] for i in range(0, 512, 128) for j in range(0, 512, 128)]
    return {
        "photographs (scikit-image, whole + quarters)": photos,
        "faces (LFW subset)": faces,
        "textures (brick, grass, gravel crops)": textures,
    }


def npz_images(path: Path) -> list[np.ndarray]:
    z = np.load(path)
    xs = [z[f"{s}_images"] for s in ("train", "val", "test")]
    return [a if a.ndim == 3 else a[..., None] for x in xs for a in x]


def measure(data: str, job: str, a: argparse.Namespace) -> list[dict]:
    run_dir = train(data, job, a)
    run = ensemble.load_model(run_dir)
    cfg, _ = parse_args([*DATA[data], f"data.size={a.size}"])
    store = load_store(cfg.data)
    root = Path(cfg.data.root)
    conf = lambda arrs: np.stack([inference.conform(x, run.prep) for x in arrs])  # noqa: E731
    val = inference.score(run, store.images[store.indices("val")])
    test_imgs = store.images[store.indices("test")]
    test = inference.score(run, test_imgs)
    rng = np.random.default_rng(0)
    noisy = np.clip(test_imgs.astype(np.float32) + rng.normal(0, 25, test_imgs.shape), 0, 255).astype(
        np.uint8
    )
    sets: dict[str, tuple[str, np.ndarray]] = {}
    if data == "breastmnist":
        busi = sorted((root / "busi").rglob("*.png"))
        sets["same images, other export (BUSI 256 px PNGs)"] = (
            "familiar",
            inference.read_images(busi, run.prep)[0],
        )
    if data == "busi":
        sets["same images, other export (BreastMNIST 28 px)"] = (
            "familiar",
            conf(npz_images(root / "breastmnist.npz")),
        )
    if data != "retinamnist":
        sets["other modality (RetinaMNIST fundus)"] = (
            "unfamiliar",
            conf(npz_images(root / "retinamnist.npz")),
        )
    else:
        sets["other modality (BreastMNIST ultrasound)"] = (
            "unfamiliar",
            conf(npz_images(root / "breastmnist.npz")),
        )
    for name, imgs in natural_images().items():
        sets[name] = ("unfamiliar", conf(imgs))
    shape = (64, *test_imgs.shape[1:])
    sets["uniform noise"] = ("unfamiliar", rng.integers(0, 256, shape, dtype=np.uint8))
    sets["test split + Gaussian noise (sigma 25)"] = ("corrupted", noisy)

    # lowshot's score: the frozen starting backbone's kNN distance; its yardstick from validation alone,
    # training leave-one-out alone, or both (what lowshot uses); against the fine-tuned backbone's own kNN
    # distance (fine-tunes) and the maximum softmax probability.
    ref = run.reference
    emb_val = torch.from_numpy(val["embedding"])
    yard = {
        "val": lambda k: inference.knn_distance(emb_val, ref, k),
        "train LOO": lambda k: inference.loo_distance(ref, k),
    }
    scorers = {}
    for k in KS:
        for yname, parts in (
            ("val + train LOO", ("val", "train LOO")),
            ("val", ("val",)),
            ("train LOO", ("train LOO",)),
        ):
            if k != inference.OOD_K and yname != "val + train LOO":
                continue
            vd = np.sort(np.concatenate([yard[p](k) for p in parts]))
            scorers[f"kNN k={k}, start, {yname}"] = (
                vd,
                lambda s, k=k: inference.knn_distance(torch.from_numpy(s["embedding"]), ref, k),
            )
    if job == "finetune":  # the fine-tuned backbone's own embedding, as lowshot first did
        own = torch.nn.functional.normalize(
            torch.from_numpy(inference.score(run, store.images[store.indices("train")])["model_embedding"]),
            dim=1,
        )
        vd = np.sort(inference.knn_distance(torch.from_numpy(val["model_embedding"]), own, inference.OOD_K))
        scorers["kNN k=5, fine-tuned, val"] = (
            vd,
            lambda s: inference.knn_distance(torch.from_numpy(s["model_embedding"]), own, inference.OOD_K),
        )
    scorers["max softmax prob., val"] = (np.sort(-val["prob_raw"].max(1)), lambda s: -s["prob_raw"].max(1))
    scored = {name: inference.score(run, imgs) for name, (_, imgs) in sets.items()}  # once per set
    rows = []
    for sname, (vd, fn) in scorers.items():
        thr = np.quantile(vd, inference.OOD_PERCENTILE / 100)
        t_score = fn(test)
        fp = int((t_score > thr).sum())
        rows.append({"data": data, "job": job, "scorer": sname, "set": "in distribution (test split)", "kind": "familiar",
                     "n": len(t_score), "flagged": fp, "auroc": float("nan"), "precision": float("nan")})  # fmt: skip
        for name, (kind, _) in sets.items():
            x = fn(scored[name])
            tp = int((x > thr).sum())
            y = np.r_[np.zeros(len(t_score), int), np.ones(len(x), int)]
            sc = np.r_[t_score, x]
            au = auroc(y, np.c_[-sc, sc])  # ranks by the score (column 1); values need not be probabilities
            rows.append({"data": data, "job": job, "scorer": sname, "set": name, "kind": kind, "n": len(x),
                         "flagged": tp, "auroc": float(au), "precision": tp / (tp + fp) if tp + fp else float("nan")})  # fmt: skip
    return rows


def table(rows: list[dict]) -> str:
    out = [
        "# Is this image unlike the training data? (`lowshot predict`'s flag)",
        "",
        "Generated by `bench/ood.py` (the docstring says how). Flagged: share above the 95th percentile of the",
        "validation images' score [Wilson 95% CI]; for familiar sets that is the false-alarm rate (5% by design),",
        "for unfamiliar ones the recall. AUROC: the score separating the set from the test split. Precision: on",
        "the test split + that set. lowshot uses kNN k=5.",
        "",
    ]
    for data, job in dict.fromkeys((r["data"], r["job"]) for r in rows):
        out += [
            f"## {data}, {job}",
            "",
            "| set | kind | n | scorer | flagged | AUROC | precision |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in (r for r in rows if r["data"] == data and r["job"] == job):
            lo, hi = wilson(r["flagged"], r["n"])
            f = f"{r['flagged'] / r['n']:.2f} [{lo:.2f}, {hi:.2f}]"
            au = "" if math.isnan(r["auroc"]) else f"{r['auroc']:.3f}"
            pr = "" if math.isnan(r["precision"]) else f"{r['precision']:.2f}"
            out.append(f"| {r['set']} | {r['kind']} | {r['n']} | {r['scorer']} | {f} | {au} | {pr} |")
        out.append("")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", nargs="+", default=list(DATA), choices=list(DATA))
    ap.add_argument("--jobs", nargs="+", default=["probe", "finetune"], choices=["probe", "finetune"])
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=20)
    a = ap.parse_args()
    os.environ.setdefault("WANDB_MODE", "offline")
    rows = [r for d in a.data for j in a.jobs for r in measure(d, j, a)]
    OUT.mkdir(parents=True, exist_ok=True)
    sha = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO
    ).stdout.strip()
    (OUT / "table.json").write_text(json.dumps({"git_sha": sha, "args": vars(a), "rows": rows}, indent=1))
    (OUT / "table.md").write_text(
        table(rows) + f"\nAt git {sha}; command: `python bench/ood.py {' '.join(sys.argv[1:])}`\n"
    )
    print(table(rows))


if __name__ == "__main__":
    main()
