from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from sklearn.metrics import roc_auc_score

from lowshot.config import Config
from lowshot.data import load_store
from lowshot.fewshot import (
    _auroc_2way,
    evaluate_episodes,
    knn_scores,
    prototype_scores,
    sample_episodes,
)
from lowshot.models import backbone_for, cached_embeddings, save_checkpoint


def pools(n_classes: int = 3, per_class: int = 40) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    idx = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    return labels, idx[: len(idx) // 2], idx[len(idx) // 2 :]


def test_sampler_counts_disjointness_and_classes() -> None:
    labels, sup, qry = pools(n_classes=5)
    ep = sample_episodes(labels, sup, qry, n_way=3, k_shot=4, n_query=6, n_episodes=300, seed=1)
    assert ep.classes.shape == (300, 3) and ep.support.shape == (300, 3, 4) and ep.query.shape == (300, 3, 6)
    assert set(ep.support.unique().tolist()) <= set(sup.tolist())
    assert set(ep.query.unique().tolist()) <= set(qry.tolist())
    for e in range(300):
        s, q = ep.support[e].flatten(), ep.query[e].flatten()
        assert len(s.unique()) == len(s) and len(q.unique()) == len(q)  # no repeats inside an episode
        assert len(ep.classes[e].unique()) == 3
        # every row holds images of its episode class
        assert (labels[ep.support[e]] == ep.classes[e][:, None]).all()
        assert (labels[ep.query[e]] == ep.classes[e][:, None]).all()
    counts = torch.bincount(ep.classes.flatten(), minlength=5)
    assert (counts > 0.8 * 300 * 3 / 5).all()  # class subsets drawn uniformly


def test_sampler_is_deterministic_per_seed() -> None:
    labels, sup, qry = pools()
    a = sample_episodes(labels, sup, qry, 2, 5, 5, 50, seed=7)
    b = sample_episodes(labels, sup, qry, 2, 5, 5, 50, seed=7)
    c = sample_episodes(labels, sup, qry, 2, 5, 5, 50, seed=8)
    assert (
        torch.equal(a.support, b.support)
        and torch.equal(a.query, b.query)
        and torch.equal(a.classes, b.classes)
    )
    assert not torch.equal(a.support, c.support)


def test_sampler_refuses_overlap_and_too_few_images() -> None:
    labels, sup, qry = pools(per_class=10)
    with pytest.raises(ValueError, match="overlap"):
        sample_episodes(labels, sup, torch.cat([qry, sup[:1]]), 2, 1, 1, 5, 0)
    with pytest.raises(ValueError, match="only"):
        sample_episodes(labels, sup, qry, 2, 20, 1, 5, 0)


def test_prototype_scores_hand_computed() -> None:
    # one episode, 2-way 2-shot, 2-d features: prototypes (1, 0) and (0, 2)
    support = torch.tensor([[[[1.0, 1.0], [1.0, -1.0]], [[0.0, 1.0], [0.0, 3.0]]]])
    query = torch.tensor([[[2.0, 0.0], [0.0, 1.0]]])
    eu = prototype_scores(support, query, "euclidean")
    assert torch.allclose(eu, -torch.tensor([[[1.0, 8.0], [2.0, 1.0]]]))
    cos = prototype_scores(support, query, "cosine")
    assert torch.allclose(cos, torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]))


def test_knn_votes() -> None:
    support = torch.tensor([[[[1.0, 0.0], [0.9, 0.1]], [[0.0, 1.0], [0.2, 1.0]]]])
    query = torch.tensor([[[1.0, 0.05], [0.1, 1.0]]])
    assert knn_scores(support, query, k=3).argmax(-1).tolist() == [[0, 1]]


def test_auroc_matches_sklearn() -> None:
    g = torch.Generator().manual_seed(0)
    score = torch.randn(4, 20, generator=g) + torch.cat([torch.zeros(10), torch.ones(10)])
    score[0, 3] = score[0, 15]  # a tie
    ours = _auroc_2way(score, 10)
    y = np.r_[np.zeros(10), np.ones(10)]
    assert ours.tolist() == pytest.approx([roc_auc_score(y, s) for s in score.numpy()])


@pytest.mark.parametrize("classifier", ["prototype", "knn", "logreg"])
def test_classifiers_separate_clusters_and_are_at_chance_on_noise(classifier: str) -> None:
    g = torch.Generator().manual_seed(0)
    labels, sup, qry = pools(n_classes=4, per_class=60)
    centres = torch.randn(4, 32, generator=g) * 3
    clustered = centres[labels] + torch.randn(len(labels), 32, generator=g)
    noise = torch.randn(len(labels), 32, generator=g)
    ep = sample_episodes(labels, sup, qry, 4, 5, 10, 200, seed=0)
    good = evaluate_episodes(clustered, labels, ep, clustered[sup].mean(0), classifier)
    bad = evaluate_episodes(noise, labels, ep, noise[sup].mean(0), classifier)
    assert good["accuracy"] > 0.95
    assert abs(bad["accuracy"] - 0.25) < 0.05
    assert bad["accuracy_low"] < bad["accuracy"] < bad["accuracy_high"]


def test_two_way_reports_auroc() -> None:
    labels, sup, qry = pools(n_classes=2)
    feats = torch.randn(len(labels), 8) + 2 * labels[:, None].float()
    r = evaluate_episodes(
        feats, labels, sample_episodes(labels, sup, qry, 2, 3, 5, 100, 0), feats[sup].mean(0), "prototype"
    )
    assert 0.8 < r["auroc"] <= 1.0 and "auroc_ci95" in r


