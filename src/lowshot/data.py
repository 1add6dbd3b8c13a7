"""One data layer for every script: sources → a decoded uint8 store with splits → datasets.

Three sources, chosen by what ``data.source`` points at (relative to ``data.root``):

- a MedMNIST ``.npz`` with the official keys ``{train,val,test}_{images,labels}`` and its own split;
  known files are verified by md5, missing named sets are downloaded through ``medmnist`` when online;
- a class-per-folder image directory (``root/source/<class>/*.png|jpg|...``);
- a CSV manifest ``path,label[,group][,split]`` (paths relative to the CSV), ``group`` being the
  patient or study id.

Every image is decoded once, padded to a square and resized to ``data.size`` px, into a uint8 store
``(N, H, W, C)`` with ``C`` 1 (grayscale) or 3 (RGB). File-based stores are cached under
``data.cache_dir`` keyed by the file listing (paths, sizes, mtimes) and the size, so the read-only
data folder is never written. Sources without a split get a seeded split, stratified by label and
grouped by ``group`` so that no patient spans two splits; identical and near-identical images
(dHash) are put in one group first, so a duplicate pair never straddles two splits or two folds.
With ``data.folds`` = k, train+val are re-split into k grouped, stratified folds (the test split is
never touched) and fold ``data.fold`` validates.

The test split is a lockbox: a training script calls :meth:`Store.seal` before any selection, after
which every read of the test rows raises :class:`LockboxError` until :meth:`Store.unseal` is called,
once, for the final evaluation.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from sklearn.model_selection import StratifiedGroupKFold, train_test_split
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler
from torchvision import transforms as T

from .config import DataConfig, TrainConfig

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp"}
# md5 and class names of the 28 px MedMNIST files used most here, for machines without the
# `medmnist` package (which lists every set and size).
KNOWN_NPZ = {
    "breastmnist.npz": ("750601b1f35ba3300ea97c75c52ff8f6", ["malignant", "normal, benign"]),
    "retinamnist.npz": ("bd4c0672f1bba3e3a89f0e4e876791e4", ["0", "1", "2", "3", "4"]),
}


class DataError(ValueError):
    """Bad or missing input data; the message names the file and the fix."""


class LockboxError(RuntimeError):
    """The test split was read while sealed, i.e. before model selection had finished."""


@dataclass
class Store:
    """Decoded images with labels, splits and groups.

    images: (N, H, W, C) uint8, C in {1, 3}; labels: (N,) int64; split, groups, paths: (N,) str.
    """

    images: np.ndarray
    labels: np.ndarray
    split: np.ndarray
    groups: np.ndarray
    paths: np.ndarray
    classes: list[str]
    name: str
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason) not decoded
    source_groups: np.ndarray | None = None  # the source's own groups, before duplicates were merged
    # Of each image at its native resolution, taken when decoding: (N, 64) dHash bits, (N,) pixel SHA-1.
    hashes: np.ndarray | None = None
    digests: np.ndarray | None = None
    sealed: bool = False  # True: the test rows cannot be read (see seal / unseal)
    test_reads: int = 0  # how often the test split was unsealed in this process

    @property
    def grayscale(self) -> bool:
        return self.images.shape[-1] == 1

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def indices(self, *splits: str) -> np.ndarray:
        """Store rows in any of ``splits`` ('train', 'val', 'test', 'unlabelled')."""
        if self.sealed and "test" in splits:
            raise LockboxError(
                "the test split is sealed: epochs, learning rates and probe strengths must be chosen on "
                "train/val only. Read it once, after selection, through Store.unseal()."
            )
        return np.flatnonzero(np.isin(self.split, splits))

    def fingerprints(self) -> tuple[np.ndarray, np.ndarray]:
        """(N, 64) dHash bits and (N,) pixel digests of the native images (of the store images if the
        source gave none)."""
        if self.hashes is None or self.digests is None:
            self.hashes, self.digests = fingerprints(list(self.images))
        return self.hashes, self.digests

    def seal(self) -> None:
        """Lock the test split until :meth:`unseal` (call before any model selection)."""
        self.sealed = True

    def unseal(self) -> np.ndarray:
        """Open the test split for the final evaluation; returns its rows. Counted in ``test_reads``."""
        self.sealed = False
        self.test_reads += 1
        return self.indices("test")

    def test_digest(self) -> str:
        """SHA-1 of the test images (their native-pixel digests: the same at any data.size) and labels:
        which lockbox a ledger entry refers to."""
        rows = np.flatnonzero(self.split == "test")
        h = hashlib.sha1("".join(str(d) for d in self.fingerprints()[1][rows]).encode())
        h.update(np.ascontiguousarray(self.labels[rows]).data)
        return h.hexdigest()[:16]

    def counts(self) -> dict[str, list[int]]:
        """Images per class in each split, e.g. ``{'train': [147, 399], ...}``."""
        return {
            s: np.bincount(self.labels[self.split == s], minlength=self.num_classes).tolist() for s in SPLITS
        }

    def describe(self) -> str:
        c = self.counts()
        h, w, ch = self.images.shape[1:]
        parts = [f"{s} {sum(c[s])} {c[s]}" for s in SPLITS]
        return f"{self.name}: {len(self.labels)} images {h}x{w}x{ch}, classes {self.classes}; " + ", ".join(
            parts
        )


# ----------------------------------------------------------------------------------------------- sources


def source_path(cfg: DataConfig) -> Path:
    p = Path(cfg.source).expanduser()
    return p if p.is_absolute() else Path(cfg.root).expanduser() / p


def load_store(cfg: DataConfig) -> Store:
    """Read ``cfg.source`` into a :class:`Store` at ``cfg.size`` px with train/val/test splits."""
    path = source_path(cfg)
    if path.suffix == ".npz":
        store = _load_npz(path, cfg.size)
    elif path.suffix == ".csv":
        store = _load_files(*_read_manifest(path), name=path.stem, cfg=cfg)
    elif path.is_dir():
        store = _load_files(*_scan_folder(path), name=path.name, cfg=cfg)
    elif not path.exists():
        raise DataError(
            f"data source {path} does not exist. Set data.root (or $LOWSHOT_DATA_ROOT) to the folder that holds "
            f"it, or data.source to a .npz, a class-per-folder directory or a .csv manifest."
        )
    else:
        raise DataError(
            f"data source {path}: expected a .npz, a .csv manifest or a class-per-folder directory"
        )
    if cfg.color == "gray" and not store.grayscale:
        # ITU-R 601 luma, as PIL's convert("L"): for gray modalities whose exports carry coloured marks
        luma = store.images.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        store.images = np.clip(luma + 0.5, 0, 255).astype(np.uint8)[..., None]
    elif cfg.color == "rgb" and store.grayscale:
        store.images = np.repeat(store.images, 3, axis=-1)
    _warn_group_leaks(store)  # the source's own split, by its own groups (duplicates: the leakage check)
    if cfg.group_duplicates:
        store.source_groups = store.groups
        store.groups = duplicate_groups(store, cfg.duplicate_bits)
    missing = [s for s in SPLITS if not (store.split == s).any()]
    if missing:
        _fill_splits(store, cfg, missing)
    if cfg.folds:
        _assign_fold(store, cfg)
    if cfg.limit:
        _apply_limit(store, cfg.limit, cfg.split_seed)
    if cfg.train_per_class:
        _label_budget(store, cfg.train_per_class, cfg.split_seed, cfg.train_draw)
    for f, why in store.skipped:
        log.warning("skipped %s: %s", f, why)
    return store


def file_digest(path: Path, algorithm: str) -> str:
    """Hex digest of a file's bytes, read in chunks (md5 for MedMNIST files, sha1 for weights)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algorithm).hexdigest()


