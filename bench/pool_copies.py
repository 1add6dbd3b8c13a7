"""How well does the pool's copy search (lowshot.data.copies) find copies, and how often is it wrong?

    LOWSHOT_DATA_ROOT=../shared/data python bench/pool_copies.py [--scale 100000] [--only mirror|scale]

1. The real case: busi/ as a pretraining pool against BreastMNIST's val+test split (BreastMNIST is BUSI
   re-cropped and resized to 28 px, so every evaluation image has its source in the pool): evaluation
   images with a copy found (recall), and pairs whose labels disagree (malignant vs benign/normal:
   different images, or BUSI's own label conflicts), with a sheet of the weakest accepted pairs.
2. Distinct images: RetinaMNIST's training images against its val+test split (fundus photos, which
   look alike at 28 px), and BreastMNIST against RetinaMNIST: every verified pair is a false positive
   unless the sheet shows the same photograph.
3. Planted copies of every shared set's test images (BreastMNIST, RetinaMNIST, BUSI at 256 px) by the
   transformations real copies undergo, in a pool of the set's other images: recall per transformation.
4. Scale: ``--scale`` synthetic pool images (crops of real ones) against 1,000 queries: time of the
   candidate search, of the verification (with the cascade find_copies uses, and without), and of the
   dHash multi-index search within the pool.
5. The threshold's calibration (calibration.mirror_levels): the look-alike level of each case measured on
   mirrored images, the threshold it gives, the false pairs at 0.88 and at that threshold, on the shared
   sets and on versions of them with less detail (half resolution, JPEG q40), and the recall it costs.
6. The cascade's margin: in every case above, the most the sub-pixel search raised a pair's coarse
   score among pairs ending at NCC >= 0.85 (what copies.FINE_GAIN must exceed).

Scores are computed once; recall and false positives are tabulated at several thresholds (the default
``data.duplicate_ncc`` is chosen from this table). Writes bench/results/pool_copies/{table.md,table.json,
busi_breastmnist.png,retina_top.png}.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from lowshot.data import calibration, copies
from lowshot.data.decode import dhash, pixel_digest
from lowshot.data.duplicates import duplicate_pairs, hamming_pairs
from lowshot.data.guards import POOL_CALIBRATE, POOL_SAMPLE, POOL_VERIFY_MAX, pool_duplicates
from lowshot.data.pool import thumbnail

OUT = Path(__file__).resolve().parent / "results" / "pool_copies"
THRESHOLDS = (0.85, 0.88, 0.9, 0.92, 0.94)
DEFAULT_NCC = 0.88  # data.duplicate_ncc


def thumbs(images: list[np.ndarray] | np.ndarray) -> np.ndarray:
    return np.stack([thumbnail(a if a.ndim == 3 else a[..., None]) for a in images])


GAINS: dict[str, float] = {}  # per case: the most the pattern search raised a pair that ends >= 0.85


def verified(q: np.ndarray, p: np.ndarray, pairs: np.ndarray, case: str) -> np.ndarray:
    """Every pair's full score (no cascade), and the case's largest fine-search gain among pairs scoring
    >= 0.85: the evidence for copies.FINE_GAIN (a floor of +inf returns the coarse scores alone)."""
    s = copies.verify(q, p, pairs)
    coarse = copies.verify(q, p, pairs, floor=float("inf"))
    hi = s >= 0.85
    GAINS[case] = float((s - coarse)[hi].max()) if hi.any() else float("nan")
    return s


def best_scores(q: np.ndarray, p: np.ndarray, case: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Candidate pairs (query, pool), their verified scores, and each query's best score."""
    pairs = copies.candidates(q, p)
    s = verified(q, p, pairs, case)
    best = np.full(len(q), -1.0)
    np.maximum.at(best, pairs[:, 0], s)
    return pairs, s, best


