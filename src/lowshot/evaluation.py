"""The statistics of honest numbers on small test sets.

- Classification metrics (scikit-learn) with percentile-bootstrap CIs over test images (Efron &
  Tibshirani, 1993): with ~150 test images one image moves accuracy by ~0.6 points. Resamples that
  lack a class give no AUROC and are left out of that metric's interval.
- Calibration: expected calibration error over equal-width confidence bins and the Brier score;
  temperature scaling fitted on validation data only (Guo et al., 2017).
- Across runs (seeds, folds): mean, standard deviation and a Student-t CI of the mean.
- Two models on the same test images: a paired bootstrap of any metric's difference, and DeLong's
  test for two correlated AUROCs (DeLong et al., 1988, in Sun & Xu's 2014 fast form).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from scipy import optimize, stats
from sklearn.metrics import (
    confusion_matrix,
)

from .config import EvalConfig
from .operating_point import reweighted

log = logging.getLogger(__name__)


def _binary_auc(positive: np.ndarray, score: np.ndarray) -> float:
    """AUROC as the Mann-Whitney statistic: the share of (positive, negative) pairs ranked correctly,
    ties ½; NaN without both classes. Ranks instead of a ROC curve: ~20x faster inside a bootstrap."""
    n1 = int(positive.sum())
    n0 = len(positive) - n1
    if n1 == 0 or n0 == 0:
        return float("nan")
    ranks = stats.rankdata(score)
    return float((ranks[positive].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def auroc(y: np.ndarray, prob: np.ndarray) -> float:
    """Binary AUROC of class 1, or macro one-vs-rest AUROC for more classes (as scikit-learn's
    ``roc_auc_score(multi_class="ovr", average="macro")``); NaN if a class is absent.

    y: (N,) int labels; prob: (N, K) class probabilities (rows sum to 1).
    """
    k = prob.shape[1]
    present = np.unique(y)
    if len(present) < 2 or (k > 2 and len(present) < k):
        return float("nan")
    if k == 2:
        return _binary_auc(y == 1, prob[:, 1])
    return float(np.mean([_binary_auc(y == c, prob[:, c]) for c in range(k)]))


def _ece(y: np.ndarray, prob: np.ndarray, bins: int) -> tuple[float, np.ndarray]:
    """ECE and each image's confidence bin (bin b holds confidences in (b/bins, (b+1)/bins])."""
    conf = prob.max(1)
    which = np.clip(np.ceil(conf * bins).astype(int) - 1, 0, bins - 1)
    correct = (prob.argmax(1) == y).astype(float)
    gap = np.abs(
        np.bincount(which, correct, bins) - np.bincount(which, conf, bins)
    )  # per-bin |sum acc - sum conf|
    return float(gap.sum() / max(1, len(y))), which


def calibration(y: np.ndarray, prob: np.ndarray, bins: int = 15) -> dict[str, Any]:
    """Top-label calibration of ``prob`` (N, K) against ``y`` (N,).

    ECE = sum_b |B_b|/N * |accuracy(B_b) - mean confidence(B_b)| over ``bins`` equal-width bins of the
    top-class probability (Naeini et al., 2015; Guo et al., 2017). Brier = mean over images of
    sum_k (p_k - 1[y = k])^2 (0 is perfect, 2 the worst). NLL = mean -log p_y. ``bins`` lists each
    non-empty bin's range, mean confidence, accuracy and count, for the reliability diagram.
    """
    y = np.asarray(y).astype(int)
    conf, pred = prob.max(1), prob.argmax(1)
    ece, which = _ece(y, prob, bins)
    table = []
    for b in range(bins):
        m = which == b
        if m.any():
            acc, c = float((pred[m] == y[m]).mean()), float(conf[m].mean())
            table.append(
                {
                    "low": b / bins,
                    "high": (b + 1) / bins,
                    "confidence": c,
                    "accuracy": acc,
                    "n": int(m.sum()),
                }
            )
    onehot = np.eye(prob.shape[1])[y]
    return {
        "ece": float(ece),
        "brier": float(((prob - onehot) ** 2).sum(1).mean()),
        "nll": nll(prob, y),
        "bins": table,
    }


