"""Splits that cannot leak: stratified, grouped hold-outs, k-fold, label budgets and limits."""

from __future__ import annotations

import hashlib
import logging

import numpy as np
from sklearn.model_selection import train_test_split

from ..config import DataConfig
from .store import SPLITS, DataError, Store

log = logging.getLogger(__name__)


def group_order(keys: np.ndarray, seed: int) -> np.ndarray:
    """(G,) float in [0, 1): each group's place in the deal, a hash of ``seed`` and its key. A hash, not a
    rank among the groups, so adding, removing or merging groups leaves every other group where it was."""
    return np.array(
        [int.from_bytes(hashlib.sha1(f"{seed}|{k}".encode()).digest()[:8], "big") / 2.0**64 for k in keys]
    )


def deal(
    labels: np.ndarray, groups: np.ndarray, seed: int, keys: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Each image's group code (N,) and each group's place (G,) in [0, 1) in the deal of its class: per
    class (a group's most common label) the groups in ``group_order``, a group's place being the share of
    the class's images dealt before its middle image. A group's key is the smallest of its images'
    ``keys`` (the pixel digests, so the deal does not depend on where the data lies or what the files are
    called; default: the group names). A hold-out of fraction f is the groups placed below f; fold j of
    k the groups placed in [j/k, (j+1)/k).

    Stable by design: scikit-learn's StratifiedGroupKFold re-deals every group when one changes, so 10 more
    verified copies in BUSI moved 385 of its 780 images between splits; here a change moves the groups it
    merges and at most the groups at the edge of each cut of each class (tests/test_data.py)."""
    names, codes = np.unique(groups, return_inverse=True)
    if keys is None:
        key = names.astype(str)
    else:
        k = np.asarray(keys, dtype=str)
        by = np.lexsort((k, codes))  # by group, then key
        _, start = np.unique(codes[by], return_index=True)
        key = k[by[start]]  # each group's smallest key
    size = np.bincount(codes, minlength=len(names))
    votes = np.zeros((len(names), int(labels.max()) + 1 if len(labels) else 1))
    np.add.at(votes, (codes, labels), 1)
    major = votes.argmax(1)
    order = group_order(key, seed)
    place = np.zeros(len(names))
    for c in np.unique(major):
        gs = np.flatnonzero(major == c)
        gs = gs[np.argsort(order[gs], kind="stable")]
        place[gs] = (np.cumsum(size[gs]) - size[gs] / 2) / size[gs].sum()  # images before the middle
    return codes, place


def group_holdout(
    labels: np.ndarray, groups: np.ndarray, fraction: float, seed: int, keys: np.ndarray | None = None
) -> np.ndarray:
    """Indices of a held-out part of about ``fraction`` of the images, grouped (no group inside and outside
    it) and stratified by label: the groups the :func:`deal` places below ``fraction``."""
    codes, place = deal(labels, groups, seed, keys)
    if len(place) < 2:
        raise DataError(f"only {len(place)} group(s): too few to hold out {fraction:.0%} by group")
    return np.flatnonzero((place < fraction)[codes])


def make_splits(
    labels: np.ndarray,
    groups: np.ndarray,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    keys: np.ndarray | None = None,
) -> np.ndarray:
    """A (N,) array of 'train' / 'val' / 'test', stratified and grouped (``group_holdout``; ``keys``: one
    per image, e.g. the pixel digests)."""
    split = np.full(len(labels), "train", dtype="<U5")
    split[group_holdout(labels, groups, test_fraction, seed, keys)] = "test"
    rest = np.flatnonzero(split == "train")
    rest_keys = None if keys is None else np.asarray(keys)[rest]
    val = group_holdout(labels[rest], groups[rest], val_fraction / (1.0 - test_fraction), seed + 1, rest_keys)
    split[rest[val]] = "val"
    return split


def fill_splits(store: Store, cfg: DataConfig, missing: list[str]) -> None:
    """Assign the splits the source does not define, out of its training images."""
    pool = np.flatnonzero((store.split == "") | (store.split == "train"))
    keys = store.fingerprints()[1][pool]  # native-pixel digests: the deal follows the images, not their paths
    if "test" in missing and "val" in missing:
        sub = make_splits(
            store.labels[pool], store.groups[pool], cfg.val_fraction, cfg.test_fraction, cfg.split_seed, keys
        )
    else:
        frac = cfg.test_fraction if "test" in missing else cfg.val_fraction
        sub = np.full(len(pool), "train", dtype="<U5")
        sub[group_holdout(store.labels[pool], store.groups[pool], frac, cfg.split_seed, keys)] = missing[0]
    store.split = store.split.astype("<U5")
    store.split[pool] = sub
    if "test" in missing and len(missing) == 1:
        log.warning(
            "%s defines no test split: holding out %.0f%% of train by group",
            store.name,
            100 * cfg.test_fraction,
        )


def assign_fold(store: Store, cfg: DataConfig) -> None:
    """k-fold cross-validation: train+val become k stratified, grouped folds, dealt like the hold-outs
    (:func:`deal`, seeded by ``split_seed``, keyed by the images' pixel digests, so a change to the data
    or the duplicate groups moves only the groups it touches and those at the folds' edges); fold
    ``cfg.fold`` is 'val', the others 'train'. The test split is untouched."""
    pool = np.flatnonzero(np.isin(store.split, ("train", "val")))
    codes, place = deal(store.labels[pool], store.groups[pool], cfg.split_seed, store.fingerprints()[1][pool])
    if len(place) < cfg.folds:
        raise DataError(f"{store.name}: {len(place)} groups cannot fill {cfg.folds} folds")
    fold = np.minimum((place * cfg.folds).astype(int), cfg.folds - 1)[codes]
    if not (fold == cfg.fold).any():  # groups so unequal that one spans more than a fold's share
        raise DataError(
            f"{store.name}: fold {cfg.fold} of {cfg.folds} holds no group (the largest groups are bigger "
            "than a fold's share); use fewer data.folds"
        )
    store.split[pool] = "train"
    store.split[pool[fold == cfg.fold]] = "val"


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
    short = {
        store.classes[c]: n
        for c, n in enumerate(np.bincount(store.labels[train], minlength=store.num_classes))
        if n < k
    }
    if short:  # the budget cannot be met there: the whole class is used, and the run says so
        log.warning(
            "%s: data.train_per_class=%d, but these classes have fewer training images: %s; all of them are used",
            store.name,
            k,
            short,
        )
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
    for name in (
        "images",
        "labels",
        "split",
        "groups",
        "paths",
        "source_groups",
        "hashes",
        "digests",
        "thumbs",
    ):
        if getattr(store, name) is not None:
            setattr(store, name, getattr(store, name)[k])


# ---------------------------------------------------------------------------------------------- datasets
