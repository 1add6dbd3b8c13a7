"""The dataset checker: exact and near-duplicate images, and where they leak.

Small medical sets are rarely clean: the same scan exported twice, once per class, or under two
patients. A duplicate pair across splits inflates test scores; across classes it is a label
conflict. For every image of a source (decoded at its native resolution, modes normalised as the
training data are) the checker computes

- a SHA-1 of the decoded pixels: equal digests are **exact** duplicates, whatever the file bytes;
- a 64-bit difference hash (dHash: brightness gradients of a 9x8 grayscale thumbnail, Krawetz 2013):
  pairs within ``data.duplicate_bits`` differing bits are *candidates* (both fingerprints are taken
  once, when the data layer decodes the images), and so are the neighbours of a crop-tolerant search
  and, with ``check.embeddings``, of backbone embeddings;
- each candidate is verified (lowshot.data.copies: detail NCC at the best alignment >=
  ``data.duplicate_ncc``, raised on a set whose mirrored images reach it): **near** duplicates and
  resized/re-cropped **copies**; the rest are **look-alikes**, listed but never counted;

and reports verified pairs across splits (leakage), across classes (label conflicts), and groups
(patients) that span splits, as a terminal summary, ``report.json`` and ``pairs.png`` (the pairs side
by side, with their paths, labels and scores, to judge at a glance); ``check.against`` adds the copies
found in a second source.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from .config import Config, DataConfig
from .data import (
    SPLITS,
    DataError,
    Store,
    decode_image,
    groups_across_splits,
    source_path,
)
from .data.copies import Cut, calibrate, decide, find_copies, rounded
from .data.duplicates import VERIFIED, duplicate_pairs, hamming_neighbours, store_thumbnails, verified_pairs
from .data.pool import Pool

log = logging.getLogger(__name__)


def native_images(store: Store, cfg: DataConfig) -> list[np.ndarray]:
    """Every store image at its native resolution, (H, W, C) uint8, in store order."""
    src = source_path(cfg)
    if src.suffix == ".npz":
        with np.load(src, allow_pickle=False) as z:
            raw = {s: z[f"{s}_images"] for s in ("train", "val", "test")}
        out = []
        for p in store.paths:
            split, i = str(p).split(":", 1)[1].split("/")
            a = raw[split][int(i)]
            out.append(a if a.ndim == 3 else a[..., None])
        return out
    return [decode_image(Path(p), 0, (cfg.dicom_window, cfg.dicom_frames)) for p in store.paths]


def file_modes(store: Store, cfg: DataConfig) -> dict[str, int]:
    """How many images come in each storage mode: PIL modes for files (L = 8-bit gray, I;16 = 16-bit
    gray, RGB, RGBA, P = palette, 1 = 1-bit), the array dtype for an npz; read from headers only."""
    if source_path(cfg).suffix == ".npz":
        with np.load(source_path(cfg), allow_pickle=False) as z:
            return {f"{z['train_images'].dtype} array": len(store.paths)}
    from PIL import Image

    modes: Counter[str] = Counter()
    for p in store.paths:
        with Image.open(p) as im:  # lazy: the header, not the pixels
            modes[im.mode] += 1
    return dict(modes.most_common())


def embedding_pairs(feats: np.ndarray, threshold: float, chunk: int = 2048) -> list[tuple[int, int, float]]:
    """(i, j, cosine) with i < j and cosine similarity >= threshold, for (N, D) embeddings."""
    x = feats / np.clip(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12, None)
    out = []
    for lo in range(0, len(x), chunk):
        sim = x[lo : lo + chunk] @ x.T  # (chunk, N)
        for a, b in zip(*np.nonzero(sim >= threshold), strict=True):
            if lo + int(a) < int(b):
                out.append((lo + int(a), int(b), float(sim[a, b])))
    return out


def check_store(
    store: Store, cfg: DataConfig, feats: np.ndarray | None = None, cosine: float = 1.0
) -> tuple[dict[str, Any], list[np.ndarray]]:
    """All findings on a loaded store (see the module docstring), JSON-ready, and the native images.

    Pairs come from lowshot.data.duplicates.verified_pairs: exact, near (hash candidate verified), copy
    (crop-tolerant search, verified) and lookalike (a hash candidate the verification rejected). With
    ``feats`` (N, D), pairs whose embeddings have cosine >= ``cosine`` are candidates too (a backbone sees
    content where dHash sees brightness gradients), verified the same way. Leakage, label conflicts and
    the exit status count verified pairs only; look-alikes are listed for a person to judge."""
    images = native_images(store, cfg)  # for the sheet and the sizes; fingerprints come with the store
    pairs, vague, cut = verified_pairs(store, cfg)
    found: list[tuple[int, int, int, str, float | None, float | None, float | None]] = [
        (i, j, d, kind, v, w, None) for i, j, d, kind, v, w in pairs
    ]
    if feats is not None:
        seen = {(i, j) for i, j, *_ in found}
        emb = [(i, j, c) for i, j, c in embedding_pairs(feats, cosine) if (i, j) not in seen]
        thumbs = store_thumbnails(store, None if emb else np.arange(0))
        ij = np.array([(i, j) for i, j, _ in emb], np.int64).reshape(-1, 2)
        ok, ncc, low = decide(thumbs, thumbs, ij, cut, cascade=False)
        for (i, j, c), good, v, w in zip(emb, ok.tolist(), ncc.tolist(), low.tolist(), strict=True):
            found.append((i, j, -1, "copy" if good else "lookalike", round(v, 4), rounded(w), c))
    rows = []
    for i, j, d, kind, v, w, cos in found:
        rows.append(
            {
                "kind": kind,
                "found_by": _found_by(kind, d, cos),
                "distance_bits": d,
                "ncc": v,
                # the band an octave lower, where the detail band fell short (None: not needed or off)
                "ncc_low": w,
                "cosine": cos,
                "a": _describe(store, i),
                "b": _describe(store, j),
                "cross_split": bool(store.split[i] != store.split[j]),
                "cross_class": bool(store.labels[i] != store.labels[j]),
            }
        )
    same = [r for r in rows if r["kind"] in VERIFIED]
    shapes = Counter(f"{a.shape[1]}x{a.shape[0]}x{a.shape[2]}" for a in images)
    return {
        "source": str(source_path(cfg)),
        "images": len(images),
        "classes": store.classes,
        "counts": store.counts(),
        "native_sizes": dict(shapes.most_common(10)),
        "file_modes": file_modes(store, cfg),
        "skipped_files": [{"file": f, "why": w} for f, w in store.skipped],
        "hash_threshold_bits": cfg.duplicate_bits,
        "duplicate_ncc": cfg.duplicate_ncc,
        # the thresholds used: duplicate_ncc, or higher where mirrored images of the set reach it
        **cut.record(),
        "pairs": rows,
        "exact_pairs": sum(r["kind"] == "exact" for r in rows),
        "near_pairs": sum(r["kind"] == "near" for r in rows),
        "copy_pairs": sum(r["kind"] == "copy" for r in rows),
        "lookalike_pairs": sum(r["kind"] == "lookalike" for r in rows),
        "embedding_candidates": sum(r["found_by"] == "embedding" for r in rows),
        # images whose dHash is within reach of many others: their hash candidates are not verified
        "hash_blind_images": int(vague.sum()),
        "cosine_threshold": cosine if feats is not None else None,
        "cross_split_pairs": sum(r["cross_split"] for r in same),
        "cross_class_pairs": sum(r["cross_class"] for r in same),
        "lookalikes_across_splits": sum(r["cross_split"] for r in rows if r["kind"] == "lookalike"),
        "groups_across_splits": groups_across_splits(store),  # none when each image is its own group
    }, images


def _found_by(kind: str, bits: int, cosine: float | None) -> str:
    """Which search proposed a pair: pixels (exact), hash, embedding, or the crop-tolerant search."""
    if kind == "exact":
        return "pixels"
    return "hash" if bits >= 0 else "embedding" if cosine else "search"


def _describe(store: Store, i: int) -> dict[str, Any]:
    return {
        "index": i,
        "path": str(store.paths[i]),
        "label": store.classes[store.labels[i]],
        "split": str(store.split[i]),
    }


def ranked(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The pairs, verified ones first (label conflicts, then leaks across splits, then the rest), then
    the look-alikes; most similar first."""
    return sorted(
        report["pairs"],
        key=lambda r: (
            r["kind"] == "lookalike",
            not r["cross_class"],
            not r["cross_split"],
            -(r["ncc"] if r["ncc"] is not None else 1.0),
        ),
    )


