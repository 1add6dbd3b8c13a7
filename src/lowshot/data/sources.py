"""Sources: a MedMNIST .npz, a class-per-folder directory or a CSV manifest, read into a Store."""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock
from tqdm.auto import tqdm

from ..config import DataConfig
from .cache import store_cache_file
from .copies import native_thumbnail
from .decode import (
    IMAGE_SUFFIXES,
    MISSING_IN_MANIFEST,
    UNREADABLE,
    decode_image,
    file_digest,
    fingerprints,
    resize_batch,
    square_resize,
    stack_images,
    to_channels,
    unreadable,
)
from .dicom import dicom_group, is_dicom
from .duplicates import duplicate_groups
from .splits import apply_limit, assign_fold, fill_splits, label_budget, warn_group_leaks
from .store import SPLITS, DataError, Store

log = logging.getLogger(__name__)

# md5 and class names of the 28 px MedMNIST files used most here, for machines without the
# `medmnist` package (which lists every set and size).
KNOWN_NPZ = {
    "breastmnist.npz": ("750601b1f35ba3300ea97c75c52ff8f6", ["malignant", "normal, benign"]),
    "retinamnist.npz": ("bd4c0672f1bba3e3a89f0e4e876791e4", ["0", "1", "2", "3", "4"]),
}


def source_path(cfg: DataConfig) -> Path:
    p = Path(cfg.source).expanduser()
    return p if p.is_absolute() else Path(cfg.root).expanduser() / p


def load_store(cfg: DataConfig) -> Store:
    """Read ``cfg.source`` into a :class:`Store` at ``cfg.size`` px with train/val/test splits."""
    path = source_path(cfg)
    if path.suffix == ".npz":
        store = _load_npz(path, cfg.size)
    elif path.suffix == ".csv":
        store = _load_files(*_read_manifest(path, cfg), name=path.stem, cfg=cfg)
    elif path.is_dir():
        store = _load_files(*_scan_folder(path, cfg), name=path.name, cfg=cfg)
    elif not path.exists():
        raise DataError(
            f"data source {path} does not exist. Set data.root (or $LOWSHOT_DATA_ROOT) to the folder that holds "
            f"it, or data.source to a .npz, a class-per-folder directory or a .csv manifest."
        )
    else:
        raise DataError(
            f"data source {path}: expected a .npz, a .csv manifest or a class-per-folder directory"
        )
    if cfg.color == "gray" and not store.grayscale:  # gray modalities whose exports carry coloured marks
        store.images = to_channels(store.images, 1)
    elif cfg.color == "rgb" and store.grayscale:
        store.images = to_channels(store.images, 3)
    warn_group_leaks(store)  # the source's own split, by its own groups (duplicates: the leakage check)
    if cfg.group_duplicates:
        store.source_groups = store.groups
        store.groups = duplicate_groups(store, cfg)
    missing = [s for s in SPLITS if not (store.split == s).any()]
    if missing:
        fill_splits(store, cfg, missing)
    if cfg.folds:
        assign_fold(store, cfg)
    if cfg.limit:
        apply_limit(store, cfg.limit, cfg.split_seed)
    if cfg.train_per_class:
        label_budget(store, cfg.train_per_class, cfg.split_seed, cfg.train_draw)
    for f, why in store.skipped:
        log.warning("skipped %s: %s", f, why)
    check_classes(store, path)
    return store


