"""The fine-tuning recipes of configs/recipes/ on BreastMNIST (official split) and BUSI (lowshot's grouped
split), several seeds each: runs what is missing, then prints and writes the results table.

    LOWSHOT_DATA_ROOT=../shared/data python bench/recipes.py [--runs DIR] [--jobs 2] [--only NAME ...]

Each run is ``accelerate launch --cpu --num_processes 1 finetune/train.py --config <recipe> seed=S`` on
one thread (``--jobs`` runs side by side; 2 on this 2-core machine). ImageNet recipes run with the
EfficientNet-Lite0 weights from PyPI (configs/recipes/offline-imagenet.yaml): the hub is unreachable
here. Writes bench/results/recipes/{table.md,table.json} and, per run, results.json, config.yaml,
meta.json, metrics.jsonl and predictions.npz under bench/results/recipes/runs/.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from lowshot.evaluation import mean_ci, paired_bootstrap

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "results" / "recipes"
R = "configs/recipes/"
OFFLINE = [R + "offline-imagenet.yaml"]
DROP = [R + "dropout.yaml"]
# name: (config files, extra overrides, seeds per data set)
RECIPES: dict[str, tuple[list[str], list[str], dict[str, int]]] = {  # run in this order
    "densenet121-transfer (as Lite0)": (  # the same settings as lowshot-recommended.yaml
        [R + "densenet121-transfer.yaml", *OFFLINE],
        [],
        {"breastmnist": 5, "busi": 3},
    ),
    "gradual-llrd": ([R + "gradual-llrd.yaml"], [], {"breastmnist": 5, "busi": 3}),
    "Lite0 linear probe (cached)": ([*OFFLINE], ["--probe", "data.size=64"], {"breastmnist": 3, "busi": 3}),
    "resnext50-sgd-steplr (as Lite0)": (
        [R + "resnext50-sgd-steplr.yaml", *OFFLINE],
        [],
        {"breastmnist": 3, "busi": 3},
    ),
    "freeze-unfreeze (as Lite0)": ([R + "freeze-unfreeze.yaml", *OFFLINE], [], {"breastmnist": 3, "busi": 3}),
    "small-cnn": ([R + "small-cnn.yaml"], [], {"breastmnist": 3, "busi": 3}),
    "resnet18-scratch": ([R + "resnet18-scratch.yaml"], [], {"breastmnist": 3, "busi": 3}),
    "densenet121-transfer (as Lite0) + dropout": (
        [R + "densenet121-transfer.yaml", *OFFLINE, *DROP],
        [],
        {"breastmnist": 3},
    ),
    "resnext50-sgd-steplr (as Lite0) + dropout": (
        [R + "resnext50-sgd-steplr.yaml", *OFFLINE, *DROP],
        [],
        {"breastmnist": 3},
    ),
    "small-cnn + dropout": ([R + "small-cnn.yaml", *DROP], [], {"breastmnist": 3}),
    "resnet18-scratch + dropout": ([R + "resnet18-scratch.yaml", *DROP], [], {"breastmnist": 3}),
}
# The row the paired differences refer to: the recommended recipe (configs/recipes/lowshot-recommended.yaml
# resolves to exactly this setting; tests/test_config.py checks it).
REFERENCE = "densenet121-transfer (as Lite0)"
DATASETS = {"breastmnist": ["data.source=breastmnist.npz"], "busi": ["--config", "configs/busi.yaml"]}
METRICS = ("auroc", "balanced_accuracy", "accuracy")


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


def command(name: str, data: str, seed: int, runs: Path) -> list[str]:
    configs, extra, _ = RECIPES[name]
    args = [a for c in configs for a in ("--config", c)] + DATASETS[data] + extra
    return [
        *[
            "accelerate",
            "launch",
            "--cpu",
            "--num_processes",
            "1",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
        ],
        "finetune/train.py",
        *args,
        f"seed={seed}",
        f"out_dir={runs / data}",
        f"name={slug(name)}-seed{seed}",
        f"track.group={data}-{slug(name)}",
        "train.eval_train=false",  # saves ~10% of the time; changes no weight (but later shuffles, see EXPERIMENTS.md)
        "check.leakage=drop",  # BreastMNIST's official split holds one image twice across train/test
        "data.augment_path=per_image",  # as the table was made (auto meant per_image on CPU then)
    ]


def run_one(cmd: list[str], run_dir: Path) -> tuple[Path, float, int]:
    if (run_dir / "results.json").is_file():
        return run_dir, 0.0, 0
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "WANDB_MODE": os.environ.get("WANDB_MODE", "offline"),
        "WANDB_SILENT": "true",
    }
    t = time.time()
    with open(run_dir.parent / f"{run_dir.name}.log", "w") as log:
        rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    print(f"{'ok ' if rc == 0 else 'FAILED'} {run_dir.name} ({time.time() - t:.0f} s)", flush=True)
    return run_dir, time.time() - t, rc


def summarise(runs: Path) -> tuple[str, dict]:
    """Markdown table and JSON: per data set and recipe, mean ± sd over seeds with a Student-t 95% CI of
    the mean, the mean per-run bootstrap 95% CI, the selected validation AUROC, and the recommended
    recipe's paired test-AUROC difference to each other recipe (same seed, same test images, bootstrap
    over images), averaged over seeds, with the number of seeds whose paired CI excludes zero."""
    table: dict = {}
    lines = []
    for data in DATASETS:
        lines += [
            f"\n### {data}\n",
            "| recipe | seeds | test AUROC mean ± sd [t-CI] | per-run bootstrap CI (mean) | balanced acc. mean ± sd [t-CI] | accuracy mean ± sd | selected val AUROC | Δ test AUROC, recommended (first row) − this (seeds whose paired 95% CI excludes 0) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        preds = {}
        for name, (_, _, seeds) in RECIPES.items():
            if data not in seeds:
                continue
            res = []
            for s in range(seeds[data]):
                d = runs / data / f"{slug(name)}-seed{s}"
                if (d / "results.json").is_file():
                    res.append(json.loads((d / "results.json").read_text()))
                    preds.setdefault(name, {})[s] = np.load(d / "predictions.npz")
            if not res:
                continue
            row = {m: mean_ci([r["test"]["metrics"][m]["value"] for r in res]) for m in METRICS}
            boot = {
                m: (
                    float(np.mean([r["test"]["metrics"][m]["low"] for r in res])),
                    float(np.mean([r["test"]["metrics"][m]["high"] for r in res])),
                )
                for m in METRICS
            }
            val = mean_ci([r["selected"]["val_auroc"] for r in res])
            table.setdefault(data, {})[name] = {
                "test": row,
                "bootstrap_mean": boot,
                "val_auroc": val,
                "seeds": len(res),
            }
            a, b = row["auroc"], row["balanced_accuracy"]
            label = f"{name} = lowshot-recommended" if name == REFERENCE else name
            lines.append(
                f"| {label} | {len(res)} | {a['mean']:.3f} ± {a['std']:.3f} [{a['low']:.3f}, {a['high']:.3f}] "
                f"| [{boot['auroc'][0]:.3f}, {boot['auroc'][1]:.3f}] "
                f"| {b['mean']:.3f} ± {b['std']:.3f} [{b['low']:.3f}, {b['high']:.3f}] "
                f"| {row['accuracy']['mean']:.3f} ± {row['accuracy']['std']:.3f} | {val['mean']:.3f} | DIFF:{name} |"
            )
        rec = preds.get(REFERENCE, {})
        for name, per_seed in preds.items():
            diffs = []
            for s, p in per_seed.items():
                if name == REFERENCE or s not in rec:
                    continue
                assert (rec[s]["test_path"] == p["test_path"]).all(), "different test images: not paired"
                # B - A with A = this recipe, B = the recommended one, on the same images and seed
                diffs.append(
                    paired_bootstrap(p["test_y"], p["test_prob"], rec[s]["test_prob"], n_boot=1000, seed=s)[
                        "auroc"
                    ]
                )
            cell = "—"
            if diffs:  # mean paired difference over seeds; how many seeds' paired CIs exclude 0 either way
                d = float(np.mean([x["diff"] for x in diffs]))
                up, down = sum(x["low"] > 0 for x in diffs), sum(x["high"] < 0 for x in diffs)
                cell = f"{d:+.3f} (CI > 0: {up}/{len(diffs)}, < 0: {down}/{len(diffs)})"
                table[data][name]["paired_vs_recommended"] = {"mean_diff": d, "per_seed": diffs}
            lines = [line.replace(f"DIFF:{name} |", f"{cell} |") for line in lines]
    return "\n".join(lines) + "\n", table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=Path, default=Path("runs/recipes"))
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--only", nargs="*", default=None, help="recipe names to run (default: all)")
    args = ap.parse_args()
    runs = args.runs.resolve()
    todo = [
        (command(name, data, s, runs), runs / data / f"{slug(name)}-seed{s}")
        for name, (_, _, seeds) in RECIPES.items()
        if args.only is None or name in args.only
        for data, n in seeds.items()
        for s in range(n)
    ]
    t0 = time.time()
    with ThreadPoolExecutor(args.jobs) as pool:
        done = list(pool.map(lambda job: run_one(*job), todo))
    failed = [d.name for d, _, rc in done if rc]
    text, table = summarise(runs)
    print(text)
    OUT.mkdir(parents=True, exist_ok=True)
    for d, _, rc in done:
        if rc == 0:
            dest = OUT / "runs" / d.parent.name / d.name
            dest.mkdir(parents=True, exist_ok=True)
            for f in ("results.json", "config.yaml", "meta.json", "metrics.jsonl", "predictions.npz"):
                if (d / f).is_file():
                    shutil.copy(d / f, dest / f)
    ran = sum(1 for _, seconds, _ in done if seconds > 0)
    head = (
        "# Fine-tuning recipes: results\n\nMade by `python bench/recipes.py` "
        f"({time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPU cores, fp32; this call ran {ran} of {len(done)} runs in "
        f"{time.time() - t0:.0f} s, the rest were on disk). Every test number is its run's single opening of the "
        "test split. 64 px, EfficientNet-Lite0 ImageNet weights from PyPI where a recipe names hub weights; "
        "a linear probe of fixed weights is deterministic, so its seeds repeat one number. How these runs were "
        "made, and what they say: EXPERIMENTS.md.\n"
    )
    (OUT / "table.md").write_text(head + text)
    (OUT / "table.json").write_text(
        json.dumps(
            {
                "command": " ".join(sys.argv),
                "recipes": {k: v[:2] for k, v in RECIPES.items()},
                "table": table,
            },
            indent=2,
        )
    )
    if failed:
        sys.exit(f"failed runs (logs beside them): {failed}")


if __name__ == "__main__":
    main()
