"""Exact and near-duplicate pairs from the fingerprints, verified, and groups merged along them.

The 64-bit dHash within ``data.duplicate_bits`` is a *candidate* generator, not a verdict: on a
homogeneous modality at low resolution it pairs different patients with similar anatomy. Every hash
candidate is verified by the detail NCC of lowshot.data.copies (the same check as the pool guard's,
``data.duplicate_ncc``), and a crop-tolerant search adds the resized / re-cropped copies the hash
misses. Only exact, verified near and verified copy pairs drive grouping, leakage and label conflicts;
hash candidates that fail verification are 'lookalike' pairs, listed by ``lowshot check`` and nothing else.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np

from ..config import DataConfig
from .cache import cache_root, write_atomic
from .calibration import Cut, calibrate, judge_pairs, rounded
from .copies import THUMB, candidates, thumbnail
from .store import Store

log = logging.getLogger(__name__)


def hamming_pairs(index_bits: np.ndarray, query_bits: np.ndarray, threshold: int) -> np.ndarray:
    """(P, 3) int64 (query row, index row, distance) for every pair within ``threshold`` bits of two sets
    of (N, 64) bool hashes, by multi-index hashing (faiss ``IndexBinaryMultiHash``): the 64 bits are cut
    into ``threshold + 1`` bands, and a pair within ``threshold`` bits agrees exactly on at least one
    band (pigeonhole), so only bucket mates are compared. 100,000 hashes against themselves: ~0.3 s."""
    import faiss

    if not len(index_bits) or not len(query_bits):
        return np.zeros((0, 3), np.int64)
    x = np.packbits(index_bits.astype(bool), axis=1)
    q = np.packbits(query_bits.astype(bool), axis=1)
    bands = threshold + 1
    index = faiss.IndexBinaryMultiHash(64, bands, min(64 // bands, 24))
    index.add(x)
    lims, dist, found = index.range_search(q, threshold + 1)  # distances < radius
    counts = np.asarray(lims[1:], dtype=np.int64) - np.asarray(lims[:-1], dtype=np.int64)
    rows = np.repeat(np.arange(len(q)), counts)
    return np.stack([rows, found.astype(np.int64), dist.astype(np.int64)], 1)


def hamming_neighbours(index_bits: np.ndarray, query_bits: np.ndarray, threshold: int, k: int) -> np.ndarray:
    """Each query's ``k`` nearest index hashes (faiss exact binary search, ``IndexBinaryFlat``) within
    ``threshold`` bits: (P, 3) int64 (query row, index row, distance). Unlike ``hamming_pairs`` the output is bounded, k per query: on a set
    of alike images (chest X-rays, fundus photos at 28 px) nearly every pair lies within a few bits, and
    listing them all is quadratic in time and memory. 6,600 hashes against themselves: 0.3 s (2 cores, while
    other work ran); 2,000 against 100,000: 0.4 s."""
    import faiss

    if not len(index_bits) or not len(query_bits) or k < 1:
        return np.zeros((0, 3), np.int64)
    index = faiss.IndexBinaryFlat(64)
    index.add(np.packbits(index_bits.astype(bool), axis=1))
    dist, found = index.search(np.packbits(query_bits.astype(bool), axis=1), min(k, len(index_bits)))
    within = (found >= 0) & (dist <= threshold)
    rows = np.repeat(np.arange(len(query_bits)), within.sum(1))
    return np.stack([rows, found[within].astype(np.int64), dist[within].astype(np.int64)], 1)


def duplicate_pairs(
    bits: np.ndarray, digests: np.ndarray, threshold: int, max_neighbours: int = 8
) -> tuple[list[tuple[int, int, int, str]], np.ndarray]:
    """(i, j, bits, 'exact' | 'near') for every identical pair and every other pair within ``threshold``
    dHash bits, i < j; and the (N,) mask of images whose hash does not discriminate.

    An image "near" more than ``max_neighbours`` others has a hash that cannot tell them apart (fundus
    photos: a bright disc on black; dHash puts most of RetinaMNIST within 4 bits of each other): its
    near pairs are left out rather than flooding the list and chaining half the set into one group. Each
    image's neighbours are searched up to that many (``hamming_neighbours``), so the work stays linear in
    the set however alike its images are."""
    same: dict[str, list[int]] = {}
    for i, d in enumerate(digests):
        same.setdefault(str(d), []).append(i)
    exact = {(i, j) for g in same.values() for k, i in enumerate(g) for j in g[k + 1 :]}
    # enough neighbours to see max_neighbours + 1 near ones past an image's own identical copies
    k = max_neighbours + 1 + max((len(g) for g in same.values()), default=1)
    found = hamming_neighbours(bits, bits, threshold, k)
    found = found[found[:, 0] != found[:, 1]]
    near_of = [(i, j, d) for i, j, d in found.tolist() if (min(i, j), max(i, j)) not in exact]
    # An image whose k slots all lie within reach holds at least k - (itself and its identical copies) >=
    # max_neighbours + 1 near neighbours among them: vague, as it would be with every neighbour counted.
    degree = np.bincount([i for i, _, _ in near_of], minlength=len(digests))
    vague = degree > max_neighbours
    near = sorted({(min(i, j), max(i, j), d) for i, j, d in near_of})
    pairs = [(i, j, 0, "exact") for i, j in sorted(exact)]
    return pairs + [(i, j, d, "near") for i, j, d in near if not (vague[i] or vague[j])], vague


# A verified pair: (i, j, dHash bits or -1, kind, detail NCC or None, low-band NCC or None), i < j.
Pair = tuple[int, int, int, str, float | None, float | None]
VERIFIED = ("exact", "near", "copy")  # the kinds that are the same image; "lookalike" is not
# Above this many images the crop-tolerant search within the store (an exact inner-product search of
# 3N descriptors against 3N) is skipped; hash candidates are still verified.
COPY_SEARCH_MAX = 20000
# The look-alike level (the calibration against the mirrored set) is measured on a seeded sample of at most
# this many of the store's images against all of them: bounded in pairs on a large set, every image of the
# shared sets (<= 1,600).
CALIBRATE_MAX = 2000


def store_thumbnails(store: Store, rows: np.ndarray | None = None) -> np.ndarray:
    """(N, THUMB, THUMB) uint8 grayscale thumbnails of the store's images, or of its ``rows`` only
    (lowshot.data.copies)."""
    rows = np.arange(len(store.labels)) if rows is None else rows
    if not len(rows):
        return np.zeros((0, THUMB, THUMB), np.uint8)
    if store.thumbs is not None:  # of the native images, taken when decoding
        return np.asarray(store.thumbs[rows])
    return np.stack([thumbnail(store.images[r]) for r in rows])


def _cache_file(digests: np.ndarray, cfg: DataConfig, native: bool) -> Path:
    # Keyed by the images' content (native-pixel digests) and the two settings. Thumbnails of the native
    # images (``native``, taken when decoding) are the same at every data.size, so a probe at 64 px reuses
    # the check made at 32 px; those of a store without them are of its data.size images.
    size = "native" if native else cfg.size
    h = hashlib.sha1(f"v5|{size}|{cfg.duplicate_bits}|{cfg.duplicate_ncc}|".encode())
    h.update("\n".join(map(str, digests)).encode())
    return cache_root(cfg) / "duplicates" / f"{h.hexdigest()[:20]}.json"


def verified_pairs(store: Store, cfg: DataConfig) -> tuple[list[Pair], np.ndarray, Cut]:
    """Every duplicate pair of the store, verified; the (N,) mask of images whose hash does not
    discriminate (their hash candidates are not verified; the crop-tolerant search still sees them); and
    the verification thresholds used: ``data.duplicate_ncc`` calibrated on the store's mirrored images
    (lowshot.data.calibration.calibrate; higher where the set's look-alikes reach it), in the detail band and
    the band an octave lower.

    Kinds: 'exact' (same decoded pixels); 'near' (dHash within ``data.duplicate_bits``, verified); 'copy'
    (a resized or re-cropped copy the hash missed, found by the descriptor search and verified);
    'lookalike' (a hash candidate that failed verification). Cached by the images' pixel digests and the
    two settings (verification of a few thousand images takes seconds; every training script asks)."""
    bits, digests = store.fingerprints()
    cache = _cache_file(digests, cfg, store.thumbs is not None)
    if cache.is_file():
        saved = json.loads(cache.read_text())
        pairs = [tuple(p) for p in saved["pairs"]]
        return pairs, np.asarray(saved["vague"], dtype=bool), Cut(*saved["threshold"])
    cands, vague = duplicate_pairs(bits, digests, cfg.duplicate_bits)
    thumbs = store_thumbnails(store)
    # the look-alike level: every image (at most CALIBRATE_MAX, a seeded sample) against the mirrored set
    rows = np.arange(len(thumbs))
    if len(rows) > CALIBRATE_MAX:
        rows = np.sort(np.random.default_rng(0).choice(rows, CALIBRATE_MAX, replace=False))
    levels, cut = calibrate(thumbs[rows], thumbs, cfg.duplicate_ncc, store.name, own=rows)
    near = np.array([(i, j) for i, j, _, k in cands if k == "near"], np.int64).reshape(-1, 2)
    ok, ncc, low = judge_pairs(thumbs, thumbs, near, cut, cascade=False)
    out: list[Pair] = [(i, j, 0, "exact", None, None) for i, j, _, k in cands if k == "exact"]
    dist = {(i, j): d for i, j, d, k in cands if k == "near"}
    for (i, j), good, v, w in zip(near.tolist(), ok.tolist(), ncc.tolist(), low.tolist(), strict=True):
        out.append((i, j, dist[(i, j)], "near" if good else "lookalike", round(v, 4), rounded(w)))
    if 1 < len(thumbs) <= COPY_SEARCH_MAX:
        seen = {(i, j) for i, j, *_ in out}
        found = candidates(thumbs, thumbs)
        found = np.unique(np.sort(found[found[:, 0] != found[:, 1]], axis=1), axis=0)
        found = np.array([p for p in found.tolist() if tuple(p) not in seen], np.int64).reshape(-1, 2)
        ok, ncc, low = judge_pairs(thumbs, thumbs, found, cut)
        out += [
            (i, j, -1, "copy", round(v, 4), rounded(w))
            for (i, j), good, v, w in zip(
                found.tolist(), ok.tolist(), ncc.tolist(), low.tolist(), strict=True
            )
            if good
        ]
    elif len(thumbs) > COPY_SEARCH_MAX:
        log.info(
            "%s: %d images: the crop-tolerant copy search within the set is skipped", store.name, len(thumbs)
        )
    out.sort()
    record = {"pairs": out, "vague": vague.tolist(), "threshold": list(cut), "mirror_levels": levels}
    write_atomic(cache, json.dumps(record))
    return out, vague, cut


def duplicate_groups(store: Store, cfg: DataConfig) -> np.ndarray:
    """``store.groups`` merged along verified duplicate pairs (union-find): images linked by a chain of
    exact, near or copy pairs, or by a shared group, get one group name (the smallest member's).
    Look-alikes the hash pairs but the verification rejects are not merged."""
    parent = np.arange(len(store.labels))
    pairs, vague, _ = verified_pairs(store, cfg)
    pairs = [p for p in pairs if p[3] in VERIFIED]
    if vague.any():
        log.warning(
            "%s: %d images are within %d dHash bits of many others; the hash cannot tell them apart, so their "
            "copies are found by the crop-tolerant search only",
            store.name,
            int(vague.sum()),
            cfg.duplicate_bits,
        )

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = int(parent[i])
        return i

    _, first = np.unique(store.groups, return_inverse=True)
    links = [(p[0], p[1]) for p in pairs]
    for g in range(first.max() + 1 if len(first) else 0):  # rows of one original group stay together
        rows = np.flatnonzero(first == g)
        links += [(int(rows[0]), int(r)) for r in rows[1:]]
    for i, j in links:
        a, b = root(i), root(j)
        if a != b:
            parent[max(a, b)] = min(a, b)
    merged = store.groups[[root(i) for i in range(len(parent))]]
    before, after = len(np.unique(store.groups)), len(np.unique(merged))
    if after < before:
        log.info("duplicates: %d groups merged into %d, so copies stay in one split", before, after)
    return merged


# ------------------------------------------------------------------------------------------------ splits
