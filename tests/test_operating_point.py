"""The operating point: each rule's decision on synthetic scores whose right answer is known."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from lowshot import operating_point as op
from lowshot.config import EvalConfig
from lowshot.evaluation import final_reports

NAMES = ["benign", "malignant"]


def scores(n: int, prevalence: float, seed: int, shift: float = 1.5) -> tuple[np.ndarray, np.ndarray]:
    """A binary model trained on a uniform prior: the posterior of two unit Gaussians ``shift`` apart with
    equal class weights, on images at ``prevalence`` of class 1."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < prevalence).astype(int)
    z = rng.normal(y * shift, 1.0)
    p1 = 1.0 / (1.0 + np.exp(-(shift * z - shift**2 / 2)))  # exact posterior at prior 0.5
    return y, np.stack([1 - p1, p1], 1)


def test_prior_rule_is_bayes_threshold_and_beats_argmax_at_low_prevalence() -> None:
    y_val, p_val = scores(400, 0.2, 0)
    point = op.choose(y_val, p_val, "prior", np.array([0.5, 0.5]), NAMES, 1, [0.8, 0.2])
    # p1 * 0.2/0.5 >= p0 * 0.8/0.5  <=>  p1 >= 0.8
    assert point["threshold"] == pytest.approx(0.8)
    assert point["deploy_prior_from"] == "eval.prior"
    y, p = scores(20000, 0.2, 1)
    acc = {r: (op.decide(p, w) == y).mean() for r, w in (("argmax", [0, 0]), ("prior", point["weights"]))}
    assert acc["prior"] > acc["argmax"] + 0.03  # Bayes-optimal accuracy at the clinic's prevalence
    # without eval.prior the validation split's frequencies are the deployment prior
    auto = op.choose(y_val, p_val, "prior", np.array([0.5, 0.5]), NAMES, 1)
    assert auto["deploy_prior"][1] == pytest.approx(y_val.mean())


def test_decision_is_the_threshold_on_the_positive_probability() -> None:
    y, p = scores(300, 0.3, 2)
    for rule in op.RULES:
        point = op.choose(y, p, rule, np.array([0.5, 0.5]), NAMES, 1)
        t = point["threshold"]
        near = np.abs(p[:, 1] - t) < 1e-9  # exactly at the threshold either side is fine
        assert np.array_equal(op.decide(p, point["weights"])[~near], (p[:, 1] >= t).astype(int)[~near]), rule
        assert np.allclose(op.reweighted(p, point["weights"]).sum(1), 1.0)


def test_youden_rule_reaches_the_best_youden_j() -> None:
    y, p = scores(250, 0.25, 3, shift=1.0)
    point = op.choose(y, p, "youden", np.array([0.5, 0.5]), NAMES, 1)

    def j(t: float) -> float:
        pred = p[:, 1] >= t
        return pred[y == 1].mean() + (~pred[y == 0]).mean() - 1

    best = max(j(t) for t in np.unique(p[:, 1]))  # brute force over every threshold
    assert j(point["threshold"]) == pytest.approx(best)
    assert point["val"]["balanced_accuracy"] == pytest.approx((best + 1) / 2)


def test_sensitivity_rule_meets_the_target_as_strictly_as_possible() -> None:
    y, p = scores(300, 0.3, 4, shift=1.0)
    point = op.choose(y, p, "sensitivity", np.array([0.5, 0.5]), NAMES, 1, target_sensitivity=0.9)
    assert point["val"]["sensitivity"] >= 0.9
    pos = np.sort(p[y == 1, 1])
    caught = (pos >= point["threshold"]).sum()
    assert caught == int(np.ceil(0.9 * len(pos)))  # one positive fewer would miss the target
    # positive class 0 works too (the other direction of the threshold)
    p0 = op.choose(y, p, "sensitivity", np.array([0.5, 0.5]), NAMES, 0, target_sensitivity=0.95)
    assert p0["val"]["sensitivity"] >= 0.95 and p0["positive"] == "benign"


def test_multiclass_youden_balanced_and_prior() -> None:
    rng = np.random.default_rng(5)
    k, n = 4, 600
    y = rng.choice(k, n, p=[0.55, 0.25, 0.15, 0.05])
    logits = (
        rng.normal(0, 1, (n, k)) + 1.2 * np.eye(k)[y] + np.log([0.55, 0.25, 0.15, 0.05])
    )  # prior baked in
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    names = [f"c{i}" for i in range(k)]
    trained = np.array([0.55, 0.25, 0.15, 0.05])
    arg = op.choose(y, p, "argmax", trained, names, 3)
    fit = op.choose(y, p, "youden", trained, names, 3)
    assert fit["val"]["balanced_accuracy"] > arg["val"]["balanced_accuracy"] + 0.05
    assert "threshold" not in fit and len(fit["weights"]) == k
    # balanced removes the baked-in training prior, weights = -log(prior) + c: the prior rule to a uniform
    # deployment prior, and without fitting anything it gains balanced accuracy as well
    bal = op.choose(y, p, "balanced", trained, names, 3)
    uni = op.choose(y, p, "prior", trained, names, 3, [0.25] * 4)
    w = np.array(bal["weights"])
    assert np.allclose(w, -np.log(trained) + np.log(trained).mean()) and np.allclose(w, uni["weights"])
    assert bal["val"]["balanced_accuracy"] > arg["val"]["balanced_accuracy"] + 0.05
    # trained on a uniform prior (a label budget), balanced is argmax
    even = op.choose(y, p, "balanced", np.full(k, 0.25), names, 3)
    assert np.allclose(even["weights"], 0.0)