def nll(prob: np.ndarray, y: np.ndarray) -> float:
    """Mean negative log-likelihood -log p_y of (N, K) probabilities for (N,) labels (p clipped at 1e-12)."""
    return float(-np.log(np.clip(prob[np.arange(len(y)), np.asarray(y).astype(int)], 1e-12, None)).mean())


def with_temperature(prob: np.ndarray, t: float) -> np.ndarray:
    """softmax(log p / T), row-wise: the temperature-scaled probabilities (argmax and ranking kept)."""
    z = np.log(np.clip(prob, 1e-12, None)) / t
    z -= z.max(1, keepdims=True)
    e = np.exp(z)
    return np.asarray(e / e.sum(1, keepdims=True))


def fit_temperature(prob: np.ndarray, y: np.ndarray) -> float:
    """The T > 0 minimising validation NLL of softmax(log p / T) (Guo et al., 2017), T in [0.05, 20].

    log p equals the logits up to a per-row constant, which softmax ignores, so probabilities suffice."""
    y = np.asarray(y).astype(int)

    def loss(log_t: float) -> float:
        return nll(with_temperature(prob, float(np.exp(log_t))), y)

    res = optimize.minimize_scalar(loss, bounds=(np.log(0.05), np.log(20.0)), method="bounded")
    return float(np.exp(res.x))


def mean_ci(values: list[float] | np.ndarray, ci: float = 0.95) -> dict[str, float]:
    """Mean, sample standard deviation and Student-t CI of the mean over runs (seeds, folds, draws).

    One value gives a zero-width interval (no spread can be estimated from one run: read it as such)."""
    a = np.asarray(values, dtype=float)
    a = a[~np.isnan(a)]
    n = len(a)
    if n == 0:
        return {"mean": float("nan"), "std": float("nan"), "low": float("nan"), "high": float("nan"), "n": 0}
    sd = float(a.std(ddof=1)) if n > 1 else 0.0
    half = float(stats.t.ppf(0.5 + ci / 2, n - 1)) * sd / np.sqrt(n) if n > 1 else 0.0
    return {
        "mean": float(a.mean()),
        "std": sd,
        "low": float(a.mean()) - half,
        "high": float(a.mean()) + half,
        "n": n,
    }


