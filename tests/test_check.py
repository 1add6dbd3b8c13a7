import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lowshot.check import check_command as check
from lowshot.check import check_store
from lowshot.config import DataConfig
from lowshot.data import dhash, duplicate_pairs, fingerprints, load_store
from lowshot.data.duplicates import hamming_pairs


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
    report, images = check_store(store, cfg)
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
    pairs = {(int(a), int(b), int(d)) for a, b, d in hamming_pairs(bits, bits, 4) if a < b}
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
    report, _ = check_store(load_store(cfg), cfg)
    conflicts = {
        (Path(r["a"]["path"]).name, Path(r["b"]["path"]).name) for r in report["pairs"] if r["cross_class"]
    }
    assert ("benign (433).png", "malignant (145).png") in conflicts  # pixel-identical
    assert report["exact_pairs"] >= 1 and report["cross_class_pairs"] >= 5
    # lowshot's own split groups copies first, so none straddles two splits; a plain split would leak
    assert report["cross_split_pairs"] == 0
    plain = DataConfig(**{**cfg.__dict__, "group_duplicates": False})
    assert check_store(load_store(plain), plain)[0]["cross_split_pairs"] >= 20


def test_embedding_pairs_and_hash_blind_images(tmp_path: Path) -> None:
    _write(tmp_path / "set")
    cfg = DataConfig(root=str(tmp_path), source="set", cache_dir=str(tmp_path / "cache"), size=32)
    store = load_store(cfg)
    feats = np.random.default_rng(0).normal(size=(len(store.labels), 16))
    i, j = 3, 9
    feats[j] = feats[i] * 2.0  # same direction: cosine 1
    report, _ = check_store(store, cfg, feats=feats, cosine=0.99)
    emb = [r for r in report["pairs"] if r["found_by"] == "embedding"]
    assert [(r["a"]["index"], r["b"]["index"]) for r in emb] == [(i, j)] and emb[0][
        "cosine"
    ] == pytest.approx(1.0)
    # two different scans: the embedding candidate fails verification, a look-alike that counts for nothing
    assert emb[0]["kind"] == "lookalike" and emb[0]["ncc"] < 0.5 and report["embedding_candidates"] == 1
    # 20 different images with one gradient pattern: dHash cannot tell them apart, so no near pairs
    ramp = np.tile(np.arange(0, 64, dtype=np.uint8) * 3, (64, 1))
    imgs = [np.clip(ramp.astype(int) + k, 0, 255).astype(np.uint8)[..., None] for k in range(20)]
    pairs, vague = duplicate_pairs(*fingerprints(imgs), threshold=4)
    assert vague.all() and pairs == []


def test_hash_lookalikes_are_not_duplicates_and_recropped_copies_are(tmp_path: Path) -> None:
    """A hash candidate is a duplicate only when verified: two different scans with the same coarse
    brightness gradient (equal dHash) are a look-alike that drives no grouping, leakage or label
    conflict; a re-cropped, resized copy the hash misses is found by the crop-tolerant search."""
    from lowshot.data.duplicates import verified_pairs

    rng = np.random.default_rng(3)
    root = tmp_path / "set"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
    ramp = np.tile(np.linspace(20, 230, 64), (64, 1))
    for k in range(2):  # same gradient, different fine texture: dHash equal, detail unrelated
        tex = np.kron(rng.normal(0, 20, (32, 32)), np.ones((2, 2)))
        Image.fromarray(np.clip(ramp + tex, 0, 255).astype(np.uint8)).save(root / "ab"[k] / f"ramp{k}.png")
    scans = [_scan(rng) for _ in range(6)]
    for i, sc in enumerate(scans):
        Image.fromarray(sc).save(root / "a" / f"s{i}.png")
    crop = Image.fromarray(scans[2][3:61, 4:62]).resize((100, 100), Image.Resampling.BICUBIC)
    crop.save(root / "b" / "s2_recropped.png")  # another class: a label conflict once found
    cfg = DataConfig(root=str(tmp_path), source="set", cache_dir=str(tmp_path / "cache"), size=64)
    store = load_store(cfg)
    name = {i: Path(p).name for i, p in enumerate(store.paths)}
    pairs, _, cut = verified_pairs(store, cfg)
    assert cut.detail == cfg.duplicate_ncc  # mirrored scans do not look like these scans
    kinds = {frozenset((name[i], name[j])): kind for i, j, _, kind, *_ in pairs}
    assert kinds[frozenset(("ramp0.png", "ramp1.png"))] == "lookalike"
    assert kinds[frozenset(("s2.png", "s2_recropped.png"))] == "copy"
    bits = store.fingerprints()[0]
    r0, r1 = [i for i in name if name[i].startswith("ramp")]
    assert (bits[r0] != bits[r1]).sum() <= cfg.duplicate_bits  # the hash could not tell them apart
    report, _ = check_store(store, cfg)
    assert report["lookalike_pairs"] == 1 and report["copy_pairs"] == 1
    assert report["cross_class_pairs"] == 1  # the copy (a/s2 ~ b/s2_recropped); the look-alike is not one
    groups = dict(zip(map(name.get, range(len(name))), store.groups, strict=True))
    assert groups["s2.png"] == groups["s2_recropped.png"] and groups["ramp0.png"] != groups["ramp1.png"]
    # cached by content: a second call reads the file the first wrote
    again, _, _ = verified_pairs(store, cfg)
    assert again == pairs and len(list((tmp_path / "cache" / "duplicates").glob("*.json"))) == 1


def test_check_against_a_second_source_finds_its_copies(tmp_path: Path) -> None:
    """`check.against=DIR`: a resized copy of one image and a re-exported copy of another are found in
    the second source; a distinct scan there is not; copies fail the check like leakage."""
    _write(tmp_path / "set")
    rng = np.random.default_rng(9)
    other = tmp_path / "external" / "any" / "layout"
    other.mkdir(parents=True)
    a3 = np.asarray(Image.open(tmp_path / "set" / "a" / "a3.png"))
    Image.fromarray(a3).resize((200, 200), Image.Resampling.BICUBIC).save(other / "a3_big.png")
    Image.open(tmp_path / "set" / "b" / "b2.png").save(other / "b2.jpg", quality=90)
    Image.fromarray(_scan(rng)).save(other / "new.png")
    args = [
        f"data.root={tmp_path}",
        "data.source=set",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"out_dir={tmp_path}",
    ]
    args += ["check.against=external", "--warn-only", "name=x"]
    assert check(args) == 0
    found = json.loads((tmp_path / "x" / "report.json").read_text())["against"]
    pairs = {(Path(p["pool"]).name, Path(p["image"]).name) for p in found["pairs"]}
    assert {("a3_big.png", "a3.png"), ("b2.jpg", "b2.png")} <= pairs
    assert not any(p == "new.png" for p, _ in pairs) and found["images"] == 3
    assert (tmp_path / "x" / "against.png").is_file()
    # without --warn-only, copies across sources fail the check even on a clean set
    clean = tmp_path / "clean"
    for c in ("a", "b"):
        (clean / c).mkdir(parents=True)
        for k in range(8):
            Image.fromarray(_scan(rng)).save(clean / c / f"{c}{k}.png")
    Image.open(clean / "a" / "a1.png").resize((90, 90)).save(other / "a1_small.png")
    base = [
        f"data.root={tmp_path}",
        "data.source=clean",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"out_dir={tmp_path}",
    ]
    assert check([*base, "name=y"]) == 0
    assert check([*base, "name=z", "check.against=external"]) == 1
