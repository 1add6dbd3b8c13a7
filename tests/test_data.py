import csv
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lowshot import data as data_mod
from lowshot.config import DataConfig
from lowshot.data import decode_image, load_store, make_splits
from lowshot.data.splits import assign_fold
from lowshot.data.store import Store


def cfg(root: Path, source: str, cache: Path, **kw) -> DataConfig:
    return DataConfig(root=str(root), source=source, cache_dir=str(cache), **kw)


def test_breastmnist_official_split(data_root: Path, cache_dir: Path) -> None:
    store = load_store(cfg(data_root, "breastmnist.npz", cache_dir, size=28))
    assert store.images.shape == (780, 28, 28, 1) and store.images.dtype == np.uint8
    assert store.counts() == {"train": [147, 399], "val": [21, 57], "test": [42, 114]}
    assert store.grayscale and store.num_classes == 2
    assert store.classes[0] == "malignant"


def test_npz_resized_to_working_size(data_root: Path, cache_dir: Path) -> None:
    store = load_store(cfg(data_root, "retinamnist.npz", cache_dir, size=40))
    assert store.images.shape == (1600, 40, 40, 3) and store.num_classes == 5
    assert sum(store.counts()["test"]) == 400


def test_known_npz_verified_without_medmnist_package(
    data_root: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "medmnist", None)
    store = load_store(cfg(data_root, "breastmnist.npz", cache_dir, size=28))
    assert store.classes == ["malignant", "normal, benign"]


