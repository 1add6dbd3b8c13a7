"""The evaluation protocol: duplicates never straddle a split or a fold, the test split is a sealed
lockbox that selection cannot read (instrumented on the real training script), leaked splits stop
training, and `lowshot report` / `compare` work on real runs."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import HANG_S
from PIL import Image

from lowshot import data as data_mod
from lowshot import finetune as finetune_mod
from lowshot import probe as probe_mod
from lowshot.config import DataConfig, parse_args
from lowshot.data import DataError, LockboxError, Store, load_store, split_loader
from lowshot.data.guards import leakage_guard

REPO = Path(__file__).resolve().parents[1]


def _smooth(rng: np.random.Generator) -> Image.Image:
    """A 64 px image with coarse structure, so its dHash is its own."""
    return Image.fromarray(rng.integers(0, 256, (6, 6), dtype=np.uint8)).resize(
        (64, 64), Image.Resampling.BILINEAR
    )


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[tuple[str, str]]]:
    """Two classes of 40 images, plus exact and near copies (same class, other file names)."""
    root = tmp_path_factory.mktemp("dups")
    rng = np.random.default_rng(0)
    copies = []
    for c in ("benign", "malignant"):
        (root / "imgs" / c).mkdir(parents=True)
        for i in range(40):
            im = _smooth(rng)
            im.save(root / "imgs" / c / f"{i}.png")
            if i < 6:  # an exact copy under another name
                im.save(root / "imgs" / c / f"{i}_copy.png")
                copies.append((f"{c}/{i}.png", f"{c}/{i}_copy.png"))
            elif i < 10:  # a re-exported copy: +-2 grey levels of noise
                a = np.asarray(im).astype(int) + rng.integers(-2, 3, (64, 64))
                Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(root / "imgs" / c / f"{i}_near.png")
                copies.append((f"{c}/{i}.png", f"{c}/{i}_near.png"))
    return root, copies


def _split_of(store: Store) -> dict[str, str]:
    return {"/".join(Path(p).parts[-2:]): str(s) for p, s in zip(store.paths, store.split, strict=True)}


def test_copies_never_straddle_splits_or_folds(folder: tuple[Path, list], tmp_path: Path) -> None:
    root, copies = folder
    for seed in range(4):
        cfg = DataConfig(root=str(root), source="imgs", size=32, cache_dir=str(tmp_path), split_seed=seed)
        split = _split_of(load_store(cfg))
        assert all(split[a] == split[b] for a, b in copies), seed
        tests = {k for k, v in split.items() if v == "test"}
        vals = []
        for fold in range(5):
            store = load_store(DataConfig(**{**cfg.__dict__, "folds": 5, "fold": fold}))
            fsplit = _split_of(store)
            assert {k for k, v in fsplit.items() if v == "test"} == tests  # k-fold never touches test
            assert all(fsplit[a] == fsplit[b] for a, b in copies), (seed, fold)
            val_groups = set(store.groups[store.split == "val"])
            assert not val_groups & set(store.groups[store.split == "train"])  # no group in two folds
            vals += [k for k, v in fsplit.items() if v == "val"]
        pool = {k for k, v in split.items() if v != "test"}
        assert sorted(vals) == sorted(pool)  # every train/val image validates exactly once


def test_without_grouping_copies_do_straddle(folder: tuple[Path, list], tmp_path: Path) -> None:
    """The control: the grouping, not luck, keeps copies together."""
    root, copies = folder
    apart = 0
    for seed in range(4):
        cfg = DataConfig(
            root=str(root),
            source="imgs",
            size=32,
            cache_dir=str(tmp_path),
            split_seed=seed,
            group_duplicates=False,
        )
        split = _split_of(load_store(cfg))
        apart += sum(split[a] != split[b] for a, b in copies)
    assert apart > 0


def test_sealed_test_split_cannot_be_read(data_root: Path, cache_dir: Path) -> None:
    store = load_store(DataConfig(root=str(data_root), cache_dir=str(cache_dir), size=28))
    n_test = len(store.indices("test"))
    store.seal()
    with pytest.raises(LockboxError):
        store.indices("test")
    with pytest.raises(LockboxError):
        split_loader(store, "test", lambda im: im, False, 8, 0)
    with pytest.raises(LockboxError):
        store.indices("val", "test")
    assert len(store.indices("train")) == 546  # everything else reads as before
    assert len(store.unseal()) == n_test and store.test_reads == 1


def test_leakage_guard_on_breastmnist_official_split(data_root: Path, cache_dir: Path) -> None:
    """BreastMNIST's official split holds one image twice (train/115 and test/76, labelled differently)."""
    cfg, _ = parse_args([f"data.root={data_root}", f"data.cache_dir={cache_dir}", "data.size=28"])
    with pytest.raises(DataError, match=r"train/115.*test/76.*check.leakage=drop"):
        leakage_guard(load_store(cfg.data), cfg)
    cfg.check.leakage = "drop"
    store = load_store(cfg.data)
    found = leakage_guard(store, cfg)
    assert found["exact_across_splits"] == 1 and found["dropped"] == ["breastmnist.npz:train/115"]
    assert len(store.indices("train")) == 545 and len(store.indices("test")) == 156  # test as published
    cfg.check.leakage = "warn"
    store = load_store(cfg.data)
    assert leakage_guard(store, cfg)["dropped"] == [] and len(store.indices("train")) == 546