def closeness(row: dict[str, Any]) -> str:
    """'identical', 'NCC 0.973 (3 bits)', 'NCC 0.912 (cos 0.985)', 'NCC 0.941' or, where the band an
    octave lower decided, 'NCC 0.812, low 0.953'."""
    if row["kind"] == "exact":
        return "identical"
    by = f" ({row['distance_bits']} bits)" if row["distance_bits"] >= 0 else ""
    by = f" (cos {row['cosine']:.3f})" if row.get("cosine") else by
    low = f", low {row['ncc_low']:.3f}" if row.get("ncc_low") is not None else ""
    return f"NCC {row['ncc']:.3f}{low}{by}"


def flags(row: dict[str, Any]) -> str:
    """'LABEL-CONFLICT ACROSS-SPLITS', either, or '' (never for a look-alike: not the same image)."""
    if row["kind"] == "lookalike":
        return ""
    return " ".join(
        f for f, on in (("LABEL-CONFLICT", row["cross_class"]), ("ACROSS-SPLITS", row["cross_split"])) if on
    )


def raised(report: dict[str, Any]) -> str:
    """', raised from data.duplicate_ncc=X: ...' where the set's mirrored look-alikes moved the threshold;
    then the low band's threshold, or that it is off."""
    out = ""
    if report["verified_at_ncc"] > report["duplicate_ncc"]:
        out = (
            f", raised from data.duplicate_ncc={report['duplicate_ncc']}: mirrored images of this set, never "
            "copies, reach it"
        )
    low = report.get("verified_at_ncc_low")
    if low is None:
        return out + "; the band an octave lower is off: look-alikes reach copies' scores there"
    return out + f"; or >= {low} an octave lower (copies that lost their detail)"