def check_classes(store: Store, path: Path) -> None:
    """Every class needs a training image (else nothing can learn it: a DataError naming it); a class
    absent from validation or test is reported, since its sensitivity there is undefined."""
    for s in ("train", "val", "test"):
        counts = np.bincount(store.labels[store.split == s], minlength=store.num_classes)
        missing = [c for c, n in zip(store.classes, counts, strict=True) if n == 0]
        if missing and s == "train" and (store.split == "train").any():
            shown = f"{missing[:8]}{f' and {len(missing) - 8} more' if len(missing) > 8 else ''}"
            present = {c: int(n) for c, n in zip(store.classes, counts, strict=True) if n}
            raise DataError(
                f"{path}: {len(missing)} class(es) {shown} have no training image (those with some: {present}); "
                f"labels out of range make such classes. Add images, merge the class, or remove its folder"
            )
        if missing and (store.split == s).any():
            log.warning(
                "%s: class(es) %s have no %s image: their %s sensitivity is undefined", path, missing, s, s
            )


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
    made = [p for p in (path.parent, *path.parent.parents) if not p.exists()]  # what the download creates
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        getattr(medmnist, entry["python_class"])(
            split="train", download=True, root=str(path.parent), size=size
        )
    except Exception as err:
        if made:  # a failed download leaves no empty data folder behind (issue 41)
            shutil.rmtree(made[-1], ignore_errors=True)
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
        if x.dtype != np.uint8 or x.ndim not in (3, 4) or (x.ndim == 4 and x.shape[-1] not in (1, 3)):
            raise DataError(
                f"{path}: {s}_images is {x.dtype} {x.shape}; expected uint8 (N, H, W) or (N, H, W, 1|3) in 0-255 "
                f"(scale float images yourself: a float array has no agreed range)"
            )
        native = list(x if x.ndim == 4 else x[..., None])
        prints.append((*fingerprints(native), np.stack([native_thumbnail(a) for a in native])))
        raw_y = npz[f"{s}_labels"]
        if raw_y.shape[:1] != (len(x),):
            raise DataError(
                f"{path}: {s}_labels has shape {raw_y.shape} for {len(x)} {s}_images; one label per image"
            )
        y = raw_y.reshape(len(x), -1)
        if y.shape[1] != 1:
            raise DataError(
                f"{path}: {s}_labels has {y.shape[1]} columns; only single-label sets are supported"
            )
        if not np.issubdtype(y.dtype, np.integer) and not (
            np.issubdtype(y.dtype, np.floating) and np.all(y == np.round(y))
        ):
            raise DataError(
                f"{path}: {s}_labels is {y.dtype} with non-integer values; labels are class indices"
            )
        if len(y) and y.min() < 0:
            raise DataError(f"{path}: {s}_labels holds {int(y.min())}; labels are class indices 0, 1, ...")
        images.append(resize_batch(x if x.ndim == 4 else x[..., None], size))
        labels.append(y[:, 0].astype(np.int64))
        split += [s] * len(x)
        paths += [f"{path.name}:{s}/{i}" for i in range(len(x))]
    y_all = np.concatenate(labels)
    classes = _medmnist_classes(path, int(y_all.max()) + 1)
    if int(y_all.max()) >= len(classes):
        raise DataError(
            f"{path}: a label is {int(y_all.max())} but {path.name} has {len(classes)} classes {classes}; "
            f"labels must lie in 0..{len(classes) - 1}"
        )
    return Store(
        images=np.concatenate(images),
        labels=y_all,
        split=np.array(split),
        groups=np.array(paths),  # MedMNIST ships no patient ids: each image is its own group
        paths=np.array(paths),
        hashes=np.concatenate([h for h, _, _ in prints]),
        digests=np.concatenate([d for _, d, _ in prints]),
        thumbs=np.concatenate([t for _, _, t in prints]),
        classes=classes,
        name=path.stem,
    )


def _medmnist_classes(path: Path, n: int) -> list[str]:
    info = _medmnist_info(path)
    if info is not None:
        names = info[2]["label"]
        return [names[str(i)] for i in range(len(names))]
    return KNOWN_NPZ[path.name][1] if path.name in KNOWN_NPZ else [str(i) for i in range(n)]


def inside(p: Path, roots: list[Path]) -> bool:
    """Whether ``p`` (links and ``..`` resolved) lies below one of ``roots``."""
    rp = p.resolve()
    return any(rp.is_relative_to(r.resolve()) for r in roots)


