"""N-way K-shot episodes on cached embeddings, batched as tensor operations.

Embeddings of every image of a store are extracted once per (backbone weights, data) pair and
cached (``models.cached_embeddings``); thousands of episodes then cost milliseconds each. An episode
draws N classes (a subset when the data has more), K support images per class from the training
split and Q query images per class from the evaluation split, so support and queries never overlap.
Classifiers fitted on the support set, all batched over episodes (E):

- ``prototype``: nearest class mean (Snell et al., 2017) after SimpleShot's feature transform
  (Wang et al., 2019): subtract the mean training feature, then L2-normalise ("CL2N"); cosine or
  euclidean distance;
- ``knn``: majority vote of the k nearest support embeddings (cosine);
- ``logreg``: multinomial logistic regression with L2, fitted by L-BFGS on all episodes at once
  (the objective is a sum over episodes, so one solve fits every episode's own weights).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import balanced_accuracy_score

from .config import load_yaml
from .data import draw_per_class
from .evaluation import auroc, format_ci, mean_ci
from .models import weights_tag
from .probe import fit_probe
from .run_folder import CONFIG, RESULTS, read_results

CLASSIFIERS = ("prototype", "knn", "logreg")


@dataclass
class Episodes:
    """Indices of E episodes. classes: (E, N) class ids; support: (E, N, K) and query: (E, N, Q)
    indices into the embedding table, grouped by episode class (row n holds class ``classes[e, n]``)."""

    classes: torch.Tensor
    support: torch.Tensor
    query: torch.Tensor


def sample_episodes(
    labels: torch.Tensor,
    support_pool: torch.Tensor,
    query_pool: torch.Tensor,
    n_way: int,
    k_shot: int,
    n_query: int,
    n_episodes: int,
    seed: int,
) -> Episodes:
    """Draw ``n_episodes`` episodes without replacement inside each episode.

    labels: (M,) class of every embedding; support_pool, query_pool: disjoint index sets (e.g. the
    train and test splits). Only classes with at least K support and Q query images take part; when
    more than N do, each episode picks N of them uniformly. Deterministic for a given ``seed``.
    """
    if bool(torch.isin(support_pool, query_pool).any()):
        raise ValueError("support and query pools overlap")
    g = torch.Generator().manual_seed(seed)
    eligible = [
        int(c)
        for c in torch.unique(labels)
        if (labels[support_pool] == c).sum() >= k_shot and (labels[query_pool] == c).sum() >= n_query
    ]
    if len(eligible) < n_way:
        raise ValueError(
            f"{n_way}-way {k_shot}-shot {n_query}-query needs {n_way} classes with >= {k_shot} support and "
            f">= {n_query} query images; only {len(eligible)} have them"
        )
    cls = torch.tensor(eligible)
    # N of the eligible classes per episode: the first N of a random permutation (E, C) → (E, N).
    classes = cls[torch.rand(n_episodes, len(cls), generator=g).argsort(1)[:, :n_way]]
    support = torch.empty(n_episodes, n_way, k_shot, dtype=torch.long)
    query = torch.empty(n_episodes, n_way, n_query, dtype=torch.long)
    for c in eligible:
        s_idx, q_idx = support_pool[labels[support_pool] == c], query_pool[labels[query_pool] == c]
        where = (classes == c).nonzero()  # (episodes using c, 2): episode, slot
        if len(where) == 0:
            continue
        # K (resp. Q) distinct indices per episode: the smallest K of random keys per row.
        pick_s = torch.rand(len(where), len(s_idx), generator=g).argsort(1)[:, :k_shot]
        pick_q = torch.rand(len(where), len(q_idx), generator=g).argsort(1)[:, :n_query]
        support[where[:, 0], where[:, 1]] = s_idx[pick_s]
        query[where[:, 0], where[:, 1]] = q_idx[pick_q]
    return Episodes(classes, support, query)


def simpleshot(feats: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """SimpleShot's CL2N: (…, D) features minus the mean training feature (D,), L2-normalised."""
    return F.normalize(feats - mean, dim=-1)