def test_positive_class_training_prior_and_errors(tmp_path: Path) -> None:
    assert op.positive_index("", NAMES, np.array([50, 20])) == 1  # the rarest
    assert op.positive_index("benign", NAMES, np.array([50, 20])) == 0
    assert op.positive_index("1", NAMES, np.array([50, 20])) == 1
    with pytest.raises(ValueError, match="not a class"):
        op.positive_index("cancer", NAMES, np.array([50, 20]))
    assert np.allclose(op.training_prior(np.array([0, 0, 0, 1]), 2, balanced=False), [0.75, 0.25])
    assert np.allclose(op.training_prior(np.array([0, 0, 0, 1]), 2, balanced=True), [0.5, 0.5])
    y, p = scores(100, 0.3, 6)
    with pytest.raises(ValueError, match=r"eval\.prior must give 2"):
        op.choose(y, p, "prior", np.array([0.5, 0.5]), NAMES, 1, [0.2, 0.3, 0.5])
    with pytest.raises(ValueError, match=r"eval\.operating_point"):
        EvalConfig(operating_point="f1")
    with pytest.raises(ValueError, match="no positive image"):
        op.choose(np.zeros(10, int), p[:10], "sensitivity", np.array([0.5, 0.5]), NAMES, 1)
    with pytest.raises(ValueError, match=r"no image of \['malignant'\].*set eval.prior"):
        op.choose(np.zeros(10, int), p[:10], "prior", np.array([0.5, 0.5]), NAMES, 1)
    point = op.choose(y, p, "youden", np.array([0.5, 0.5]), NAMES, 1)
    op.save(point, tmp_path)
    assert op.load_point(tmp_path) == json.loads(json.dumps(point)) and not list(tmp_path.glob(".*tmp"))
    with pytest.raises(FileNotFoundError, match="no operating point"):
        op.load_point(tmp_path / "elsewhere")


def test_config_choices_are_the_rules() -> None:
    cfg = EvalConfig()
    for rule in op.RULES:
        assert dataclasses.replace(cfg, operating_point=rule).operating_point == rule


def test_final_reports_score_the_test_split_at_the_point() -> None:
    y_val, p_val = scores(300, 0.2, 7)
    y_te, p_te = scores(500, 0.2, 8)
    cfg = EvalConfig(bootstrap=50, operating_point="prior")
    point = op.from_config(cfg, NAMES, np.array([0, 1] * 50), False, y_val, p_val)  # trained at 0.5
    assert point["rule"] == "prior" and point["positive"] == "malignant"
    out = final_reports((y_val, p_val), (y_te, p_te), NAMES, cfg, 0, point)
    at, plain = out["test_at_point"], out["test"]
    assert at["metrics"]["accuracy"]["value"] == pytest.approx(
        (op.decide(p_te, point["weights"]) == y_te).mean()
    )
    assert plain["metrics"]["accuracy"]["value"] == pytest.approx((p_te.argmax(1) == y_te).mean())
    assert "auroc" not in at["metrics"] and out["operating_point"] is point
    # fewer positives called at the low prevalence: sensitivity falls, specificity rises
    sens = at["per_class"]["malignant"]["sensitivity"]["value"]
    assert sens < plain["per_class"]["malignant"]["sensitivity"]["value"]
    assert (
        at["per_class"]["malignant"]["specificity"]["value"]
        > plain["per_class"]["malignant"]["specificity"]["value"]
    )


def _skewed(n: int, shift: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Binary scores of a good ranker (separation 2.5 sd), 62 % positive (class 1), whose logits are
    shifted by ``shift`` against class 1: at 0.5 it calls many positives negative (issue 38's chest X-rays)."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.62).astype(int)
    logit = rng.normal(2.5 * y - 1.25 - shift, 1.0)
    p1 = 1 / (1 + np.exp(-logit))
    return y, np.stack([1 - p1, p1], 1)


def test_balanced_rule_is_checked_on_validation_and_fitted_where_it_fails() -> None:
    y, p = _skewed(500, 1.5)
    point = op.choose(y, p, "balanced", np.array([0.5, 0.5]), NAMES, 1)
    assert point["asked"] == "balanced" and point["rule"] == "youden" and point["check"]["holds"] is False
    assert point["check"]["low"] > 0 and "fitted on validation" in point["why"]
    at_half = op.at_point(y, p, {**point, "weights": [0.0, 0.0]})
    assert at_half["sensitivity"] < 0.75 < point["val"]["sensitivity"]  # 0.5 missed the positives
    assert point["val"]["balanced_accuracy"] > at_half["balanced_accuracy"] + 0.05
    # calibrated scores: the rule's assumption holds and its threshold stays
    y, p = _skewed(500, 0.0)
    point = op.choose(y, p, "balanced", np.array([0.5, 0.5]), NAMES, 1)
    assert point["rule"] == "balanced" and point["check"]["holds"] is True
    assert point["threshold"] == pytest.approx(0.5)
    # too few images of a class to check: the rule stands, and the record says why
    y, p = _skewed(500, 1.5)
    few = np.concatenate([np.flatnonzero(y == 0)[:3], np.flatnonzero(y == 1)[:20]])
    y, p = y[few], p[few]
    point = op.choose(y, p, "balanced", np.array([0.5, 0.5]), NAMES, 1)
    assert point["rule"] == "balanced" and point["check"]["holds"] is None and "too few" in point["why"]
    assert op.choose(y, p, "balanced", np.array([0.5, 0.5]), NAMES, 1, check=False)["check"] is None