def _medmnist_info(path: Path) -> tuple[str, int, dict[str, Any]] | None:
    """(flag, size, INFO entry) when ``path`` is named like a MedMNIST file (``breastmnist.npz``,
    ``breastmnist_64.npz``) and the ``medmnist`` package is installed."""
    try:
        from medmnist import INFO
    except ImportError:
        return None
    stem = path.stem
    flag, _, size = stem.rpartition("_") if stem.rsplit("_", 1)[-1].isdigit() else (stem, "", "28")
    return (flag, int(size), INFO[flag]) if flag in INFO else None


def _expected_md5(path: Path) -> str | None:
    info = _medmnist_info(path)
    if info is not None:
        _, size, entry = info
        return entry.get("MD5" if size == 28 else f"MD5_{size}")
    return KNOWN_NPZ[path.name][0] if path.name in KNOWN_NPZ else None


def _download_medmnist(path: Path) -> None:
    info = _medmnist_info(path)
    if info is None:
        raise DataError(
            f"{path} does not exist. Put the file there (data.root / data.source), or, for a MedMNIST set on an "
            f"online machine, install the downloader: pip install 'lowshot[medmnist]'."
        )
    flag, size, entry = info
    import medmnist

    log.info("downloading %s (%d px) through medmnist into %s", flag, size, path.parent)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        getattr(medmnist, entry["python_class"])(
            split="train", download=True, root=str(path.parent), size=size
        )
    except Exception as err:
        raise DataError(
            f"{path} does not exist and could not be downloaded ({type(err).__name__}: {err}). On a machine "
            f"without network, copy {path.name} (md5 {_expected_md5(path)}) into {path.parent}."
        ) from None
    if not path.exists():
        raise DataError(f"medmnist downloaded {flag} but {path} is still missing; check data.source")


