"""Changes to the recommended recipe, screened on BreastMNIST's validation split only (the test split
stays sealed): which of them, if any, should be run on the test split against the standing target
(test AUROC >= 0.93 and accuracy >= 0.88, mean of 5 seeds; the recommended recipe has 0.907 / 0.878).

    LOWSHOT_DATA_ROOT=../shared/data python bench/recipe_screen.py [--runs DIR] [--jobs 2] [--only NAME ...]

Each candidate is configs/recipes/lowshot-recommended.yaml plus a few overrides, ``eval.test=false``, 3
seeds, launched as bench/recipes.py launches its runs (one thread each, ``--jobs`` side by side). The
table (bench/results/recipe_screen/screen.md, .json) gives per candidate the selected validation AUROC (the best
epoch's: optimistic by the same selection for every row) and the validation accuracy at that epoch, mean
± sd over seeds, and the difference to the recommended recipe paired by seed: mean with a Student-t 95%
CI over the seeds, and the number of seeds whose image-bootstrap 95% CI (78 validation images) excludes 0.
A candidate earns a test run only if its paired difference is > 0 with the t-CI excluding 0; the test
run is then a row of bench/recipes.py (5 seeds), so it is paired with the recommended recipe there.
The ensemble column averages a candidate's seeds (``lowshot ensemble``) and compares that with each
single seed of the recommended recipe: what averaging seeds, rather than a setting, is worth.
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from recipes import LAUNCH, REPO, run_one, slug  # bench/ is the script's directory: sys.path[0]

from lowshot.evaluation import mean_ci, paired_bootstrap

OUT = REPO / "bench" / "results" / "recipe_screen"
REFERENCE = "recommended"
SEEDS = 3
# name: overrides on top of lowshot-recommended.yaml (64 px Lite0, Adam 1e-3 constant, rotations, flips)
CANDIDATES: dict[str, list[str]] = {
    REFERENCE: [],
    "EMA 0.99": [
        "train.ema=0.99"
    ],  # timm ModelEmaV3 with its warmup (9 steps an epoch: decay ~0.96 by epoch 13)
    "EMA 0.998": ["train.ema=0.998"],  # with timm's warmup: the same run as 0.99 (train.ema_warmup)
    "EMA 0.99, no warmup": ["train.ema=0.99", "train.ema_warmup=false"],  # a ~100-step (11-epoch) average
    "EMA 0.97, no warmup": ["train.ema=0.97", "train.ema_warmup=false"],  # ~33 steps (4 epochs)
    "label smoothing 0.1": ["train.label_smoothing=0.1"],
    "mixup 0.2": ["train.mixup=0.2"],
    "brightness/contrast 0.2": ["train.brightness=0.2", "train.contrast=0.2"],
    "cosine, lr 3e-4": ["train.schedule=cosine", "train.lr=0.0003", "train.warmup_epochs=2"],
    "96 px": ["data.size=96"],
    "128 px": ["data.size=128"],
    "Lite1": ["model.name=tf_efficientnet_lite1", "model.weights=efficientnet-lite1"],
    "Lite2": ["model.name=tf_efficientnet_lite2", "model.weights=efficientnet-lite2"],
}


def command(name: str, seed: int, runs: Path) -> list[str]:
    return [
        *LAUNCH,
        "finetune/train.py",
        "--config",
        "configs/recipes/lowshot-recommended.yaml",
        "data.source=breastmnist.npz",
        *CANDIDATES[name],
        f"seed={seed}",
        f"out_dir={runs}",
        f"name={slug(name)}-seed{seed}",
        "track.group=breastmnist-screen",
        "eval.test=false",  # the point of a screen: the test split is not opened
        "train.eval_train=false",
        "check.leakage=drop",  # as bench/recipes.py: the official split's one image in train and test
    ]


def summarise(runs: Path) -> tuple[str, dict]:
    ref = {s: np.load(runs / f"{slug(REFERENCE)}-seed{s}" / "predictions.npz") for s in range(SEEDS)}
    table: dict = {}
    lines = [
        "| change to the recommended recipe | seeds | selected val AUROC mean ± sd | val accuracy mean ± sd "
        "| Δ val AUROC vs recommended [t-CI over seeds] | seeds whose paired image CI excludes 0 (> / <) "
        "| its seeds averaged (an ensemble): val AUROC, Δ vs the recommended single seeds (seeds whose CI > 0) | s a run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in CANDIDATES:
        res, diffs, above, below, secs, probs = [], [], 0, 0, [], []
        for s in range(SEEDS):
            d = runs / f"{slug(name)}-seed{s}"
            if not (d / "results.json").is_file():
                continue
            r = json.loads((d / "results.json").read_text())
            res.append(r)
            secs.append(
                json.loads((d / "timing.json").read_text())["s"] if (d / "timing.json").is_file() else np.nan
            )
            p = np.load(d / "predictions.npz")
            if not np.array_equal(p["val_path"], ref[s]["val_path"]):
                raise SystemExit(f"{d}: other validation images than the reference's")
            b = paired_bootstrap(p["val_y"], ref[s]["val_prob"], p["val_prob"], n_boot=1000, seed=s)["auroc"]
            diffs.append(b["diff"])
            probs.append(p["val_prob"])
            above += b["low"] > 0
            below += b["high"] < 0
        if not res:
            continue
        auc = mean_ci([r["selected"]["val_auroc"] for r in res])
        acc = mean_ci([r["val"]["metrics"]["accuracy"]["value"] for r in res])
        dd = mean_ci(diffs)
        # The candidate's seeds as one deep ensemble (lowshot ensemble: averaged probabilities), against each
        # single seed of the recommended recipe on the same images.
        y, ens = ref[0]["val_y"], np.mean(probs, axis=0)
        eb = [
            paired_bootstrap(y, ref[s]["val_prob"], ens, n_boot=1000, seed=s)["auroc"] for s in range(SEEDS)
        ]
        table[name] = {
            "overrides": CANDIDATES[name],
            "val_auroc": auc,
            "val_accuracy": acc,
            "diff_val_auroc": dd,
            "seeds_ci_above_0": int(above),
            "seeds_ci_below_0": int(below),
            "selected_epochs": [r["selected"]["epoch"] for r in res],
            "ensemble_val_auroc": eb[0]["b"],
            "ensemble_diff_vs_recommended_seeds": [x["diff"] for x in eb],
            "ensemble_seeds_ci_above_0": int(sum(x["low"] > 0 for x in eb)),
        }
        delta = "—" if name == REFERENCE else f"{dd['mean']:+.3f} [{dd['low']:+.3f}, {dd['high']:+.3f}]"
        lines.append(
            f"| {name} | {len(res)} | {auc['mean']:.3f} ± {auc['std']:.3f} | {acc['mean']:.3f} ± {acc['std']:.3f} "
            f"| {delta} | {'—' if name == REFERENCE else f'{above} / {below}'} "
            f"| {eb[0]['b']:.3f}, {np.mean([x['diff'] for x in eb]):+.3f} ({sum(x['low'] > 0 for x in eb)}/{SEEDS}) "
            f"| {np.nanmean(secs):.0f} |"
        )
    return "\n".join(lines), table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=Path, default=REPO / "runs" / "recipe-screen")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--only", nargs="+", default=None, help="candidate names (the reference always runs)")
    args = ap.parse_args()
    names = [REFERENCE, *[n for n in (args.only or CANDIDATES) if n != REFERENCE]]
    unknown = set(names) - set(CANDIDATES)
    if unknown:
        raise SystemExit(f"unknown candidates {sorted(unknown)}; known: {list(CANDIDATES)}")
    todo = [(n, s) for n in names for s in range(SEEDS)]

    def one(ns: tuple[str, int]) -> int:
        d = args.runs / f"{slug(ns[0])}-seed{ns[1]}"
        _, secs, rc = run_one(command(*ns, args.runs), d)
        if rc == 0 and secs > 0:  # wall time of this run (one thread, `--jobs` runs sharing the machine)
            (d / "timing.json").write_text(json.dumps({"s": round(secs, 1), "jobs": args.jobs}))
        return rc

    t = time.time()
    with ThreadPoolExecutor(args.jobs) as pool:
        failed = sum(rc != 0 for rc in pool.map(one, todo))
    text, table = summarise(args.runs)
    head = (
        "# Changes to the recommended recipe, screened on validation (BreastMNIST)\n\n"
        f"Made by `python bench/recipe_screen.py` ({time.strftime('%Y-%m-%d')}, 2 CPU cores, fp32, "
        f"{args.jobs} runs side by side on one thread each; this call took {time.time() - t:.0f} s). "
        "The test split was not opened. Validation: 78 images (21 malignant).\n\n"
    )
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "screen.md").write_text(head + text + "\n")
    (OUT / "screen.json").write_text(json.dumps(table, indent=1))
    print(head + text)
    if failed:
        raise SystemExit(f"{failed} runs failed: see the logs under {args.runs}")


if __name__ == "__main__":
    main()
