import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lowshot.check import check_store
from lowshot.cli import check
from lowshot.config import DataConfig
from lowshot.data import dhash, duplicate_pairs, fingerprints, load_store, near_pairs


def _scan(rng: np.random.Generator) -> np.ndarray:
    """A smooth random 'scan' (structure at several scales, like ultrasound speckle over anatomy)."""
    base = np.kron(rng.integers(0, 256, (8, 8)), np.ones((8, 8)))
    return np.clip(base + rng.normal(0, 10, (64, 64)), 0, 255).astype(np.uint8)


def _write(root: Path) -> None:
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
    scans = [_scan(rng) for _ in range(12)]
    for i, s in enumerate(scans[:6]):
        Image.fromarray(s).save(root / "a" / f"a{i}.png")
    for i, s in enumerate(scans[6:]):
        Image.fromarray(s).save(root / "b" / f"b{i}.png")
    Image.fromarray(scans[0]).save(root / "b" / "copy_of_a0.png")  # exact duplicate, other class
    Image.fromarray(scans[0]).save(root / "a" / "a0_again.jpg", quality=100)  # same image, other bytes
    noisy = np.clip(scans[7].astype(int) + rng.integers(-2, 3, scans[7].shape), 0, 255).astype(np.uint8)
    Image.fromarray(noisy).save(root / "b" / "b1_reexport.png")  # near duplicate, same class


def test_finds_exact_and_near_duplicates_and_label_conflicts(tmp_path: Path) -> None:
    _write(tmp_path / "set")
    cfg = DataConfig(root=str(tmp_path), source="set", cache_dir=str(tmp_path / "cache"), size=32)
    store = load_store(cfg)
    report, images = check_store(store, cfg, threshold=4)
    assert len(images) == 15 and images[0].shape == (64, 64, 1)  # native resolution
    assert report["file_modes"] == {"L": 15}
    names = {
        (Path(r["a"]["path"]).name, Path(r["b"]["path"]).name, r["kind"], r["cross_class"])
        for r in report["pairs"]
    }
    assert ("a0.png", "copy_of_a0.png", "exact", True) in names  # decoded pixels, not file bytes
    assert any({a, b} == {"b1.png", "b1_reexport.png"} and not cc for a, b, _, cc in names)
    assert report["exact_pairs"] >= 1 and report["cross_class_pairs"] >= 1
    # The 10 distinct scans pair with nothing.
    flagged = {Path(r[s]["path"]).name for r in report["pairs"] for s in ("a", "b")}
    assert not flagged & {f"a{i}.png" for i in range(1, 6)}


def test_dhash_distance_is_small_for_copies_and_large_for_different_images() -> None:
    rng = np.random.default_rng(1)
    a, b = _scan(rng)[..., None], _scan(rng)[..., None]
    bits = np.stack([dhash(a), dhash(np.clip(a.astype(int) + 1, 0, 255).astype(np.uint8)), dhash(b)])
    pairs = near_pairs(bits, threshold=4)
    assert (0, 1, 0) in pairs and all(j != 2 for _, j, _ in pairs)


def test_cli_exit_code_json_and_sheet(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write(tmp_path / "set")
    args = [
        f"data.root={tmp_path}",
        "data.source=set",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"out_dir={tmp_path}",
        "name=c1",
    ]
    assert check(args) == 1  # a label conflict fails the check
    report = json.loads((tmp_path / "c1" / "report.json").read_text())
    assert report["cross_class_pairs"] >= 1
    assert (tmp_path / "c1" / "pairs.png").read_bytes()[:4] == b"\x89PNG"
    assert "label conflicts" in capsys.readouterr().out
    assert check([*args[:-1], "name=c2", "--warn-only"]) == 0


def test_busi_has_duplicates_across_classes(busi: Path, cache_dir: Path) -> None:
    """Real data is not clean: BUSI holds near-identical scans filed under two classes."""
    cfg = DataConfig(root=str(busi.parent), source=busi.name, cache_dir=str(cache_dir), size=32, color="gray")
    report, _ = check_store(load_store(cfg), cfg, threshold=4)
    conflicts = {
        (Path(r["a"]["path"]).name, Path(r["b"]["path"]).name) for r in report["pairs"] if r["cross_class"]
    }
    assert ("benign (433).png", "malignant (145).png") in conflicts  # pixel-identical
    assert report["exact_pairs"] >= 1 and report["cross_class_pairs"] >= 5
    # lowshot's own split groups copies first, so none straddles two splits; a plain split would leak
    assert report["cross_split_pairs"] == 0
    plain = DataConfig(**{**cfg.__dict__, "group_duplicates": False})
    assert check_store(load_store(plain), plain, threshold=4)[0]["cross_split_pairs"] >= 20


def test_embedding_pairs_and_hash_blind_images(tmp_path: Path) -> None:
    _write(tmp_path / "set")
    cfg = DataConfig(root=str(tmp_path), source="set", cache_dir=str(tmp_path / "cache"), size=32)
    store = load_store(cfg)
    feats = np.random.default_rng(0).normal(size=(len(store.labels), 16))
    i, j = 3, 9
    feats[j] = feats[i] * 2.0  # same direction: cosine 1
    report, _ = check_store(store, cfg, threshold=4, feats=feats, cosine=0.99)
    emb = [r for r in report["pairs"] if r["kind"] == "embedding"]
    assert [(r["a"]["index"], r["b"]["index"]) for r in emb] == [(i, j)] and emb[0][
        "cosine"
    ] == pytest.approx(1.0)
    # 20 different images with one gradient pattern: dHash cannot tell them apart, so no near pairs
    ramp = np.tile(np.arange(0, 64, dtype=np.uint8) * 3, (64, 1))
    imgs = [np.clip(ramp.astype(int) + k, 0, 255).astype(np.uint8)[..., None] for k in range(20)]
    pairs, vague = duplicate_pairs(*fingerprints(imgs), threshold=4)
    assert vague.all() and pairs == []
