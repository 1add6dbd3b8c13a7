"""The operating point: which class a probability vector is called, chosen on validation.

A classifier trained on a class mix unlike the one it will meet puts the 0.5 (argmax) threshold in the
wrong place: a label budget of K images per class, a class-weighted loss or a balanced sampler all train
on a uniform prior, while the clinic's images come at their own prevalence. AUROC does not see this;
accuracy, sensitivity and specificity do. Every rule here is one vector of per-class log-weights ``w``
(K,): the decision is ``argmax_c(log p_c + w_c)``, so a binary rule is a threshold on the positive
class's probability, ``p_pos >= sigmoid(w_neg - w_pos)``, and every rule applies to K classes alike.

Rules (``eval.operating_point``; bench/results/operating_point/table.md measures them):

- ``argmax``: w = 0, the 0.5 threshold for two classes.
- ``balanced`` (default): w = -log(pi_train), the Bayes decision for balanced accuracy (every class's
  sensitivity weighs the same, whatever its prevalence). pi_train is the prior the model was fitted on:
  the training labels' frequencies, uniform under a K-per-class label budget, a class-weighted loss or a
  balanced sampler (where the rule is argmax). Nothing is fitted on validation labels, but the rule's
  assumption, scores calibrated to pi_train, is checked on them (``check_rule``): where a threshold fitted
  on part of the validation split beats the rule on the rest, out of fold, by a paired 95% CI above 0, the
  assumption failed (a fine-tune on 20 chest X-rays called 38 % of the diseased validation images normal
  at 0.5) and the point is fitted on validation instead (``youden``), the record saying so and why.
- ``prior``: Bayes' rule for a change of prior (Saerens, Latinne & Decaestecker, Neural Computation
  2002): w = log(pi_deploy / pi_train), pi_deploy the user's ``eval.prior`` (the clinic's prevalence) or
  the validation split's frequencies: the most accurate decisions at that prevalence, at the cost of the
  rare classes' sensitivity.
- ``youden``: w maximising validation balanced accuracy (for two classes Youden's J = sensitivity +
  specificity - 1, Youden 1950), by coordinate search; fitted on a small validation split it overfits
  (measured below ``balanced``).
- ``sensitivity``: the largest positive-class weight whose validation sensitivity for
  ``eval.positive_class`` is at least ``eval.target_sensitivity`` (a screening setting: "miss at most
  1 malignant in 10"), the other classes' weights 0.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from .config import EvalConfig
from .data.cache import write_atomic

RULES = ("argmax", "balanced", "prior", "youden", "sensitivity")
FILE = "operating_point.json"
_EPS = 1e-12
# The rule check's folds; a class needs CHECK_FOLDS validation images for it (fewer: the check is skipped).
CHECK_FOLDS = 5


def decide(prob: np.ndarray, weights: np.ndarray | list[float]) -> np.ndarray:
    """Class decisions (N,) of probabilities ``prob`` (N, K) at per-class log-weights ``weights`` (K,)."""
    return np.argmax(np.log(np.clip(prob, _EPS, 1.0)) + np.asarray(weights, dtype=np.float64), axis=1)


def reweighted(prob: np.ndarray, weights: np.ndarray | list[float]) -> np.ndarray:
    """``prob`` (N, K) times exp(weights), renormalised: the probabilities under the new prior, whose
    argmax is ``decide``'s decision (for ``prior``, calibrated to the deployment prior)."""
    logit = np.log(np.clip(prob, _EPS, 1.0)) + np.asarray(weights, dtype=np.float64)
    logit -= logit.max(1, keepdims=True)
    e = np.exp(logit)
    return np.asarray(e / e.sum(1, keepdims=True))


def training_prior(y_train: np.ndarray, k: int, balanced: bool) -> np.ndarray:
    """The class prior (K,) a model was fitted on: uniform when the loss or the sampler balanced the
    classes, else the training labels' frequencies."""
    if balanced:
        return np.full(k, 1.0 / k)
    counts = np.bincount(np.asarray(y_train, dtype=int), minlength=k).astype(float)
    return np.asarray(counts / counts.sum())


