import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from lowshot.evaluation import auroc, classification_report


def _probs(p1: np.ndarray) -> np.ndarray:
    return np.stack([1 - p1, p1], 1)


def test_hand_computed_binary_case() -> None:
    y = np.array([0, 0, 0, 1, 1, 1, 1, 1])
    p1 = np.array([0.1, 0.6, 0.3, 0.8, 0.7, 0.4, 0.9, 0.55])
    r = classification_report(y, _probs(p1), ["neg", "pos"], n_boot=200)
    m = r["metrics"]
    # pred = [0,1,0,1,1,0,1,1]: TP=4, FN=1, TN=2, FP=1
    assert m["accuracy"]["value"] == pytest.approx(6 / 8)
    assert m["balanced_accuracy"]["value"] == pytest.approx((4 / 5 + 2 / 3) / 2)
    assert m["auroc"]["value"] == pytest.approx(13 / 15)  # 13 of 15 (pos, neg) pairs ordered correctly
    assert r["per_class"]["pos"]["sensitivity"]["value"] == pytest.approx(4 / 5)
    assert r["per_class"]["pos"]["specificity"]["value"] == pytest.approx(2 / 3)
    assert r["per_class"]["pos"]["precision"]["value"] == pytest.approx(4 / 5)
    assert r["confusion_matrix"] == [[2, 1], [1, 4]]
    for v in m.values():
        assert v["low"] <= v["value"] <= v["high"]


def test_multiclass_macro_ovr_matches_sklearn() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 300)
    logits = rng.normal(size=(300, 5)) + 1.5 * np.eye(5)[y]
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    assert auroc(y, p) == pytest.approx(roc_auc_score(y, p, multi_class="ovr", average="macro"))
    r = classification_report(y, p, [str(i) for i in range(5)], n_boot=100)
    assert len(r["per_class"]) == 5 and np.array(r["confusion_matrix"]).sum() == 300


def test_ci_narrows_with_more_data_and_covers_truth() -> None:
    rng = np.random.default_rng(1)

    def width(n: int) -> float:
        y = rng.integers(0, 2, n)
        p1 = np.clip(0.5 + 0.3 * (2 * y - 1) + rng.normal(0, 0.3, n), 0, 1)
        a = classification_report(y, _probs(p1), ["a", "b"], n_boot=300)["metrics"]["accuracy"]
        return a["high"] - a["low"]

    assert width(1000) < width(100) / 2


def test_degenerate_predictor_is_flagged() -> None:
    y = np.array([0] * 20 + [1] * 80)
    r = classification_report(y, _probs(np.full(100, 0.9)), ["a", "b"], n_boot=50)
    assert r["degenerate"] and r["metrics"]["accuracy"]["value"] == 0.8
    assert r["metrics"]["balanced_accuracy"]["value"] == 0.5
    ok = classification_report(y, _probs(np.r_[np.full(20, 0.2), np.full(80, 0.9)]), ["a", "b"], n_boot=50)
    assert not ok["degenerate"]