# --------------------------------------------------------------- the real training script, instrumented


def _run_train(args: list[str], monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, bool]]:
    """Run finetune/train.py in this process with selection and the lockbox instrumented; returns the
    events in order: ('select', store sealed?) for every selection step, ('unseal', ...) for test reads."""
    events: list[tuple[str, bool]] = []
    stores: list[Store] = []
    real_load, real_fit, real_step, real_unseal = (
        data_mod.load_store,
        probe_mod.fit_probe,
        finetune_mod.EarlyStopping.step,
        Store.unseal,
    )

    def load(cfg: DataConfig) -> Store:
        stores.append(real_load(cfg))
        return stores[-1]

    def fit(*a, **k):  # type: ignore[no-untyped-def]
        events.append(("select", stores[-1].sealed))
        return real_fit(*a, **k)

    def step(self, *a, **k):  # type: ignore[no-untyped-def]
        events.append(("select", stores[-1].sealed))
        return real_step(self, *a, **k)

    def unseal(self: Store) -> np.ndarray:
        events.append(("unseal", self.sealed))
        return real_unseal(self)

    monkeypatch.setattr(data_mod, "load_store", load)
    monkeypatch.setattr(probe_mod, "fit_probe", fit)
    monkeypatch.setattr(finetune_mod.EarlyStopping, "step", step)
    monkeypatch.setattr(Store, "unseal", unseal)
    monkeypatch.setattr(sys, "argv", ["finetune/train.py", *args])
    runpy.run_path(str(REPO / "finetune" / "train.py"), run_name="__main__")
    return events


