from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from lowshot.evaluation import (
    auroc,
    calibration,
    classification_report,
    delong,
    fit_temperature,
    mean_ci,
    paired_bootstrap,
    with_temperature,
)


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


# ------------------------------------------------------------------------------ calibration


def _calibrated(n: int, rng: np.random.Generator, k: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities that are calibrated by construction: y is drawn from them."""
    prob = rng.dirichlet(np.full(k, 0.7), n)
    y = (rng.random(n)[:, None] > prob.cumsum(1)).sum(1)
    return y, prob


def test_ece_of_a_calibrated_predictor_is_near_zero_and_of_an_overconfident_one_is_not() -> None:
    rng = np.random.default_rng(0)
    y, prob = _calibrated(100_000, rng)
    cal = calibration(y, prob, bins=15)
    assert cal["ece"] < 0.01
    sharp = with_temperature(prob, 0.3)  # same ranking, overconfident
    assert calibration(y, sharp)["ece"] > 0.05
    assert sum(b["n"] for b in cal["bins"]) == len(y)


def test_brier_and_ece_known_values() -> None:
    y = np.array([0, 1, 1, 0])
    onehot = np.eye(2)[y]
    assert calibration(y, onehot)["brier"] == 0.0 and calibration(y, onehot)["ece"] == 0.0
    assert calibration(y, np.full((4, 2), 0.5))["brier"] == pytest.approx(0.5)
    # 4 images all at confidence 0.9, half right: ECE = |0.5 - 0.9| = 0.4
    assert calibration(y, np.tile([0.9, 0.1], (4, 1)))["ece"] == pytest.approx(0.4)


def test_temperature_scaling_recovers_the_temperature_and_keeps_the_ranking() -> None:
    rng = np.random.default_rng(1)
    y, prob = _calibrated(20_000, rng, k=3)
    hot = with_temperature(prob, 1 / 2.5)  # logits x 2.5: overconfident
    t = fit_temperature(hot, y)
    assert t == pytest.approx(2.5, rel=0.1)
    fixed = with_temperature(hot, t)
    assert (fixed.argmax(1) == hot.argmax(1)).all()
    yb, pb = _calibrated(2000, rng)  # two classes: the ranking of p(class 1) is kept, so AUROC is too
    assert auroc(yb, with_temperature(pb, 0.4)) == pytest.approx(auroc(yb, pb))
    assert calibration(y, fixed)["ece"] < calibration(y, hot)["ece"]


# ------------------------------------------------------------------- intervals and comparisons


def test_t_interval_over_runs_covers_the_mean_95_percent_of_the_time() -> None:
    rng = np.random.default_rng(2)
    hits = [(s := mean_ci(rng.normal(0.8, 0.03, 5)))["low"] <= 0.8 <= s["high"] for _ in range(4000)]
    assert 0.935 <= np.mean(hits) <= 0.965
    one = mean_ci([0.7])
    assert one["low"] == one["high"] == 0.7 and one["n"] == 1


def test_bootstrap_ci_of_accuracy_covers_the_true_value() -> None:
    """A predictor that is right with probability 0.8 on 150 images: the 95% percentile bootstrap
    interval should hold 0.8 in about 95% of repeated test sets (percentile intervals run a bit low)."""
    rng = np.random.default_rng(3)
    hits = []
    for rep in range(150):
        y = rng.integers(0, 2, 150)
        right = rng.random(150) < 0.8
        pred = np.where(right, y, 1 - y)
        prob = np.eye(2)[pred] * 0.8 + 0.1
        m = classification_report(y, prob, ["a", "b"], n_boot=300, seed=rep)["metrics"]["accuracy"]
        hits.append(m["low"] <= 0.8 <= m["high"])
    assert 0.88 <= np.mean(hits) <= 0.99


def test_delong_matches_auroc_and_holds_its_level_under_the_null() -> None:
    rng = np.random.default_rng(4)
    rejections, ses, boot_sds = 0, [], []
    for rep in range(300):
        y = rng.integers(0, 2, 120)
        base = y + rng.normal(0, 1.2, 120)  # two equally good, correlated scores
        a, b = base + rng.normal(0, 0.6, 120), base + rng.normal(0, 0.6, 120)
        d = delong(y, a, b)
        assert d["auroc_a"] == pytest.approx(roc_auc_score(y, a))
        rejections += d["p"] < 0.05
        if rep < 10:
            ses.append(d["se"])
            pb = paired_bootstrap(y, np.stack([-a, a], 1), np.stack([-b, b], 1), n_boot=400, seed=rep)
            boot_sds.append((pb["auroc"]["high"] - pb["auroc"]["low"]) / (2 * 1.96))
    assert 0.02 <= rejections / 300 <= 0.09  # nominal 0.05
    assert np.mean(ses) == pytest.approx(np.mean(boot_sds), rel=0.25)  # two estimates of one SE
    same = delong(y, a, a)
    assert same["diff"] == 0.0 and same["p"] == 1.0


def test_paired_bootstrap_finds_a_real_difference_and_none_between_equals() -> None:
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, 200)
    good = np.stack(
        [1 - (p := np.clip(0.5 + 0.35 * (2 * y - 1) + rng.normal(0, 0.15, 200), 0.01, 0.99)), p], 1
    )
    coin = rng.dirichlet([1, 1], 200)
    better = paired_bootstrap(y, coin, good, n_boot=500)
    assert better["auroc"]["diff"] > 0.3 and better["auroc"]["low"] > 0 and better["auroc"]["p"] < 0.01
    equal = paired_bootstrap(y, good, good, n_boot=200)
    assert equal["accuracy"]["diff"] == 0.0 and equal["accuracy"]["p"] == 1.0


def test_ssl_or_imagenet_chooses_on_validation_only_when_the_paired_interval_says_so(tmp_path: Path) -> None:
    """The quickstart's verdict: 'ssl' / 'imagenet' only when the paired 95% CI on validation excludes 0."""
    from lowshot.quickstart import ssl_or_imagenet

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    good = np.clip(y * 0.6 + rng.uniform(0, 0.4, 300), 0, 1)  # AUROC near 1
    weak = np.clip(y * 0.1 + rng.uniform(0, 0.9, 300), 0, 1)  # AUROC near 0.6

    paths = np.array([f"img{i}.png" for i in range(300)])

    def run(name: str, p1: np.ndarray, labels: np.ndarray = y, val_path: np.ndarray = paths) -> Path:
        d = tmp_path / name
        d.mkdir()
        np.savez(d / "predictions.npz", val_y=labels, val_prob=np.stack([1 - p1, p1], 1), val_path=val_path)
        return d

    ssl_good, ssl_weak, imnet = run("a", good), run("b", weak), run("c", weak.copy())
    win = ssl_or_imagenet(ssl_good, imnet, n_boot=500)
    assert win["verdict"] == "ssl" and win["val_images"] == 300
    assert win["ssl_minus_imagenet_val_auroc"]["diff"] > 0.2 and "keep it" in win["text"]
    assert ssl_or_imagenet(imnet, ssl_good, n_boot=500)["verdict"] == "imagenet"
    tie = ssl_or_imagenet(ssl_weak, imnet, n_boot=500)
    assert tie["verdict"] == "unresolved" and tie["ssl_minus_imagenet_val_auroc"]["diff"] == 0.0
    with pytest.raises(ValueError, match="different val images"):
        ssl_or_imagenet(ssl_good, run("d", good, 1 - y), n_boot=100)
    # The same labels on other images (another split seed, say) are not a pairing either.
    with pytest.raises(ValueError, match="different val images"):
        ssl_or_imagenet(ssl_good, run("e", good, y, paths[::-1]), n_boot=100)


@pytest.mark.parametrize("verdict", ["ssl", "imagenet", "unresolved"])
def test_keep_script_trains_the_chosen_start_with_the_test_sealed(
    verdict: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """keep.sh's member command resolves, with the quickstart's own overrides, to the start the verdict
    chose: the SSL checkpoint's fine-tune, else the recommended ImageNet recipe; every member has its seed
    and a sealed test split, and the ensemble line opens the test split once."""
    import shlex

    from lowshot.config import parse_args
    from lowshot.quickstart import repo_root, write_keep_script

    monkeypatch.chdir(repo_root())  # the user's --config paths are relative to where they ran it
    common = ["check.leakage=drop", "--config", "configs/busi.yaml", "data.size=96", "track.group=qs"]
    ckpt = tmp_path / "qs" / "pretrain" / "checkpoint"
    text = write_keep_script(tmp_path / "qs", "qs", common, verdict, ckpt).read_text()
    line = next(x for x in text.splitlines() if "finetune/train.py" in x)
    args = shlex.split(line.split("finetune/train.py", 1)[1].replace("$s", "3"))
    cfg, _ = parse_args(args)
    assert cfg.seed == 3 and cfg.eval.test is False and cfg.name == "qs/keep/seed3" and cfg.resume == "auto"
    assert cfg.data.source == "busi" and cfg.data.size == 96  # the user's overrides win over the recipe
    if verdict == "ssl":
        assert cfg.model.weights == str(ckpt.resolve()) and "lowshot-recommended" not in line
    else:
        assert (cfg.model.name, cfg.model.weights, cfg.train.lr) == (
            "tf_efficientnet_lite0",
            "efficientnet-lite0",
            0.001,
        )
    assert 'ensemble "${members[@]}" --out "$out" --open-test' in text and f"verdict: {verdict}" in text


def test_roc_figure_of_a_split_without_one_class(tmp_path: Path) -> None:
    """A class with no test image (warned at the start of a run) must not crash the figures after the test
    split was opened (issue 41): its curve is left out, the others drawn."""
    from lowshot.figures import plot_roc

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 60)  # classes 0 and 1 only; class 2 has no test image
    prob = rng.dirichlet([1, 1, 1], 60)
    auroc = {"value": float("nan"), "low": float("nan"), "high": float("nan")}
    run = {
        "pred": {"test_y": y, "test_prob": prob},
        "results": {"classes": ["a", "b", "c"], "test": {"metrics": {"auroc": auroc}}},
    }
    assert plot_roc(run, tmp_path / "roc.png").read_bytes()[:4] == b"\x89PNG"


def test_clean_test_report_leaves_out_the_copies(data_root: Path, cache_dir: Path) -> None:
    """BreastMNIST's official test split holds verified copies of train/val images (issue 41): the clean
    test report is computed on the others, says how many it left out, and is shown beside the official."""
    from lowshot.config import EvalConfig, parse_args
    from lowshot.data import load_store
    from lowshot.data.guards import copied_from_train_val
    from lowshot.evaluation import final_reports, format_clean

    cfg, _ = parse_args([f"data.root={data_root}", f"data.cache_dir={cache_dir}", "data.size=28"])
    store = load_store(cfg.data)
    copied = copied_from_train_val(store, cfg)
    test = store.indices("test")
    assert len(copied) and set(copied) <= set(test)  # only test images, those with a copy seen in training
    clean = ~np.isin(test, copied)
    rng = np.random.default_rng(0)
    y = store.labels[test]
    prob = np.clip(np.eye(2)[y] * 0.6 + rng.random((len(y), 2)) * 0.4, 1e-3, None)
    prob /= prob.sum(1, keepdims=True)
    val = store.labels[store.indices("val")]
    res = final_reports(
        (val, np.eye(2)[val]), (y, prob), store.classes, EvalConfig(bootstrap=50), 0, None, clean
    )
    assert res["test_clean"]["n"] == clean.sum() == len(test) - len(copied)
    assert res["test_clean"]["left_out"] == len(copied) and res["test"]["n"] == len(test)
    assert f"n={clean.sum()}; {len(copied)} with a copy" in format_clean(res)
    assert "test_clean" not in final_reports(
        (val, np.eye(2)[val]), (y, prob), store.classes, EvalConfig(bootstrap=50), 0
    )