def _load_npz(path: Path, size: int) -> Store:
    if not path.exists():
        _download_medmnist(path)
    want = _expected_md5(path)
    if want is not None and (got := file_digest(path, "md5")) != want:
        raise DataError(
            f"{path} is corrupt or not the official file: md5 {got}, expected {want}. Download it again."
        )
    try:
        npz = np.load(path, allow_pickle=False)
    except Exception as err:
        raise DataError(f"{path} is not a readable .npz ({err})") from None
    keys = [f"{s}_{k}" for s in SPLITS for k in ("images", "labels")]
    if absent := [k for k in keys if k not in npz.files]:
        raise DataError(f"{path} lacks the MedMNIST keys {absent} (has {npz.files})")
    images, labels, split, paths, prints = [], [], [], [], []
    for s in SPLITS:
        x = npz[f"{s}_images"]
        prints.append(fingerprints(list(x if x.ndim == 4 else x[..., None])))
        y = npz[f"{s}_labels"].reshape(len(x), -1)
        if y.shape[1] != 1:
            raise DataError(
                f"{path}: {s}_labels has {y.shape[1]} columns; only single-label sets are supported"
            )
        images.append(_resize_batch(x if x.ndim == 4 else x[..., None], size))
        labels.append(y[:, 0].astype(np.int64))
        split += [s] * len(x)
        paths += [f"{path.name}:{s}/{i}" for i in range(len(x))]
    y_all = np.concatenate(labels)
    classes = _medmnist_classes(path, int(y_all.max()) + 1)
    return Store(
        images=np.concatenate(images),
        labels=y_all,
        split=np.array(split),
        groups=np.array(paths),  # MedMNIST ships no patient ids: each image is its own group
        paths=np.array(paths),
        hashes=np.concatenate([h for h, _ in prints]),
        digests=np.concatenate([d for _, d in prints]),
        classes=classes,
        name=path.stem,
    )


def _medmnist_classes(path: Path, n: int) -> list[str]:
    info = _medmnist_info(path)
    if info is not None:
        names = info[2]["label"]
        return [names[str(i)] for i in range(len(names))]
    return KNOWN_NPZ[path.name][1] if path.name in KNOWN_NPZ else [str(i) for i in range(n)]


def _scan_folder(
    root: Path,
) -> tuple[list[Path], list[str], list[str] | None, list[str] | None, list[tuple[str, str]]]:
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if len(classes) < 2:
        raise DataError(
            f"{root} should hold one sub-folder per class (e.g. {root}/benign/*.png, {root}/malignant/*.png); "
            f"found {classes or 'none'}"
        )
    files: list[Path] = []
    labels: list[str] = []
    skipped = [(str(f), "not inside a class folder") for f in sorted(root.iterdir()) if f.is_file()]
    for c in classes:
        for f in sorted((root / c).rglob("*")):
            if f.is_file():
                files.append(f)
                labels.append(c)
    return files, labels, None, None, skipped


