"""Classification metrics with bootstrap confidence intervals, computed with scikit-learn.

With ~150 test images one image moves accuracy by ~0.6 points, so every number comes with a
percentile-bootstrap 95% CI over test images (Efron & Tibshirani, 1993). Resamples that lack a class
give no AUROC and are left out of that metric's interval (their count is reported).
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
)

log = logging.getLogger(__name__)


def auroc(y: np.ndarray, prob: np.ndarray) -> float:
    """Binary AUROC of class 1, or macro one-vs-rest AUROC for more classes; NaN if a class is absent.

    y: (N,) int labels; prob: (N, K) class probabilities (rows sum to 1).
    """
    k = prob.shape[1]
    present = np.unique(y)
    if len(present) < 2:
        return float("nan")
    if k == 2:
        return float(roc_auc_score(y, prob[:, 1]))
    if len(present) < k:
        return float("nan")
    return float(roc_auc_score(y, prob, multi_class="ovr", average="macro", labels=np.arange(k)))


def _scalars(y: np.ndarray, prob: np.ndarray) -> dict[str, float]:
    """Every scalar metric of one (resampled) prediction set."""
    k = prob.shape[1]
    pred = prob.argmax(1)
    labels = np.arange(k)
    cm = confusion_matrix(y, pred, labels=labels)
    prec, rec, f1, _ = precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    tn = cm.sum() - cm.sum(0) - cm.sum(1) + np.diag(cm)
    fp = cm.sum(0) - np.diag(cm)
    spec = np.divide(tn, tn + fp, out=np.full(k, np.nan), where=(tn + fp) > 0)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a resample can lack a class: expected, handled
        out = {
            "accuracy": float(accuracy_score(y, pred)),
            "balanced_accuracy": float(balanced_accuracy_score(y, pred)),
            "auroc": auroc(y, prob),
            "macro_f1": float(f1.mean()),
        }
    for c in range(k):
        out[f"class{c}.sensitivity"] = float(rec[c])  # = recall
        out[f"class{c}.specificity"] = float(spec[c])
        out[f"class{c}.precision"] = float(prec[c])
        out[f"class{c}.f1"] = float(f1[c])
    return out


def classification_report(
    y: np.ndarray,
    prob: np.ndarray,
    class_names: list[str],
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Metrics of ``prob`` (N, K) against labels ``y`` (N,), each with a bootstrap CI.

    Returns ``{"n", "metrics": {name: {"value", "low", "high"}}, "per_class": {class: {...}},
    "confusion_matrix", "degenerate", "predicted_counts"}``. ``degenerate`` is True when the
    predictor outputs one class for every image, which accuracy alone hides on imbalanced data.
    """
    y = np.asarray(y).astype(int)
    prob = np.asarray(prob, dtype=np.float64)
    if prob.ndim != 2 or len(prob) != len(y):
        raise ValueError(f"prob must be (N, K) with N = len(y) = {len(y)}; got {prob.shape}")
    k = prob.shape[1]
    point = _scalars(y, prob)
    rng = np.random.default_rng(seed)
    boots: dict[str, list[float]] = {m: [] for m in point}
    for _ in range(n_boot):
        idx = rng.integers(0, len(y), len(y))
        for m, v in _scalars(y[idx], prob[idx]).items():
            boots[m].append(v)
    alpha = (1.0 - ci) / 2.0
    intervals: dict[str, dict[str, float]] = {}
    for m, v in point.items():
        b = np.asarray(boots[m], dtype=np.float64)
        b = b[~np.isnan(b)]
        lo, hi = np.quantile(b, [alpha, 1.0 - alpha]) if len(b) else (np.nan, np.nan)
        intervals[m] = {"value": v, "low": float(lo), "high": float(hi)}
    pred = prob.argmax(1)
    counts = np.bincount(pred, minlength=k)
    degenerate = bool((counts > 0).sum() == 1)
    if degenerate:
        log.warning(
            "the model predicts '%s' for every one of the %d images: a degenerate classifier",
            class_names[int(counts.argmax())],
            len(y),
        )
    per_class = {
        name: {m.split(".", 1)[1]: intervals.pop(m) for m in list(intervals) if m.startswith(f"class{c}.")}
        for c, name in enumerate(class_names)
    }
    return {
        "n": len(y),
        "ci": ci,
        "n_boot": n_boot,
        "metrics": intervals,
        "per_class": per_class,
        "confusion_matrix": confusion_matrix(y, pred, labels=np.arange(k)).tolist(),
        "predicted_counts": counts.tolist(),
        "degenerate": degenerate,
    }


def format_report(report: dict[str, Any], title: str) -> str:
    """A short table of the headline metrics with their CIs, for the terminal."""
    lines = [f"{title} (n={report['n']}, {report['ci']:.0%} bootstrap CI)"]
    for m in ("auroc", "accuracy", "balanced_accuracy", "macro_f1"):
        r = report["metrics"][m]
        lines.append(f"  {m:<18} {r['value']:.3f}  [{r['low']:.3f}, {r['high']:.3f}]")
    for name, pc in report["per_class"].items():
        lines.append(
            f"  {name[:24]:<24} sens {pc['sensitivity']['value']:.2f}  spec {pc['specificity']['value']:.2f}  prec {pc['precision']['value']:.2f}"
        )
    if report["degenerate"]:
        lines.append("  WARNING: one class predicted for every image (degenerate classifier)")
    return "\n".join(lines)
