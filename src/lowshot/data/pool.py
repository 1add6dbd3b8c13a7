"""The unlabelled pool: extra images that only self-supervised pretraining reads (``ssl.unlabelled``).

A real user's unlabelled images are a separate, larger collection (a PACS export of thousands of
scans next to a few hundred labelled ones). Each entry of ``ssl.unlabelled`` is one source, relative
to ``data.root`` unless absolute:

- a folder: every image file below it, recursively, whatever the layout (class folders are not
  labels here); hidden files and folders (``.name``) are ignored, files with other suffixes listed;
- a CSV manifest with a ``path`` column (paths relative to the CSV; any other column is ignored);
- a ``.npz``: every image array in it, (N, H, W) or (N, H, W, C) uint8 (label arrays are skipped).

Every image is decoded once, at ``data.size`` px with the labelled store's channel count, into a
memory-mapped uint8 cache ``(N, H, W, C)`` under ``data.cache_dir`` (keyed by the file listing, sizes
and mtimes), by all cores in parallel with a progress bar (100,000 64-px PNGs: 13.6 s on 2 cores); a
second run lists the files and maps the cache (2.3 s for those 100,000). Decoded images are never Python objects: workers write their chunks straight into the
memory map. Beside the images the cache holds, per image, the fingerprints of the native image
(dHash bits, pixel digest) and a 32 px grayscale thumbnail for the copy search (``data.copies``).
Unreadable files are listed and skipped, as for labelled data.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import shutil
import uuid
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..config import DataConfig
from .cache import cache_root, dicom_key
from .copies import THUMB, thumbnail
from .decode import (
    IMAGE_SUFFIXES,
    MISSING_IN_MANIFEST,
    UNREADABLE,
    decode_image,
    dhash,
    pixel_digest,
    square_resize,
    to_channels,
    unreadable,
)
from .sources import inside
from .store import DataError, Store

log = logging.getLogger(__name__)

CHUNK = 256  # images a worker decodes per task


@dataclass
class Pool:
    """Unlabelled images. images: (N, H, W, C) uint8 (a read-only memory map); paths, digests: (N,) str;
    hashes: (N, 64) bool dHash of the native images; thumbs: (N, 32, 32) uint8 grayscale thumbnails."""

    images: np.ndarray
    paths: np.ndarray
    hashes: np.ndarray
    digests: np.ndarray
    thumbs: np.ndarray
    skipped: list[tuple[str, str]] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)

    def keep(self, rows: np.ndarray) -> Pool:
        """The pool restricted to ``rows`` (the images array is copied out of the memory map)."""
        return Pool(
            self.images[rows],
            self.paths[rows],
            self.hashes[rows],
            self.digests[rows],
            self.thumbs[rows],
            self.skipped,
            self.sources,
        )


# ---------------------------------------------------------------------------------------------- listing


def _list_source(path: Path, cfg: DataConfig) -> tuple[list[str], list[tuple[str, str]]]:
    """Items of one pool source: file paths, or ``file.npz:key/i`` entries; and (file, reason) skipped.
    A manifest's paths stay below its folder or data.root unless data.allow_outside_root (as for labelled
    manifests)."""
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                shapes = {k: (z[k].shape, z[k].dtype) for k in z.files}
        except Exception as err:
            raise DataError(f"pool source {path} is not a readable .npz ({err})") from None
        items = [
            f"{path}:{k}/{i}"
            for k, (shape, dtype) in shapes.items()
            if dtype == np.uint8 and (len(shape) == 3 or (len(shape) == 4 and shape[-1] in (1, 3)))
            for i in range(shape[0])
        ]
        if not items:
            raise DataError(
                f"pool source {path} holds no image arrays ((N, H, W) or (N, H, W, C) uint8): {shapes}"
            )
        return items, []
    if path.suffix == ".csv":
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            if "path" not in (reader.fieldnames or []):
                raise DataError(f"pool manifest {path} needs a 'path' column; got {reader.fieldnames}")
            rows = [r["path"].strip() for r in reader if (r.get("path") or "").strip()]
        files = [p if (p := Path(r).expanduser()).is_absolute() else path.parent / p for r in rows]
        roots = [path.parent, Path(cfg.root).expanduser()]
        if not cfg.allow_outside_root and (out := [f for f in files if not inside(f, roots)]):
            raise DataError(
                f"pool manifest {path}: {len(out)} path(s) lie outside its folder and data.root, e.g. {out[0]}; "
                "a manifest reads only what is below them unless data.allow_outside_root=true"
            )
        return [str(f) for f in files], []
    if path.is_dir():
        items, skipped = [], []
        for f in sorted(path.rglob("*")):
            rel = f.relative_to(path).parts
            if any(part.startswith(".") for part in rel) or not f.is_file():
                continue  # hidden files and folders (.DS_Store, .git) are not data
            if f.suffix.lower() in IMAGE_SUFFIXES:
                items.append(str(f))
            else:
                skipped.append((str(f), f"not an image file (suffix {f.suffix or 'none'})"))
        if not items:
            raise DataError(f"pool folder {path} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
        return items, skipped
    if not path.exists():
        raise DataError(
            f"pool source {path} does not exist: ssl.unlabelled takes folders, .csv manifests (a 'path' column) "
            f"or .npz files, relative to data.root unless absolute"
        )
    raise DataError(f"pool source {path}: expected a folder, a .csv manifest or a .npz")


def _cache_dir(sources: list[Path], items: list[str], size: int, channels: int, cfg: DataConfig) -> Path:
    h = hashlib.sha1(f"pool-v1|{size}|{channels}{dicom_key(cfg)}".encode())
    for s in sources:  # npz entries are keyed by their file, folders and manifests by every file
        st = s.stat()
        h.update(f"{s.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    for it in items:
        if ".npz:" not in it:
            sz, mt = (os.stat(it).st_size, os.stat(it).st_mtime_ns) if os.path.exists(it) else (-1, -1)
            h.update(f"{it}|{sz}|{mt}\n".encode())
    return cache_root(cfg) / "pools" / f"{sources[0].stem}-{len(items)}-{size}px-{h.hexdigest()[:16]}"


# --------------------------------------------------------------------------------------------- decoding


def _decode_one(
    native: np.ndarray, size: int, channels: int
) -> tuple[np.ndarray, np.ndarray, str, np.ndarray]:
    """One native (H, W, C) image → (store image, dHash bits, pixel digest, thumbnail)."""
    square = square_resize(native, 0)
    return (
        to_channels(square_resize(square, size), channels),
        dhash(native),
        pixel_digest(native),
        thumbnail(square),
    )


def _decode_chunk(
    args: tuple[str, list[int], list[str], int, int, tuple[str, str]],
) -> list[tuple[int, str, str]]:
    """Decode image files into their ``rows`` of the memory-mapped cache files in ``folder``; returns
    (row, file, reason) for every file that could not be decoded (its row stays zero)."""
    folder, rows, files, size, channels, dicom = args
    d = Path(folder)
    images = np.load(d / "images.npy", mmap_mode="r+")
    hashes = np.load(d / "hashes.npy", mmap_mode="r+")
    thumbs = np.load(d / "thumbs.npy", mmap_mode="r+")
    digests = np.load(d / "digests.npy", mmap_mode="r+")
    bad = []
    for row, file in zip(rows, files, strict=True):
        try:
            images[row], hashes[row], digests[row], thumbs[row] = _decode_one(
                decode_image(Path(file), 0, dicom), size, channels
            )
        except UNREADABLE as err:
            bad.append((row, file, unreadable(err, MISSING_IN_MANIFEST)))
    for a in (images, hashes, thumbs, digests):
        a.flush()
    return bad


def load_pool(entries: list[str], cfg: DataConfig, channels: int, workers: int = 0) -> Pool:
    """Read the ``ssl.unlabelled`` sources into one memory-mapped :class:`Pool` at ``cfg.size`` px with
    ``channels`` channels (the labelled store's), decoding on ``workers`` processes (0 = every core)."""
    sources = [
        p if (p := Path(e).expanduser()).is_absolute() else Path(cfg.root).expanduser() / p for e in entries
    ]
    items, skipped = [], []
    for s in sources:
        it, sk = _list_source(s, cfg)
        items += it
        skipped += sk
    folder = _cache_dir(sources, items, cfg.size, channels, cfg)
    if not (folder / "done.json").is_file():
        dicom = (cfg.dicom_window, cfg.dicom_frames)
        _build(folder, items, cfg.size, channels, workers or os.cpu_count() or 1, dicom)
    done = json.loads((folder / "done.json").read_text())
    keep = np.setdiff1d(np.arange(len(items)), [b[0] for b in done["bad"]])
    skipped += [(b[1], b[2]) for b in done["bad"]]
    if not len(keep):
        raise DataError(f"no readable images in the pool {entries}: {skipped[:3]}")
    pool = Pool(  # the cache holds the readable rows only (see _build)
        np.load(folder / "images.npy", mmap_mode="r"),
        np.array(items)[keep],
        np.load(folder / "hashes.npy"),
        np.load(folder / "digests.npy"),
        np.load(folder / "thumbs.npy", mmap_mode="r"),
        skipped,
        [str(s) for s in sources],
    )
    for f, why in skipped:
        log.warning("pool: skipped %s: %s", f, why)
    return pool


def _decode_arrays(tmp: Path, items: list[str], size: int, channels: int) -> None:
    """Write the ``file.npz:key/i`` items (listed in order, one run per array) into the memory maps."""
    runs: dict[tuple[str, str], list[int]] = {}
    for row, it in enumerate(items):
        if ".npz:" in it:
            file, _, rest = it.rpartition(".npz:")
            runs.setdefault((file + ".npz", rest.rpartition("/")[0]), []).append(row)
    if not runs:
        return
    images, hashes = np.load(tmp / "images.npy", mmap_mode="r+"), np.load(tmp / "hashes.npy", mmap_mode="r+")
    thumbs, digests = (
        np.load(tmp / "thumbs.npy", mmap_mode="r+"),
        np.load(tmp / "digests.npy", mmap_mode="r+"),
    )
    for (file, key), rows in runs.items():
        with np.load(file, allow_pickle=False) as z:
            x = z[key]
        for row, a in zip(rows, tqdm(x, desc=f"{Path(file).name}:{key}", leave=False), strict=True):
            images[row], hashes[row], digests[row], thumbs[row] = _decode_one(
                a[..., None] if a.ndim == 2 else a, size, channels
            )
    for a in (images, hashes, thumbs, digests):
        a.flush()


def _build(
    folder: Path, items: list[str], size: int, channels: int, workers: int, dicom: tuple[str, str]
) -> None:
    """Decode every item into memory-mapped files in a temporary folder, then rename it into place
    (atomic: a killed run leaves no half-written cache, and two runs never share a temporary name)."""
    tmp = folder.with_name(f"{folder.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    n = len(items)
    np.lib.format.open_memmap(tmp / "images.npy", "w+", np.uint8, (n, size, size, channels)).flush()
    np.lib.format.open_memmap(tmp / "hashes.npy", "w+", np.bool_, (n, 64)).flush()
    np.lib.format.open_memmap(tmp / "thumbs.npy", "w+", np.uint8, (n, THUMB, THUMB)).flush()
    np.lib.format.open_memmap(tmp / "digests.npy", "w+", "<U40", (n,)).flush()
    bad: list[tuple[int, str, str]] = []
    files = [i for i, it in enumerate(items) if ".npz:" not in it]
    tasks = [
        (str(tmp), files[lo : lo + CHUNK], [items[i] for i in files[lo : lo + CHUNK]], size, channels, dicom)
        for lo in range(0, len(files), CHUNK)
    ]
    bar = tqdm(total=len(files), desc=f"decoding the pool ({workers} processes)", unit="img", leave=False)
    try:
        _decode_arrays(tmp, items, size, channels)  # .npz entries: each array read once, in this process
        if workers > 1 and len(tasks) > 1:
            with ProcessPoolExecutor(workers) as ex:
                for task, b in zip(tasks, ex.map(_decode_chunk, tasks), strict=True):
                    bad += b
                    bar.update(len(task[1]))
        else:
            for task in tasks:
                bad += _decode_chunk(task)
                bar.update(len(task[1]))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        bar.close()
    if bad:  # compact: the cache holds the readable images only, so loading maps it without a copy
        keep = np.setdiff1d(np.arange(n), [b[0] for b in bad])
        for name in ("images", "hashes", "thumbs", "digests"):
            old = np.load(tmp / f"{name}.npy", mmap_mode="r")
            new = np.lib.format.open_memmap(
                tmp / f"{name}.tmp.npy", "w+", old.dtype, (len(keep), *old.shape[1:])
            )
            for lo in range(0, len(keep), 4096):  # in slices: memory stays bounded
                new[lo : lo + 4096] = old[keep[lo : lo + 4096]]
            new.flush()
            del old, new
            os.replace(tmp / f"{name}.tmp.npy", tmp / f"{name}.npy")
    (tmp / "done.json").write_text(json.dumps({"n": n, "bad": bad}))
    try:
        tmp.rename(folder)
    except OSError:  # another process finished the same cache first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)


def pretraining_store(store: Store, pool: Pool | None, use_train: bool) -> Store:
    """Every image self-supervised pretraining reads, as one store whose rows are all 'train': the
    labelled training split and the images a label budget left unlabelled (``use_train``), then the
    pool. Labels are -1 (none is used; the kNN monitor reads the labelled store)."""
    rows = store.indices("train", "unlabelled") if use_train else np.zeros(0, np.int64)
    parts, paths = [store.images[rows]], [store.paths[rows]]
    if pool is not None and len(pool):
        parts.append(np.asarray(pool.images))
        paths.append(pool.paths)
    if not sum(len(p) for p in parts):
        raise DataError("nothing to pretrain on: ssl.use_train=false and ssl.unlabelled is empty")
    images, names = np.concatenate(parts), np.concatenate(paths)
    return Store(
        images=images,
        labels=np.full(len(images), -1, dtype=np.int64),
        split=np.full(len(images), "train"),
        groups=names,
        paths=names,
        classes=store.classes,
        name=f"{store.name}+pool" if pool is not None else store.name,
    )