def paired_bootstrap(
    y: np.ndarray,
    prob_a: np.ndarray,
    prob_b: np.ndarray,
    n_boot: int = 2000,
    ci: float = 0.95,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """B − A for every scalar metric, resampling the same test images for both models.

    Returns ``{metric: {"a", "b", "diff", "low", "high", "p"}}``; ``p`` is the two-sided bootstrap p-value
    of "no difference" (twice the smaller share of resampled differences on either side of 0)."""
    y = np.asarray(y).astype(int)
    pa, pb = _scalars(y, prob_a), _scalars(y, prob_b)
    names = [m for m in pa if "." not in m]  # the headline metrics, not per class
    rng = np.random.default_rng(seed)
    diffs: dict[str, list[float]] = {m: [] for m in names}
    for _ in range(n_boot):
        idx = rng.integers(0, len(y), len(y))
        a, b = _scalars(y[idx], prob_a[idx]), _scalars(y[idx], prob_b[idx])
        for m in names:
            diffs[m].append(b[m] - a[m])
    out = {}
    for m in names:
        d = np.asarray(diffs[m])
        d = d[~np.isnan(d)]
        lo, hi = np.quantile(d, [(1 - ci) / 2, (1 + ci) / 2]) if len(d) else (np.nan, np.nan)
        p = min(1.0, 2 * min((d <= 0).mean(), (d >= 0).mean())) if len(d) else float("nan")
        out[m] = {
            "a": pa[m],
            "b": pb[m],
            "diff": pb[m] - pa[m],
            "low": float(lo),
            "high": float(hi),
            "p": float(p),
        }
    return out


def delong(y: np.ndarray, score_a: np.ndarray, score_b: np.ndarray, ci: float = 0.95) -> dict[str, float]:
    """DeLong's test for two correlated binary AUROCs on the same images (Sun & Xu, 2014).

    y: (N,) in {0, 1}; score_*: (N,) scores of class 1. Returns the two AUROCs, diff = B − A, its standard
    error, a normal CI and the two-sided p-value."""
    y = np.asarray(y).astype(int)
    pos, neg = y == 1, y == 0
    m, n = int(pos.sum()), int(neg.sum())
    if m < 2 or n < 2:
        raise ValueError("DeLong needs at least two images of each class")
    v10, v01, aucs = [], [], []
    for s in (np.asarray(score_a, float), np.asarray(score_b, float)):
        x, z = s[pos], s[neg]
        # Midranks (ties count ½): V10_i = share of negatives below positive i, V01_j likewise.
        rx, rz, rall = stats.rankdata(x), stats.rankdata(z), stats.rankdata(np.concatenate([x, z]))
        v10.append((rall[:m] - rx) / n)
        v01.append(1.0 - (rall[m:] - rz) / m)
        aucs.append(float(v10[-1].mean()))
    s10, s01 = np.cov(np.stack(v10)), np.cov(np.stack(v01))  # (2, 2) each
    cov = s10 / m + s01 / n
    var = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    diff = aucs[1] - aucs[0]
    se = float(np.sqrt(max(var, 0.0)))
    zq = float(stats.norm.ppf(0.5 + ci / 2))
    p = float(2 * stats.norm.sf(abs(diff) / se)) if se > 0 else (1.0 if diff == 0 else 0.0)
    return {
        "auroc_a": aucs[0],
        "auroc_b": aucs[1],
        "diff": diff,
        "se": se,
        "low": diff - zq * se,
        "high": diff + zq * se,
        "p": p,
    }


def _scalars(y: np.ndarray, prob: np.ndarray) -> dict[str, float]:
    """Every scalar metric of one (resampled) prediction set, from its confusion matrix (the same
    definitions as scikit-learn's, with zero_division=0; about 0.5 ms, so 1000 resamples stay cheap)."""
    k = prob.shape[1]
    pred = prob.argmax(1)
    cm = np.bincount(y * k + pred, minlength=k * k).reshape(k, k)  # rows: truth, columns: prediction
    tp, support, predicted = np.diag(cm).astype(float), cm.sum(1), cm.sum(0)
    with np.errstate(all="ignore"):
        rec = np.where(support > 0, tp / support, 0.0)
        prec = np.where(predicted > 0, tp / predicted, 0.0)
        f1 = np.where(prec + rec > 0, 2 * prec * rec / (prec + rec), 0.0)
        tn, fp = len(y) - support - predicted + tp, predicted - tp
        spec = np.where(tn + fp > 0, tn / (tn + fp), np.nan)
    out = {
        "accuracy": float(tp.sum() / len(y)),
        "balanced_accuracy": float(rec[support > 0].mean()),  # over the classes present
        "auroc": auroc(y, prob),
        "macro_f1": float(f1.mean()),
        "ece": _ece(y, prob, 15)[0],
        "brier": float(((prob - np.eye(k)[y]) ** 2).sum(1).mean()),
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


def final_reports(
    val: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray] | None,
    class_names: list[str],
    cfg: EvalConfig,
    seed: int,
    point: dict[str, Any] | None = None,
    clean: np.ndarray | None = None,
) -> dict[str, Any]:
    """The selected model's validation and test reports, each ``(labels (N,), probabilities (N, K))``
    (no test: a selection-only run), and its calibration: a temperature fitted on validation only,
    test ECE/Brier/NLL without and with it. With an operating ``point`` (lowshot.operating_point, chosen on
    validation): also ``val_at_point``/``test_at_point``, the accuracy, balanced accuracy, F1 and per-class
    sensitivity/specificity of its decisions, with bootstrap CIs. With ``clean`` (bool over the test
    images: no verified copy in train or val): also ``test_clean``, the test report on those images only,
    with ``left_out``, how many had a copy (issue 41: BreastMNIST's official test split holds 125 copies)."""
    parts = {"val": val, **({"test": test} if test is not None else {})}
    out: dict[str, Any] = {
        name: classification_report(y, p, class_names, cfg.bootstrap, cfg.ci, seed)
        for name, (y, p) in parts.items()
    }
    cal: dict[str, Any] = {name: calibration(y, p, cfg.calibration_bins) for name, (y, p) in parts.items()}
    if cfg.temperature_scaling:
        t = fit_temperature(val[1], val[0])
        cal["temperature"] = t
        if test is not None:
            cal["test_scaled"] = calibration(test[0], with_temperature(test[1], t), cfg.calibration_bins)
    out["calibration"] = cal
    if test is not None and clean is not None:
        y, p = test[0][clean], test[1][clean]
        out["test_clean"] = classification_report(y, p, class_names, cfg.bootstrap, cfg.ci, seed)
        out["test_clean"]["left_out"] = int((~clean).sum())
    if point is not None:  # the decisions at the operating point chosen on validation
        out["operating_point"] = point
        for name, (y, p) in parts.items():
            r = classification_report(
                y, reweighted(p, point["weights"]), class_names, cfg.bootstrap, cfg.ci, seed
            )
            r["metrics"] = {m: r["metrics"][m] for m in AT_POINT}  # the threshold-free ones are unchanged
            out[f"{name}_at_point"] = r
    return out


# What an operating point changes (AUROC, ECE and Brier are properties of the probabilities, reported once).
AT_POINT = ("accuracy", "balanced_accuracy", "macro_f1")


def format_point(report: dict[str, Any], point: dict[str, Any], title: str) -> str:
    """The metrics at the operating point, for the terminal."""
    thr = f", threshold {point['threshold']:.3f} on P({point['positive']})" if "threshold" in point else ""
    lines = [f"{title} at the operating point ({point['rule']}{thr}, chosen on validation)"]
    if point.get("positive_from"):  # which class the sensitivity below is of, and how to name another
        lines.append(f"  positive class {point['positive']!r}: {point['positive_from']}")
    if point.get("why"):  # the rule used and why (the balanced rule's assumption checked on validation)
        lines.append(f"  {point['rule']}: {point['why']}")
    for m in AT_POINT:
        r = report["metrics"][m]
        lines.append(f"  {m:<18} {r['value']:.3f}  [{r['low']:.3f}, {r['high']:.3f}]")
    for name, pc in report["per_class"].items():
        s, sp = pc["sensitivity"], pc["specificity"]
        lines.append(
            f"  {name[:24]:<24} sens {s['value']:.2f} [{s['low']:.2f}, {s['high']:.2f}]  spec {sp['value']:.2f} [{sp['low']:.2f}, {sp['high']:.2f}]"
        )
    return "\n".join(lines)


def format_ci(m: dict[str, float]) -> str:
    """A metric ``{value, low, high}`` as ``0.872 [0.799, 0.930]``: the one way a number and its CI are
    written in tables and titles."""
    return f"{m['value']:.3f} [{m['low']:.3f}, {m['high']:.3f}]"


def format_clean(results: dict[str, Any]) -> str:
    """The test numbers on the images without a copy in train/val, beside the official ones (issue 41)."""
    r = results["test_clean"]
    shown = ", ".join(
        f"{m.replace('_', ' ')} {format_ci(r['metrics'][m])}" for m in ("auroc", "balanced_accuracy")
    )
    return f"  clean test (n={r['n']}; {r['left_out']} with a copy in train/val left out): {shown}"


def format_report(report: dict[str, Any], title: str) -> str:
    """A short table of the headline metrics with their CIs, for the terminal."""
    lines = [f"{title} (n={report['n']}, {report['ci']:.0%} bootstrap CI)"]
    for m in ("auroc", "accuracy", "balanced_accuracy", "macro_f1", "ece", "brier"):
        r = report["metrics"][m]
        lines.append(f"  {m:<18} {r['value']:.3f}  [{r['low']:.3f}, {r['high']:.3f}]")
    for name, pc in report["per_class"].items():
        lines.append(
            f"  {name[:24]:<24} sens {pc['sensitivity']['value']:.2f}  spec {pc['specificity']['value']:.2f}  prec {pc['precision']['value']:.2f}"
        )
    if report["degenerate"]:
        lines.append("  WARNING: one class predicted for every image (degenerate classifier)")
    return "\n".join(lines)