def sheet(rows: list[tuple[np.ndarray, np.ndarray, str]], path: Path) -> None:
    """Pairs side by side at 96 px with a caption each (PIL only)."""
    w, h = 2 * 96 + 8, 96 + 14
    im = Image.new("L", (4 * w, h * ((len(rows) + 3) // 4)), 255)
    d = ImageDraw.Draw(im)
    for k, (a, b, cap) in enumerate(rows):
        x, y = (k % 4) * w, (k // 4) * h
        for j, t in enumerate((a, b)):
            im.paste(Image.fromarray(t).resize((96, 96), Image.Resampling.BICUBIC), (x + j * 98, y))
        d.text((x, y + 97), cap, fill=0)
    OUT.mkdir(parents=True, exist_ok=True)
    im.save(path)


def real_case(root: Path) -> dict:
    z = np.load(root / "breastmnist.npz")
    q_img = np.concatenate([z["val_images"], z["test_images"]])
    y_q = np.concatenate([z["val_labels"][:, 0], z["test_labels"][:, 0]])  # 0 malignant, 1 normal/benign
    files = sorted((root / "busi").rglob("*.png"))
    busi = [np.asarray(Image.open(f).convert("L")) for f in files]
    y_p = np.array([0 if f.parent.name == "malignant" else 1 for f in files])
    t0 = time.perf_counter()
    pairs, s, _ = best_scores(thumbs(q_img), thumbs(busi), "busi vs breastmnist")
    took = time.perf_counter() - t0
    rows = {}
    for t in THRESHOLDS:
        ok = s >= t
        rows[t] = {
            "eval_images_with_copy": len(np.unique(pairs[ok, 0])),
            "cross_label_pairs": int((y_q[pairs[ok, 0]] != y_p[pairs[ok, 1]]).sum()),
        }
    weakest = sorted(
        [(float(v), int(i), int(j)) for (i, j), v in zip(pairs, s, strict=True) if v >= THRESHOLDS[0]]
    )[:12]
    sheet(
        [(q_img[i], busi[j], f"{v:.3f} {files[j].name[:18]}") for v, i, j in weakest],
        OUT / "busi_breastmnist.png",
    )
    return {"n_eval": len(q_img), "n_pool": len(busi), "seconds": took, "by_threshold": rows}


def distinct_case(root: Path) -> dict:
    r = np.load(root / "retinamnist.npz")
    b = np.load(root / "breastmnist.npz")
    rq = np.concatenate([r["val_images"], r["test_images"]])
    pairs, s, best_r = best_scores(thumbs(rq), thumbs(r["train_images"]), "retinamnist")
    top = np.argsort(-s)[:8]
    sheet(
        [
            (
                rq[pairs[k, 0]].mean(-1).astype(np.uint8),
                r["train_images"][pairs[k, 1]].mean(-1).astype(np.uint8),
                f"{s[k]:.3f}",
            )
            for k in top
        ],
        OUT / "retina_top.png",
    )
    bq = np.concatenate([b["val_images"], b["test_images"]])
    _, _, best_x = best_scores(
        thumbs(bq),
        thumbs(np.concatenate([r[f"{k}_images"] for k in ("train", "val", "test")])),
        "breastmnist vs retinamnist",
    )
    return {
        "retina_val_test_vs_train": {t: int((best_r >= t).sum()) for t in THRESHOLDS}
        | {"max": float(best_r.max()), "n": len(rq)},
        "breastmnist_vs_retina": {t: int((best_x >= t).sum()) for t in THRESHOLDS}
        | {"max": float(best_x.max()), "n": len(bq)},
    }


def _jpeg(a: np.ndarray, q: int = 70) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "JPEG", quality=q)
    return np.asarray(Image.open(buf))


def _crop(a: np.ndarray, f: float) -> np.ndarray:
    h, w = a.shape[:2]
    ch, cw = round(h * f), round(w * f)
    y, x = (h - ch) // 2, (w - cw) // 2
    return np.asarray(Image.fromarray(a[y : y + ch, x : x + cw]).resize((w, h), Image.Resampling.BICUBIC))


def _pad(a: np.ndarray) -> np.ndarray:  # letterbox: 10 % black bars above and below
    h, w = a.shape[:2]
    out = np.zeros((round(h * 1.2), w, *a.shape[2:]), a.dtype)
    out[round(h * 0.1) : round(h * 0.1) + h] = a
    return out


def _marks(a: np.ndarray) -> np.ndarray:  # calipers and a text label, as ultrasound exports carry
    im = Image.fromarray(a)
    d = ImageDraw.Draw(im)
    h, w = a.shape[:2]
    for cx, cy in ((0.35, 0.4), (0.65, 0.6)):
        x, y, r = cx * w, cy * h, max(1, w // 30)
        d.line((x - r, y, x + r, y), fill=255)
        d.line((x, y - r, x, y + r), fill=255)
    d.text((2, 2), "L 1.2cm", fill=255)
    return np.asarray(im)


# Real exports burn marks in at the scanner's resolution and are resized afterwards (BreastMNIST's 28 px
# images are BUSI's, calipers included, resized). Drawn on a 28 px image, the same 1 px strokes and PIL's
# ~11 px font cover a third of the frame at full contrast: an overlay, not a re-export.
MARKS_AT = 224  # px: marks drawn at (at least) this side, then the image resized back


def _marks_at_source(a: np.ndarray) -> np.ndarray:
    h, w = a.shape[:2]
    f = max(1, -(-MARKS_AT // w))  # ceil: 8x for 28 px, 1x for BUSI's 256 px (the row above)
    big = np.asarray(Image.fromarray(a).resize((w * f, h * f), Image.Resampling.BICUBIC))
    return np.asarray(Image.fromarray(_marks(big)).resize((w, h), Image.Resampling.BICUBIC))


TRANSFORMS = {
    "resize x4": lambda a: np.asarray(
        Image.fromarray(a).resize((a.shape[1] * 4, a.shape[0] * 4), Image.Resampling.BICUBIC)
    ),
    "resize /2 then back": lambda a: np.asarray(
        Image.fromarray(a)
        .resize((a.shape[1] // 2, a.shape[0] // 2), Image.Resampling.BICUBIC)
        .resize((a.shape[1], a.shape[0]))
    ),
    "jpeg q70": _jpeg,
    "jpeg q40": lambda a: _jpeg(a, 40),
    "brightness +20% contrast": lambda a: np.clip(a.astype(np.float32) * 1.2 + 10, 0, 255).astype(np.uint8),
    "gamma 0.8": lambda a: (255 * (a / 255.0) ** 0.8).astype(np.uint8),
    "crop 95%": lambda a: _crop(a, 0.95),
    "crop 90%": lambda a: _crop(a, 0.9),
    "crop 80%": lambda a: _crop(a, 0.8),
    "rotate 3°": lambda a: np.asarray(Image.fromarray(a).rotate(3, Image.Resampling.BILINEAR)),
    "rotate 5°": lambda a: np.asarray(Image.fromarray(a).rotate(5, Image.Resampling.BILINEAR)),
    "letterbox 10%": _pad,
    "caliper marks + text": _marks,
    "marks drawn at 224 px, resized": _marks_at_source,
}


def planted(root: Path) -> dict:
    sets = {}
    for name in ("breastmnist", "retinamnist"):
        z = np.load(root / f"{name}.npz")
        sets[name] = (z["test_images"][:200], np.concatenate([z["train_images"], z["val_images"]]))
    files = sorted((root / "busi").rglob("*.png"))
    busi = [np.asarray(Image.open(f).convert("L")) for f in files]
    sets["busi (256 px)"] = (np.stack(busi[::4][:150]), np.stack([a for k, a in enumerate(busi) if k % 4]))
    out: dict[str, dict] = {}
    for name, (test, rest) in sets.items():
        q, p = thumbs(test), thumbs(rest)
        # The set's own copies (a test image verified against another test image or one of the rest, before
        # anything is planted): every shared set holds real ones, which are not false positives of a copy.
        base = np.concatenate([p, q])
        pairs0 = copies.candidates(q, base)
        pairs0 = pairs0[pairs0[:, 1] != len(p) + pairs0[:, 0]]
        s0 = verified(q, base, pairs0, f"planted {name}: none")
        for tname, f in TRANSFORMS.items():
            moved = thumbs([f(a) for a in test])
            pool = np.concatenate([p, moved])
            truth = np.arange(len(p), len(pool))
            pairs = copies.candidates(q, pool)
            s = verified(q, pool, pairs, f"planted {name}: {tname}")
            score = np.full(len(q), -1.0)
            hit = pairs[:, 1] == truth[pairs[:, 0]]
            np.maximum.at(score, pairs[hit, 0], s[hit])
            row = {t: float((score >= t).mean()) for t in THRESHOLDS}
            # Precision: the copy as the query, against the other images and the originals; a verified pair
            # with any image but its original is a false positive unless that original was already a
            # verified copy of the same image (the set's own duplicates).
            rpairs = copies.candidates(moved, base)
            rs = verified(moved, base, rpairs, f"planted {name}: {tname} (as query)")
            own = rpairs[:, 1] == len(p) + rpairs[:, 0]
            prec = {}
            for t in THRESHOLDS:
                known = {(int(i), int(j)) for (i, j), v in zip(pairs0, s0, strict=True) if v >= t}
                wrong = [
                    (int(i), int(j)) not in known
                    for (i, j), v, o in zip(rpairs, rs, own, strict=True)
                    if v >= t and not o
                ]
                tp, fp = int(((rs >= t) & own).sum()), int(sum(wrong))
                prec[t] = {"precision": tp / (tp + fp) if tp + fp else float("nan"), "false_pairs": fp}
            out.setdefault(tname, {})[name] = row | {"precision": prec}
    return out


def scale(root: Path, n: int) -> dict:
    """n pool thumbnails made of random crops of real BUSI/BreastMNIST/RetinaMNIST images, 1,000 queries."""
    rng = np.random.default_rng(0)
    z = np.load(root / "retinamnist.npz")
    base = thumbs(
        np.concatenate(
            [np.load(root / "breastmnist.npz")["train_images"], z["train_images"].mean(-1).astype(np.uint8)]
        )
    )
    origin = rng.integers(0, len(base), n)  # which real image each pool image is a crop of
    src = base[origin]
    # random sub-crops + noise so that the pool is n distinct-looking images
    shift = rng.integers(-2, 3, (n, 2))
    pool = np.stack([np.roll(a, tuple(sh), (0, 1)) for a, sh in zip(src, shift, strict=True)])
    pool = np.clip(pool.astype(np.int16) + rng.integers(-6, 7, pool.shape), 0, 255).astype(np.uint8)
    q = thumbs(np.load(root / "breastmnist.npz")["test_images"])[np.arange(1000) % 156]
    t0 = time.perf_counter()
    pairs = copies.candidates(q, pool)
    t1 = time.perf_counter()
    floor = DEFAULT_NCC - copies.FINE_GAIN  # what find_copies does at the default threshold
    fast = copies.verify(q, pool, pairs, floor=floor)
    t2 = time.perf_counter()
    cut = calibration.Cut(
        DEFAULT_NCC, DEFAULT_NCC
    )  # both bands on, at the default (this pool's look-alikes allow it)
    both_ok = calibration.judge_pairs(q, pool, pairs, cut)[0]
    t2b = time.perf_counter()
    bits = rng.random((n, 64)) < 0.5
    hamming_pairs(bits, bits, 4)
    t3 = time.perf_counter()
    full = copies.verify(q, pool, pairs)  # no cascade: every pair searched to sub-pixel alignment
    t4 = time.perf_counter()
    coarse = copies.verify(q, pool, pairs, floor=float("inf"))
    t5 = time.perf_counter()
    calibration.mirror_levels(q, pool, DEFAULT_NCC)  # the calibration the pool guard adds: one more search
    t6 = time.perf_counter()
    # copies within the pool as the guard records them (results.json pool_duplicates): real dHash of
    # these look-alike crops (~60 of each base image), so the hash candidates are the worst case
    hashes = np.stack([dhash(a[..., None]) for a in pool])
    digests = np.array([pixel_digest(a) for a in pool])
    t7 = time.perf_counter()
    within = pool_duplicates(hashes, digests, pool, 4, DEFAULT_NCC)  # calibrated on this pool itself
    t8 = time.perf_counter()
    own = calibration.Cut(within["verified_at_ncc"], within["verified_at_ncc_low"])
    # The same kind of sample with its truth: a hash candidate is a copy when both are crops of one real
    # image (the real sets hold copies of their own, so a few 'false' pairs may be real copies)
    rows = np.sort(np.random.default_rng(1).choice(n, POOL_SAMPLE, replace=False))
    cands, _ = duplicate_pairs(hashes[rows], digests[rows], 4)
    near = np.array([(i, j) for i, j, _, k in cands if k == "near"], np.int64).reshape(-1, 2)
    near = near[np.sort(np.random.default_rng(2).choice(len(near), POOL_VERIFY_MAX, replace=False))]
    src = np.stack([origin[rows[near[:, 0]]], origin[rows[near[:, 1]]]], 1)
    same = src[:, 0] == src[:, 1]
    # crops of two real images that are themselves copies (the detail band verifies the two originals,
    # un-noised: the shared sets hold copies of their own) are copies too, not false pairs
    related = ~same & (copies.verify(base, base, src) >= DEFAULT_NCC)
    ok_detail = copies.verify(pool[rows], pool[rows], near) >= DEFAULT_NCC
    ok_both = calibration.judge_pairs(pool[rows], pool[rows], near, cut)[0]
    ok_own = calibration.judge_pairs(pool[rows], pool[rows], near, own)[0]
    # per modality: the pool mixes BreastMNIST and RetinaMNIST crops (hash candidates never mix them here);
    # a mixed pool's calibration is that of its most look-alike part, so also a pool of one modality's crops
    n_breast = len(np.load(root / "breastmnist.npz")["train_images"])
    truth: dict[str, dict] = {}
    for mod, m in (("breastmnist", src.max(1) < n_breast), ("retinamnist", src.min(1) >= n_breast)):
        part = np.flatnonzero((origin < n_breast) == (mod == "breastmnist"))
        part = np.sort(np.random.default_rng(3).choice(part, min(len(part), POOL_SAMPLE), replace=False))
        cal = np.sort(np.random.default_rng(4).choice(len(part), POOL_CALIBRATE, replace=False))
        _, alone = calibration.calibrate(
            pool[part][cal], pool[part], DEFAULT_NCC, f"{mod} crops alone", own=cal
        )
        ok_alone = calibration.judge_pairs(pool[rows], pool[rows], near, alone)[0]
        truth[mod] = {
            "cut_alone": list(alone),
            "candidates": int(m.sum()),
            "same_image": int((same & m).sum()),
            "originals_copies": int((related & m).sum()),
            **{
                k: {
                    "recall": float(ok[same & m].mean()),
                    "false_pairs": int((ok & m & ~same & ~related).sum()),
                    "originals_copies": int((ok & m & related).sum()),
                    "precision": float((same | related)[ok & m].mean()),
                }
                for k, ok in (("detail", ok_detail), ("both", ok_both), ("own", ok_own), ("alone", ok_alone))
            },
        }
    return {
        "within_pool": within,
        "within_pool_cut": list(own),
        "within_pool_truth": truth,
        "base_images": len(base),
        "within_pool_s": t8 - t7,
        "mirror_level_s": t6 - t5,
        "pool": n,
        "queries": 1000,
        "candidate_pairs": len(pairs),
        "fine_searched": int((coarse >= floor).sum()),
        "candidates_s": t1 - t0,
        "verify_s": t2 - t1,
        # the detail band, then the band an octave lower for the pairs that fell short (calibration.judge_pairs)
        "decide_s": t2b - t2,
        "verified_detail": int((fast >= DEFAULT_NCC).sum()),
        "verified_both": int(both_ok.sum()),
        "verify_full_s": t4 - t3,
        "decisions_changed_by_cascade": int(((fast >= DEFAULT_NCC) != (full >= DEFAULT_NCC)).sum()),
        "dhash_within_pool_s": t3 - t2b,
    }


def _half(a: np.ndarray) -> np.ndarray:
    return TRANSFORMS["resize /2 then back"](a)


def _noise(a: np.ndarray, amp: int) -> np.ndarray:  # uniform +-amp grey levels per pixel (a noisy re-export)
    r = np.random.default_rng(0)
    return np.clip(a.astype(np.int16) + r.integers(-amp, amp + 1, a.shape), 0, 255).astype(np.uint8)


# What the band an octave lower is for: copies that lost the finest detail
LOW_TRANSFORMS = TRANSFORMS | {"noise ±6": lambda a: _noise(a, 6), "noise ±12": lambda a: _noise(a, 12)}


def _both(q: np.ndarray, p: np.ndarray, pairs: np.ndarray, case: str) -> tuple[np.ndarray, np.ndarray]:
    """Every pair's detail-band and low-band score, each without the cascade; records the low band's
    largest sub-pixel gain among pairs ending >= 0.85 (the evidence that FINE_GAIN holds there too)."""
    d = copies.verify(q, p, pairs)
    low = copies.verify(q, p, pairs, low=True)
    grid = copies.verify(q, p, pairs, floor=float("inf"), low=True)
    hi = low >= 0.85
    GAINS[f"{case} (low band)"] = float((low - grid)[hi].max()) if hi.any() else float("nan")
    return d, low


def _passes(d: np.ndarray, low: np.ndarray, cut: calibration.Cut, with_low: bool) -> np.ndarray:
    ok = d >= cut.detail
    return ok | (low >= cut.low) if with_low and cut.low is not None else ok


def calibration_cases(
    r: np.lib.npyio.NpzFile, b: np.lib.npyio.NpzFile, busi: np.ndarray
) -> dict[str, tuple[np.ndarray, np.ndarray, bool]]:
    """The calibration cases, name: (query thumbnails, pool thumbnails, distinct: every verified pair is
    false). 'Half res' (14 px and back) and JPEG q40 of every image make sets with less detail than any
    shared one, standing in for the modalities that are not here (a chest X-ray at 28 px)."""

    def split(z: np.lib.npyio.NpzFile, f=lambda a: a) -> tuple[np.ndarray, np.ndarray]:
        ev = np.concatenate([z["val_images"], z["test_images"]])
        return thumbs([f(a) for a in ev]), thumbs([f(a) for a in z["train_images"]])

    return {
        "RetinaMNIST val+test vs train": (*split(r), True),
        "RetinaMNIST, half res": (*split(r, _half), True),
        "RetinaMNIST, JPEG q40": (*split(r, TRANSFORMS["jpeg q40"]), True),
        "BreastMNIST val+test vs RetinaMNIST": (split(b)[0], np.concatenate(split(r)), True),
        "BreastMNIST val+test vs train (holds real copies)": (*split(b), False),
        "BreastMNIST, half res (holds real copies)": (*split(b, _half), False),
        "BreastMNIST val+test vs BUSI (every image has a copy)": (split(b)[0], busi, False),
        "BUSI a quarter vs the rest (holds real copies)": (busi[::4], np.delete(busi, np.s_[::4], 0), False),
    }


def bands(root: Path) -> dict:
    """The band an octave lower (copies.LOW_BAND): per calibration case the look-alike level in each band,
    the Cut it gives and the false pairs with and without the low band; planted copies of every shared
    set's test images (LOW_TRANSFORMS, noise added) in a pool of its other images, each case calibrated
    on its own pool as the guard does: recall and precision with the detail band alone and with both."""
    r, b = np.load(root / "retinamnist.npz"), np.load(root / "breastmnist.npz")
    files = sorted((root / "busi").rglob("*.png"))
    busi_imgs = [np.asarray(Image.open(f).convert("L")) for f in files]
    busi = thumbs(busi_imgs)
    b_eval = np.concatenate([b["val_images"], b["test_images"]])
    y_b = np.concatenate([b["val_labels"][:, 0], b["test_labels"][:, 0]])  # 0 malignant, 1 normal/benign
    y_busi = np.array([0 if f.parent.name == "malignant" else 1 for f in files])

    cases = calibration_cases(r, b, busi)
    out: dict[str, dict] = {}
    for name, (q, p, distinct) in cases.items():
        t0 = time.perf_counter()
        (level, level_low), cut = calibration.calibrate(q, p, DEFAULT_NCC, name)
        took = time.perf_counter() - t0
        pairs = copies.candidates(q, p)
        d, low = _both(q, p, pairs, name)
        counts, labels = {}, {}
        for k, with_low in (("detail", False), ("both", True)):
            ok = _passes(d, low, cut, with_low)
            counts[k] = len(np.unique(pairs[ok, 0]))
            if "vs BUSI" in name:  # pairs whose labels disagree: different scans, or BUSI's own conflicts
                labels[k] = int((y_b[pairs[ok, 0]] != y_busi[pairs[ok, 1]]).sum())
        if "vs BUSI" in name:  # the pairs only the low band accepts, weakest first: are they one scan?
            added = np.flatnonzero(_passes(d, low, cut, True) & ~_passes(d, low, cut, False))
            added = added[np.argsort(low[added])][:16]
            sheet(
                [
                    (
                        b_eval[pairs[k, 0]],
                        np.asarray(Image.fromarray(busi_imgs[pairs[k, 1]]).resize((28, 28))),
                        f"{d[k]:.2f}/{low[k]:.3f} {'ok' if y_b[pairs[k, 0]] == y_busi[pairs[k, 1]] else 'LABELS'}",
                    )
                    for k in added
                ],
                OUT / "low_band_busi_breastmnist.png",
            )
        out[name] = {
            "n": len(q),
            "pool": len(p),
            "distinct": distinct,
            "best_real": float(d.max()) if len(d) else -1.0,
            "best_real_low": float(low.max()) if len(low) else -1.0,
            "level": level,
            "level_low": level_low,
            "cut": list(cut),
            "queries_verified": counts,
            "pairs_with_disagreeing_labels": labels,
            "calibration_s": took,
        }
        print(name, out[name], flush=True)
    sets = {}
    for name, z in (("breastmnist", b), ("retinamnist", r)):
        sets[name] = (z["test_images"][:200], np.concatenate([z["train_images"], z["val_images"]]))
    sets["busi (256 px)"] = (
        np.stack(busi_imgs[::4][:150]),
        np.stack([a for k, a in enumerate(busi_imgs) if k % 4]),
    )
    planted_out: dict[str, dict] = {}
    false_rows: list[tuple[np.ndarray, np.ndarray, str]] = []
    for name, (test, rest) in sets.items():
        q, p = thumbs(test), thumbs(rest)
        base = np.concatenate([p, q])
        pairs0 = copies.candidates(q, base)
        pairs0 = pairs0[pairs0[:, 1] != len(p) + pairs0[:, 0]]
        d0, l0 = _both(q, base, pairs0, f"planted {name}: none")
        for tname, f in LOW_TRANSFORMS.items():
            moved = thumbs([f(a) for a in test])
            pool = np.concatenate([p, moved])
            _, cut = calibration.calibrate(q, pool, DEFAULT_NCC, f"{name} + {tname}")
            truth = np.arange(len(p), len(pool))
            pairs = copies.candidates(q, pool)
            d, low = _both(q, pool, pairs, f"planted {name}: {tname}")
            hit = pairs[:, 1] == truth[pairs[:, 0]]
            rpairs = copies.candidates(moved, base)
            rd, rl = _both(moved, base, rpairs, f"planted {name}: {tname} (as query)")
            own = rpairs[:, 1] == len(p) + rpairs[:, 0]
            row: dict = {"cut": list(cut)}
            for k, with_low in (("detail", False), ("both", True)):
                found = np.zeros(len(q), bool)
                found[pairs[hit & _passes(d, low, cut, with_low), 0]] = True
                known = {(int(i), int(j)) for i, j in pairs0[_passes(d0, l0, cut, with_low)].tolist()}
                ok = _passes(rd, rl, cut, with_low)
                false = [k for k in np.flatnonzero(ok & ~own) if tuple(rpairs[k].tolist()) not in known]
                fp = len(false)
                if with_low:  # the copy, and the image it was wrongly paired with
                    false_rows += [
                        (moved[rpairs[k, 0]], base[rpairs[k, 1]], f"{tname[:12]} {rd[k]:.2f}/{rl[k]:.2f}")
                        for k in false
                    ]
                tp = int((ok & own).sum())
                row[k] = {
                    "recall": float(found.mean()),
                    "precision": tp / (tp + fp) if tp + fp else float("nan"),
                    "false_pairs": int(fp),
                }
            planted_out.setdefault(tname, {})[name] = row
            print(name, tname, row, flush=True)
    sheet(false_rows[:24], OUT / "low_band_false_pairs.png")
    return {
        "cases": out,
        "planted": planted_out,
        "gains": {k: v for k, v in GAINS.items() if "low band" in k},
    }


def mirror(root: Path) -> dict:
    """The threshold's calibration (calibration.mirror_levels): per case, the best score of the queries against
    the *mirrored* pool (never a copy), the calibrated threshold, and the queries with a verified pair at
    0.88 and at the calibrated threshold. Distinct cases count false pairs; 'half res' (14 px and back)
    and JPEG q40 of every image make sets with less detail than any shared one, standing in for the
    modalities that are not here (a chest X-ray at 28 px); planted copies in half-res RetinaMNIST give
    the recall the raised threshold costs."""
    r, b = np.load(root / "retinamnist.npz"), np.load(root / "breastmnist.npz")
    files = sorted((root / "busi").rglob("*.png"))
    busi = thumbs([np.asarray(Image.open(f).convert("L")) for f in files])

    cases = calibration_cases(r, b, busi)
    out: dict[str, dict] = {}
    for name, (q, p, distinct) in cases.items():
        pairs = copies.candidates(q, p)
        s = copies.verify(q, p, pairs)
        best = np.full(len(q), -1.0)
        np.maximum.at(best, pairs[:, 0], s)
        t0 = time.perf_counter()
        level = calibration.mirror_levels(q, p, DEFAULT_NCC)[0]
        took = time.perf_counter() - t0
        # the evidence for calibration.LOOKALIKE_GAIN: how far the sub-pixel search raises mirrored pairs
        flipped = np.ascontiguousarray(p[:, :, ::-1])
        mp = copies.candidates(q, flipped)
        full, coarse = copies.verify(q, flipped, mp), copies.verify(q, flipped, mp, floor=float("inf"))
        hi = (full >= 0.8) & (full < calibration.MIRROR_COPY)
        gain = float((full - coarse)[hi].max()) if hi.any() else float("nan")
        thr = calibration.calibrated(DEFAULT_NCC, level)
        out[name] = {
            "n": len(q),
            "pool": len(p),
            "distinct": distinct,
            "best_real": float(best.max()),
            "mirror_level": level,
            "threshold": thr,
            "at_default": int((best >= DEFAULT_NCC).sum()),
            "at_calibrated": int((best >= thr).sum()),
            "seconds": took,
            "mirrored_gain": gain,
        }
    # recall of planted copies in half-res RetinaMNIST at 0.88 and at its calibrated threshold
    test = np.stack([_half(a) for a in r["test_images"][:200]])
    rest = thumbs([_half(a) for a in np.concatenate([r["train_images"], r["val_images"]])])
    qt = thumbs(test)
    thr = calibration.calibrated(DEFAULT_NCC, calibration.mirror_levels(qt, rest, DEFAULT_NCC)[0])
    recall = {}
    for tname in ("resize x4", "jpeg q70", "brightness +20% contrast", "gamma 0.8", "crop 95%"):
        moved = thumbs([TRANSFORMS[tname](a) for a in test])
        pool = np.concatenate([rest, moved])
        pairs = copies.candidates(qt, pool)
        s = copies.verify(qt, pool, pairs)
        hit = pairs[:, 1] == len(rest) + pairs[:, 0]
        score = np.full(len(qt), -1.0)
        np.maximum.at(score, pairs[hit, 0], s[hit])
        recall[tname] = {
            "default": float((score >= DEFAULT_NCC).mean()),
            "calibrated": float((score >= thr).mean()),
        }
    return {"cases": out, "planted_half_res": {"threshold": thr, "recall": recall}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", type=int, default=100_000)
    ap.add_argument("--render", action="store_true", help="only rewrite table.md from table.json")
    ap.add_argument(
        "--only",
        choices=["mirror", "scale", "bands"],
        help="run this section again, keep the others from table.json",
    )
    a = ap.parse_args()
    root = Path(os.environ.get("LOWSHOT_DATA_ROOT", "../shared/data"))
    if a.render or a.only:
        res = json.loads((OUT / "table.json").read_text(), object_hook=_float_keys)
        if a.only:
            run = {"mirror": mirror, "bands": bands, "scale": lambda r: scale(r, a.scale)}[a.only]
            res[a.only] = run(root)
            (OUT / "table.json").write_text(json.dumps(res, indent=1, default=str))
    else:
        res = {
            "real": real_case(root),
            "distinct": distinct_case(root),
            "planted": planted(root),
            "scale": scale(root, a.scale),
            "mirror": mirror(root),
            "bands": bands(root),
            # the detail band's margins (FINE_GAIN); the low band's are in "bands"
            "fine_gain": {k: v for k, v in GAINS.items() if "low band" not in k},
        }
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / "table.json").write_text(json.dumps(res, indent=1, default=str))
    render(res)


def _cut(c: list | None) -> str:
    """A Cut as 'detail · low' ('off' for a low band that is off)."""
    if not c:
        return "?"
    return f"{c[0]:.3f} · " + ("off" if c[1] is None else f"{c[1]:.3f}")


def _float_keys(d: dict) -> dict:
    """JSON turned the threshold keys into strings: back to floats."""
    return {float(k) if k.replace(".", "", 1).isdigit() else k: v for k, v in d.items()}


PLANTED_AT = (0.85, 0.88, 0.9)


def render_mirror(m: dict) -> list[str]:
    lines = [
        "",
        "## Look-alikes measured on mirrored images: the threshold's calibration",
        "",
        "Each query against the left-right mirrored pool images (never its copies, same modality and detail): the "
        f"best such score is the set's look-alike level; the threshold used is max({DEFAULT_NCC}, level + "
        f"{calibration.MIRROR_GAP}), at most {calibration.MIRROR_COPY} (calibration.calibrated). 'Half res' (14 px and back) and "
        "JPEG q40 of every image make sets with less detail than any shared one. In distinct cases every verified "
        "pair is false; the others hold real copies.",
        "",
        f"| case | queries x pool | best real pair | mirrored level | threshold used | queries verified @{DEFAULT_NCC} | "
        "@ threshold used | calibration time | sub-pixel gain of mirrored pairs >= 0.8 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, c in m["cases"].items():
        kind = " (false)" if c["distinct"] else ""
        lines.append(
            f"| {name} | {c['n']} x {c['pool']} | {c['best_real']:.3f} | {c['mirror_level']:.3f} | {c['threshold']:.3f} | "
            f"{c['at_default']}{kind} | {c['at_calibrated']}{kind} | {c['seconds']:.1f} s | {c['mirrored_gain']:.3f} |"
        )
    ph = m["planted_half_res"]
    lines += [
        "",
        f"What the raised threshold costs: planted copies of 200 half-res RetinaMNIST test images among the other "
        f"1,400 (threshold {ph['threshold']:.3f}):",
        "",
        f"| transformation | recall @{DEFAULT_NCC} | recall @ threshold used |",
        "|---|---|---|",
        *[f"| {t} | {v['default']:.3f} | {v['calibrated']:.3f} |" for t, v in ph["recall"].items()],
    ]
    return lines


def render_bands(bd: dict) -> list[str]:
    lines = [
        "",
        "## The band an octave lower: copies that lost their detail (copies.LOW_BAND)",
        "",
        "A pair is verified when its detail NCC reaches the detail threshold, or its NCC in the band an octave "
        "lower (thumbnails averaged to 16 px, then the same band-pass) reaches that band's threshold: max("
        f"{DEFAULT_NCC}, the set's mirrored level there + {calibration.MIRROR_GAP}), and the band is off where that "
        f"passes {calibration.MIRROR_COPY} (calibration.calibrated_low). Levels and best real pairs: detail · low band. In "
        "distinct cases every verified query is false.",
        "",
        "| case | queries x pool | best real pair | mirrored level | thresholds used (detail · low) | queries "
        "verified, detail band only | with the low band | calibration time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, c in bd["cases"].items():
        kind = " (false)" if c["distinct"] else ""
        v = c["queries_verified"]
        lines.append(
            f"| {name} | {c['n']} x {c['pool']} | {c['best_real']:.3f} · {c['best_real_low']:.3f} | "
            f"{c['level']:.3f} · {c['level_low']:.3f} | {_cut(c['cut'])} | {v['detail']}{kind} | {v['both']}{kind} | "
            f"{c['calibration_s']:.1f} s |"
        )
    for name, c in bd["cases"].items():
        if c.get("pairs_with_disagreeing_labels"):
            lab = c["pairs_with_disagreeing_labels"]
            lines += [
                "",
                f"{name}: pairs whose labels disagree (malignant vs benign/normal) {lab['detail']} with the detail "
                f"band, {lab['both']} with the low band. Sheet of the pairs only the low band accepts, weakest "
                "first (BreastMNIST left, the BUSI image at 28 px right; detail/low NCC): "
                "low_band_busi_breastmnist.png.",
            ]
    names = list(next(iter(bd["planted"].values())))
    lines += [
        "",
        "Planted copies of each set's test images among its other images (as in 'Planted copies' above), each "
        "case calibrated on its own pool as the guard does: recall, then precision (false pairs), with the "
        "detail band only → with the low band. Thresholds used are in table.json.",
        "",
        "| transformation | "
        + " | ".join(f"{n} recall" for n in names)
        + " | "
        + " | ".join(f"{n} precision" for n in names)
        + " |",
        "|---" * (1 + 2 * len(names)) + "|",
    ]
    for tname, per in bd["planted"].items():
        rec = [f"{per[n]['detail']['recall']:.3f} → {per[n]['both']['recall']:.3f}" for n in names]
        prec = [
            f"{per[n]['detail']['precision']:.3f} ({per[n]['detail']['false_pairs']}) → "
            f"{per[n]['both']['precision']:.3f} ({per[n]['both']['false_pairs']})"
            for n in names
        ]
        lines.append(f"| {tname} | " + " | ".join(rec + prec) + " |")
    lines += [
        "",
        "The false pairs with the low band (the copy left, the image it was paired with right; detail/low NCC): "
        "low_band_false_pairs.png.",
        "",
        "The low band's cascade margin (the largest sub-pixel gain among pairs ending >= 0.85 there): "
        + "; ".join(
            f"{k.replace(' (low band)', '')} {v:.3f}"
            for k, v in sorted(bd["gains"].items(), key=lambda kv: -(kv[1] if kv[1] == kv[1] else -1))[:3]
        )
        + f"; at most {sorted(v for v in bd['gains'].values() if v == v)[-4]:.3f} in the other "
        f"{len(bd['gains']) - 3} cases. Above FINE_GAIN ({copies.FINE_GAIN}) once, so the low band has no cascade "
        "(copies.decide).",
    ]
    return lines


def render(res: dict) -> None:
    ts = " | ".join(f"≥{t}" for t in THRESHOLDS)
    sep = "|---" * (len(THRESHOLDS) + 1) + "|"
    r = res["real"]
    lines = [
        "## BUSI pool vs BreastMNIST val+test (every evaluation image has its source in the pool)",
        "",
        f"| detail NCC | {ts} |",
        sep,
        f"| eval images with a copy found (of {r['n_eval']}) | "
        + " | ".join(str(r["by_threshold"][t]["eval_images_with_copy"]) for t in THRESHOLDS)
        + " |",
        "| pairs with disagreeing labels | "
        + " | ".join(str(r["by_threshold"][t]["cross_label_pairs"]) for t in THRESHOLDS)
        + " |",
        "",
        f"Search + verification: {r['seconds']:.1f} s for {r['n_eval']} x {r['n_pool']}. Sheet of the weakest accepted pairs: busi_breastmnist.png.",
        "",
        "## Distinct images: evaluation images with a verified pair (false positives)",
        "",
        f"| set | n | {ts} | max |",
        "|---|---" + "|---" * (len(THRESHOLDS) + 1) + "|",
    ]
    for k, v in res["distinct"].items():
        lines.append(
            f"| {k} | {v['n']} | " + " | ".join(str(v[t]) for t in THRESHOLDS) + f" | {v['max']:.3f} |"
        )
    lines += ["", "Top RetinaMNIST pairs: retina_top.png.", "", "## Planted copies: recall", ""]
    names = list(next(iter(res["planted"].values())))
    lines += [
        "| transformation | " + " | ".join(f"{n} @{t}" for n in names for t in PLANTED_AT) + " |",
        "|---" * (1 + len(PLANTED_AT) * len(names)) + "|",
    ]
    for tname, per in res["planted"].items():
        lines.append(
            f"| {tname} | " + " | ".join(f"{per[n][t]:.3f}" for n in names for t in PLANTED_AT) + " |"
        )
    lines += [
        "",
        "Marks: 'caliper marks + text' are drawn on the image at its own size (at 28 px the text covers the top "
        "third of the frame at full contrast, an overlay); 'marks drawn at 224 px, resized' are the same marks "
        "drawn on the image enlarged to >= 224 px (8x at 28 px, 1x for BUSI: the row above), then resized back, "
        "as a scanner burns them in before a set is downsized (BreastMNIST is BUSI, calipers included, at 28 px).",
        "",
        "## Planted copies: precision (false pairs)",
        "",
        "The copy as the query against the set's other images and the originals: precision = pairs with its own "
        "original / all verified pairs; a false pair is one with another image that the original itself was not "
        "already a verified copy of (each shared set holds real copies of its own, within its test split too). The negatives are the "
        "candidates the hash and thumbnail search propose among distinct real images of the same modality.",
        "",
        "| transformation | " + " | ".join(f"{n} @{t}" for n in names for t in PLANTED_AT) + " |",
        "|---" * (1 + len(PLANTED_AT) * len(names)) + "|",
    ]
    for tname, per in res["planted"].items():
        cells = [
            f"{per[n]['precision'][t]['precision']:.3f} ({per[n]['precision'][t]['false_pairs']})"
            for n in names
            for t in PLANTED_AT
        ]
        lines.append(f"| {tname} | " + " | ".join(cells) + " |")
    if "mirror" in res:
        lines += render_mirror(res["mirror"])
    if "bands" in res:
        lines += render_bands(res["bands"])
    sc = res["scale"]
    lines += [
        "",
        "## Scale (2 CPU cores)",
        "",
        f"{sc['pool']:,} pool images x {sc['queries']:,} queries: candidates {sc['candidates_s']:.1f} s "
        f"({sc['candidate_pairs']:,} pairs), verification {sc['verify_s']:.1f} s at data.duplicate_ncc={DEFAULT_NCC} "
        f"({sc['fine_searched']:,} pairs above the coarse floor {DEFAULT_NCC} - FINE_GAIN {copies.FINE_GAIN} went on "
        f"to the sub-pixel search; without that cascade {sc['verify_full_s']:.1f} s, and "
        f"{sc['decisions_changed_by_cascade']} decisions differ); dHash pairs within the pool "
        f"(multi-index hashing, 4 bits) {sc['dhash_within_pool_s']:.1f} s"
        + (
            f"; the threshold's calibration on the mirrored pool {sc['mirror_level_s']:.1f} s."
            if "mirror_level_s" in sc
            else "."
        )
        + (
            f" Copies within the pool (results.json `pool_duplicates`; the pool is ~60 shifted, noisy crops of "
            f"each of {sc['base_images']:,} real images, the hash's worst case): {sc['within_pool_s']:.1f} s for a "
            f"seeded sample of {POOL_SAMPLE:,} images and {sc['within_pool']['near_checked']:,} of their hash "
            f"candidates verified (at most {POOL_VERIFY_MAX:,}); {sc['within_pool']['hash_vague_images']:,} of "
            f"the sample have a hash too vague to pair."
            if "within_pool" in sc
            else ""
        ),
        *(
            [
                "",
                f"Both bands (copies.decide at {DEFAULT_NCC} · {DEFAULT_NCC}, what the pool guard runs on such a pool): "
                f"{sc['decide_s']:.1f} s for the {sc['candidate_pairs']:,} candidate pairs "
                f"({sc['verified_detail']:,} verified by the detail band, {sc['verified_both']:,} with the low band). "
                # the guard's steps on a pool: candidates, both bands, the calibration, the record within the pool
                f"The pool guard's check, all its steps: "
                f"{sc['candidates_s'] + sc['decide_s'] + sc['mirror_level_s'] + sc['within_pool_s']:.1f} s "
                "(candidates + both bands + calibration + copies within the pool; target < 60 s). "
                "Hash candidates within a seeded sample of the pool, with their truth: a copy when both are crops of "
                "one real image, or of two real images that are themselves copies (their un-noised originals pass "
                "the detail band: the shared sets hold copies of their own); else false:",
                "",
                "| crops of | verification | candidates | same image | originals are copies | recall (same image) | "
                "verified pairs of copied originals | false pairs | precision |",
                "|---|---|---|---|---|---|---|---|---|",
                *[
                    f"| {mod} | {name} | {t['candidates']:,} | {t['same_image']:,} | {t['originals_copies']:,} | "
                    f"{t[k]['recall']:.3f} | {t[k]['originals_copies']} | {t[k]['false_pairs']} | "
                    f"{t[k]['precision']:.3f} |"
                    for mod, t in sc["within_pool_truth"].items()
                    for k, name in (
                        ("detail", "detail band only"),
                        ("both", f"with the low band at {DEFAULT_NCC}"),
                        (
                            "own",
                            f"calibrated on this mixed pool ({_cut(sc.get('within_pool_cut'))}): the record",
                        ),
                        ("alone", f"calibrated on a pool of these crops alone ({_cut(t.get('cut_alone'))})"),
                    )
                    if k in t
                ],
                "",
                f"The first two rows fix both thresholds at {DEFAULT_NCC}. The record of copies within a pool "
                "(results.json `pool_duplicates`) calibrates them on the pool's own mirrored images (a seeded "
                f"sample of {POOL_CALIBRATE} against the examined images), not on the labelled set, whose "
                "modality may be another: an ultrasound labelled set leaves the low band on at 0.88, and fundus "
                "crops in its pool would get the second row, with its false pairs. A pool that mixes modalities "
                "gets the calibration of its most look-alike part (here the fundus crops turn the low band off "
                "for all): fewer copies found among the others, no false ones.",
            ]
            if "within_pool_truth" in sc
            else []
        ),
        "",
        "## The cascade's margin: how much the sub-pixel search raised a pair that ends at NCC >= 0.85",
        "",
        "| case | largest gain over the coarse grid |",
        "|---|---|",
        *[f"| {k} | {v:.3f} |" for k, v in res["fine_gain"].items()],
        "",
        f"copies.FINE_GAIN = {copies.FINE_GAIN}: a pair whose coarse score is more than that below the threshold "
        "skips the search (it could not have reached the threshold in any case above).",
    ]
    (OUT / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