def summary(report: dict[str, Any]) -> str:
    c = report["counts"]
    lines = [
        f"{report['source']}: {report['images']} images, classes {report['classes']}",
        "  per split and class: " + ", ".join(f"{s} {c[s]}" for s in ("train", "val", "test")),
        f"  native sizes: {report['native_sizes']}",
        f"  file modes (bit depth): {report['file_modes']}",
        f"  skipped files: {len(report['skipped_files'])}",
        f"  duplicate pairs (verified: detail NCC >= {report['verified_at_ncc']}{raised(report)}): exact {report['exact_pairs']}, "
        f"near {report['near_pairs']} (dHash <= {report['hash_threshold_bits']} bits), resized/re-cropped copies "
        f"{report['copy_pairs']}",
        f"  look-alikes (hash or embedding candidates the verification rejected; not counted): "
        f"{report['lookalike_pairs']}, {report['lookalikes_across_splits']} across splits",
        *(
            [
                f"  images the hash cannot tell apart: {report['hash_blind_images']} (their hash candidates are not "
                "verified; the crop-tolerant search still compares them)"
            ]
            if report.get("hash_blind_images")
            else []
        ),
        f"  verified pairs across splits (leakage): {report['cross_split_pairs']}",
        f"  verified pairs across classes (label conflicts): {report['cross_class_pairs']}",
        f"  groups in more than one split: {len(report['groups_across_splits'])}",
    ]
    return "\n".join(lines)


