import csv
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lowshot import data as data_mod
from lowshot.config import DataConfig
from lowshot.data import DataError, decode_image, load_store, make_splits


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


def test_npz_md5_mismatch_is_an_error(data_root: Path, tmp_path: Path, cache_dir: Path) -> None:
    bad = tmp_path / "breastmnist.npz"
    raw = bytearray((data_root / "breastmnist.npz").read_bytes())
    raw[-100] ^= 0xFF
    bad.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="md5") as err:
        load_store(cfg(tmp_path, "breastmnist.npz", cache_dir))
    assert str(bad) in str(err.value)


def test_missing_medmnist_file_offline_says_where_to_put_it(
    tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import medmnist

    def offline(*a, **k):
        raise OSError("Name or service not known")

    monkeypatch.setattr(medmnist, "PneumoniaMNIST", offline)
    with pytest.raises(DataError) as err:
        load_store(cfg(tmp_path, "pneumoniamnist.npz", cache_dir))
    msg = str(err.value)
    assert "could not be downloaded" in msg and str(tmp_path) in msg and "md5" in msg


def test_missing_npz_without_medmnist_package_says_what_to_install(
    tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "medmnist", None)  # as if the optional extra were not installed
    with pytest.raises(DataError) as err:
        load_store(cfg(tmp_path, "pneumoniamnist.npz", cache_dir))
    assert "lowshot[medmnist]" in str(err.value) and str(tmp_path / "pneumoniamnist.npz") in str(err.value)


def test_known_npz_verified_without_medmnist_package(
    data_root: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "medmnist", None)
    store = load_store(cfg(data_root, "breastmnist.npz", cache_dir, size=28))
    assert store.classes == ["malignant", "normal, benign"]


def test_missing_source_names_the_path(tmp_path: Path, cache_dir: Path) -> None:
    with pytest.raises(DataError, match="LOWSHOT_DATA_ROOT") as err:
        load_store(cfg(tmp_path, "nothing_here", cache_dir))
    assert str(tmp_path / "nothing_here") in str(err.value)


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
    Image.fromarray(g, "L").convert("P").save(root / "b" / "palette.png")
    sixteen = (np.linspace(1000, 4000, 900).reshape(30, 30)).astype(np.uint16)  # 12-bit data in 16 bits
    Image.fromarray(sixteen).save(root / "b" / "deep16.png")
    Image.fromarray(g > 128).save(root / "b" / "binary.png")
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


def test_csv_manifest_errors_name_line(tmp_path: Path, cache_dir: Path) -> None:
    m = tmp_path / "m.csv"
    m.write_text("path,label,split\na.png,x,train\nb.png,y,holdout\n")
    with pytest.raises(DataError, match="line 3"):
        load_store(cfg(tmp_path, "m.csv", cache_dir))
    m.write_text("file,class\na.png,x\n")
    with pytest.raises(DataError, match="path,label"):
        load_store(cfg(tmp_path, "m.csv", cache_dir))


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


def _bad_npz(data_root: Path, tmp_path: Path, **change: np.ndarray) -> Path:
    """BreastMNIST's real arrays with some replaced, under a name lowshot has no md5 for."""
    z = dict(np.load(data_root / "breastmnist.npz"))
    z.update(change)
    out = tmp_path / "edited.npz"
    np.savez(out, **z)
    return out


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("labels_out_of_range", r"5 class\(es\) \['2', '3', '4', '5', '6'\] have no training image"),
        ("negative_label", "holds -1"),
        ("short_labels", "one label per image"),
        ("fractional_labels", "non-integer values"),
        ("float_images", "expected uint8"),
    ],
)
def test_bad_label_and_image_arrays_are_refused(
    data_root: Path, tmp_path: Path, change: str, message: str
) -> None:
    """The five ways an edited .npz used to train silently or crash later, each a DataError naming the
    file and the fix (a label 7 in a 2-class file makes classes 2-6 with no image: refused)."""
    z = np.load(data_root / "breastmnist.npz")
    y, x = z["train_labels"].astype(np.int64), z["train_images"]
    edits = {
        "labels_out_of_range": {"train_labels": np.where(np.arange(len(y))[:, None] == 0, 7, y)},
        "negative_label": {"train_labels": np.where(np.arange(len(y))[:, None] == 3, -1, y)},
        "short_labels": {"train_labels": y[:-5]},
        "fractional_labels": {"train_labels": y + 0.5},
        "float_images": {"train_images": x.astype(np.float32) / 255},
    }
    path = _bad_npz(data_root, tmp_path, **edits[change])
    with pytest.raises(DataError, match=message) as err:
        load_store(DataConfig(root=str(tmp_path), source=path.name, cache_dir=str(tmp_path / "c")))
    assert path.name in str(err.value)


