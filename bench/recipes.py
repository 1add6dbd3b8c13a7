"""The fine-tuning recipes of configs/recipes/ on BreastMNIST (official split) and BUSI (lowshot's grouped
split), several seeds each, and the recommended recipe, the ImageNet probe and seed ensembles on
RetinaMNIST (official split): runs what is missing, then prints and writes the results table.

    LOWSHOT_DATA_ROOT=../shared/data python bench/recipes.py [--runs DIR] [--jobs 2] [--only NAME ...]
        [--data breastmnist|busi|retinamnist ...]

Each run is ``accelerate launch --cpu --num_processes 1 finetune/train.py --config <recipe> seed=S`` on
one thread (``--jobs`` runs side by side; 2 on this 2-core machine). ImageNet recipes run with the
EfficientNet-Lite0 weights from PyPI (configs/recipes/offline-imagenet.yaml): the hub is unreachable
here. Writes bench/results/recipes/{table.md,table.json} and, per run, results.json, config.yaml,
meta.json, metrics.jsonl and predictions.npz under bench/results/recipes/runs/. The SimCLR rows first run
``ssl/pretrain.py`` once per (data set, seed) and start from that checkpoint (``model.weights=``). The
ensemble rows (ENSEMBLES) run their member recipe's further seeds and average them with ``lowshot.ensemble``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from lowshot.ensemble import MEMBERS, combine
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
        {"breastmnist": 5, "busi": 3, "retinamnist": 5},
    ),
    "gradual-llrd": ([R + "gradual-llrd.yaml"], [], {"breastmnist": 5, "busi": 3}),
    "Lite0 linear probe (cached)": (
        [*OFFLINE],
        ["--probe", "data.size=64"],
        {"breastmnist": 3, "busi": 3, "retinamnist": 3},
    ),
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
    # The SSL route (the quickstart's: SimCLR on ResNet-18 from random init, 50 epochs on the training
    # images, at the recipes' 64 px), then the recommended recipe from it, and a probe of it: pretrained
    # once per (data set, seed) by PRETRAIN below, before the runs that start from it.
    "SimCLR ResNet-18 + recommended fine-tune": (
        [R + "lowshot-recommended.yaml"],
        ["model.name=resnet18"],
        {"breastmnist": 3, "busi": 3},
    ),
    "SimCLR ResNet-18 linear probe (cached)": (
        [],
        ["--probe", "data.size=64", "model.name=resnet18"],
        {"breastmnist": 3, "busi": 3},
    ),
}
# recipe name -> (pretraining tag, ssl/pretrain.py overrides); the recipe's model.weights= is that checkpoint
SIMCLR_R18 = (
    "simclr-resnet18-50ep",
    ["model.name=resnet18", "model.weights=none", "ssl.epochs=50", "data.size=64"],
)
PRETRAIN = {
    "SimCLR ResNet-18 + recommended fine-tune": SIMCLR_R18,
    "SimCLR ResNet-18 linear probe (cached)": SIMCLR_R18,
}
# The row the paired differences refer to: the recommended recipe (configs/recipes/lowshot-recommended.yaml
# resolves to exactly this setting; tests/test_config.py checks it).
REFERENCE = "densenet121-transfer (as Lite0)"
# Deep ensembles (`lowshot ensemble`): row name -> (member recipe, members per ensemble, {data set: ensembles}).
# Ensemble k averages the member recipe's seeds k*m ... k*m + m - 1, so the first is made of the reference
# row's own seeds and every ensemble is paired with the reference seed k on the same test images.
ENSEMBLES: dict[str, tuple[str, int, dict[str, int]]] = {
    "recommended, ensemble of 5 seeds": (REFERENCE, 5, {"breastmnist": 5, "busi": 3, "retinamnist": 3}),
}
DATASETS = {
    "breastmnist": ["data.source=breastmnist.npz"],
    "busi": ["--config", "configs/busi.yaml"],
    # RGB fundus photographs, 5 grades (AUROC: one-vs-rest macro), official split: the recommended recipe,
    # the ImageNet probe and seed ensembles only
    "retinamnist": ["--config", "configs/retinamnist.yaml"],
}
METRICS = ("auroc", "balanced_accuracy", "accuracy")


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


LAUNCH = [
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
]


def pretrain_dir(name: str, data: str, seed: int, runs: Path) -> Path:
    return runs / data / f"pretrain-{PRETRAIN[name][0]}-seed{seed}"


def pretrain_command(name: str, data: str, seed: int, runs: Path) -> list[str]:
    d = pretrain_dir(name, data, seed, runs)
    return [
        *LAUNCH,
        "ssl/pretrain.py",
        *DATASETS[data],
        *PRETRAIN[name][1],
        f"seed={seed}",
        f"out_dir={d.parent}",
        f"name={d.name}",
        f"track.group={data}-pretrain-{PRETRAIN[name][0]}",
        "check.leakage=drop",  # as the fine-tunes: the official split's one image in both train and test
    ]


def command(name: str, data: str, seed: int, runs: Path) -> list[str]:
    configs, extra, _ = RECIPES[name]
    args = [a for c in configs for a in ("--config", c)] + DATASETS[data] + extra
    if name in PRETRAIN:
        args.append(f"model.weights={pretrain_dir(name, data, seed, runs) / 'checkpoint'}")
    return [
        *LAUNCH,
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
    done = run_dir / (
        "checkpoint/backbone.safetensors" if run_dir.name.startswith("pretrain-") else "results.json"
    )
    if done.is_file():
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


def summarise(runs: Path, kept: dict) -> tuple[str, dict]:
    """Markdown table and JSON: per data set and recipe, mean ± sd over seeds with a Student-t 95% CI of
    the mean, the mean per-run bootstrap 95% CI, the selected validation AUROC, and the recommended
    recipe's paired test-AUROC difference to each other recipe (same seed, same test images, bootstrap
    over images), averaged over seeds, with the number of seeds whose paired CI excludes zero. A recipe
    with no runs in ``runs`` keeps its row of ``kept`` (the committed table.json's table)."""
    table: dict = {}
    lines = []
    for data in DATASETS:
        lines += [
            f"\n### {data}\n",
            "| recipe | seeds | test AUROC mean ± sd [t-CI] | per-run bootstrap CI (mean) | balanced acc. mean ± sd [t-CI] | accuracy mean ± sd | selected val AUROC | Δ test AUROC, recommended (first row) − this (seeds whose paired 95% CI excludes 0) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        preds: dict = {}
        rows = {name: seeds for name, (_, _, seeds) in RECIPES.items()}
        rows |= {name: n for name, (_, _, n) in ENSEMBLES.items()}
        for name, seeds in rows.items():
            if data not in seeds:
                continue
            res = []
            for s in range(seeds[data]):
                d = runs / data / f"{slug(name)}-seed{s}"
                if (d / "results.json").is_file():
                    res.append(json.loads((d / "results.json").read_text()))
                    preds.setdefault(name, {})[s] = np.load(d / "predictions.npz")
            if not res:
                if name in kept.get(data, {}):
                    table.setdefault(data, {})[name] = {**kept[data][name], "kept": True}
                continue
            table.setdefault(data, {})[name] = {
                "test": {m: mean_ci([r["test"]["metrics"][m]["value"] for r in res]) for m in METRICS},
                "bootstrap_mean": {
                    m: (
                        float(np.mean([r["test"]["metrics"][m]["low"] for r in res])),
                        float(np.mean([r["test"]["metrics"][m]["high"] for r in res])),
                    )
                    for m in METRICS
                },
                "val_auroc": mean_ci([r["selected"]["val_auroc"] for r in res]),
                "seeds": len(res),
                # which images each split held (runs made before lowshot recorded it: None)
                "splits": res[0].get("splits"),
            }
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
            if diffs:
                d = float(np.mean([x["diff"] for x in diffs]))
                table[data][name]["paired_vs_recommended"] = {"mean_diff": d, "per_seed": diffs}
        # Kept rows were paired with the committed reference runs; if the reference, run again, does not
        # reproduce them, kept rows are marked, their Δ not shown. Why, where both recorded their splits:
        # another split (BUSI: the verified-duplicate grouping changed lowshot's split), or the same split
        # and other numbers (another processor or package versions; meta.json of the runs says which).
        ref_new, ref_old = table.get(data, {}).get(REFERENCE, {}), kept.get(data, {}).get(REFERENCE, {})
        stale = (
            bool(ref_new and ref_old) and not ref_new.get("kept") and ref_old.get("test") != ref_new["test"]
        )
        why = "the reference's split was not recorded then"
        if stale and ref_new.get("splits") and ref_old.get("splits"):
            why = (
                "another split (its split digests differ)"
                if ref_new["splits"] != ref_old["splits"]
                else "the same split (equal split digests): another processor or package versions"
            )
        for name, row in list(table.get(data, {}).items()):
            kept_row = row.pop("kept", False)
            # a kept row whose recorded split is not the reference's (an earlier call ran the reference again)
            other = bool(row.get("splits") and ref_new.get("splits") and row["splits"] != ref_new["splits"])
            if kept_row and (stale or other):
                row = table[data][name] = {**row, "other_split": True}
                stale, why = True, "another split (its split digests differ)" if other else why
        for name, row in table.get(data, {}).items():
            a, b, acc = (row["test"][m] for m in METRICS)
            boot = row["bootstrap_mean"]["auroc"]
            cell = "—"
            if "paired_vs_recommended" in row:  # mean paired difference over seeds; seeds whose CI excludes 0
                diffs = row["paired_vs_recommended"]["per_seed"]
                up, down = sum(x["low"] > 0 for x in diffs), sum(x["high"] < 0 for x in diffs)
                cell = f"{row['paired_vs_recommended']['mean_diff']:+.3f} (CI > 0: {up}/{len(diffs)}, < 0: {down}/{len(diffs)})"
            label = f"{name} = lowshot-recommended" if name == REFERENCE else name
            if row.get("other_split"):
                label, cell = f"{label} (earlier split †)", "— (other split)"
            lines.append(
                f"| {label} | {row['seeds']} | {a['mean']:.3f} ± {a['std']:.3f} [{a['low']:.3f}, {a['high']:.3f}] "
                f"| [{boot[0]:.3f}, {boot[1]:.3f}] "
                f"| {b['mean']:.3f} ± {b['std']:.3f} [{b['low']:.3f}, {b['high']:.3f}] "
                f"| {acc['mean']:.3f} ± {acc['std']:.3f} | {row['val_auroc']['mean']:.3f} | {cell} |"
            )
        if stale:
            lines.append(
                f"\n† Not run again: the committed row of {data}; the reference's runs above are not those it was "
                f"paired with ({why}), so these rows are not paired with the rows above."
            )
    return "\n".join(lines) + "\n", table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=Path, default=Path("runs/recipes"))
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--only", nargs="*", default=None, help="recipe names to run (default: all)")
    ap.add_argument(
        "--data", nargs="*", choices=list(DATASETS), default=None, help="data sets to run (default: all)"
    )
    args = ap.parse_args()
    runs = args.runs.resolve()
    jobs = [
        (name, data, s)
        for name, (_, _, seeds) in RECIPES.items()
        if args.only is None or name in args.only
        for data, n in seeds.items()
        if args.data is None or data in args.data
        for s in range(n)
    ]
    for name, (member, m, ensembles) in ENSEMBLES.items():  # the members' runs, then the ensembles below
        if args.only is None or name in args.only:
            jobs += [
                (member, data, s)
                for data, n in ensembles.items()
                if args.data is None or data in args.data
                for s in range(n * m)
                if (member, data, s) not in jobs
            ]
    todo = [(command(name, data, s, runs), runs / data / f"{slug(name)}-seed{s}") for name, data, s in jobs]
    # each SSL checkpoint once (a probe and a fine-tune share it), before the runs that start from it
    pretrain = {pretrain_dir(*j, runs): pretrain_command(*j, runs) for j in jobs if j[0] in PRETRAIN}
    t0 = time.time()
    with ThreadPoolExecutor(args.jobs) as pool:
        pre = list(pool.map(lambda d: run_one(pretrain[d], d), pretrain))
        if any(rc for _, _, rc in pre):
            sys.exit(f"failed pretraining (logs beside them): {[d.name for d, _, rc in pre if rc]}")
        done = list(pool.map(lambda job: run_one(*job), todo))
    failed = [d.name for d, _, rc in done if rc]
    for name, (member, m, ensembles) in ENSEMBLES.items():
        for data, n in ensembles.items():
            if (args.only is not None and name not in args.only) or (
                args.data is not None and data not in args.data
            ):
                continue
            for k in range(n):
                d = runs / data / f"{slug(name)}-seed{k}"
                members = [runs / data / f"{slug(member)}-seed{s}" for s in range(k * m, (k + 1) * m)]
                if not (d / "results.json").is_file() and all(
                    (x / "results.json").is_file() for x in members
                ):
                    combine(
                        members, d, shlex.join(["lowshot", "ensemble", *map(str, members), "--out", str(d)])
                    )
                    done.append((d, 0.0, 0))  # copied below with the runs; not counted as a run
    committed = OUT / "table.json"
    kept = json.loads(committed.read_text())["table"] if committed.is_file() else {}
    text, table = summarise(runs, kept)
    print(text)
    OUT.mkdir(parents=True, exist_ok=True)
    for d, _, rc in done:
        if rc == 0:
            dest = OUT / "runs" / d.parent.name / d.name
            dest.mkdir(parents=True, exist_ok=True)
            for f in (
                "results.json",
                "config.yaml",
                "meta.json",
                "metrics.jsonl",
                "predictions.npz",
                MEMBERS,
            ):
                if (d / f).is_file() and f.endswith((".json", ".yaml")):  # no paths of this machine
                    body = (d / f).read_text().replace(str(REPO), "<repo>")
                    (dest / f).write_text(body.replace(os.environ.get("LOWSHOT_DATA_ROOT") or "\0", "<data>"))
                elif (d / f).is_file():
                    shutil.copy(d / f, dest / f)
    ran = sum(1 for _, seconds, _ in done if seconds > 0)
    head = (
        "# Fine-tuning recipes: results\n\nMade by `python bench/recipes.py` "
        f"({time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPU cores, fp32; this call ran {ran} of {len(done)} runs and "
        f"{sum(1 for _, seconds, _ in pre if seconds > 0)} SSL pretrainings in {time.time() - t0:.0f} s, the rest were "
        "on disk; rows of recipes this call did not name are the committed table's). Every test number is its "
        "run's single opening of the test split. 64 px, EfficientNet-Lite0 ImageNet weights from PyPI where a "
        "recipe names hub weights; a linear probe of fixed weights is deterministic, so its seeds repeat one "
        "number; the SimCLR rows' seeds are pretraining seeds (SimCLR on ResNet-18 from random init, 50 epochs on "
        "the training images, lightly's NT-Xent, the data set's views). How these runs were made, and what they "
        "say: EXPERIMENTS.md.\n"
    )
    (OUT / "table.md").write_text(head + text)
    (OUT / "table.json").write_text(
        json.dumps(
            {
                "command": " ".join(sys.argv),
                "recipes": {k: v[:2] for k, v in RECIPES.items()},
                "pretrain": PRETRAIN,
                "ensembles": ENSEMBLES,
                "table": table,
            },
            indent=2,
        )
    )
    if failed:
        sys.exit(f"failed runs (logs beside them): {failed}")


if __name__ == "__main__":
    main()
