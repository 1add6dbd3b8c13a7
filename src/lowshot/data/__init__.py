"""One data layer for every script: sources → a decoded uint8 store with splits → datasets.

Three sources, chosen by what ``data.source`` points at (relative to ``data.root``):

- a MedMNIST ``.npz`` with the official keys ``{train,val,test}_{images,labels}`` and its own split;
  known files are verified by md5, missing named sets are downloaded through ``medmnist`` when online;
- a class-per-folder image directory (``root/source/<class>/*.png|jpg|...``);
- a CSV manifest ``path,label[,group][,split]`` (paths relative to the CSV), ``group`` being the
  patient or study id.

Every image is decoded once, padded to a square and resized to ``data.size`` px, into a uint8 store
``(N, H, W, C)`` with ``C`` 1 (grayscale) or 3 (RGB). File-based stores are cached under
``data.cache_dir`` keyed by every file's path and content (sha1) and the size, so the read-only
data folder is never written. Sources without a split get a seeded split, stratified by label and
grouped by ``group`` so that no patient spans two splits; identical and near-identical images
(dHash) are put in one group first, so a duplicate pair never straddles two splits or two folds.
With ``data.folds`` = k, train+val are re-split into k grouped, stratified folds (the test split is
never touched) and fold ``data.fold`` validates.

The test split is a lockbox: a training script calls :meth:`Store.seal` before any selection, after
which every read of the test rows raises :class:`LockboxError` until :meth:`Store.unseal` is called,
once, for the final evaluation.

The package holds one concern a module: ``sources`` (npz, folders, manifests → Store), ``decode``
(files → arrays, fingerprints), ``dicom`` (DICOM pixel data, windows, patients), ``cache``, ``duplicates``, ``splits``, ``loaders`` and ``store``.
"""

from .cache import cache_root, store_cache_file
from .decode import (
    IMAGE_SUFFIXES,
    decode_image,
    dhash,
    file_digest,
    fingerprints,
    pixel_digest,
    square_resize,
)
from .duplicates import duplicate_groups, duplicate_pairs
from .loaders import (
    Rebatch,
    StoreDataset,
    balanced_draw_weights,
    eval_transform,
    make_loader,
    normalisation,
    resolve_workers,
    split_loader,
    split_train_loader,
    store_loader,
    train_loader,
)
from .sources import KNOWN_NPZ, load_store, source_path
from .splits import draw_per_class, group_holdout, groups_across_splits, make_splits
from .store import SPLITS, DataError, LockboxError, Store

__all__ = [
    "IMAGE_SUFFIXES",
    "KNOWN_NPZ",
    "SPLITS",
    "DataError",
    "LockboxError",
    "Rebatch",
    "Store",
    "StoreDataset",
    "balanced_draw_weights",
    "cache_root",
    "decode_image",
    "dhash",
    "draw_per_class",
    "duplicate_groups",
    "duplicate_pairs",
    "eval_transform",
    "file_digest",
    "fingerprints",
    "group_holdout",
    "groups_across_splits",
    "load_store",
    "make_loader",
    "make_splits",
    "normalisation",
    "pixel_digest",
    "resolve_workers",
    "source_path",
    "split_loader",
    "split_train_loader",
    "square_resize",
    "store_cache_file",
    "store_loader",
    "train_loader",
]
