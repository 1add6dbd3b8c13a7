"""Which operating-point rule to use when the training labels' class mix is not the clinic's?

    LOWSHOT_DATA_ROOT=../shared/data python bench/operating_point.py [--data breastmnist retinamnist busi]
        [--size 64] [--draws 10] [--weights efficientnet-lite0]

A linear probe (finetune/train.py --probe: standardised embeddings, logistic regression with its L2
strength chosen on validation AUROC) on K labelled training images per class (a class-balanced label
budget: the training prior is uniform) and on every training label (the training split's own prior). On
each of ``--draws`` seeded draws every rule of lowshot.operating_point picks its point on the validation
split, and the test split is scored at it: accuracy, balanced accuracy, and the positive class's (the
rarest in validation) sensitivity and specificity. The sensitivity rule targets 0.9 on validation, so its
row shows what that target gives on test. Cells: mean over draws [95% t-interval]; Δ: paired against
argmax over draws. Embeddings come from lowshot's cache (one extraction per data set).
Writes bench/results/operating_point/table.md and table.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import set_seed

from lowshot import operating_point as op
from lowshot.config import parse_args
from lowshot.data import load_store
from lowshot.data.splits import draw_per_class
from lowshot.evaluation import mean_ci, paired_bootstrap
from lowshot.models import backbone_for, cached_embeddings
from lowshot.probe import fit_probe
from lowshot.tracking import make_accelerator

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "results" / "operating_point"
CONFIG = {
    "breastmnist": [],
    "retinamnist": ["--config", "configs/retinamnist.yaml"],
    "busi": ["--config", "configs/busi.yaml"],
}
METRICS = ("accuracy", "balanced_accuracy", "sensitivity", "specificity")


def measure(data: str, a: argparse.Namespace) -> list[dict]:
    args = [
        *CONFIG[data],
        f"data.size={a.size}",
        "model.name=tf_efficientnet_lite0",
        f"model.weights={a.weights}",
    ]
    cfg, _ = parse_args([*args, "track.log_with=none"])
    set_seed(cfg.seed)
    accelerator = make_accelerator(cfg)
    store = load_store(cfg.data)
    backbone, in_chans, norm = backbone_for(cfg, store.grayscale)
    backbone.requires_grad_(False)
    feats, _ = cached_embeddings(cfg, store, backbone, in_chans, norm, accelerator)
    x, labels = feats.numpy(), store.labels
    tr, va, te = (store.indices(s) for s in ("train", "val", "test"))
    k = store.num_classes
    # the finding where the set names one (BUSI's rarest class is "normal"), else the rarest class
    finding = "malignant" if "malignant" in store.classes else ""
    positive = op.positive_index(finding, store.classes, np.bincount(labels[va], minlength=k))
    rows = []
    for budget in a.budgets:
        per_rule: dict[str, dict[str, list[float]]] = {r: {m: [] for m in METRICS} for r in op.RULES}
        boot: dict[str, dict[str, dict[str, float]]] = {}
        for d in range(a.draws if budget else 1):
            pick = draw_per_class(labels, tr, budget, [cfg.seed, budget, d])
            free = x[np.concatenate([tr, va])]  # the shipped probe's label-free normalisation
            clf, _, _ = fit_probe(
                x[pick], labels[pick], x[va], labels[va], cfg.train.probe_cs, cfg.seed, free
            )
            pv, pt = clf.predict_proba(x[va]), clf.predict_proba(x[te])
            prior = op.training_prior(labels[pick], k, balanced=False)
            for rule in op.RULES:
                point = op.choose(labels[va], pv, rule, prior, store.classes, positive, None, 0.9)
                for m, v in op.at_point(labels[te], pt, point).items():
                    per_rule[rule][m].append(v)
                if not budget:  # one fit: the interval of a difference comes from resampling test images
                    boot[rule] = paired_bootstrap(labels[te], pt, op.reweighted(pt, point["weights"]), 1000)
        for rule, scores in per_rule.items():
            rows.append(
                {
                    "data": data,
                    "labels_per_class": budget,
                    "rule": rule,
                    "positive": store.classes[positive],
                    "n_val": len(va),
                    "n_test": len(te),
                    **{m: v for m, v in scores.items()},
                    **{f"delta_{m}": list(np.subtract(v, per_rule["argmax"][m])) for m, v in scores.items()},
                    **({"paired_bootstrap": {m: boot[rule][m] for m in METRICS[:2]}} if boot else {}),
                }
            )
    return rows


def delta(r: dict, m: str) -> str:
    if r["rule"] == "argmax":
        return "–"
    if "paired_bootstrap" in r:  # all labels: one fit, a paired bootstrap over the test images
        b = r["paired_bootstrap"][m]
        return f"{b['diff']:+.3f} [{b['low']:+.3f}, {b['high']:+.3f}]ᵇ"
    return cell(r[f"delta_{m}"], True)


def cell(v: list[float], signed: bool = False) -> str:
    f = "+.3f" if signed else ".3f"
    if len(v) < 2 or np.std(v) == 0:
        return format(float(np.mean(v)), f)
    s = mean_ci(v)
    return f"{format(s['mean'], f)} [{format(s['low'], f)}, {format(s['high'], f)}]"


def main() -> None:
    torch.set_num_threads(2)
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", nargs="*", default=["breastmnist", "retinamnist", "busi"])
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--draws", type=int, default=10)
    ap.add_argument("--budgets", type=int, nargs="*", default=[5, 20, 50, 0])
    ap.add_argument("--weights", default="efficientnet-lite0")
    a = ap.parse_args()
    rows = [r for d in a.data for r in measure(d, a)]
    head = "| data | labels/class | rule | accuracy | Δ accuracy vs argmax | balanced acc | Δ balanced acc vs argmax | sensitivity | specificity |"
    lines = [head, "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['data']} | {r['labels_per_class'] or 'all'} | {r['rule']} | {cell(r['accuracy'])} | "
            + delta(r, "accuracy")
            + f" | {cell(r['balanced_accuracy'])} | "
            + delta(r, "balanced_accuracy")
            + f" | {cell(r['sensitivity'])} | {cell(r['specificity'])} |"
        )
    sha = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout
    note = (
        f"\nLinear probe on ImageNet EfficientNet-Lite0 embeddings ({a.weights}) at {a.size} px, L2 strength chosen on "
        f"validation AUROC; K labels per class drawn {a.draws} times (all: one fit). Each rule picks its point on "
        "the validation split; test scored at it. Sensitivity/specificity: of 'malignant' (BreastMNIST, BUSI) or "
        "the validation split's rarest class (RetinaMNIST: grade 4). The sensitivity rule targets 0.9 on "
        "validation. Cells: mean over draws "
        f"[95% t-interval]; Δ paired over draws; ᵇ: all labels, one fit, so the Δ interval is a paired bootstrap over "
        f"the test images (1,000 resamples). git {sha.strip()}.\n"
    )
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "table.md").write_text("\n".join(lines) + "\n" + note)
    (OUT / "table.json").write_text(json.dumps(rows, indent=1))
    print("\n".join(lines) + "\n" + note)


if __name__ == "__main__":
    main()
