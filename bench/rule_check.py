"""From how many validation images does the check of the balanced rule's assumption pay?

    python bench/rule_check.py [--reps 200]

The default operating point (``balanced``: w = -log pi_train, the 0.5 threshold under a class-balanced
label budget) is the Bayes decision for balanced accuracy only where the scores are calibrated to the
training prior. ``lowshot.operating_point.check_rule`` tests that on the validation split (a threshold
fitted out of fold against the rule, paired bootstrap) and fits the point on validation where the rule
loses. This simulation says how often the check switches and what that does on a large test split:

- scores of a good ranker (binormal, separation 2.5 sd, AUROC ~0.96), 62 % positives (the held-out chest
  X-ray test split of issue 38), logits shifted against the positive class by 0, 0.75 or 1.5 (0: calibrated,
  the rule is right; 1.5: the rule's 0.5 misses about a third of the positives, as issue 38's fine-tune did);
- validation splits of 20 to 640 images, ``--reps`` replications each; a test split of 5,000 images.

Cells: how often the check switched to the fitted point, and the test balanced accuracy of the point used
against the rule's own point (paired over replications: mean [95% t-interval]). Writes
bench/results/operating_point/rule_check.md and .json, headed by the command and commit.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from lowshot import operating_point as op
from lowshot.evaluation import mean_ci

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "results" / "operating_point"
NAMES = ["normal", "disease"]
SIZES = (20, 40, 80, 160, 320, 640)
SHIFTS = (0.0, 0.75, 1.5)


def scores(n: int, shift: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(N,) labels, 62 % class 1, and (N, 2) probabilities of a good ranker whose logits are shifted by
    ``shift`` against class 1 (a model trained on a uniform prior, miscalibrated towards class 0)."""
    y = (rng.random(n) < 0.62).astype(int)
    p1 = 1 / (1 + np.exp(-rng.normal(2.5 * y - 1.25 - shift, 1.0)))
    return y, np.stack([1 - p1, p1], 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=200)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    uniform = np.array([0.5, 0.5])
    rows = []
    for shift in SHIFTS:
        y_test, p_test = scores(5000, shift, rng)
        for n in SIZES:
            switched, used, rule = 0, [], []
            for _ in range(a.reps):
                y, p = scores(n, shift, rng)
                if len(np.unique(y)) < 2:
                    y[0] = 1 - y[0]
                point = op.choose(y, p, "balanced", uniform, NAMES, 1)
                switched += point["rule"] != "balanced"
                used.append(op.at_point(y_test, p_test, point)["balanced_accuracy"])
                rule.append(
                    op.at_point(y_test, p_test, {**point, "weights": [0.0, 0.0]})["balanced_accuracy"]
                )
            d = mean_ci(np.asarray(used) - np.asarray(rule))
            rows.append(
                {
                    "shift": shift,
                    "n_val": n,
                    "switched": switched / a.reps,
                    "test_bal_acc_rule": float(np.mean(rule)),
                    "test_bal_acc_used": float(np.mean(used)),
                    "diff": d["mean"],
                    "diff_low": d["low"],
                    "diff_high": d["high"],
                }
            )
            print(rows[-1], flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
    command = "python bench/rule_check.py " + " ".join(sys.argv[1:])
    lines = [
        f"<!-- {command} @ {commit.stdout.strip()} -->",
        "# The balanced rule's assumption, checked on validation",
        "",
        f"Command: `{command}`, commit {commit.stdout.strip()}, {time.strftime('%Y-%m-%d')}; {a.reps} replications "
        "per cell, test split of 5,000 images, 62 % positive, binormal scores (AUROC ~0.96).",
        "",
        "| logit shift | val images | check switched | test balanced accuracy, rule (0.5) | point used | used − rule [95% CI] |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['shift']:g} | {r['n_val']} | {r['switched']:.0%} | {r['test_bal_acc_rule']:.3f} | "
            f"{r['test_bal_acc_used']:.3f} | {r['diff']:+.3f} [{r['diff_low']:+.3f}, {r['diff_high']:+.3f}] |"
        )
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "rule_check.md").write_text("\n".join(lines) + "\n")
    (OUT / "rule_check.json").write_text(json.dumps({"command": command, "rows": rows}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