def _recalls(y: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
    support = np.bincount(y, minlength=k)
    hits = np.bincount(y[pred == y], minlength=k)
    return np.where(support > 0, hits / np.maximum(support, 1), np.nan)


def _youden_weights(y: np.ndarray, logp: np.ndarray, start: np.ndarray, rounds: int = 3) -> np.ndarray:
    """Coordinate search for w maximising balanced accuracy; class 0's weight stays 0 (only differences
    matter). For each class the candidates are the margins at which some image's decision flips, and a
    plateau of equal scores resolves to its middle (the least fitted to this validation sample)."""
    k = logp.shape[1]
    w = start.copy()
    w -= w[0]
    present = np.bincount(y, minlength=k) > 0

    def score(v: np.ndarray) -> float:
        return float(np.nanmean(_recalls(y, np.argmax(logp + v, 1), k)[present]))

    best = score(w)
    for _ in range(rounds):
        improved = False
        for c in range(1, k):
            others = np.delete(logp + w, c, axis=1).max(1)
            flips = np.unique(others - logp[:, c])  # w_c at which image i turns to class c
            if len(flips) > 256:  # a large validation split: flip points at 256 quantiles suffice
                flips = np.unique(np.quantile(flips, np.linspace(0, 1, 256)))
            cands = np.concatenate([[flips[0] - 1.0], (flips[1:] + flips[:-1]) / 2, [flips[-1] + 1.0]])
            vals = np.array([score(np.where(np.arange(k) == c, v, w)) for v in cands])
            top = np.flatnonzero(vals >= vals.max() - 1e-12)
            run = max(np.split(top, np.flatnonzero(np.diff(top) > 1) + 1), key=len)  # longest best plateau
            if vals.max() >= best - 1e-12:
                improved = improved or vals.max() > best + 1e-12
                w[c], best = float(cands[run[len(run) // 2]]), float(vals.max())
        if not improved:
            break
    return w


def _sensitivity_weight(y: np.ndarray, logp: np.ndarray, positive: int, target: float) -> np.ndarray:
    """Weights (0 but the positive class) with validation sensitivity >= ``target`` for ``positive``,
    as strict as that allows: the boundary sits halfway between the last positive that must be caught
    and the next image below it."""
    k = logp.shape[1]
    margin = logp[:, positive] - np.delete(logp, positive, axis=1).max(1)  # called positive iff m + w >= 0
    pos = np.sort(margin[y == positive])[::-1]
    if not len(pos):
        raise ValueError("eval.operating_point=sensitivity: the validation split has no positive image")
    need = max(1, math.ceil(target * len(pos) - 1e-9))
    cut = pos[need - 1]  # the need-th highest positive margin must stay >= -w
    below = margin[margin < cut]
    edge = (cut + below.max()) / 2 if len(below) else cut - 1.0
    w = np.zeros(k)
    w[positive] = -edge
    return w


def _balanced_accuracy(y: np.ndarray, pred: np.ndarray, k: int) -> float:
    return float(np.nanmean(_recalls(y, pred, k)[np.bincount(y, minlength=k) > 0]))


def check_rule(
    y: np.ndarray, logp: np.ndarray, w: np.ndarray, n_boot: int = 2000, seed: int = 0
) -> dict[str, Any]:
    """Do the validation scores bear out the rule's weights ``w`` (K,)? A threshold is fitted (``youden``,
    from ``w``) on CHECK_FOLDS - 1 folds of the validation split and applied to the fold left out; its
    balanced accuracy over every image, out of fold, is compared with the rule's on the same images by a
    stratified paired bootstrap. ``holds`` is False when the fitted threshold is ahead with the CI above 0:
    the scores are not calibrated as the rule assumes, and a threshold fitted on this many images
    generalises. A small split cannot resolve that, so the rule stands there (bench/operating_point.py
    --check measures from which size on the check resolves). Returns {"holds", "gain", "low", "high",
    "n", "folds"}; "holds": None where a class has fewer than CHECK_FOLDS images (too few to check)."""
    k = logp.shape[1]
    counts = np.bincount(y, minlength=k)
    out: dict[str, Any] = {"n": len(y), "folds": CHECK_FOLDS, "holds": None}
    if counts.min() < CHECK_FOLDS:
        return out
    from sklearn.model_selection import StratifiedKFold

    fitted = np.empty(len(y), dtype=int)
    for fit, held in StratifiedKFold(CHECK_FOLDS, shuffle=True, random_state=seed).split(logp, y):
        fitted[held] = np.argmax(logp[held] + _youden_weights(y[fit], logp[fit], w.copy()), 1)
    ruled = np.argmax(logp + w, 1)
    gain = _balanced_accuracy(y, fitted, k) - _balanced_accuracy(y, ruled, k)
    # stratified bootstrap: every class keeps its size, so balanced accuracy is defined in every resample
    rng = np.random.default_rng(seed)
    diff = np.zeros(n_boot)
    for c in range(k):
        rows = np.flatnonzero(y == c)
        pick = rows[rng.integers(0, len(rows), (n_boot, len(rows)))]  # (B, n_c)
        diff += ((fitted[pick] == c).mean(1) - (ruled[pick] == c).mean(1)) / k
    low, high = np.quantile(diff, [0.025, 0.975])
    out |= {"gain": float(gain), "low": float(low), "high": float(high), "holds": not low > 0}
    return out


def choose(
    y_val: np.ndarray,
    prob_val: np.ndarray,
    rule: str,
    train_prior: np.ndarray,
    class_names: list[str],
    positive: int,
    deploy_prior: list[float] | None = None,
    target_sensitivity: float = 0.9,
    check: bool = True,
) -> dict[str, Any]:
    """The operating point of ``rule`` from validation labels ``y_val`` (N,) and probabilities
    ``prob_val`` (N, K). Returns what is stored beside the model: ``{"rule" (the rule used), "asked" (the
    rule asked for), "why", "check" (``check_rule``'s result for ``balanced``, with ``check``), "weights"
    (K,), "classes", "positive", "threshold" (two classes: on the positive class's probability),
    "train_prior", "deploy_prior", "target_sensitivity", "val": {"sensitivity", "specificity" of the
    positive class, "balanced_accuracy", "accuracy"}}``."""
    if rule not in RULES:
        raise ValueError(f"eval.operating_point={rule!r}: choose one of {', '.join(RULES)}")
    y = np.asarray(y_val, dtype=int)
    prob = np.asarray(prob_val, dtype=np.float64)
    k = prob.shape[1]
    logp = np.log(np.clip(prob, _EPS, 1.0))
    counts = np.bincount(y, minlength=k).astype(float)
    if deploy_prior and (len(deploy_prior) != k or min(deploy_prior) <= 0):
        raise ValueError(f"eval.prior must give {k} positive class frequencies (in {class_names} order)")
    target_prior = np.asarray(deploy_prior, dtype=np.float64) if deploy_prior else counts / counts.sum()
    target_prior = target_prior / target_prior.sum()
    asked, why, checked = rule, "", None
    if rule == "argmax":
        w = np.zeros(k)
    elif rule == "balanced":
        w = -np.log(np.clip(train_prior, _EPS, None))
        if check:
            checked = check_rule(y, logp, w)
            if checked["holds"] is False:
                rule = "youden"
                why = (
                    f"the balanced rule assumes scores calibrated to the training prior; on validation a threshold "
                    f"fitted out of fold raised balanced accuracy by {checked['gain']:+.3f} [{checked['low']:+.3f}, "
                    f"{checked['high']:+.3f}] over it (n={len(y)}), so the point is fitted on validation"
                )
                w = _youden_weights(y, logp, w)
            elif checked["holds"] is None:
                why = f"too few validation images per class (< {CHECK_FOLDS}) to check the rule's assumption"
            else:
                why = (
                    f"its assumption holds on validation: a fitted threshold gained {checked['gain']:+.3f} "
                    f"[{checked['low']:+.3f}, {checked['high']:+.3f}] balanced accuracy out of fold"
                )
    elif rule == "prior":
        if np.any(target_prior <= 0):
            missing = [c for c, n in zip(class_names, counts, strict=True) if n == 0]
            raise ValueError(
                f"eval.operating_point=prior: the validation split has no image of {missing}, so its class "
                f"frequencies cannot be the deployment prior; set eval.prior=[...] ({k} values, {class_names} order)"
            )
        w = np.log(target_prior / np.clip(train_prior, _EPS, None))
    elif rule == "youden":
        w = _youden_weights(y, logp, np.zeros(k))
    else:
        w = _sensitivity_weight(y, logp, positive, target_sensitivity)
    w = w - w.mean()  # only differences matter; centred for a stable record
    point: dict[str, Any] = {
        "rule": rule,
        "asked": asked,
        "why": why,
        "check": checked,
        "weights": [float(v) for v in w],
        "classes": list(class_names),
        "positive": class_names[positive],
        "train_prior": [float(v) for v in train_prior],
        "deploy_prior": [float(v) for v in target_prior],
        "deploy_prior_from": "eval.prior" if deploy_prior else "validation split",
        "target_sensitivity": target_sensitivity if rule == "sensitivity" else None,
    }
    if k == 2:
        neg = 1 - positive
        point["threshold"] = float(1.0 / (1.0 + math.exp(-(w[neg] - w[positive]))))
    point["val"] = at_point(y, prob, point)
    return point


def at_point(y: np.ndarray, prob: np.ndarray, point: dict[str, Any]) -> dict[str, float]:
    """Accuracy, balanced accuracy and the positive class's sensitivity/specificity at ``point``."""
    y = np.asarray(y, dtype=int)
    k = prob.shape[1]
    pred = decide(prob, point["weights"])
    p = point["classes"].index(point["positive"])
    rec = _recalls(y, pred, k)
    neg = y != p
    return {
        "accuracy": float((pred == y).mean()),
        "balanced_accuracy": float(np.nanmean(rec)),
        "sensitivity": float(rec[p]),
        "specificity": float((pred[neg] != p).mean()) if neg.any() else float("nan"),
    }


def positive_index(setting: str, class_names: list[str], counts: np.ndarray) -> int:
    """``eval.positive_class`` as an index: a class name, an index, or "" = the rarest class (in
    medical sets usually the finding: malignant, disease)."""
    if setting == "":
        return int(np.argmin(counts))
    if setting in class_names:
        return class_names.index(setting)
    if setting.isdigit() and int(setting) < len(class_names):
        return int(setting)
    raise ValueError(f"eval.positive_class={setting!r} is not a class: use one of {class_names} or an index")


def from_config(
    cfg: EvalConfig,
    class_names: list[str],
    y_train: np.ndarray | None,
    balanced: bool,
    y_val: np.ndarray,
    prob_val: np.ndarray,
    train_prior: np.ndarray | None = None,
) -> dict[str, Any]:
    """``choose`` with the ``eval.*`` settings: the model was fitted on labels ``y_train`` (uniformly
    weighted when ``balanced``), or on ``train_prior`` where that is given (an ensemble inherits its
    members'); the default positive class is the validation split's rarest, and the record says so."""
    k = len(class_names)
    positive = positive_index(
        cfg.positive_class, class_names, np.bincount(np.asarray(y_val, int), minlength=k)
    )
    if train_prior is not None:
        prior = np.asarray(train_prior, dtype=np.float64)
    elif y_train is not None:
        prior = training_prior(y_train, k, balanced)
    else:
        raise ValueError(
            "from_config needs the training labels (y_train) or the training prior (train_prior)"
        )
    point = choose(
        y_val,
        prob_val,
        cfg.operating_point,
        prior,
        class_names,
        positive,
        cfg.prior or None,
        cfg.target_sensitivity,
    )
    point["positive_from"] = (
        "eval.positive_class"
        if cfg.positive_class
        else f"the rarest validation class; eval.positive_class=NAME names another ({', '.join(class_names)})"
    )
    return point


def save(point: dict[str, Any], directory: str | Path) -> Path:
    """Write ``operating_point.json`` into ``directory`` (temp + rename: a kill leaves the old or the
    new file, never half of one)."""
    return write_atomic(Path(directory) / FILE, json.dumps(point, indent=2))


def load_point(directory: str | Path) -> dict[str, Any]:
    """The operating point stored beside a model by ``save``."""
    path = Path(directory) / FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no operating point here; re-run finetune/train.py to write one")
    return dict(json.loads(path.read_text()))