def _read_manifest(
    path: Path,
) -> tuple[list[Path], list[str], list[str] | None, list[str] | None, list[tuple[str, str]]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        cols = reader.fieldnames or []
        if "path" not in cols or "label" not in cols:
            raise DataError(
                f"{path}: a manifest needs a header with at least 'path,label' (optional: group, split); got {cols}"
            )
        rows = list(reader)
    if not rows:
        raise DataError(f"{path}: the manifest lists no images")
    files, labels, groups, splits = [], [], [], []
    for i, r in enumerate(rows, start=2):
        if not r["path"] or not r["label"]:
            raise DataError(f"{path} line {i}: empty path or label")
        p = Path(r["path"]).expanduser()
        files.append(p if p.is_absolute() else path.parent / p)
        labels.append(r["label"].strip())
        groups.append((r.get("group") or "").strip())
        s = (r.get("split") or "").strip().lower()
        if "split" in cols and s not in SPLITS:
            raise DataError(f"{path} line {i}: split {s!r} must be one of train, val, test")
        splits.append(s)
    if "group" in cols and not all(groups):
        raise DataError(
            f"{path}: the 'group' column is empty on some rows; give every image its patient/study id"
        )
    return files, labels, groups if "group" in cols else None, splits if "split" in cols else None, []


def _load_files(
    files: list[Path],
    labels: list[str],
    groups: list[str] | None,
    splits: list[str] | None,
    skipped: list[tuple[str, str]],
    *,
    name: str,
    cfg: DataConfig,
) -> Store:
    """Decode image files into a cached store; unreadable files are reported, not fatal."""
    cache = _cache_file(files, name, cfg)
    if cache.exists():
        with np.load(cache, allow_pickle=False) as z:
            kept, images, hashes, digests = z["kept"], z["images"], z["hashes"], z["digests"]
            bad = json.loads(str(z["skipped"]))
    else:
        kept_l, imgs, natives, bad = [], [], [], []
        for i, f in enumerate(files):
            if f.suffix.lower() not in IMAGE_SUFFIXES and f.suffix:
                bad.append((str(f), f"not an image file (suffix {f.suffix})"))
                continue
            try:
                native = decode_image(f, 0)  # padded to a square; fingerprinted at full resolution
                imgs.append(_square_resize(native, cfg.size))
                natives.append(fingerprints([native]))
                kept_l.append(i)
            except FileNotFoundError:
                bad.append((str(f), "missing (manifest paths are relative to the manifest's folder)"))
            except (UnidentifiedImageError, OSError, ValueError) as err:
                bad.append((str(f), f"cannot decode: {err}"))
        if not imgs:
            raise DataError(f"no readable images in {name}: {bad[:3]}")
        kept = np.array(kept_l)
        images = _stack(imgs)
        hashes = np.concatenate([h for h, _ in natives])
        digests = np.concatenate([d for _, d in natives])
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp.npz")
        np.savez(tmp, images=images, kept=kept, skipped=json.dumps(bad), hashes=hashes, digests=digests)
        os.replace(tmp, cache)  # atomic: a killed run never leaves a half-written cache
    classes = sorted(set(labels))
    lab = np.array([classes.index(labels[i]) for i in kept], dtype=np.int64)
    paths = np.array([str(files[i]) for i in kept])
    return Store(
        images=images,
        labels=lab,
        split=np.array([splits[i] for i in kept]) if splits else np.full(len(kept), "", dtype="<U5"),
        groups=np.array([groups[i] for i in kept]) if groups else paths.copy(),
        paths=paths,
        classes=classes,
        name=name,
        skipped=skipped + [(str(b[0]), str(b[1])) for b in bad],
        hashes=hashes,
        digests=digests,
    )


def cache_root(cfg: DataConfig) -> Path:
    return Path(cfg.cache_dir).expanduser() if cfg.cache_dir else Path.home() / ".cache" / "lowshot"


def _cache_file(files: list[Path], name: str, cfg: DataConfig) -> Path:
    h = hashlib.sha1(f"v2|{cfg.size}".encode())
    for f in files:
        st = f.stat() if f.exists() else None
        h.update(f"{f.resolve()}|{st.st_size if st else -1}|{st.st_mtime_ns if st else -1}\n".encode())
    return cache_root(cfg) / "stores" / f"{name}-{cfg.size}px-{h.hexdigest()[:16]}.npz"


def decode_image(path: Path, size: int) -> np.ndarray:
    """Decode one file to (size, size, C) uint8, C = 1 for grayscale content, else 3 (size 0: the
    native resolution, padded to a square).

    Modes are handled explicitly: 16-bit and float grayscale are scaled to 8 bits by their own
    min-max (the window the image uses), alpha is composited onto black, palettes are expanded, and
    RGB files whose three channels are equal count as grayscale. The image is padded to a square
    with black (keeping the whole field of view, no distortion) and resized with antialiasing.
    """
    with Image.open(path) as f:
        im: Image.Image = ImageOps.exif_transpose(f)
        if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
            a = np.asarray(im, dtype=np.float32)
            lo, hi = float(a.min()), float(a.max())
            im = Image.fromarray(((a - lo) / max(hi - lo, 1e-6) * 255.0 + 0.5).astype(np.uint8), "L")
        elif im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            rgba = im.convert("RGBA")
            im = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba).convert("RGB")
        elif im.mode in ("1", "L"):
            im = im.convert("L")
        else:  # P, CMYK, YCbCr, LAB, HSV, RGB
            im = im.convert("RGB")
        a = np.asarray(im)
    if a.ndim == 3 and (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all():
        a = a[..., 0]
    return _square_resize(a if a.ndim == 3 else a[..., None], size)


def _square_resize(a: np.ndarray, size: int) -> np.ndarray:
    """(H, W, C) uint8 → (size, size, C): pad to a centred square with 0, then antialiased resize."""
    h, w, c = a.shape
    if h != w:
        s = max(h, w)
        sq = np.zeros((s, s, c), dtype=np.uint8)
        sq[(s - h) // 2 : (s - h) // 2 + h, (s - w) // 2 : (s - w) // 2 + w] = a
        a = sq
    if size > 0 and a.shape[0] != size:
        im = Image.fromarray(a[..., 0] if c == 1 else a)
        a = np.asarray(im.resize((size, size), Image.Resampling.BICUBIC))
        a = a[..., None] if a.ndim == 2 else a
    return a


def _resize_batch(x: np.ndarray, size: int) -> np.ndarray:
    """(N, H, W, C) uint8 → (N, size, size, C)."""
    if x.shape[1] == size and x.shape[2] == size:
        return np.ascontiguousarray(x)
    return np.stack([_square_resize(a, size) for a in x])


def _stack(imgs: list[np.ndarray]) -> np.ndarray:
    """Stack per-image arrays; if any image is colour, grayscale ones are replicated to 3 channels."""
    if n_colour := sum(a.shape[-1] == 3 for a in imgs):
        if n_colour < len(imgs):
            log.warning(
                "%d of %d images have colour, so the store is RGB; data.color=gray converts them",
                n_colour,
                len(imgs),
            )
        imgs = [np.repeat(a, 3, axis=-1) if a.shape[-1] == 1 else a for a in imgs]
    return np.stack(imgs)


# -------------------------------------------------------------------------------------------- duplicates


def dhash(a: np.ndarray) -> np.ndarray:
    """(H, W, C) uint8 → 64 bools: is each pixel of a 9x8 grayscale thumbnail darker than its right
    neighbour (difference hash, Krawetz 2013; robust to resizing, re-encoding and small edits)."""
    im = Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).convert("L")
    t = np.asarray(im.resize((9, 8), Image.Resampling.LANCZOS), dtype=np.int16)
    return (t[:, 1:] > t[:, :-1]).ravel()


def pixel_digest(a: np.ndarray) -> str:
    """SHA-1 of decoded pixels and shape: equal for identical images whatever their file bytes."""
    return hashlib.sha1(np.ascontiguousarray(a).data.tobytes() + str(a.shape).encode()).hexdigest()


def near_pairs(bits: np.ndarray, threshold: int, chunk: int = 2048) -> list[tuple[int, int, int]]:
    """(i, j, distance) with i < j and Hamming distance <= threshold, for (N, 64) bool hashes."""
    x = np.packbits(bits.astype(bool), axis=1).view(">u8")[:, 0]  # (N,) one 64-bit word per hash
    pairs = []
    for lo in range(0, len(x), chunk):
        d = np.bitwise_count(x[lo : lo + chunk, None] ^ x[None, :])  # (chunk, N) differing bits
        for a, b in zip(*np.nonzero(d <= threshold), strict=True):
            i = lo + int(a)
            if i < int(b):
                pairs.append((i, int(b), int(d[a, b])))
    return pairs


def fingerprints(images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(N, 64) dHash bits and (N,) pixel SHA-1 digests of (H, W, C) uint8 images."""
    if not images:
        return np.zeros((0, 64), bool), np.zeros(0, "<U40")
    return np.stack([dhash(a) for a in images]), np.array([pixel_digest(a) for a in images])


def duplicate_pairs(
    bits: np.ndarray, digests: np.ndarray, threshold: int, max_neighbours: int = 8
) -> tuple[list[tuple[int, int, int, str]], np.ndarray]:
    """(i, j, bits, 'exact' | 'near') for every identical pair and every other pair within ``threshold``
    dHash bits, i < j; and the (N,) mask of images whose hash does not discriminate.

    An image "near" more than ``max_neighbours`` others has a hash that cannot tell it apart (fundus
    photos: a bright disc on black; dHash puts most of RetinaMNIST within 4 bits of each other): its
    near pairs are left out rather than flooding the list and chaining half the set into one group."""
    same: dict[str, list[int]] = {}
    for i, d in enumerate(digests):
        same.setdefault(str(d), []).append(i)
    exact = {(i, j) for g in same.values() for k, i in enumerate(g) for j in g[k + 1 :]}
    near = [(i, j, d) for i, j, d in near_pairs(bits, threshold) if (i, j) not in exact]
    degree = np.bincount([k for i, j, _ in near for k in (i, j)], minlength=len(digests))
    vague = degree > max_neighbours
    pairs = [(i, j, 0, "exact") for i, j in sorted(exact)]
    return pairs + [(i, j, d, "near") for i, j, d in near if not (vague[i] or vague[j])], vague


def duplicate_groups(store: Store, threshold: int) -> np.ndarray:
    """``store.groups`` merged along duplicate pairs (union-find): images linked by a chain of exact or
    near duplicates, or by a shared group, get one group name (the smallest member's)."""
    parent = np.arange(len(store.labels))
    pairs, vague = duplicate_pairs(*store.fingerprints(), threshold)
    if vague.any():
        log.warning(
            "%s: %d images are within %d dHash bits of many others; the hash cannot tell them apart, so only "
            "their exact duplicates are grouped (`lowshot check check.embeddings=true` compares content)",
            store.name,
            int(vague.sum()),
            threshold,
        )

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = int(parent[i])
        return i

    _, first = np.unique(store.groups, return_inverse=True)
    links = [(i, j) for i, j, _, _ in pairs]
    for g in range(first.max() + 1 if len(first) else 0):  # rows of one original group stay together
        rows = np.flatnonzero(first == g)
        links += [(int(rows[0]), int(r)) for r in rows[1:]]
    for i, j in links:
        a, b = root(i), root(j)
        if a != b:
            parent[max(a, b)] = min(a, b)
    merged = store.groups[[root(i) for i in range(len(parent))]]
    before, after = len(np.unique(store.groups)), len(np.unique(merged))
    if after < before:
        log.info("duplicates: %d groups merged into %d, so copies stay in one split", before, after)
    return merged


# ------------------------------------------------------------------------------------------------ splits


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


def _fill_splits(store: Store, cfg: DataConfig, missing: list[str]) -> None:
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


def _assign_fold(store: Store, cfg: DataConfig) -> None:
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


def _warn_group_leaks(store: Store) -> None:
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


def _label_budget(store: Store, k: int, seed: int, draw: int) -> None:
    """Keep k training labels per class (all of a smaller class); mark the rest 'unlabelled'."""
    train = store.indices("train")
    keep = draw_per_class(store.labels, train, k, [seed, k, draw])
    store.split = store.split.astype("<U10")
    store.split[np.setdiff1d(train, keep)] = "unlabelled"


def _apply_limit(store: Store, limit: int, seed: int) -> None:
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


class StoreDataset(Dataset):
    """Images of a store as PIL images through ``transform``; items are ``(transform(img), label)``.

    ``rgb=True`` replicates grayscale to 3 channels (data.channels=replicate); ``False`` keeps 1.
    """

    def __init__(
        self, images: np.ndarray, labels: np.ndarray, transform: Callable[[Image.Image], Any], rgb: bool
    ):
        self.images, self.labels, self.transform, self.rgb = images, labels, transform, rgb

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        a = self.images[i]
        im = Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a)
        if self.rgb and im.mode == "L":
            im = im.convert("RGB")
        return self.transform(im), int(self.labels[i])


def balanced_draw_weights(labels: np.ndarray) -> np.ndarray:
    """(N,) per-item draw weights 1 / n_class(item): drawn with replacement, every class equally often."""
    return 1.0 / np.bincount(labels)[labels]


def resolve_workers(num_workers: int) -> int:
    """data.num_workers=-1 picks: 0 on CPU (the cores are busy with the model), else the CPU cores per
    local process less one, at most 8."""
    if num_workers >= 0:
        return num_workers
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return min(8, max(0, (os.cpu_count() or 1) // local - 1)) if torch.cuda.is_available() else 0


def make_loader(
    ds: Dataset,
    batch_size: int,
    num_workers: int,
    train: bool,
    balance: np.ndarray | None = None,
) -> DataLoader:
    """Shuffled, last partial batch dropped, for training; in order and complete for evaluation.

    ``balance``: (N,) labels to draw training items with replacement at probability 1 / (K n_class), so
    every class is drawn equally often in expectation. ``num_workers``: see ``resolve_workers``."""
    num_workers = resolve_workers(num_workers)
    sampler = None
    if balance is not None:
        sampler = WeightedRandomSampler(
            balanced_draw_weights(balance).tolist(), len(balance), replacement=True
        )
    return DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=train and sampler is None,
        sampler=sampler,
        drop_last=train,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
    )


def _cat(parts: list[Any]) -> Any:
    """Concatenate same-shaped nested tuples of tensors along the batch dimension."""
    if isinstance(parts[0], torch.Tensor):
        return torch.cat(parts)
    return type(parts[0])(_cat([p[i] for p in parts]) for i in range(len(parts[0])))


class Rebatch:
    """Training batches assembled in the main process from ``per_batch`` chunks of a DataLoader, so each
    worker augments a chunk, not a whole batch. With whole batches per worker, batch 256 and ~1000 images,
    only ~4 workers ever hold one and the rest idle (issue #6 measured 199 pairs/s on 15 workers against
    954 with 16-image chunks). Call ``prepare`` instead of ``accelerator.prepare`` (it shards the chunks
    over processes)."""

    def __init__(self, loader: DataLoader, per_batch: int) -> None:
        self.loader, self.per_batch = loader, per_batch
        self.batch_size = (loader.batch_size or 1) * per_batch

    def prepare(self, accelerator: Any) -> Rebatch:
        self.loader = accelerator.prepare(self.loader)
        return self

    def __len__(self) -> int:
        return len(self.loader) // self.per_batch

    def __iter__(self) -> Any:
        parts: list[Any] = []
        for chunk in self.loader:
            parts.append(chunk)
            if len(parts) == self.per_batch:
                yield _cat(parts) if self.per_batch > 1 else parts[0]
                parts = []


def train_loader(
    ds: Dataset,
    batch_size: int,
    num_workers: int,
    balance: np.ndarray | None = None,
) -> Rebatch:
    """A training loader that keeps every worker busy. Each worker prefetches 2 batches; when an epoch
    has fewer than 2 batches per worker (many workers, few images, big batches), each batch is split
    into one chunk per worker (the largest divisor of the batch not above the worker count), joined
    again by ``Rebatch``. With enough batches, whole batches per worker: on 2 cores chunks measured no
    faster (711-729 vs 788-1,032 pairs/s at 64 px), so the split is kept for where it helps."""
    workers = resolve_workers(num_workers)
    per = 1
    if workers > 1 and len(ds) // batch_size < 2 * workers:  # type: ignore[arg-type]
        per = max(k for k in range(1, workers + 1) if batch_size % k == 0)
    return Rebatch(make_loader(ds, batch_size // per, workers, True, balance), per)


def store_loader(
    store: Store, rows: np.ndarray, transform: Callable[[Image.Image], Any], rgb: bool, num_workers: int
) -> DataLoader:
    """An evaluation loader (in order, batches of 256) over the given store rows."""
    return make_loader(
        StoreDataset(store.images[rows], store.labels[rows], transform, rgb), 256, num_workers, False
    )


def split_loader(
    store: Store,
    split: str | tuple[str, ...],
    transform: Callable[[Image.Image], Any],
    rgb: bool,
    batch_size: int,
    num_workers: int,
) -> DataLoader:
    """An evaluation loader (in order, complete) over one split (or a tuple of splits) of the store."""
    idx = store.indices(*((split,) if isinstance(split, str) else split))
    return make_loader(
        StoreDataset(store.images[idx], store.labels[idx], transform, rgb), batch_size, num_workers, False
    )


def split_train_loader(
    store: Store,
    split: str | tuple[str, ...],
    transform: Callable[[Image.Image], Any],
    rgb: bool,
    batch_size: int,
    num_workers: int,
    processes: int = 1,
    balance: bool = False,
) -> Rebatch:
    """A training loader over one split (or a tuple of splits): shuffled (or class-balanced draws), full
    batches, in per-worker chunks (``train_loader``). The batch shrinks to the images each of
    ``processes`` gets, so dropping the last partial batch still leaves a step."""
    idx = store.indices(*((split,) if isinstance(split, str) else split))
    batch_size = max(1, min(batch_size, len(idx) // processes))
    ds = StoreDataset(store.images[idx], store.labels[idx], transform, rgb)
    return train_loader(ds, batch_size, num_workers, store.labels[idx] if balance else None)


def normalisation(mean: tuple[float, ...], std: tuple[float, ...], channels: int) -> dict[str, list[float]]:
    """Model mean/std for ``channels`` input channels (1: the mean of the RGB values)."""
    if channels == 1:
        return {"mean": [float(np.mean(mean))], "std": [float(np.mean(std))]}
    return {"mean": list(mean), "std": list(std)}


def eval_transform(norm: dict[str, list[float]]) -> Callable[[Image.Image], torch.Tensor]:
    """PIL → (C, H, W) float tensor, normalised; no augmentation (the store is at working size)."""
    return T.Compose([T.ToTensor(), T.Normalize(norm["mean"], norm["std"])])


def train_transform(
    size: int, tc: TrainConfig, norm: dict[str, list[float]]
) -> Callable[[Image.Image], torch.Tensor]:
    """Supervised augmentation for grayscale modalities: random resized crop, optional flips (off where
    laterality matters), small rotations, brightness/contrast jitter; never hue or saturation."""
    return T.Compose(
        [
            T.RandomResizedCrop(size, scale=(tc.crop_min_scale, 1.0), antialias=True),
            T.RandomHorizontalFlip(tc.hflip),
            T.RandomVerticalFlip(tc.vflip),
            T.RandomRotation(tc.rotate),
            T.ColorJitter(brightness=tc.brightness, contrast=tc.contrast),
            T.ToTensor(),
            T.Normalize(norm["mean"], norm["std"]),
        ]
    )