@pytest.fixture(scope="module")
def runs(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A probe, two seeds of a fine-tune and a fold run on BreastMNIST (28 px, tiny model), each with
    the instrumented selection checked; shared by the report tests."""
    out, cache = tmp_path_factory.mktemp("runs"), tmp_path_factory.mktemp("cache")
    base = [
        f"data.root={data_root}",
        f"data.cache_dir={cache}",
        f"out_dir={out}",
        "data.size=28",
        "data.limit=80",
        "model.name=test_resnet",
        "track.log_with=none",
        "eval.bootstrap=100",
        "check.leakage=drop",
        "train.epochs=3",
    ]
    mp = pytest.MonkeyPatch()
    found = {}
    try:
        for name, extra in (
            ("probe", ["--probe"]),
            ("ft0", ["seed=0"]),
            ("ft1", ["seed=1"]),
            ("fold1", ["data.folds=3", "data.fold=1"]),
            ("select-only", ["data.folds=3", "data.fold=2", "eval.test=false"]),
        ):
            events = _run_train([*base, *extra, f"name={name}"], mp)
            selects = [sealed for e, sealed in events if e == "select"]
            assert selects and all(selects), (name, events)  # every selection step ran with test sealed
            opened = [e for e, _ in events].count("unseal")
            if name == "select-only":
                assert opened == 0  # a selection-only run never opens the lockbox
            else:
                assert opened == 1, events  # test read exactly once ...
                assert events[-1][0] == "unseal"  # ... after the last selection step
            found[name] = out / name
    finally:
        mp.undo()
    return found


def test_selection_never_reads_test_and_results_are_complete(runs: dict[str, Path]) -> None:
    only = json.loads((runs["select-only"] / "results.json").read_text())
    assert "test" not in only and "lockbox" not in json.loads((runs["select-only"] / "meta.json").read_text())
    assert "test_prob" not in np.load(runs["select-only"] / "predictions.npz")
    for name, d in runs.items():
        if name == "select-only":
            continue
        res = json.loads((d / "results.json").read_text())
        meta = json.loads((d / "meta.json").read_text())
        assert res["test"]["n"] == 80 and meta["lockbox"]["reads_this_run"] == 1
        cal = res["calibration"]
        assert cal["temperature"] > 0 and 0 <= cal["test_scaled"]["ece"] <= 1
        pred = np.load(d / "predictions.npz")
        assert pred["test_prob"].shape == (80, 2) and len(pred["test_path"]) == 80
        if name != "probe":
            rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
            assert {"train/loss_clean", "train/accuracy_clean", "val/auroc"} <= set(rows[0])
    # the ledger counts earlier openings of the same test split
    lock = json.loads((runs["ft1"] / "meta.json").read_text())["lockbox"]
    assert (
        lock["opened_before"] == 2 and lock["other_settings_before"] == 1
    )  # the probe; ft0 is the same setting


def test_report_aggregates_seeds_and_compares_runs(runs: dict[str, Path], tmp_path: Path) -> None:
    from lowshot.report import compare, write_report
    from lowshot.run_folder import read_run as load_run

    md = write_report([runs["ft0"], runs["ft1"], runs["probe"]], tmp_path / "rep").read_text()
    assert "| 2 |" in md  # the two seeds form one experiment of n=2
    assert "How much to believe this" in md and "one image moves accuracy by 1.25 points" in md
    assert "Paired comparisons" in md and "DeLong" in md
    assert md.count("Operating point (balanced, threshold") == 3 and "at argmax (0.5): sensitivity" in md
    for run in ("ft0", "ft1", "probe"):
        for fig in ("roc", "confusion", "reliability", "learning_curves"):
            png = tmp_path / "rep" / run / f"{fig}.png"
            assert png.is_file() and png.stat().st_size > 5000, png
            assert f"]({run}/{fig}.png)" in md
    c = compare(load_run(runs["ft0"]), load_run(runs["ft1"]))
    assert c["n"] == 80 and -1 <= c["delong"]["diff"] <= 1
    (tmp_path / "pre").mkdir()
    (tmp_path / "pre" / "results.json").write_text('{"job": "pretrain"}')
    with pytest.raises(FileNotFoundError, match="is a pretrain run"):
        load_run(tmp_path / "pre")
    with pytest.raises(ValueError, match="no test predictions"):
        compare(load_run(runs["ft0"]), load_run(runs["select-only"]))
    md = write_report([runs["fold1"], runs["select-only"]], tmp_path / "cv").read_text()
    assert "Selection-only run" in md and "| val |" in md


@pytest.mark.slow  # processes of their own: a new interpreter each
def test_refused_leak_is_one_clear_line(data_root: Path, tmp_path: Path) -> None:
    """The script refuses BreastMNIST's official split by default and says how to go on."""
    import subprocess

    p = subprocess.run(
        [
            sys.executable,
            str(REPO / "finetune" / "train.py"),
            "--probe",
            f"data.root={data_root}",
            f"data.cache_dir={tmp_path}",
            f"out_dir={tmp_path}",
            "track.log_with=none",
            "data.size=28",
        ],
        capture_output=True,
        text=True,
        timeout=HANG_S,
        cwd=REPO,
    )
    assert p.returncode != 0
    assert "train/115" in p.stderr and "check.leakage=drop" in p.stderr and "Traceback" not in p.stderr
    assert not list(tmp_path.glob("probe-*"))  # refused before a run directory was made
