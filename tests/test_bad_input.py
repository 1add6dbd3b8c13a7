"""Bad input, in one place (issue #13): every way a data set, a cache or a run directory can be wrong,
on real images, each asserting the exact outcome — a one-line error naming the file or key and the fix,
or a documented recovery (listed, skipped, rebuilt, continued). Cases that need the whole CLI live beside
the job they stop: configuration keys (tests/test_config.py), DICOM (tests/test_dicom.py), fail-fast
settings, divergence and reused run names (tests/test_e2e.py), killed and preempted runs and existing
run directories (tests/test_resume.py).
"""

import json
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import HANG_S, lowshot_cli
from PIL import Image

from lowshot.config import ConfigError, DataConfig, parse_args
from lowshot.data import DataError, load_store
from lowshot.models import WeightsError
from lowshot.tracking import preflight


def cfg(root: Path, source: str, cache: Path, **kw) -> DataConfig:
    return DataConfig(root=str(root), source=source, cache_dir=str(cache), **kw)


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
    # no empty data folder is left behind, and the scripts' preflight makes no runs/ folder (issue 41)
    with pytest.raises(DataError):
        load_store(cfg(tmp_path / "data", "pneumoniamnist.npz", cache_dir))
    assert not (tmp_path / "data").exists()
    preflight(parse_args([f"out_dir={tmp_path / 'runs'}"])[0])
    assert not (tmp_path / "runs").exists()


def test_missing_npz_without_medmnist_package_says_what_to_install(
    tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "medmnist", None)  # as if the optional extra were not installed
    with pytest.raises(DataError) as err:
        load_store(cfg(tmp_path, "pneumoniamnist.npz", cache_dir))
    assert "lowshot[medmnist]" in str(err.value) and str(tmp_path / "pneumoniamnist.npz") in str(err.value)


def test_missing_source_names_the_path(tmp_path: Path, cache_dir: Path) -> None:
    with pytest.raises(DataError, match="LOWSHOT_DATA_ROOT") as err:
        load_store(cfg(tmp_path, "nothing_here", cache_dir))
    assert str(tmp_path / "nothing_here") in str(err.value)


def test_csv_manifest_errors_name_line(tmp_path: Path, cache_dir: Path) -> None:
    m = tmp_path / "m.csv"
    m.write_text("path,label,split\na.png,x,train\nb.png,y,holdout\n")
    with pytest.raises(DataError, match="line 3"):
        load_store(cfg(tmp_path, "m.csv", cache_dir))
    m.write_text("file,class\na.png,x\n")
    with pytest.raises(DataError, match="path,label"):
        load_store(cfg(tmp_path, "m.csv", cache_dir))


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


@pytest.mark.slow  # processes of their own: a new interpreter each
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
    outs = [p.communicate(timeout=HANG_S)[0].strip() for p in procs]
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


def test_pool_manifest_paths_stay_below_the_data_root(busi: Path, tmp_path: Path) -> None:
    """The same rule for an ssl.unlabelled manifest: /etc or ../ is refused, unless allowed."""
    from lowshot.data.pool import load_pool

    inside, outside = tmp_path / "root", tmp_path / "elsewhere"
    for d in (inside, outside):
        d.mkdir()
    pngs = sorted((busi / "benign").glob("*.png"))[:6]
    for p in pngs[:5]:
        shutil.copy(p, inside / p.name)
    shutil.copy(pngs[5], outside / "x.png")
    (inside / "pool.csv").write_text(
        "path\n" + "".join(f"{p.name}\n" for p in pngs[:5]) + "../elsewhere/x.png\n"
    )
    cfg = dict(root=str(inside), cache_dir=str(tmp_path / "c"), size=28)
    with pytest.raises(
        DataError, match=r"pool manifest .*pool\.csv: 1 path\(s\) lie outside .*allow_outside_root"
    ):
        load_pool(["pool.csv"], DataConfig(**cfg), 1, workers=1)
    assert len(load_pool(["pool.csv"], DataConfig(**cfg, allow_outside_root=True), 1, workers=1)) == 6


