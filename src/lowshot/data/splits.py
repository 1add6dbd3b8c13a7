"""Splits that cannot leak: stratified, grouped hold-outs, k-fold, label budgets and limits."""

from __future__ import annotations

import logging

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold, train_test_split

from ..config import DataConfig
from .store import SPLITS, DataError, Store

log = logging.getLogger(__name__)


def group_holdout(labels: np.ndarray, groups: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Indices of a held-out part of about ``fraction`` of the images: stratified by label and
    grouped (no group inside and outside it), via scikit-learn's ``StratifiedGroupKFold``."""
    n_splits = max(2, round(1.0 / fraction))
    _, codes = np.unique(groups, return_inverse=True)
    min_class = np.bincount(labels).min() if len(labels) else 0
    if len(np.unique(codes)) < n_splits:
        raise DataError(f"only {len(np.unique(codes))} groups: too few to hold out {fraction:.0%} by group")
    if min_class < n_splits:  # StratifiedGroupKFold warns and can leave a class out of the held-out part
        log.warning(
            "a class has %d images, fewer than %d folds: the split cannot be fully stratified",
            min_class,
            n_splits,
        )
    kfold = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    _, held = next(kfold.split(np.zeros(len(labels)), labels, codes))
    return held


def make_splits(
    labels: np.ndarray, groups: np.ndarray, val_fraction: float, test_fraction: float, seed: int
) -> np.ndarray:
    """A (N,) array of 'train' / 'val' / 'test', stratified and grouped."""
    split = np.full(len(labels), "train", dtype="<U5")
    split[group_holdout(labels, groups, test_fraction, seed)] = "test"
    rest = np.flatnonzero(split == "train")
    val = group_holdout(labels[rest], groups[rest], val_fraction / (1.0 - test_fraction), seed + 1)
    split[rest[val]] = "val"
    return split


def fill_splits(store: Store, cfg: DataConfig, missing: list[str]) -> None:
    """Assign the splits the source does not define, out of its training images."""
    pool = np.flatnonzero((store.split == "") | (store.split == "train"))
    if "test" in missing and "val" in missing:
        sub = make_splits(
            store.labels[pool], store.groups[pool], cfg.val_fraction, cfg.test_fraction, cfg.split_seed
        )
    else:
        frac = cfg.test_fraction if "test" in missing else cfg.val_fraction
        sub = np.full(len(pool), "train", dtype="<U5")
        sub[group_holdout(store.labels[pool], store.groups[pool], frac, cfg.split_seed)] = missing[0]
    store.split = store.split.astype("<U5")
    store.split[pool] = sub
    if "test" in missing and len(missing) == 1:
        log.warning(
            "%s defines no test split: holding out %.0f%% of train by group",
            store.name,
            100 * cfg.test_fraction,
        )


def assign_fold(store: Store, cfg: DataConfig) -> None:
    """k-fold cross-validation: train+val become k stratified, grouped folds (seeded by
    ``split_seed``); fold ``cfg.fold`` is 'val', the others 'train'. The test split is untouched."""
    pool = np.flatnonzero(np.isin(store.split, ("train", "val")))
    _, codes = np.unique(store.groups[pool], return_inverse=True)
    if len(np.unique(codes)) < cfg.folds:
        raise DataError(f"{store.name}: {len(np.unique(codes))} groups cannot fill {cfg.folds} folds")
    kfold = StratifiedGroupKFold(n_splits=cfg.folds, shuffle=True, random_state=cfg.split_seed)
    _, held = list(kfold.split(np.zeros(len(pool)), store.labels[pool], codes))[cfg.fold]
    store.split[pool] = "train"
    store.split[pool[held]] = "val"


def groups_across_splits(store: Store) -> list[str]:
    """The source's groups (patients) that have images in more than one split, sorted."""
    names, g = np.unique(
        store.groups if store.source_groups is None else store.source_groups, return_inverse=True
    )
    _, s = np.unique(store.split, return_inverse=True)
    pairs = np.unique(np.stack([g.ravel(), s.ravel()], 1), axis=0)  # distinct (group, split) pairs
    return [str(n) for n in names[np.flatnonzero(np.bincount(pairs[:, 0]) > 1)]]


def warn_group_leaks(store: Store) -> None:
    leaks = groups_across_splits(store)
    if leaks:
        log.warning(
            "%d groups (patients) span more than one split, e.g. %s: scores will be optimistic. Drop the 'split' "
            "column to let lowshot split by group.",
            len(leaks),
            leaks[:3],
        )


def draw_per_class(labels: np.ndarray, pool: np.ndarray, k: int, seed: list[int]) -> np.ndarray:
    """k random indices of ``pool`` per class (all of a class with fewer; k = 0: all), seeded."""
    rng = np.random.default_rng(seed)
    return np.concatenate(
        [rng.permutation(pool[labels[pool] == c])[: k or None] for c in np.unique(labels[pool])]
    )


def label_budget(store: Store, k: int, seed: int, draw: int) -> None:
    """Keep k training labels per class (all of a smaller class); mark the rest 'unlabelled'."""
    train = store.indices("train")
    keep = draw_per_class(store.labels, train, k, [seed, k, draw])
    store.split = store.split.astype("<U10")
    store.split[np.setdiff1d(train, keep)] = "unlabelled"


def apply_limit(store: Store, limit: int, seed: int) -> None:
    keep = []
    for s in SPLITS:
        idx = store.indices(s)
        if len(idx) > limit:
            try:
                idx, _ = train_test_split(
                    idx, train_size=limit, stratify=store.labels[idx], random_state=seed
                )
            except ValueError:  # a class too small to stratify
                idx = np.random.default_rng(seed).choice(idx, limit, replace=False)
        keep.append(np.sort(idx))
    k = np.concatenate(keep)
    for name in ("images", "labels", "split", "groups", "paths", "source_groups", "hashes", "digests"):
        if getattr(store, name) is not None:
            setattr(store, name, getattr(store, name)[k])


# ---------------------------------------------------------------------------------------------- datasets