def prototype_scores(support: torch.Tensor, query: torch.Tensor, metric: str = "cosine") -> torch.Tensor:
    """support (E, N, K, D), query (E, M, D) → (E, M, N) scores, higher = more likely that class.

    Prototypes are the support means (E, N, D); cosine similarity or negative squared euclidean
    distance to them."""
    protos = support.mean(2)
    if metric == "cosine":
        return torch.einsum("emd,end->emn", F.normalize(query, dim=-1), F.normalize(protos, dim=-1))
    if metric == "euclidean":
        return -torch.cdist(query, protos).pow(2)
    raise ValueError(f"metric must be cosine or euclidean, not {metric!r}")


def knn_scores(support: torch.Tensor, query: torch.Tensor, k: int) -> torch.Tensor:
    """support (E, N, K, D), query (E, M, D) → (E, M, N) vote shares of the k nearest support
    embeddings (cosine), ties broken by the mean similarity of the voters."""
    e, n, kk, d = support.shape
    flat = F.normalize(support.reshape(e, n * kk, d), dim=-1)
    sim = torch.einsum("emd,esd->ems", F.normalize(query, dim=-1), flat)  # (E, M, N*K)
    k = min(k, n * kk)
    top, idx = sim.topk(k, dim=-1)
    votes = F.one_hot(idx // kk, n).float()  # (E, M, k, N): the class of each neighbour
    return votes.sum(2) + 1e-3 * (votes * top.unsqueeze(-1)).sum(2) / k


def logreg_scores(
    support: torch.Tensor, query: torch.Tensor, l2: float = 1e-2, steps: int = 50
) -> torch.Tensor:
    """Multinomial logistic regression per episode on (E, N, K, D) support, scored on (E, M, D) queries.

    Weights (E, D, N) and biases (E, N) of all episodes are fitted together by L-BFGS on the summed
    mean cross-entropy + ``l2`` * ||W||^2 (separable across episodes)."""
    e, n, k, d = support.shape
    x = support.reshape(e, n * k, d)
    y = torch.arange(n).repeat_interleave(k).expand(e, -1)  # (E, N*K): row order is class-major
    w = torch.zeros(e, d, n, requires_grad=True)
    b = torch.zeros(e, 1, n, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        logits = torch.baddbmm(b, x, w)  # (E, N*K, N)
        loss = (
            F.cross_entropy(logits.reshape(-1, n), y.reshape(-1), reduction="sum") / (n * k)
            + l2 * w.pow(2).sum()
        )
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return torch.baddbmm(b, query, w)


def evaluate_episodes(
    feats: torch.Tensor,
    labels: torch.Tensor,
    episodes: Episodes,
    train_mean: torch.Tensor,
    classifier: str,
    metric: str = "cosine",
    knn_k: int = 5,
    logreg_l2: float = 1e-2,
) -> dict[str, float]:
    """Accuracy (= balanced accuracy: queries are balanced) and, for 2-way, AUROC of every episode;
    returns their mean, std and 95% CI half-width over episodes (normal approximation)."""
    if classifier not in CLASSIFIERS:
        raise ValueError(f"classifier must be one of {CLASSIFIERS}, not {classifier!r}")
    f = simpleshot(feats, train_mean)
    e, n, q = episodes.query.shape
    scorers = {
        "prototype": lambda sup, qry: prototype_scores(sup, qry, metric),
        "knn": lambda sup, qry: knn_scores(sup, qry, knn_k),
        "logreg": lambda sup, qry: logreg_scores(sup, qry, logreg_l2),
    }
    # Episodes in chunks bound the memory of the batched tensors (L-BFGS keeps a history per parameter).
    step = 512 if classifier == "logreg" else 4096
    chunks = [
        scorers[classifier](
            f[episodes.support[lo : lo + step]], f[episodes.query[lo : lo + step].flatten(1, 2)]
        )
        for lo in range(0, e, step)
    ]  # each (e', N*Q, N); queries flattened class-major
    scores = torch.cat(chunks)
    truth = torch.arange(n).repeat_interleave(q)  # (N*Q,): query rows are class-major too
    acc = (scores.argmax(-1) == truth).float().mean(1)  # (E,)
    out = _summary("accuracy", acc)
    if n == 2:
        out.update(_summary("auroc", _auroc_2way(scores[..., 1] - scores[..., 0], q)))
    return out


def _auroc_2way(score: torch.Tensor, q: int) -> torch.Tensor:
    """(E, 2Q) scores for class 1 (first Q rows are class 0) → (E,) AUROC via the Mann-Whitney U
    statistic, ties counted as one half."""
    neg, pos = score[:, :q], score[:, q:]
    diff = pos.unsqueeze(2) - neg.unsqueeze(1)  # (E, Q, Q)
    return ((diff > 0).float() + 0.5 * (diff == 0).float()).mean((1, 2))


def _summary(name: str, per_episode: torch.Tensor) -> dict[str, float]:
    m, sd = float(per_episode.mean()), float(per_episode.std()) if len(per_episode) > 1 else 0.0
    half = 1.96 * sd / math.sqrt(len(per_episode))
    return {
        name: m,
        f"{name}_std": sd,
        f"{name}_ci95": half,
        f"{name}_low": m - half,
        f"{name}_high": m + half,
    }


# ------------------------------------------------------------------------------- label efficiency


def label_efficiency(
    feats: torch.Tensor,
    labels: np.ndarray,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    test_idx: np.ndarray,
    budgets: list[int],
    draws: int,
    cs: list[float],
    seed: int,
) -> list[dict[str, float]]:
    """Test metrics of the linear probe (lowshot.probe, the estimator behind ``finetune/train.py --probe``)
    fitted on K labelled training images per class.

    For each K in ``budgets`` (0 = every training label) and each of ``draws`` seeded draws, K images per
    class (all of a class that has fewer) are drawn from ``train_idx``, the probe is fitted on them (its
    features standardised with the statistics of every training and validation image, which need no
    label; its L2 strength chosen on the validation labels among ``cs``, or fixed where ``cs`` holds one
    value) and scored on every test image. Returns one row per K with the mean, the standard deviation and
    a 95% t-interval over draws of accuracy, balanced accuracy and AUROC.
    """
    x = feats.numpy()
    x_free = x[np.concatenate([train_idx, val_idx])]
    y_test, y_val = labels[test_idx], labels[val_idx]
    rows = []
    for k in budgets:
        scores: dict[str, list[float]] = {"accuracy": [], "balanced_accuracy": [], "auroc": []}
        for d in range(draws if k else 1):  # all labels: one fit, nothing to draw
            pick = draw_per_class(labels, train_idx, k, [seed, k, d])
            clf = fit_probe(x[pick], labels[pick], x[val_idx], y_val, cs, seed, x_free)[0]
            prob = np.zeros((len(test_idx), int(labels.max()) + 1))
            prob[:, clf.classes_] = clf.predict_proba(x[test_idx])
            scores["accuracy"].append(float((prob.argmax(1) == y_test).mean()))
            scores["balanced_accuracy"].append(float(balanced_accuracy_score(y_test, prob.argmax(1))))
            scores["auroc"].append(auroc(y_test, prob))
        rows.append(summarise_draws(k, len(pick), scores))
    return rows


def summarise_draws(k: int, n_labels: int, scores: dict[str, list[float]]) -> dict[str, float]:
    """One label-efficiency point: for each metric its mean, standard deviation and 95% t-interval
    over the draws (a single draw gives a zero-width interval)."""
    row: dict[str, float] = {
        "labels_per_class": k,
        "draws": len(next(iter(scores.values()))),
        "n_labels": n_labels,
    }
    for m, v in scores.items():
        s = mean_ci(v)
        row.update({m: s["mean"], f"{m}_std": s["std"], f"{m}_low": s["low"], f"{m}_high": s["high"]})
    # per draw, in draw order (the draws are seeded alike for every backbone: paired comparisons)
    row["auroc_draws"] = list(scores.get("auroc", []))  # type: ignore[assignment]
    return row


def plot_label_efficiency(
    curves: dict[str, list[dict[str, float]]], metric: str, path: str | Path, title: str = ""
) -> Path:
    """One line per backbone: ``metric`` against labelled images per class (log axis; "all" last),
    with the 95% band over draws. curves: {name: label_efficiency rows}. Writes a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2 + 0.22 * len(curves)), dpi=120)
    ticks: dict[float, str] = {}
    for name, rows in curves.items():
        finite = [r for r in rows if r["labels_per_class"]]
        top = max((r["labels_per_class"] for r in finite), default=1) * 2
        xs = [r["labels_per_class"] or top for r in rows]
        for xv, r in zip(xs, rows, strict=True):
            ticks[xv] = (
                str(int(r["labels_per_class"])) if r["labels_per_class"] else f"all\n({int(r['n_labels'])})"
            )
        order = np.argsort(xs)
        x = np.asarray(xs, dtype=float)[order]
        m = np.asarray([rows[i][metric] for i in order])
        ax.plot(x, m, marker="o", label=name)
        ax.fill_between(
            x,
            [rows[i][f"{metric}_low"] for i in order],
            [rows[i][f"{metric}_high"] for i in order],
            alpha=0.2,
        )
    ax.set_xscale("log")
    ax.set_xticks(list(ticks), list(ticks.values()))
    ax.minorticks_off()
    ax.set_xlabel("labelled training images per class")
    ax.set_ylabel("test " + {"auroc": "AUROC"}.get(metric, metric.replace("_", " ")))
    ax.set_title(title or "label efficiency (linear probe, 95% band over draws)", fontsize=10)
    ax.grid(alpha=0.3)
    # Below the axes: with several backbones a legend inside would hide the curves.
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=1, frameon=False)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out)
    plt.close(fig)
    return out


def curves(run_dirs: list[Path], out: Path, metric: str) -> None:
    """Label-efficiency curves of several runs in one PNG and a Markdown table beside it.

    A fewshot/evaluate.py run gives its probe curve; finetune/train.py runs with
    ``data.train_per_class=K`` (one per draw ``data.train_draw``) are pooled into a fine-tune curve
    per backbone, K = 0 meaning every label."""
    data: dict[str, list[dict[str, float]]] = {}
    finetunes: dict[str, dict[int, tuple[int, dict[str, list[float]]]]] = {}
    names = set()
    for d in run_dirs:
        f = Path(d) / RESULTS
        res = read_results(d) if f.is_file() else {}
        if res.get("job") not in ("fewshot", "finetune"):
            raise SystemExit(
                f"lowshot: error: {f} is not a finished fewshot/evaluate.py or finetune/train.py run"
            )
        cfg = load_yaml(Path(d) / CONFIG)
        tag = f"{weights_tag(res['model'], res['weights'])} · {cfg.data.size} px"
        names.add(res["data"])
        if res["job"] == "fewshot":
            tag += " · probe"
            data[f"{tag} ({Path(d).name})" if tag in data else tag] = res["label_efficiency"]
        else:
            k = cfg.data.train_per_class
            _, scores = finetunes.setdefault(tag + " · fine-tune", {}).setdefault(
                k, (sum(res["counts"]["train"]), {"accuracy": [], "balanced_accuracy": [], "auroc": []})
            )
            for m in scores:
                scores[m].append(res["test"]["metrics"][m]["value"])
    for tag, by_k in finetunes.items():
        data[tag] = [
            summarise_draws(k, n, sc) for k, (n, sc) in sorted(by_k.items(), key=lambda kv: kv[0] or 1 << 30)
        ]
    plot_label_efficiency(data, metric, out, " / ".join(sorted(names)))
    budgets = sorted(
        {int(r["labels_per_class"]) for rows in data.values() for r in rows}, key=lambda k: k or 1 << 30
    )
    table = [
        f"Test {'AUROC' if metric == 'auroc' else metric.replace('_', ' ')}, mean [95% CI] over draws, by labelled "
        "training images per class (probe: fewshot/evaluate.py; fine-tune: finetune/train.py data.train_per_class=K)",
        "",
        "| backbone | " + " | ".join(str(k) if k else "all" for k in budgets) + " |",
        "|---" * (len(budgets) + 1) + "|",
    ]
    for name, rows in data.items():
        at = {int(r["labels_per_class"]): r for r in rows}
        cells = [
            format_ci({b: at[k][metric + s] for b, s in (("value", ""), ("low", "_low"), ("high", "_high"))})
            if k in at
            else "–"
            for k in budgets
        ]
        table.append(f"| {name} | " + " | ".join(cells) + " |")
    out.with_suffix(".md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    print(f"wrote {out} and {out.with_suffix('.md')}")