@pytest.mark.parametrize(
    ("name", "payload", "why"),
    [
        ("truncated.png", "truncate", "truncated"),
        ("empty.png", b"", "empty"),
        ("notes.png", b"patient notes, not an image\n", "cannot identify image file"),
        ("scan.jpg", "png_bytes", None),  # a PNG under a .jpg name: read by content, kept
    ],
)
def test_unreadable_images_are_listed_with_why_and_the_rest_load(
    busi: Path, tmp_path: Path, name: str, payload: bytes | str, why: str | None
) -> None:
    root = _small_folder(busi, tmp_path / "d")
    src = sorted((busi / "benign").glob("*.png"))[20]
    raw = src.read_bytes()
    data = {"truncate": raw[: len(raw) // 3], "png_bytes": raw}.get(payload, payload)  # type: ignore[call-overload]
    (root / "benign" / name).write_bytes(data)
    cfg = DataConfig(
        root=str(tmp_path), source="d", cache_dir=str(tmp_path / "c"), val_fraction=0.25, test_fraction=0.25
    )
    store = load_store(cfg)
    skipped = {Path(f).name: r for f, r in store.skipped}
    if why is None:
        assert name not in skipped and len(store.labels) == 17
    else:
        assert len(store.labels) == 16 and why in skipped[name].lower(), skipped


@pytest.mark.parametrize("damage", ["truncated", "zero bytes", "garbage"])
def test_a_corrupt_store_cache_is_named_discarded_and_rebuilt(
    busi: Path, tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    _small_folder(busi, tmp_path / "d")
    cfg = DataConfig(
        root=str(tmp_path), source="d", cache_dir=str(tmp_path / "c"), val_fraction=0.25, test_fraction=0.25
    )
    want = load_store(cfg).images
    (cache,) = (tmp_path / "c" / "stores").glob("*.npz")
    raw = cache.read_bytes()
    cache.write_bytes({"truncated": raw[:100], "zero bytes": b"", "garbage": raw[::-1]}[damage])
    np.testing.assert_array_equal(load_store(cfg).images, want)  # discarded and rebuilt
    assert any(str(cache) in r.getMessage() and "unreadable" in r.getMessage() for r in caplog.records)


def test_an_npz_without_the_medmnist_keys_names_them(data_root: Path, tmp_path: Path) -> None:
    z = dict(np.load(data_root / "breastmnist.npz"))
    z["train_x"] = z.pop("train_images")
    np.savez(tmp_path / "renamed.npz", **z)
    with pytest.raises(DataError, match=r"renamed\.npz lacks the MedMNIST keys \['train_images'\]"):
        load_store(DataConfig(root=str(tmp_path), source="renamed.npz", cache_dir=str(tmp_path / "c")))


def test_a_class_missing_from_validation_is_reported(
    data_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    z = dict(np.load(data_root / "breastmnist.npz"))
    keep = z["val_labels"][:, 0] == 1  # validation without class 0
    z["val_images"], z["val_labels"] = z["val_images"][keep], z["val_labels"][keep]
    np.savez(tmp_path / "noval.npz", **z)
    store = load_store(DataConfig(root=str(tmp_path), source="noval.npz", cache_dir=str(tmp_path / "c")))
    assert store.counts()["val"][0] == 0
    assert any(
        "have no val image: their val sensitivity is undefined" in r.getMessage() for r in caplog.records
    )


def test_a_second_run_in_a_folder_still_in_use_is_refused(tmp_path: Path) -> None:
    """A restart while the first run still runs (its lock held) never writes into the same folder."""
    from accelerate import Accelerator
    from filelock import FileLock

    from lowshot.config import ConfigError, parse_args
    from lowshot.tracking import Run

    cfg, _ = parse_args([f"out_dir={tmp_path}", "name=busy", "track.log_with=none"])
    with (
        FileLock(tmp_path / ".busy.lock"),
        pytest.raises(ConfigError, match="in use by another running process"),
    ):
        Run(Accelerator(cpu=True), cfg, "pretrain", "x", [])
    assert not (tmp_path / "busy" / "config.yaml").exists()
    Run(Accelerator(cpu=True), cfg, "pretrain", "x", [])  # free again: the run starts
    assert (tmp_path / "busy" / "config.yaml").is_file()


def test_settings_that_need_no_data_fail_before_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unwritable out_dir, a missing weights file, W&B online without a key: each refused by the
    scripts' preflight before any data are read (the data root here does not even exist). In-process: the
    launcher adds nothing to a check made before decoding (the one-line printing is test_e2e's)."""
    (tmp_path / "file").write_text("")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc holding a key
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    base = [f"data.root={tmp_path / 'nothing'}"]
    cases = [
        ([f"out_dir={tmp_path / 'file' / 'runs'}"], ConfigError, "cannot be written"),
        ([f"out_dir={tmp_path}", "model.weights=/no/such/weights.safetensors"], WeightsError, "no such file"),
        ([f"out_dir={tmp_path}", "track.wandb_mode=online"], ConfigError, "no W&B API key"),
    ]
    for args, error, message in cases:
        cfg, _ = parse_args([*base, *args])
        with pytest.raises(error, match=message):
            preflight(cfg)
    assert not (tmp_path / "nothing").exists()


def test_settings_that_cannot_be_valid_fail_when_read() -> None:
    """A learning rate <= 0 or a negative weight decay: refused by the config, naming the key, not a torch
    error after the data have loaded (issue 41); data.size's message says what does train."""
    for args, key in (
        (["train.lr=-1"], "train.lr"),
        (["ssl.lr=0"], "ssl.lr"),
        (["train.weight_decay=-0.1"], "train.weight_decay"),
        (["ssl.lr=nan"], "ssl.lr"),
    ):
        with pytest.raises(ConfigError, match=key):
            parse_args(args)
    assert parse_args(["train.lr=1e6"])[0].train.lr == 1e6  # huge but valid: the divergence guard's job
    with pytest.raises(ConfigError, match="use 8 or more"):
        parse_args(["data.size=7"])
    assert parse_args(["data.size=8"])[0].data.size == 8


def test_wandb_online_in_the_environment_without_a_key_is_refused_before_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("WANDB_MODE", "online")
    cfg, _ = parse_args([f"out_dir={tmp_path}"])  # track.wandb_mode=auto: the environment decides
    with pytest.raises(ConfigError, match="WANDB_MODE=online"):
        preflight(cfg)


def test_show_on_a_pretraining_run_says_what_it_is(tmp_path: Path) -> None:
    (tmp_path / "pre").mkdir()
    res = {"job": "pretrain", "data": "breastmnist", "final_loss": 5.1, "knn/val_accuracy": 0.75, "steps": 8}
    (tmp_path / "pre" / "results.json").write_text(json.dumps({**res, "checkpoint": "pre/checkpoint"}))
    p = lowshot_cli("show", str(tmp_path / "pre"))
    assert p.returncode == 0, p.stderr
    assert "pretrain run on breastmnist" in p.stdout and "knn/val_accuracy 0.75" in p.stdout
    assert "pre/checkpoint" in p.stdout


def test_a_label_budget_larger_than_a_class_is_said(
    data_root: Path, cache_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = DataConfig(root=str(data_root), cache_dir=str(cache_dir), size=28, train_per_class=200)
    store = load_store(cfg)  # BreastMNIST's training split: 147 malignant images
    assert (store.split == "train").sum() < 400
    assert any(
        "data.train_per_class=200" in r.getMessage() and "malignant" in r.getMessage() for r in caplog.records
    )


def test_a_link_out_of_a_class_folder_is_refused_like_a_manifest_line(tmp_path: Path) -> None:
    """A symlink in a class folder pointing outside the data folder was trained on without a word, where a
    manifest line with the same path is refused (issue 41); data.allow_outside_root=true lets both in."""
    outside = tmp_path / "elsewhere" / "x.png"
    outside.parent.mkdir()
    Image.fromarray(np.full((32, 32), 200, np.uint8)).save(outside)
    for c in ("a", "b"):
        (tmp_path / "data" / "set" / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(np.full((32, 32), 40 * i + (c == "b"), np.uint8)).save(
                tmp_path / "data" / "set" / c / f"{i}.png"
            )
    (tmp_path / "data" / "set" / "a" / "link.png").symlink_to(outside)
    cfg = DataConfig(root=str(tmp_path / "data"), source="set", cache_dir=str(tmp_path / "cache"), size=32)
    with pytest.raises(DataError, match=r"link\.png links to .*outside"):
        load_store(cfg)
    store = load_store(replace(cfg, allow_outside_root=True))
    assert any(str(p).endswith("link.png") for p in store.paths)


def test_help_names_every_subcommand_and_flag() -> None:
    """`lowshot --help` lists every subcommand, `lowshot check --help` its --warn-only (issue 41)."""
    top = lowshot_cli("--help")
    assert top.returncode == 0 and all(
        c in top.stdout
        for c in ("quickstart", "check", "evaluate", "predict", "export", "ensemble", "report")
    )
    check = lowshot_cli("check", "--help")
    assert check.returncode == 0 and "--warn-only" in check.stdout and "train.lr=" in check.stdout
