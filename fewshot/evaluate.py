"""N-way K-shot episodes for any backbone, on embeddings extracted once and cached.

    accelerate launch fewshot/evaluate.py model.weights=runs/<pretrain>/checkpoint
    accelerate launch fewshot/evaluate.py --config configs/retinamnist.yaml fewshot.n_way=3 model.weights=none

Support images come from the training split, queries from ``fewshot.query_split`` (test by
default), so they never overlap. Each (shots, classifier) row reports accuracy (= balanced accuracy:
queries are balanced per class) and, for 2-way, AUROC, as the mean over ``fewshot.episodes``
episodes with a 95% CI. Embeddings are cached under the cache folder, keyed by the weights' bytes
and the decoded images, so a second run with other episode settings does not touch the backbone.
"""

import sys
import time

import torch
from accelerate.utils import set_seed

from lowshot.config import parse_args
from lowshot.data import load_store
from lowshot.data.guards import leakage_guard
from lowshot.errors import user_errors
from lowshot.fewshot import evaluate_episodes, label_efficiency, plot_label_efficiency, sample_episodes
from lowshot.models import backbone_for, cached_embeddings, weights_tag
from lowshot.tracking import Run, make_accelerator

user_errors()
cfg, overrides = parse_args(sys.argv[1:])
fs = cfg.fewshot
accelerator = make_accelerator(cfg)
set_seed(cfg.seed)
with accelerator.main_process_first():
    store = load_store(cfg.data)
leakage = leakage_guard(store, cfg)  # identical images in two splits: stop, warn or drop
accelerator.print(store.describe())
run = Run(accelerator, cfg, "fewshot", store.name, overrides)

backbone, in_chans, norm = backbone_for(cfg, store.grayscale)
t0 = time.perf_counter()
feats, cache_hit = cached_embeddings(cfg, store, backbone, in_chans, norm, accelerator)
accelerator.print(
    f"embeddings {tuple(feats.shape)} {'from the cache' if cache_hit else 'extracted'} in {time.perf_counter() - t0:.1f} s"
)

labels = torch.from_numpy(store.labels)
support_pool = torch.from_numpy(store.indices("train"))
query_pool = torch.from_numpy(store.indices(fs.query_split))
train_mean = feats[support_pool].mean(0)  # SimpleShot centring uses training images only
rows = []
for shots in fs.shots:
    episodes = sample_episodes(
        labels, support_pool, query_pool, fs.n_way, shots, fs.n_query, fs.episodes, cfg.seed
    )
    for clf in fs.classifiers:
        t = time.perf_counter()
        r = evaluate_episodes(feats, labels, episodes, train_mean, clf, fs.metric, fs.knn_k, fs.logreg_l2)
        rows.append({"shots": shots, "classifier": clf, **r, "seconds": time.perf_counter() - t})
        run.log({f"fewshot/{clf}/accuracy": r["accuracy"], "shots": shots}, step=shots)

header = (
    f"{fs.n_way}-way, {fs.n_query} queries/class from {fs.query_split}, {fs.episodes} episodes, mean [95% CI]"
)
lines = [header, f"{'shots':>5}  {'classifier':<10} {'accuracy':<22} {'AUROC' if fs.n_way == 2 else ''}"]
for r in rows:
    auc = f"{r['auroc']:.3f} [{r['auroc_low']:.3f}, {r['auroc_high']:.3f}]" if "auroc" in r else ""
    lines.append(
        f"{r['shots']:>5}  {r['classifier']:<10} {r['accuracy']:.3f} [{r['accuracy_low']:.3f}, {r['accuracy_high']:.3f}]  {auc}"
    )
accelerator.print("\n".join(lines))

# ---- label efficiency: a probe on K labels per class, scored on the whole test split -------------------
curve = label_efficiency(
    feats,
    store.labels,
    store.indices("train"),
    store.indices("val"),
    store.indices("test"),
    fs.label_budgets,
    fs.draws,
    [fs.probe_c] if fs.probe_c > 0 else cfg.train.probe_cs,
    cfg.seed,
)
accelerator.print(f"label efficiency (test, mean [95% CI] over {fs.draws} draws):")
for r in curve:
    k = int(r["labels_per_class"]) or f"all ({int(r['n_labels'])})"
    accelerator.print(
        f"  {k!s:>9} /class  AUROC {r['auroc']:.3f} [{r['auroc_low']:.3f}, {r['auroc_high']:.3f}]"
        f"  balanced acc {r['balanced_accuracy']:.3f} [{r['balanced_accuracy_low']:.3f}, {r['balanced_accuracy_high']:.3f}]"
    )
if accelerator.is_main_process and curve:
    run.log_table("label_efficiency_table", curve)
    png = plot_label_efficiency(
        {weights_tag(cfg.model.name, cfg.model.weights): curve},
        "auroc",
        run.dir / "label_efficiency.png",
        store.name,
    )
    run.log_image("label_efficiency", png)
run.finish(
    {
        "job": "fewshot",
        "data": store.name,
        "splits": store.split_digests(),  # which images each split held
        "model": cfg.model.name,
        "weights": cfg.model.weights,
        "n_way": fs.n_way,
        "n_query": fs.n_query,
        "episodes": fs.episodes,
        "query_split": fs.query_split,
        "embedding_cache_hit": cache_hit,
        "rows": rows,
        "label_efficiency": curve,
        "leakage": leakage,
    }
)
