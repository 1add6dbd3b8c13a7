"""The guards every training script runs before it trains, and the copy search behind them: identical
images across splits (``check.leakage``), copies of val/test images among the images a label budget leaves
unlabelled or in an unlabelled pool (``check.pool_leakage``), copies between two sources
(``lowshot check check.against=``) and copies within a pool, for the record. Each guard raises a
:class:`DataError` naming the fix, drops the offending images, or warns, as its setting says.

Candidates and verification are :mod:`.duplicates` and :mod:`.copies`; ``lowshot check``'s report and
sheets are :mod:`lowshot.check`.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import numpy as np

from ..config import Config
from .calibration import Cut, calibrate, find_copies, judge_pairs, rounded
from .duplicates import VERIFIED, duplicate_pairs, hamming_neighbours, store_thumbnails, verified_pairs
from .pool import Pool
from .store import SPLITS, DataError, Store

log = logging.getLogger(__name__)


def act(action: str, key: str, msg: str, fix: str, anyway: str) -> bool:
    """The guards' one rule for what they found (``msg``): ``key`` = error raises a DataError with the fix,
    warn logs that the run goes on (``anyway``), drop returns True (the caller drops the images and says
    which)."""
    if action == "error":
        raise DataError(f"{msg} {fix}")
    if action == "warn":
        log.warning("%s %s (%s=warn).", msg, anyway, key)
    return action == "drop"


def leakage_guard(store: Store, cfg: Config) -> dict[str, Any]:
    """The fast part of the check, run by every training script before it trains (on the fingerprints
    taken when the images were decoded, so it sees what `lowshot check` sees).

    Identical images in two splits are leakage: ``check.leakage`` = error raises, warn logs, drop marks
    the copy in the earlier split (train before val before test) 'dropped', so the test split stays as
    published. Verified near duplicates and resized/re-cropped copies across splits are only counted and
    logged: a person judges them with ``lowshot check`` (look-alikes are not counted). Returns
    ``{"exact_across_splits", "near_across_splits", "dropped"}``.
    """
    pairs, _, cut = verified_pairs(store, cfg.data)
    rank = {s: i for i, s in enumerate(SPLITS)}
    cross = [
        (i, j, kind) for i, j, _, kind, *_ in pairs if kind in VERIFIED and store.split[i] != store.split[j]
    ]
    cross = [(i, j, k) for i, j, k in cross if store.split[i] in rank and store.split[j] in rank]
    exact = [(i, j) for i, j, k in cross if k == "exact"]
    out: dict[str, Any] = {"exact_across_splits": len(exact), "near_across_splits": len(cross) - len(exact)}
    out["dropped"] = []
    if exact:
        shown = ", ".join(f"{store.paths[i]} ~ {store.paths[j]}" for i, j in exact[:3])
        msg = (
            f"{store.name}: {len(exact)} image(s) appear in two splits (identical pixels), e.g. {shown}: "
            f"test scores would be optimistic."
        )
        fix = (
            "Fix the split, or pass check.leakage=drop (drop the train/val copy; the test split stays as "
            "published) or --warn-only (train anyway). See `lowshot check` for the pairs."
        )
        if act(cfg.check.leakage, "check.leakage", msg, fix, "Training anyway"):
            drop = sorted(
                {i if rank[str(store.split[i])] < rank[str(store.split[j])] else j for i, j in exact}
            )
            store.split = store.split.astype("<U10")
            out["dropped"] = [str(store.paths[i]) for i in drop]
            store.split[drop] = "dropped"
            log.warning("%s Dropped the earlier-split copies: %s", msg, out["dropped"])
    if out["near_across_splits"]:
        log.warning(
            "%s: %d verified near-duplicate or re-cropped copy pair(s) across splits (detail NCC >= %.2f%s); "
            "look at them with `lowshot check`",
            store.name,
            out["near_across_splits"],
            cut.detail,
            "" if cut.low is None else f", or >= {cut.low:.2f} an octave lower",
        )
    return out


def copies_in(store: Store, cfg: Config, split: str, of: set[str]) -> np.ndarray:
    """The store rows of ``split`` with a verified copy (exact, near or re-cropped) among the images of the
    splits ``of``, sorted (the pairs are the leakage guard's, cached)."""
    pairs, _, _ = verified_pairs(store, cfg.data)
    rows = {
        int(a)
        for i, j, _, kind, *_ in pairs
        if kind in VERIFIED
        for a, b in ((i, j), (j, i))
        if store.split[a] == split and store.split[b] in of
    }
    return np.array(sorted(rows), dtype=np.int64)


def copied_from_train_val(store: Store, cfg: Config) -> np.ndarray:
    """The test images with a verified copy among the train/val images: what a "clean test" report leaves
    out."""
    return copies_in(store, cfg, "test", {"train", "val"})


def unlabelled_guard(store: Store, cfg: Config) -> dict[str, Any]:
    """Before pretraining: the training images a label budget left unlabelled (data.train_per_class) are
    pretrained on like a pool, so they pass the pool's guard (check.pool_leakage): a verified copy of a
    val/test image among them (exact, near or re-cropped; lowshot.data.duplicates) stops the run (error),
    is left out of pretraining (drop: its split becomes 'dropped') or is logged (warn). Issue 38: 10 such
    images of a chest X-ray set were identical to 8 validation images. Returns the finding for results.json."""
    rows = copies_in(store, cfg, "unlabelled", {"val", "test"})
    out: dict[str, Any] = {
        "unlabelled_images": int((store.split == "unlabelled").sum()),
        "copies_of_val_test": len(rows),
        "action": cfg.check.pool_leakage,
    }
    if not len(rows):
        return out
    shown = ", ".join(str(store.paths[r]) for r in rows[:5])
    msg = (
        f"{store.name}: {len(rows)} training image(s) that data.train_per_class leaves unlabelled are copies of "
        f"val/test images (e.g. {shown}); pretraining on them would leak the evaluation images into the "
        f"representation."
    )
    fix = (
        "Pass check.pool_leakage=drop (leave them out of pretraining) or check.pool_leakage=warn "
        "(pretrain anyway); `lowshot check` lists the pairs."
    )
    if act(cfg.check.pool_leakage, "check.pool_leakage", msg, fix, "Pretraining anyway"):
        store.split[rows] = "dropped"
        out["dropped"] = [str(p) for p in store.paths[rows]]
        log.warning("%s Left them out of pretraining.", msg)
    return out


# Hash candidates verified per labelled image against a pool: its nearest pool hashes, as many as an image
# may have before the store calls its hash one that cannot tell images apart (duplicate_pairs' 8), plus one.
HASH_NEIGHBOURS = 9


def pool_copies(
    pool: Pool, store: Store, cfg: Config, splits: tuple[str, ...] = ("val", "test")
) -> tuple[list[dict[str, Any]], Cut]:
    """Pool images that are copies of the store's images in ``splits``, one row per (pool image, store
    image) pair with its strongest evidence: 'exact' (same decoded pixels), 'near' (dHash within
    data.duplicate_bits, verified) or 'copy' (a verified resized/re-cropped copy, lowshot.data.copies);
    and the verification thresholds: data.duplicate_ncc, calibrated on those images against the mirrored
    pool (the look-alikes the pool offers them), in the detail band and an octave lower."""
    rows = np.flatnonzero(np.isin(store.split, splits))
    hashes, digests = store.fingerprints()
    found: dict[tuple[int, int], tuple[str, float, float | None]] = {}
    thumbs = store_thumbnails(store, rows)
    _, cut = calibrate(thumbs, pool.thumbs, cfg.data.duplicate_ncc, f"{store.name} against the other source")
    for q, j, ncc, low in find_copies(thumbs, pool.thumbs, cut):
        found[(j, int(rows[q]))] = ("copy", ncc, low)
    # the HASH_NEIGHBOURS nearest pool hashes of each image, within data.duplicate_bits (all of them where it
    # has fewer: a hash that discriminates); hash candidates count only when verified, like the store's own
    # near pairs (data.duplicates). On alike images nearly every pair is within reach: bounded per image.
    near = hamming_neighbours(pool.hashes, hashes[rows], cfg.data.duplicate_bits, HASH_NEIGHBOURS)[:, :2]
    ok, nccs, lows = judge_pairs(thumbs, pool.thumbs, near, cut, cascade=False)
    for (q, j), good, v, w in zip(near.tolist(), ok.tolist(), nccs.tolist(), lows.tolist(), strict=True):
        if good:
            found[(int(j), int(rows[q]))] = ("near", v, rounded(w))
    where = {str(d): int(r) for r, d in zip(rows, digests[rows], strict=True)}
    for j, d in enumerate(pool.digests):
        if str(d) in where:
            found[(j, where[str(d)])] = ("exact", 1.0, None)
    out = [
        {
            "pool": str(pool.paths[j]),
            "pool_row": j,
            "image": str(store.paths[r]),
            "split": str(store.split[r]),
            "kind": kind,
            # detail NCC at the best alignment ('exact': 1); the band an octave lower where that decided
            "score": round(score, 4),
            "score_low": low,
        }
        for (j, r), (kind, score, low) in found.items()
    ]
    order = {"exact": 0, "near": 1, "copy": 2}
    return sorted(out, key=lambda o: (order[o["kind"]], -o["score"])), cut


def against(other: Pool, store: Store, cfg: Config) -> dict[str, Any]:
    """``lowshot check check.against=SOURCE``: copies between a second source and every split of this
    one, JSON-ready (all pairs; the counts per split and kind)."""
    pairs, cut = pool_copies(other, store, cfg, SPLITS)
    return {
        "source": other.sources,
        "images": len(other),
        "skipped_files": len(other.skipped),
        "pairs": pairs,
        "by_kind": dict(Counter(p["kind"] for p in pairs)),
        "images_with_a_copy": {s: len({p["image"] for p in pairs if p["split"] == s}) for s in SPLITS},
        "other_images_with_a_copy": len({p["pool"] for p in pairs}),
        "duplicate_ncc": cfg.data.duplicate_ncc,
        **cut.record(),
    }


# The record of copies within a pool looks at a seeded sample of at most POOL_SAMPLE of its images (a
# homogeneous modality puts hundreds of hash neighbours on every image of a large pool: the candidates
# grow as N^2) and verifies at most POOL_VERIFY_MAX of their hash candidates (~0.5-2 ms a pair).
POOL_SAMPLE = 20000
POOL_VERIFY_MAX = 5000
# The pool's own look-alike level is measured on a seeded sample of at most POOL_CALIBRATE of the examined
# images against all of them, mirrored (calibration.calibrate). The level is a maximum, so a smaller sample
# reads it lower: on BUSI 250 queries gave 0.636 · 0.814 (detail · low band), 500 gave 0.698 · 0.867, the
# whole set 0.867 in the low band; on RetinaMNIST 250 and 500 both gave 0.884 · 0.956, the band off.
POOL_CALIBRATE = 500


def pool_duplicates(
    hashes: np.ndarray,
    digests: np.ndarray,
    thumbs: np.ndarray,
    bits: int,
    threshold: float,
    max_neighbours: int = 8,
) -> dict[str, Any]:
    """Copies within the pool, for the record (they only weight those images more in pretraining):
    identical pixels, and dHash candidates within ``bits`` verified like the labelled set's
    (lowshot.data.duplicates), at ``threshold`` (data.duplicate_ncc) calibrated on the pool's own mirrored
    images. Not the labelled set's calibration: a pool of another modality has look-alikes of its own (a
    fundus pool beside an ultrasound set would keep the low band on, and its look-alikes pass there). A
    hash candidate is not a duplicate: on fundus photographs at 28 px most images are within 4 bits of
    many others. Images with more than ``max_neighbours`` candidates have a hash that cannot tell them
    apart and are left out.

    Above POOL_SAMPLE images the counts are those within a seeded sample (``images_examined``); above
    POOL_VERIFY_MAX candidates a seeded sample of them is verified and ``near_verified_pairs`` is an
    estimate (``near_checked`` says how many were looked at, ``hash_candidates_rejected`` how many of
    those failed). hashes: (N, 64) bool dHash; digests: (N,) pixel digests; thumbs: (N, 32, 32) uint8."""
    rng = np.random.default_rng(0)
    rows = np.arange(len(hashes))
    if len(rows) > POOL_SAMPLE:
        rows = np.sort(rng.choice(len(rows), POOL_SAMPLE, replace=False))
    hashes, thumbs = np.asarray(hashes[rows]), np.asarray(thumbs[rows])
    # own generator: the samples above and below stay those of earlier records
    cal = np.random.default_rng(1).choice(len(rows), min(POOL_CALIBRATE, len(rows)), replace=False)
    _, cut = calibrate(
        thumbs[np.sort(cal)], thumbs, threshold, "the pool (copies within it)", own=np.sort(cal)
    )
    cands, vague = duplicate_pairs(hashes, np.asarray(digests)[rows], bits, max_neighbours)
    near = np.array([(i, j) for i, j, _, kind in cands if kind == "near"], np.int64).reshape(-1, 2)
    sample = near
    if len(near) > POOL_VERIFY_MAX:
        sample = near[np.sort(rng.choice(len(near), POOL_VERIFY_MAX, replace=False))]
    verified = int(judge_pairs(thumbs, thumbs, sample, cut)[0].sum())
    return {
        "images_examined": len(rows),
        "exact_pairs": sum(kind == "exact" for *_, kind in cands),
        "near_verified_pairs": round(verified * len(near) / max(len(sample), 1)),
        "near_checked": len(sample),
        "hash_candidates_rejected": len(sample) - verified,
        "hash_vague_images": int(vague.sum()),
        **cut.record(),
    }


def pool_guard(pool: Pool, store: Store, cfg: Config) -> tuple[Pool, dict[str, Any]]:
    """Before pretraining on ``ssl.unlabelled``: pretraining on the evaluation images is leakage too
    (transductive; the representation has seen the test images). Copies of val/test images in the pool
    stop the run (check.pool_leakage=error, with the list and the fix), are dropped from the pool
    (drop), or are logged (warn). Returns the pool to train on and the finding for results.json."""
    pairs, cut = pool_copies(pool, store, cfg)
    flagged = sorted({p["pool_row"] for p in pairs})
    report: dict[str, Any] = {
        "pool_images": len(pool),
        "pool_sources": pool.sources,
        "pool_skipped": len(pool.skipped),
        "checked_against": {s: int((store.split == s).sum()) for s in ("val", "test")},
        "pairs": len(pairs),
        "by_kind": dict(Counter(p["kind"] for p in pairs)),
        "pool_images_flagged": len(flagged),
        "eval_images_with_a_copy": {
            s: len({p["image"] for p in pairs if p["split"] == s}) for s in ("val", "test")
        },
        "pool_duplicates": pool_duplicates(
            pool.hashes, pool.digests, pool.thumbs, cfg.data.duplicate_bits, cfg.data.duplicate_ncc
        ),
        "duplicate_ncc": cfg.data.duplicate_ncc,
        **cut.record(),
        "action": cfg.check.pool_leakage,
        "examples": pairs[:20],
    }
    if not pairs:
        return pool, report
    shown = "; ".join(f"{p['pool']} ~ {p['split']} {p['image']} ({p['kind']})" for p in pairs[:5])
    msg = (
        f"ssl.unlabelled: {len(flagged)} pool image(s) are copies of {sum(report['eval_images_with_a_copy'].values())} "
        f"labelled val/test image(s) ({report['by_kind']}), e.g. {shown}. Pretraining on them would leak the "
        f"evaluation images into the representation."
    )
    fix = (
        "Remove them from the pool, or pass check.pool_leakage=drop (leave them out of pretraining) or "
        "check.pool_leakage=warn (pretrain anyway)."
    )
    if act(cfg.check.pool_leakage, "check.pool_leakage", msg, fix, "Pretraining anyway"):
        pool = pool.keep(np.setdiff1d(np.arange(len(pool)), flagged))
        report["dropped"] = len(flagged)
        log.warning("%s Dropped them: %d pool images remain.", msg, len(pool))
    return pool, report
