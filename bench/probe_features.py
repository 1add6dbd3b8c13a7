"""Which feature normalisation should the linear probe use, at every label count?

    LOWSHOT_DATA_ROOT=../shared/data python bench/probe_features.py --runs DIR [--draws 10]
        [--data breastmnist busi retinamnist] [--render]

The probe (``finetune/train.py --probe``, the quickstart's verdict, the label-efficiency tables) is
logistic regression on frozen embeddings with its L2 strength chosen on validation AUROC. How the
features are normalised before it decides whether it survives a handful of labels: a standard scaler
fitted on the K labelled images blows up a feature that happens to be near-constant among them
(issue 38: a held-out chest X-ray set, 20 labels, val AUROC 0.58 instead of 0.96). Estimators compared,
each with C chosen on the validation split from ``train.probe_cs``, on the same label draws:

- ``labelled``: the old probe, standardised with the labelled images' mean and standard deviation;
- ``raw``: no normalisation;
- ``simpleshot``: SimpleShot's CL2N (Wang et al. 2019): centred by the mean of the label-free images,
  L2-normalised, times sqrt(D) so that the C grid means the same as on standardised features;
- ``label-free``: standardised with the mean and standard deviation of every image the probe sees
  without labels (the whole training split, labelled or not, and the validation split; never the test);
- ``label-free, floor``: the same with each standard deviation floored at a tenth of their median (the
  shipped probe, lowshot.probe).

Backbones: the quickstart's two (SimCLR ResNet-18 from scratch, 50 epochs, 32 px, the checkpoint of an
``ssl/pretrain.py`` run under ``--runs``, named ``simclr-{DATA}``; ImageNet EfficientNet-Lite0 at 64 px).
K = 1, 5, 10, 20 labels per class (``--draws`` seeded draws each, the same for every estimator) and all.
Paired differences over draws, mean with a t-interval. Writes bench/results/probe_features/{table.md,
results.json}, headed by the command and the commit.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from lowshot.config import parse_args
from lowshot.data import draw_per_class, load_store
from lowshot.evaluation import auroc, mean_ci
from lowshot.models import backbone_for, cached_embeddings
from lowshot.probe import label_free_scaler
from lowshot.tracking import make_accelerator

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "results" / "probe_features"
CONFIGS = {
    "breastmnist": [],
    "busi": ["--config", "configs/busi.yaml"],
    "retinamnist": ["--config", "configs/retinamnist.yaml"],
}
KS = (1, 5, 10, 20, 0)
ESTIMATORS = ("labelled", "raw", "simpleshot", "label-free", "label-free, floor")


def transform(name: str, x: np.ndarray, pick: np.ndarray, free: np.ndarray) -> np.ndarray:
    """(N, D) features of every image as the estimator ``name`` feeds them to the regression."""
    if name == "labelled":
        return StandardScaler().fit(x[pick]).transform(x)
    if name == "raw":
        return x
    if name == "simpleshot":
        c = x - x[free].mean(0)
        return c / np.linalg.norm(c, axis=1, keepdims=True).clip(1e-12) * np.sqrt(x.shape[1])
    if name == "label-free":
        return StandardScaler().fit(x[free]).transform(x)
    return label_free_scaler(x[free]).transform(x)


def probe_test_auroc(
    z: np.ndarray, y: np.ndarray, pick: np.ndarray, val: np.ndarray, test: np.ndarray, cs: list[float]
) -> tuple[float, float]:
    """(test AUROC, C) of the probe whose C has the best validation AUROC (ties: the smaller C)."""
    best = (-np.inf, None, 0.0)
    for c in sorted(cs):
        clf = LogisticRegression(C=c, max_iter=2000, random_state=0).fit(z[pick], y[pick])
        prob = np.zeros((len(y), int(y.max()) + 1))
        prob[:, clf.classes_] = clf.predict_proba(z)
        s = auroc(y[val], prob[val])
        s = -1.0 if np.isnan(s) else s
        if s > best[0] + 1e-12:
            best = (s, prob, c)
    return auroc(y[test], best[1][test]), best[2]


def embeddings(
    data: str, route: str, runs: Path
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray], list[float]]:
    """(N, D) embeddings, (N,) labels, split rows and the probe's C grid of one set and backbone, through
    the same store (duplicates dropped as the quickstart does) and cache as finetune/train.py --probe."""
    over = ["check.leakage=drop", "track.log_with=none"]
    if route == "simclr":
        over += [f"model.weights={runs / f'simclr-{data}' / 'checkpoint'}"]
    else:
        over += ["model.name=tf_efficientnet_lite0", "model.weights=efficientnet-lite0", "data.size=64"]
        over += ["model.small_input_stem=false"]
    cfg, _ = parse_args([*CONFIGS[data], *over])
    from lowshot.data.guards import leakage_guard

    store = load_store(cfg.data)
    leakage_guard(store, cfg)
    backbone, in_chans, norm = backbone_for(cfg, store.grayscale)
    backbone.requires_grad_(False)
    feats, _ = cached_embeddings(cfg, store, backbone, in_chans, norm, make_accelerator(cfg))
    rows = {s: store.indices(s) for s in ("train", "val", "test")}
    return feats.numpy().astype(np.float64), store.labels, rows, list(cfg.train.probe_cs)


def measure(data: str, route: str, runs: Path, draws: int) -> dict:
    x, y, rows, cs = embeddings(data, route, runs)
    free = np.concatenate([rows["train"], rows["val"]])  # label-free: every image but the sealed test split
    out: dict = {"n": {s: len(r) for s, r in rows.items()}, "dim": x.shape[1], "by_k": {}}
    z_fixed = {e: transform(e, x, rows["train"], free) for e in ESTIMATORS if e != "labelled"}
    for k in KS:
        res: dict[str, list[float]] = {e: [] for e in ESTIMATORS}
        for d in range(draws if k else 1):
            pick = draw_per_class(y, rows["train"], k, [0, k, d])
            for e in ESTIMATORS:
                z = transform(e, x, pick, free) if e == "labelled" else z_fixed[e]
                res[e].append(probe_test_auroc(z, y, pick, rows["val"], rows["test"], cs)[0])
        out["by_k"][str(k)] = res
        print(data, route, k, {e: round(float(np.mean(v)), 4) for e, v in res.items()}, flush=True)
    return out


def ci(values: list[float]) -> str:
    s = mean_ci(values)
    return f"{s['mean']:+.3f} [{s['low']:+.3f}, {s['high']:+.3f}]" if len(values) > 1 else f"{s['mean']:+.3f}"


def render(record: dict) -> str:
    lines = [
        f"<!-- {record['command']} @ {record['commit']} -->",
        "# The probe's feature normalisation at every label count",
        "",
        f"Command: `{record['command']}`, commit {record['commit']}, {record['date']}. Test AUROC, mean over "
        f"{record['draws']} label draws per K (the same draws for every estimator), C chosen on validation AUROC. "
        "Δ columns: paired differences over draws, mean [95% t-interval].",
        "",
    ]
    for data, by_route in record["results"].items():
        for route, r in by_route.items():
            lines += [
                f"## {data}, {route} ({r['dim']} features; train {r['n']['train']}, val {r['n']['val']}, test {r['n']['test']})",
                "",
                "| labels/class | "
                + " | ".join(ESTIMATORS)
                + " | shipped − labelled | shipped − the better of raw, simpleshot |",
                "|---|" + "---|" * (len(ESTIMATORS) + 2),
            ]
            for k, res in r["by_k"].items():
                ship = np.asarray(res["label-free, floor"])
                # the better of the two alternatives on average over the draws (the yardstick)
                other = np.asarray(max(res["raw"], res["simpleshot"], key=np.mean))
                cells = [f"{np.mean(res[e]):.3f}" for e in ESTIMATORS]
                lines.append(
                    f"| {k if k != '0' else 'all'} | "
                    + " | ".join(cells)
                    + f" | {ci(list(ship - np.asarray(res['labelled'])))} | {ci(list(ship - other))} |"
                )
            lines.append("")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=Path, default=Path("runs"))
    p.add_argument("--draws", type=int, default=10)
    p.add_argument("--data", nargs="+", default=list(CONFIGS))
    p.add_argument("--render", action="store_true", help="rewrite table.md from the committed results.json")
    a = p.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    if a.render:
        record = json.loads((OUT / "results.json").read_text())
    else:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO
        )
        record = {
            "command": "python bench/probe_features.py " + " ".join(sys.argv[1:]),
            "commit": commit.stdout.strip(),
            "date": time.strftime("%Y-%m-%d"),
            "draws": a.draws,
            "results": {
                d: {r: measure(d, r, a.runs, a.draws) for r in ("simclr", "imagenet")} for d in a.data
            },
        }
        (OUT / "results.json").write_text(json.dumps(record, indent=1))
    (OUT / "table.md").write_text(render(record))
    print(render(record))


if __name__ == "__main__":
    main()