def test_embedding_cache_hits_and_invalidates(data_root: Path, tmp_path: Path) -> None:
    cfg = Config()
    cfg.data.root, cfg.data.source, cfg.data.size, cfg.data.limit = str(data_root), "breastmnist.npz", 28, 40
    cfg.data.cache_dir, cfg.model.name, cfg.data.num_workers = str(tmp_path / "cache"), "test_resnet", 0
    accelerator = Accelerator(cpu=True)
    store = load_store(cfg.data)

    def run() -> tuple[torch.Tensor, bool]:
        backbone, in_chans, norm = backbone_for(cfg, store.grayscale)
        return cached_embeddings(cfg, store, backbone, in_chans, norm, accelerator)

    torch.manual_seed(0)
    f1, hit1 = run()
    f2, hit2 = run()
    assert (hit1, hit2) == (False, True) and torch.equal(f1, f2) and f1.shape[0] == len(store.labels)
    # Weights change (a checkpoint with other bytes): a new key, new features.
    backbone, _, _ = backbone_for(cfg, store.grayscale)
    with torch.no_grad():
        for p in backbone.parameters():
            p.mul_(0.5)
    save_checkpoint(tmp_path / "ckpt", backbone, cfg, {"in_chans": 3})
    cfg.model.weights = str(tmp_path / "ckpt")
    f3, hit3 = run()
    assert not hit3 and not torch.equal(f1, f3)
    # Data change (one pixel): a new key.
    store.images[0, 0, 0, 0] ^= 1
    _, hit4 = run()
    assert not hit4
    assert len(list((tmp_path / "cache" / "embeddings").glob("*.safetensors"))) == 3


def test_label_efficiency_curve_shape_and_trend(tmp_path: Path) -> None:
    from lowshot.fewshot import label_efficiency, plot_label_efficiency

    g = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], 100)
    feats = torch.from_numpy(g.normal(size=(300, 16)) + 1.2 * np.eye(16)[labels]).float()
    train, val, test = np.arange(0, 300, 3), np.arange(1, 300, 3), np.arange(2, 300, 3)
    rows = label_efficiency(feats, labels, train, val, test, [1, 5, 20, 0], draws=6, cs=[0.1, 1.0], seed=0)
    assert [r["labels_per_class"] for r in rows] == [1, 5, 20, 0]
    assert [r["n_labels"] for r in rows] == [3, 15, 60, 100] and [r["draws"] for r in rows] == [6, 6, 6, 1]
    for r in rows:
        for m in ("accuracy", "balanced_accuracy", "auroc"):
            assert r[f"{m}_low"] <= r[m] <= r[f"{m}_high"]
    assert rows[0]["auroc"] < rows[2]["auroc"] < 1.0  # more labels, better probe
    assert rows[-1]["auroc_low"] == rows[-1]["auroc_high"]  # one fit on all labels: nothing to draw
    png = plot_label_efficiency({"a": rows, "b": rows}, "auroc", tmp_path / "c.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_curves_pool_finetune_runs_by_label_budget(tmp_path: Path) -> None:
    """`lowshot curves` turns finetune runs made with data.train_per_class=K into one curve with a
    point per K (mean over the draws) next to a probe curve."""
    import json

    from lowshot.config import to_yaml
    from lowshot.fewshot import curves

    def run(name: str, job: str, k: int, auc: float, extra: dict) -> Path:
        d = tmp_path / name
        d.mkdir()
        cfg = Config()
        cfg.data.train_per_class = k
        (d / "config.yaml").write_text(to_yaml(cfg))
        metrics = {
            m: {"value": auc, "low": 0.0, "high": 1.0} for m in ("accuracy", "balanced_accuracy", "auroc")
        }
        res = {"job": job, "model": "resnet18", "weights": "none", "data": "toy", **extra}
        if job == "finetune":
            res |= {"test": {"metrics": metrics}, "counts": {"train": [k or 50, k or 60]}}
        (d / "results.json").write_text(json.dumps(res))
        return d

    le = [
        {
            "labels_per_class": k,
            "n_labels": 2 * k,
            "draws": 1,
            **{f"{m}{s}": 0.6 for m in ("auroc",) for s in ("", "_low", "_high")},
        }
        for k in (2, 5)
    ]
    dirs = [run("probe", "fewshot", 0, 0.0, {"label_efficiency": le})]
    dirs += [run(f"ft{k}-{d}", "finetune", k, 0.5 + 0.1 * d + k / 100, {}) for k in (2, 5) for d in (0, 1)]
    dirs += [run("ftall", "finetune", 0, 0.9, {})]
    curves(dirs, tmp_path / "c.png", "auroc")
    table = (tmp_path / "c.md").read_text().splitlines()
    assert table[2] == "| backbone | 2 | 5 | all |"
    ft = next(line for line in table[4:] if "fine-tune" in line)
    assert (
        ft.startswith("| resnet18 · random init · 32 px · fine-tune | 0.570 [")
        and "0.600 [" in ft
        and "0.900 [0.900, 0.900]" in ft
    )
    probe = next(line for line in table[4:] if "probe" in line)
    assert probe.endswith("| – |")  # the probe run had no 'all' point