def test_a_class_without_training_images_is_refused(busi: Path, tmp_path: Path) -> None:
    root = tmp_path / "busi"
    for c in ("benign", "malignant"):
        shutil.copytree(busi / c, root / c)
    (root / "normal").mkdir()
    f = sorted((busi / "normal").glob("*.png"))[0]
    shutil.copy(f, root / "normal" / f.name)  # one image: it lands in one split only
    rows = ["path,label,split"] + [
        f"{c}/{p.name},{c},train"
        for c in ("benign", "malignant")
        for p in sorted((root / c).glob("*.png"))[:20]
    ]
    rows += [f"benign/{p.name},benign,val" for p in sorted((root / "benign").glob("*.png"))[20:25]]
    rows += [f"malignant/{p.name},malignant,test" for p in sorted((root / "malignant").glob("*.png"))[20:25]]
    rows += [f"normal/{f.name},normal,test"]
    (root / "m.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError, match=r"\['normal'\] have no training image"):
        load_store(
            DataConfig(root=str(root), source="m.csv", cache_dir=str(tmp_path / "c"), group_duplicates=False)
        )


def _small_folder(busi: Path, root: Path, n: int = 8) -> Path:
    for c in ("benign", "malignant"):
        (root / c).mkdir(parents=True)
        for p in sorted((busi / c).glob("*.png"))[:n]:
            shutil.copy2(p, root / c / p.name)
    return root


def test_an_edited_file_with_the_same_size_and_time_is_decoded_again(busi: Path, tmp_path: Path) -> None:
    """The store cache is keyed by content: BMP pixels edited in place, the size and modification time
    put back, are decoded again."""
    import os

    for c in ("benign", "malignant"):
        (tmp_path / "d" / c).mkdir(parents=True)
        for p in sorted((busi / c).glob("*.png"))[:8]:
            Image.open(p).convert("L").save(tmp_path / "d" / c / f"{p.stem}.bmp")
    cfg = DataConfig(
        root=str(tmp_path), source="d", cache_dir=str(tmp_path / "c"), val_fraction=0.25, test_fraction=0.25
    )
    first = load_store(cfg)
    f = sorted((tmp_path / "d" / "benign").glob("*.bmp"))[0]
    st, raw = f.stat(), bytearray(f.read_bytes())
    raw[-4000:] = bytes(255 - b for b in raw[-4000:])  # the last rows of pixels, inverted
    f.write_bytes(bytes(raw))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert f.stat().st_size == st.st_size and f.stat().st_mtime_ns == st.st_mtime_ns
    second = load_store(cfg)
    row = list(first.paths).index(str(f))
    assert not np.array_equal(first.images[row], second.images[row])
    others = [r for r in range(len(first.paths)) if r != row]
    np.testing.assert_array_equal(first.images[others], second.images[others])


def test_a_corrupt_store_cache_is_named_discarded_and_rebuilt(
    busi: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _small_folder(busi, tmp_path / "d")
    cfg = DataConfig(
        root=str(tmp_path), source="d", cache_dir=str(tmp_path / "c"), val_fraction=0.25, test_fraction=0.25
    )
    want = load_store(cfg).images
    (cache,) = (tmp_path / "c" / "stores").glob("*.npz")
    cache.write_bytes(cache.read_bytes()[:100])  # truncated
    got = load_store(cfg).images
    np.testing.assert_array_equal(got, want)
    assert any(str(cache) in r.getMessage() and "unreadable" in r.getMessage() for r in caplog.records)


def test_two_processes_filling_an_empty_cache_at_once(busi: Path, tmp_path: Path) -> None:
    """Parallel runs share the store cache: one decodes under the lock, the other reads its file."""
    import subprocess

    _small_folder(busi, tmp_path / "d", n=30)
    code = (
        "import sys, hashlib; from lowshot.config import DataConfig; from lowshot.data import load_store;"
        f"s = load_store(DataConfig(root={str(tmp_path)!r}, source='d', cache_dir={str(tmp_path / 'c')!r}));"
        "print(hashlib.sha1(s.images.tobytes()).hexdigest())"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(2)
    ]
    outs = [p.communicate(timeout=300)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs) and outs[0] == outs[1] and len(outs[0]) == 40
    assert len(list((tmp_path / "c" / "stores").glob("*.npz"))) == 1
    assert not list((tmp_path / "c" / "stores").glob("*.tmp*"))


def test_folder_rules_hidden_nested_empty_and_huge(
    busi: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The documented folder rule: files at any depth below a class folder have its class; hidden files and
    folders are listed as skipped; an empty class folder is reported; a decompression bomb is skipped with
    PIL's limit named and the rest still load; images smaller than data.size are said to be upsampled."""
    from PIL import Image as PILImage

    root = tmp_path / "d"
    pngs = {c: sorted((busi / c).glob("*.png"))[:6] for c in ("benign", "malignant")}
    for c, ps in pngs.items():
        (root / c / "site2").mkdir(parents=True)
        for p in ps[:4]:
            shutil.copy(p, root / c / p.name)
        for p in ps[4:]:
            shutil.copy(p, root / c / "site2" / p.name)  # nested: still this class
    (root / "benign" / ".DS_Store").write_bytes(b"\0\0")
    (root / "benign" / ".thumbs").mkdir()
    shutil.copy(pngs["benign"][0], root / "benign" / ".thumbs" / "x.png")
    (root / "normal").mkdir()  # empty class
    PILImage.new("L", (2000, 1500)).save(root / "malignant" / "huge.png")  # 3 Mpx
    cfg = DataConfig(
        root=str(tmp_path),
        source="d",
        cache_dir=str(tmp_path / "c"),
        size=300,
        val_fraction=0.25,
        test_fraction=0.25,
    )
    old = PILImage.MAX_IMAGE_PIXELS
    PILImage.MAX_IMAGE_PIXELS = 1_000_000  # the 3 Mpx file is then a decompression bomb (> 2x the limit)
    try:
        store = load_store(cfg)
    finally:
        PILImage.MAX_IMAGE_PIXELS = old
    assert len(store.labels) == 12 and store.classes == ["benign", "malignant"]
    why = {Path(f).name: r for f, r in store.skipped}
    assert why[".DS_Store"] == "hidden file or folder" and why["x.png"] == "hidden file or folder"
    assert "holds no files" in why["normal"] and "MAX_IMAGE_PIXELS" in why["huge.png"]
    assert any("smaller than data.size=300" in r.getMessage() for r in caplog.records), [
        r.getMessage()[:120] for r in caplog.records
    ]


def test_manifest_paths_stay_below_the_data_root(busi: Path, tmp_path: Path) -> None:
    """A manifest that reaches outside its folder and data.root (../, absolute) is refused, naming the line
    and the setting; data.allow_outside_root=true reads it."""
    inside, outside = tmp_path / "root", tmp_path / "elsewhere"
    for d in (inside, outside):
        d.mkdir()
    rows = ["path,label"]
    for i, p in enumerate(
        sorted((busi / "benign").glob("*.png"))[:10] + sorted((busi / "malignant").glob("*.png"))[:10]
    ):
        shutil.copy(p, inside / p.name)
        rows.append(f"{p.name},{'benign' if i < 10 else 'malignant'}")
    shutil.copy(sorted((busi / "normal").glob("*.png"))[0], outside / "n.png")
    rows.append("../elsewhere/n.png,benign")
    (inside / "m.csv").write_text("\n".join(rows) + "\n")
    cfg = dict(
        root=str(inside), source="m.csv", cache_dir=str(tmp_path / "c"), val_fraction=0.25, test_fraction=0.25
    )
    with pytest.raises(
        DataError, match=r"m\.csv line 22: \.\./elsewhere/n\.png lies outside .*data\.allow_outside_root=true"
    ):
        load_store(DataConfig(**cfg))
    assert len(load_store(DataConfig(**cfg, allow_outside_root=True)).labels) == 21