def _write_modes(root: Path) -> None:
    """A class-per-folder set with every mode the reader must handle, plus junk."""
    rng = np.random.default_rng(0)
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    g = rng.integers(0, 256, (40, 30), dtype=np.uint8)
    Image.fromarray(g, "L").save(root / "a" / "gray.png")
    Image.fromarray(rng.integers(0, 256, (30, 30, 3), dtype=np.uint8), "RGB").save(root / "a" / "rgb.jpg")
    rgba = np.zeros((30, 30, 4), dtype=np.uint8)
    rgba[..., 0] = 255
    rgba[:, :15, 3] = 255  # left half opaque red, right half transparent
    Image.fromarray(rgba, "RGBA").save(root / "a" / "rgba.png")
    # Each file its own random image: derived ones (a palette or a threshold of ``g``) are copies of it, and
    # their duplicate groups would decide this 6-image split, which is not what this set tests.
    Image.fromarray(rng.integers(0, 256, (30, 30), dtype=np.uint8), "L").convert("P").save(
        root / "b" / "palette.png"
    )
    sixteen = (np.linspace(1000, 4000, 900).reshape(30, 30)).astype(np.uint16)  # 12-bit data in 16 bits
    Image.fromarray(sixteen).save(root / "b" / "deep16.png")
    Image.fromarray(rng.integers(0, 256, (30, 30)) > 128).save(root / "b" / "binary.png")
    (root / "b" / "notes.txt").write_text("not an image")
    (root / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (root / "README.md").write_text("stray file")


def test_folder_handles_modes_and_reports_junk(tmp_path: Path, cache_dir: Path) -> None:
    _write_modes(tmp_path / "set")
    store = load_store(cfg(tmp_path, "set", cache_dir, size=16, val_fraction=0.34, test_fraction=0.34))
    names = sorted(Path(p).name for p in store.paths)
    assert names == ["binary.png", "deep16.png", "gray.png", "palette.png", "rgb.jpg", "rgba.png"]
    skipped = {Path(f).name: why for f, why in store.skipped}
    assert set(skipped) == {"notes.txt", "broken.png", "README.md"}
    assert "cannot decode" in skipped["broken.png"]
    assert store.images.shape == (6, 16, 16, 3)  # one colour image makes the store RGB
    assert store.classes == ["a", "b"]


def test_decode_modes_explicitly(tmp_path: Path) -> None:
    _write_modes(tmp_path)
    deep = decode_image(tmp_path / "b" / "deep16.png", 30)
    assert (
        deep.shape == (30, 30, 1) and deep.min() == 0 and deep.max() == 255
    )  # 16-bit window → full 8-bit range
    rgba = decode_image(tmp_path / "a" / "rgba.png", 30)
    assert rgba.shape == (30, 30, 3)
    assert (rgba[:, :10, 0] == 255).all() and (rgba[:, 20:] == 0).all()  # transparent → black
    gray = decode_image(tmp_path / "a" / "gray.png", 20)  # 40x30 → padded square → 20x20
    assert gray.shape == (20, 20, 1)
    assert (gray[:, 0] < 10).all()  # the padding column is black
    assert decode_image(tmp_path / "b" / "palette.png", 8).shape == (8, 8, 1)  # a gray palette stays gray


def test_busi_folder_split_cache(busi: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    c = cfg(busi.parent, busi.name, cache_dir, size=32)
    store = load_store(c)
    assert len(store.labels) == 780 and store.classes == ["benign", "malignant", "normal"]
    # BUSI PNGs are RGB files; most have three equal channels, 16 carry coloured annotations.
    assert not store.grayscale
    colour = (store.images[..., 0] != store.images[..., 1]).any(axis=(1, 2))
    assert 10 <= colour.sum() <= 20
    counts = store.counts()
    assert [sum(counts[s]) for s in ("train", "val", "test")] == pytest.approx([507, 117, 156], abs=8)
    for s in ("val", "test"):  # stratified: class proportions follow the whole set (437/210/133)
        frac = np.array(counts[s]) / sum(counts[s])
        assert np.allclose(frac, [437 / 780, 210 / 780, 133 / 780], atol=0.03)
    assert len(list((cache_dir / "stores").glob("busi-32px-*.npz"))) == 1

    def no_decode(*a, **k):
        raise AssertionError("the second load must read the cache, not decode")

    monkeypatch.setattr(data_mod, "decode_image", no_decode)
    again = load_store(c)
    assert np.array_equal(again.images, store.images) and np.array_equal(again.split, store.split)
    gray = load_store(cfg(busi.parent, busi.name, cache_dir, size=32, color="gray"))
    assert gray.images.shape == (780, 32, 32, 1) and np.array_equal(gray.split, store.split)
    # the recorded split digests: of the native images, so the same from the cache and in gray; another
    # split_seed moves images between all three splits
    assert again.split_digests() == store.split_digests() == gray.split_digests()
    other = load_store(cfg(busi.parent, busi.name, cache_dir, size=32, split_seed=1)).split_digests()
    assert all(other[s] != store.split_digests()[s] for s in ("train", "val", "test"))


def _manifest(tmp: Path, busi: Path, with_split: bool = False) -> Path:
    files = sorted(busi.glob("*/*.png"))[::4]  # 195 images
    rows = []
    for i, f in enumerate(files):
        row = {"path": str(f), "label": f.parent.name, "group": f"patient{i // 3}"}  # 3 images per patient
        if with_split:
            row["split"] = ("train", "val", "test")[(i // 3) % 3]
        rows.append(row)
    out = tmp / "manifest.csv"
    with open(out, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return out


def test_csv_manifest_grouped_split(busi: Path, tmp_path: Path, cache_dir: Path) -> None:
    m = _manifest(tmp_path, busi)
    store = load_store(cfg(busi.parent, str(m), cache_dir, size=16))  # the images lie below data.root
    assert len(store.labels) == 195 and store.num_classes == 3
    for g in np.unique(store.groups):
        assert len(np.unique(store.split[store.groups == g])) == 1, f"group {g} spans two splits"
    assert data_mod.groups_across_splits(store) == []
    store.split[np.flatnonzero(store.groups == store.groups[0])[:1]] = "test"  # move one image of a patient
    store.split[np.flatnonzero(store.groups == store.groups[0])[1:]] = "train"
    assert data_mod.groups_across_splits(store) == [store.groups[0]]
    assert set(np.unique(store.split)) == {"train", "val", "test"}


def test_csv_manifest_own_split_is_kept(busi: Path, tmp_path: Path, cache_dir: Path) -> None:
    m = _manifest(tmp_path, busi, with_split=True)
    store = load_store(cfg(busi.parent, str(m), cache_dir, size=16))  # the images lie below data.root
    with open(m) as fh:
        want = {r["path"]: r["split"] for r in csv.DictReader(fh)}
    assert all(want[p] == s for p, s in zip(store.paths, store.split, strict=True))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_make_splits_never_puts_a_group_in_two_splits(seed: int) -> None:
    rng = np.random.default_rng(seed)
    groups = rng.integers(0, 120, 600).astype(str)  # uneven group sizes
    labels = (rng.random(600) < 0.3).astype(int)
    split = make_splits(labels, groups, 0.15, 0.2, seed)
    for g in np.unique(groups):
        assert len(np.unique(split[groups == g])) == 1
    fractions = [np.mean(split == s) for s in ("train", "val", "test")]
    assert fractions == pytest.approx([0.65, 0.15, 0.2], abs=0.06)
    assert np.array_equal(split, make_splits(labels, groups, 0.15, 0.2, seed))  # seeded


def test_the_deal_moves_only_what_changed() -> None:
    """Groups are dealt by a hash of their images' digests, not by rank: renaming every group (the data
    moved to another folder) changes nothing, and merging 5 pairs of groups (a better duplicate check)
    moves a few images (scikit-learn's StratifiedGroupKFold moved 385 of BUSI's 780 for 10 new pairs)."""
    rng = np.random.default_rng(0)
    groups = rng.integers(0, 300, 600)
    labels = (rng.random(300) < 0.3).astype(int)[groups]  # a patient has one label
    digests = np.array([f"{d:040x}" for d in rng.integers(0, 2**62, 600)])
    split = make_splits(labels, groups.astype(str), 0.15, 0.2, 0, digests)
    renamed = make_splits(labels, np.char.add("/elsewhere/", groups.astype(str)), 0.15, 0.2, 0, digests)
    assert np.array_equal(split, renamed)
    merged = groups.copy()
    pairs = rng.choice(300, (5, 2), replace=False)
    for a, b in pairs:
        merged[merged == b] = a
    again = make_splits(labels, merged.astype(str), 0.15, 0.2, 0, digests)
    for g in np.unique(merged):
        assert len(np.unique(again[merged == g])) == 1
    assert 0 < (again != split).sum() <= 20, (again != split).sum()


def test_folds_are_stratified_grouped_and_move_only_what_changed() -> None:
    """k-fold deals like the hold-outs: every group in one fold, each class spread evenly over the folds,
    and merging 5 pairs of groups moves a few images between folds, not most of them."""
    rng = np.random.default_rng(1)
    groups = rng.integers(0, 300, 600)
    labels = (rng.random(300) < 0.3).astype(int)[groups]

    def folds(g: np.ndarray) -> np.ndarray:
        store = Store(
            name="toy",
            images=np.zeros((600, 1, 1, 1), np.uint8),
            labels=labels,
            split=np.full(600, "train", dtype="<U5"),
            groups=g.astype(str),
            classes=["a", "b"],
            paths=np.arange(600).astype(str),
        )
        store.hashes, store.digests = np.zeros((600, 64), bool), np.array([f"{d:040x}" for d in range(600)])
        out = np.zeros(600, int)
        for j in range(5):
            assign_fold(store, DataConfig(folds=5, fold=j))
            out[store.split == "val"] = j
            store.split[:] = "train"
        return out

    fold = folds(groups)
    for g in np.unique(groups):
        assert len(np.unique(fold[groups == g])) == 1
    for c in (0, 1):
        sizes = np.bincount(fold[labels == c], minlength=5)
        assert sizes.max() - sizes.min() <= 2 * np.bincount(groups).max(), sizes  # within a group's size
    merged = groups.copy()
    for a, b in rng.choice(300, (5, 2), replace=False):
        merged[merged == b] = a
    moved = (folds(merged) != fold).sum()
    assert 0 < moved <= 60, moved  # StratifiedGroupKFold(shuffle, seed 0) moved 422 of the 600 here


def test_limit_keeps_stratified_subset(data_root: Path, cache_dir: Path) -> None:
    store = load_store(cfg(data_root, "breastmnist.npz", cache_dir, size=28, limit=50))
    counts = store.counts()
    assert [sum(counts[s]) for s in ("train", "val", "test")] == [50, 50, 50]
    assert counts["train"][0] == pytest.approx(50 * 147 / 546, abs=1)


def test_read_only_data_folder_is_never_written(busi: Path, tmp_path: Path, cache_dir: Path) -> None:
    copy = tmp_path / "ro"
    shutil.copytree(busi / "normal", copy / "normal")
    shutil.copytree(busi / "malignant", copy / "malignant")
    before = sorted(p.relative_to(copy) for p in copy.rglob("*"))
    load_store(cfg(tmp_path, "ro", cache_dir / "other", size=16))
    assert sorted(p.relative_to(copy) for p in copy.rglob("*")) == before


def test_label_budget_keeps_k_per_class(data_root: Path, cache_dir: Path) -> None:
    a = load_store(cfg(data_root, "breastmnist.npz", cache_dir, size=28, train_per_class=5))
    assert a.counts()["train"] == [5, 5] and a.counts()["test"] == [42, 114]
    assert (a.split == "unlabelled").sum() == 546 - 10
    assert len(a.indices("train", "unlabelled")) == 546  # what SimCLR pretrains on: every training image
    b = load_store(cfg(data_root, "breastmnist.npz", cache_dir, size=28, train_per_class=5))
    c = load_store(cfg(data_root, "breastmnist.npz", cache_dir, size=28, train_per_class=5, train_draw=1))
    assert np.array_equal(a.indices("train"), b.indices("train"))  # seeded
    assert not np.array_equal(a.indices("train"), c.indices("train"))  # another draw
    # the split digests a run records say the same: equal for the same draw, other train/unlabelled
    # images for another draw, the same val and test (and test's is the lockbox ledger's digest)
    da, db, dc = (s.split_digests() for s in (a, b, c))
    assert da == db and set(da) == {"train", "val", "test", "unlabelled"}
    assert (da["train"], da["unlabelled"]) != (dc["train"], dc["unlabelled"])
    assert (da["val"], da["test"]) == (dc["val"], dc["test"]) and da["test"] == a.test_digest()


def test_training_batches_split_into_worker_chunks_only_when_workers_would_idle() -> None:
    """4 workers, 40 items, batch 8: 5 batches per epoch cannot keep 4 workers x 2 prefetched batches
    busy, so each batch is 4 chunks of 2 (one per worker), joined again; every item once per epoch,
    images and labels aligned. With 2 workers the 5 batches suffice: whole batches."""
    import torch
    from torch.utils.data import TensorDataset

    from lowshot.data import train_loader

    ds = TensorDataset(torch.arange(40).view(40, 1).float(), torch.arange(40) % 3)
    dl = train_loader(ds, 8, 4)
    assert (dl.per_batch, dl.loader.batch_size, dl.batch_size, len(dl)) == (4, 2, 8, 5)
    seen = []
    for x, y in dl:
        assert x.shape == (8, 1) and torch.equal(y, x[:, 0].long() % 3)
        seen += x[:, 0].long().tolist()
    assert sorted(seen) == list(range(40))
    whole = train_loader(ds, 8, 2)
    assert (whole.per_batch, whole.loader.batch_size, len(whole)) == (1, 8, 5)
    assert train_loader(ds, 12, 5).per_batch == 4  # largest divisor of the batch not above the workers