def _scan_folder(
    root: Path, cfg: DataConfig
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
    # The rule: every file below a class folder, at any depth, has that class; hidden files and anything in
    # hidden folders (.DS_Store, .git, editor backups) are listed as skipped; an empty class is reported.
    for c in classes:
        found = 0
        for f in sorted((root / c).rglob("*")):
            if not f.is_file():
                continue
            if any(part.startswith(".") for part in f.relative_to(root).parts):
                skipped.append((str(f), "hidden file or folder"))
                continue
            if not cfg.allow_outside_root and not inside(f, [root, Path(cfg.root).expanduser()]):
                raise DataError(  # a link out of the data folder: the manifest's rule (issue 41)
                    f"{f} links to {f.resolve()}, outside {root} and data.root; a class folder reads only what "
                    "is below it unless data.allow_outside_root=true"
                )
            files.append(f)
            labels.append(c)
            found += 1
        if not found:
            skipped.append((str(root / c), f"class folder {c!r} holds no files: the class is left out"))
    return files, labels, None, None, skipped


def _read_manifest(
    path: Path, cfg: DataConfig
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
        p = p if p.is_absolute() else path.parent / p
        if not cfg.allow_outside_root and not inside(p, [path.parent, Path(cfg.root).expanduser()]):
            raise DataError(
                f"{path} line {i}: {r['path']} lies outside the manifest's folder and data.root; a manifest reads "
                f"only what is below them unless data.allow_outside_root=true"
            )
        files.append(p)
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


def read_store_cache(
    cache: Path,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, list] | None:
    """A decoded store's cache file, or None if there is none; a corrupt or truncated one is named in a
    warning, deleted and rebuilt."""
    if not cache.exists():
        return None
    try:
        with np.load(cache, allow_pickle=False) as z:
            skipped = json.loads(str(z["skipped"]))
            return z["kept"], z["images"], z["hashes"], z["digests"], z["thumbs"], skipped
    except Exception as err:  # zero bytes, truncated zip, missing keys
        log.warning(
            "store cache %s is unreadable (%s: %s); deleting it and decoding again",
            cache,
            type(err).__name__,
            err,
        )
        cache.unlink(missing_ok=True)
        return None


def _decode_files(
    files: list[Path], name: str, cfg: DataConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, list]:
    """Decode every file: (kept indices, images, dHash bits, pixel digests, copy-search thumbnails,
    [(file, reason)] not decoded)."""
    kept_l, imgs, natives, thumbs, bad = [], [], [], [], []
    sides: list[int] = []  # each native image's longer side, px
    # a bar for sets that take seconds to decode: no phase of a run is silent (issue 41)
    for i, f in enumerate(tqdm(files, desc="decoding", unit="file", leave=False, disable=len(files) < 200)):
        if f.suffix.lower() not in IMAGE_SUFFIXES and f.suffix:
            bad.append((str(f), f"not an image file (suffix {f.suffix})"))
            continue
        try:
            # padded to a square; fingerprinted at full resolution
            native = decode_image(f, 0, (cfg.dicom_window, cfg.dicom_frames))
            sides.append(max(native.shape[:2]))
            imgs.append(square_resize(native, cfg.size))
            natives.append(fingerprints([native]))
            thumbs.append(native_thumbnail(native))
            kept_l.append(i)
        except UNREADABLE as err:
            bad.append((str(f), unreadable(err, MISSING_IN_MANIFEST)))
    if not imgs:
        raise DataError(f"no readable images in {name}: {bad[:3]}")
    if small := sum(side < cfg.size for side in sides):
        log.warning(
            "%s: %d of %d images are smaller than data.size=%d px and are upsampled (no detail is added; a "
            "smaller data.size is as informative and cheaper)",
            name,
            small,
            len(imgs),
            cfg.size,
        )
    hashes = np.concatenate([h for h, _ in natives])
    digests = np.concatenate([d for _, d in natives])
    return np.array(kept_l), stack_images(imgs), hashes, digests, np.stack(thumbs), bad


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
    cache = store_cache_file(files, name, cfg)
    cache.parent.mkdir(parents=True, exist_ok=True)
    # One process decodes, the others wait and read its cache (parallel runs, sweep agents).
    with FileLock(str(cache) + ".lock"):
        got = read_store_cache(cache)
        if got is None:
            got = _decode_files(files, name, cfg)
            kept, images, hashes, digests, thumbs, bad = got
            tmp = cache.with_name(f".{cache.stem}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp.npz")
            np.savez(
                tmp,
                images=images,
                kept=kept,
                skipped=json.dumps(bad),
                hashes=hashes,
                digests=digests,
                thumbs=thumbs,
            )
            os.replace(tmp, cache)  # atomic: a killed run never leaves a half-written cache
    kept, images, hashes, digests, thumbs, bad = got
    classes = sorted(set(labels))
    lab = np.array([classes.index(labels[i]) for i in kept], dtype=np.int64)
    paths = np.array([str(files[i]) for i in kept])
    if groups is None and any(is_dicom(files[i]) for i in kept[:1000]):
        # DICOM carries its patient: PatientID (else StudyInstanceUID) groups the splits, no CSV needed
        ids = [dicom_group(files[i]) if is_dicom(files[i]) else "" for i in range(len(files))]
        groups = [g or str(files[i]) for i, g in enumerate(ids)]
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
        thumbs=thumbs,
    )