def plot_pairs(report: dict[str, Any], images: list[np.ndarray], path: Path, most: int) -> Path | None:
    """A sheet of the flagged pairs, label conflicts first, then leaks, then the rest."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = ranked(report)[:most]
    if not rows:
        return None
    fig, axes = plt.subplots(len(rows), 2, figsize=(6, 3 * len(rows)), dpi=80, squeeze=False)
    for ax_row, r in zip(axes, rows, strict=True):
        for ax, side in zip(ax_row, ("a", "b"), strict=True):
            a = images[r[side]["index"]]  # native resolution
            ax.imshow(a[..., 0] if a.shape[-1] == 1 else a, cmap="gray", vmin=0, vmax=255)
            p = r[side]["path"]
            name = p.split(":", 1)[1] if ".npz:" in p else Path(p).name  # npz rows: 'split/index'
            ax.set_title(f"{name[:30]}\n{r[side]['label']} · {r[side]['split']}", fontsize=8)
            ax.axis("off")
        marks = flags(r)
        ax_row[0].text(
            0,
            -0.35,
            f"{r['kind']} ({closeness(r)}) {marks}",
            transform=ax_row[0].transAxes,
            fontsize=8,
            color="red" if marks else "black",
        )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


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
        if cfg.check.leakage == "error":
            raise DataError(
                msg + " Fix the split, or pass check.leakage=drop (drop the train/val copy; the test split "
                "stays as published) or --warn-only (train anyway). See `lowshot check` for the pairs."
            )
        if cfg.check.leakage == "drop":
            drop = sorted(
                {i if rank[str(store.split[i])] < rank[str(store.split[j])] else j for i, j in exact}
            )
            store.split = store.split.astype("<U10")
            out["dropped"] = [str(store.paths[i]) for i in drop]
            store.split[drop] = "dropped"
            log.warning("%s Dropped the earlier-split copies: %s", msg, out["dropped"])
        else:
            log.warning("%s Training anyway (check.leakage=warn).", msg)
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


def unlabelled_guard(store: Store, cfg: Config) -> dict[str, Any]:
    """Before pretraining: the training images a label budget left unlabelled (data.train_per_class) are
    pretrained on like a pool, so they pass the pool's guard (check.pool_leakage): a verified copy of a
    val/test image among them (exact, near or re-cropped; lowshot.data.duplicates) stops the run (error),
    is left out of pretraining (drop: its split becomes 'dropped') or is logged (warn). Issue 38: 10 such
    images of a chest X-ray set were identical to 8 validation images. Returns the finding for results.json."""
    pairs, _, _ = verified_pairs(store, cfg.data)
    held = {"val", "test"}
    flagged: set[int] = set()
    for i, j, _, kind, *_ in pairs:
        if kind not in VERIFIED:
            continue
        for a, b in ((i, j), (j, i)):
            if store.split[a] == "unlabelled" and store.split[b] in held:
                flagged.add(int(a))
    out: dict[str, Any] = {
        "unlabelled_images": int((store.split == "unlabelled").sum()),
        "copies_of_val_test": len(flagged),
        "action": cfg.check.pool_leakage,
    }
    if not flagged:
        return out
    rows = sorted(flagged)
    shown = ", ".join(str(store.paths[r]) for r in rows[:5])
    msg = (
        f"{store.name}: {len(rows)} training image(s) that data.train_per_class leaves unlabelled are copies of "
        f"val/test images (e.g. {shown}); pretraining on them would leak the evaluation images into the "
        f"representation."
    )
    if cfg.check.pool_leakage == "error":
        raise DataError(
            msg + " Pass check.pool_leakage=drop (leave them out of pretraining) or check.pool_leakage=warn "
            "(pretrain anyway); `lowshot check` lists the pairs."
        )
    if cfg.check.pool_leakage == "drop":
        store.split[rows] = "dropped"
        out["dropped"] = [str(store.paths[r]) for r in rows]
        log.warning("%s Left them out of pretraining.", msg)
    else:
        log.warning("%s Pretraining anyway (check.pool_leakage=warn).", msg)
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
    ok, nccs, lows = decide(thumbs, pool.thumbs, near, cut, cascade=False)
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


def plot_against(found: dict[str, Any], other: Pool, store: Store, path: Path, most: int) -> Path | None:
    """A sheet of the weakest accepted cross-source pairs (where the verification decided), this
    source's image left, the other's right, at data.size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(found["pairs"], key=lambda p: p["score"])[:most]
    if not rows:
        return None
    index = {str(p): i for i, p in enumerate(store.paths)}
    fig, axes = plt.subplots(len(rows), 2, figsize=(6, 3 * len(rows)), dpi=80, squeeze=False)
    for ax_row, r in zip(axes, rows, strict=True):
        for ax, a, title in (
            (ax_row[0], store.images[index[r["image"]]], f"{r['image'][-30:]}\n{r['split']}"),
            (ax_row[1], other.images[r["pool_row"]], f"{r['pool'][-30:]}\n{r['kind']} {r['score']:.3f}"),
        ):
            ax.imshow(a[..., 0] if a.shape[-1] == 1 else a, cmap="gray", vmin=0, vmax=255)
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# The record of copies within a pool looks at a seeded sample of at most POOL_SAMPLE of its images (a
# homogeneous modality puts hundreds of hash neighbours on every image of a large pool: the candidates
# grow as N^2) and verifies at most POOL_VERIFY_MAX of their hash candidates (~0.5-2 ms a pair).
POOL_SAMPLE = 20000
POOL_VERIFY_MAX = 5000
# The pool's own look-alike level is measured on a seeded sample of at most POOL_CALIBRATE of the examined
# images against all of them, mirrored (copies.calibrate). The level is a maximum, so a smaller sample
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
    verified = int(decide(thumbs, thumbs, sample, cut)[0].sum())
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
    if cfg.check.pool_leakage == "error":
        raise DataError(
            msg
            + " Remove them from the pool, or pass check.pool_leakage=drop (leave them out of pretraining) or "
            "check.pool_leakage=warn (pretrain anyway)."
        )
    if cfg.check.pool_leakage == "drop":
        pool = pool.keep(np.setdiff1d(np.arange(len(pool)), flagged))
        report["dropped"] = len(flagged)
        log.warning("%s Dropped them: %d pool images remain.", msg, len(pool))
    else:
        log.warning("%s Pretraining anyway (check.pool_leakage=warn).", msg)
    return pool, report
