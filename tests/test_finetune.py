import itertools

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from lowshot.config import TrainConfig
from lowshot.finetune import EarlyStopping
from lowshot.optim import lr_schedule, make_optimizer, warmup_cosine
from lowshot.probe import fit_probe


def test_early_stopping_keeps_a_copy_not_a_reference() -> None:
    model = nn.Linear(3, 2)
    stop = EarlyStopping(patience=2)
    assert not stop.step(0.7, 1, model)
    best = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)  # a later optimizer step changes the live weights in place
    assert not stop.step(0.6, 2, model)
    assert stop.step(0.65, 3, model)  # two epochs without improvement
    stop.restore(model)
    assert torch.equal(model.weight, best) and stop.best_epoch == 1


def test_no_weight_decay_on_norms_and_biases() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(1, 3, 8, 8))
    opt = make_optimizer(model, "adamw", 1e-3, 0.05)
    by_decay = {g["weight_decay"]: sum(p.numel() for p in g["params"]) for g in opt.param_groups}
    n_1d = sum(p.numel() for p in model.parameters() if p.ndim <= 1)
    assert by_decay[0.0] == n_1d and by_decay[0.05] == sum(p.numel() for p in model.parameters()) - n_1d
    assert isinstance(make_optimizer(model, "sgd", 1e-2, 1e-4), torch.optim.SGD)


def _lrs(opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler, steps: int) -> list[float]:
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_warmup_then_cosine() -> None:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    lrs = _lrs(opt, warmup_cosine(opt, warmup_steps=4, total_steps=20, min_ratio=0.1), 20)
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert all(a >= b for a, b in itertools.pairwise(lrs[3:]))
    assert lrs[-1] == pytest.approx(0.1, abs=0.01)


def test_a_warmup_as_long_as_training_is_cut_so_the_lr_decays() -> None:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.warns(UserWarning, match=r"warmup \(30 steps\) is not shorter than training \(20 steps\)"):
        sched = warmup_cosine(opt, warmup_steps=30, total_steps=20, min_ratio=0.1)
    lrs = _lrs(opt, sched, 20)
    assert lrs[4] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1, abs=0.01)  # 5 warmup steps, decayed


def test_probe_chooses_regularisation_on_validation() -> None:
    rng = np.random.default_rng(0)
    w = rng.normal(size=20)

    def sample(n: int) -> tuple[np.ndarray, np.ndarray]:
        x = rng.normal(size=(n, 20))
        return x, (x @ w + rng.normal(0, 2, n) > 0).astype(int)

    xt, yt = sample(40)  # few labels, noisy: an unregularised fit overfits
    xv, yv = sample(200)
    clf, c, curve = fit_probe(xt, yt, xv, yv, [1e-3, 1e-2, 0.1, 1.0, 10.0])
    assert len(curve) == 5 and c == max(curve, key=lambda p: p["val_auroc"])["C"]
    assert clf.predict_proba(xv).shape == (200, 2)
    assert max(p["val_auroc"] for p in curve) > 0.75


def test_step_schedule_is_medmnist_protocol() -> None:
    """100 epochs, lr x0.1 at 50% and 75%: epochs 1-50 at 1e-3, 51-75 at 1e-4, 76-100 at 1e-5."""
    tc = TrainConfig(optimizer="adam", lr=1e-3, schedule="step", epochs=100, milestones=[0.5, 0.75])
    opt = make_optimizer(nn.Linear(2, 2), tc.optimizer, tc.lr, 0.0)
    assert isinstance(opt, torch.optim.Adam)
    sched = lr_schedule(opt, tc, steps_per_epoch=4)
    lrs = []
    for _ in range(100 * 4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    per_epoch = lrs[::4]
    assert per_epoch[49] == pytest.approx(1e-3) and per_epoch[50] == pytest.approx(1e-4)
    assert per_epoch[74] == pytest.approx(1e-4) and per_epoch[75] == pytest.approx(1e-5)


def test_probe_survives_a_feature_constant_among_the_labelled_images() -> None:
    """Issue 38: a feature nearly constant over the few labelled images (and spuriously tied to their
    labels there) must not be blown up on the validation images. Standardised with the labelled images'
    own statistics, the probe collapses; with the label-free statistics (lowshot.probe) it holds."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)

    def sample(n: int, labelled: bool) -> tuple[np.ndarray, np.ndarray]:
        y = np.arange(n) % 2
        x = rng.normal(size=(n, 64)) + 2.5 * np.eye(64)[y * 3]  # the class lives in features 0 and 3
        # feature 63: sd 0.0002 and tied to the label among the labelled images, sd 0.5 elsewhere
        x[:, 63] = (1e-4 * (2 * y - 1) + rng.normal(0, 1e-4, n)) if labelled else rng.normal(0, 0.5, n)
        return x, y

    (xt, yt), (xv, yv), (xu, _) = sample(20, True), sample(200, False), sample(500, False)
    cs = [1e-2, 0.1, 1.0, 10.0]
    clf, _, curve = fit_probe(xt, yt, xv, yv, cs, x_free=np.concatenate([xt, xu, xv]))
    new = max(p["val_auroc"] for p in curve)
    old = max(
        roc_auc_score(
            yv,
            LogisticRegression(C=c, max_iter=2000)
            .fit(s.transform(xt), yt)
            .predict_proba(s.transform(xv))[:, 1],
        )
        for s in [StandardScaler().fit(xt)]
        for c in cs
    )
    assert new > 0.85 and old < 0.7, (new, old)
    assert clf[0].scale_[63] > 0.3  # the label-free standard deviation, not the labelled images' 0.0002


def test_probe_stops_when_a_class_has_no_validation_image() -> None:
    """Issue 41: every C scored a stand-in validation AUROC, the first was 'selected' and the test split
    opened. No strength can be chosen on such a split: the probe stops with one line naming the class."""
    from lowshot.data import DataError

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 8)), np.arange(40) % 2
    with pytest.raises(DataError, match=r"no image of class \[1\]"):
        fit_probe(x, y, rng.normal(size=(10, 8)), np.zeros(10, int), [0.1, 1.0])
