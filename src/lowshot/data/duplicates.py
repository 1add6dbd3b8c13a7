"""Exact and near-duplicate pairs from the fingerprints, and groups merged along them."""

from __future__ import annotations

import logging

import numpy as np

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


def near_pairs(bits: np.ndarray, threshold: int, chunk: int = 2048) -> list[tuple[int, int, int]]:
    """(i, j, distance) with i < j and Hamming distance <= threshold, for (N, 64) bool hashes."""
    x = np.packbits(bits.astype(bool), axis=1).view(">u8")[:, 0]  # (N,) one 64-bit word per hash
    pairs = []
    for lo in range(0, len(x), chunk):
        d = np.bitwise_count(x[lo : lo + chunk, None] ^ x[None, :])  # (chunk, N) differing bits
        for a, b in zip(*np.nonzero(d <= threshold), strict=True):
            i = lo + int(a)
            if i < int(b):
                pairs.append((i, int(b), int(d[a, b])))
    return pairs


def duplicate_pairs(
    bits: np.ndarray, digests: np.ndarray, threshold: int, max_neighbours: int = 8
) -> tuple[list[tuple[int, int, int, str]], np.ndarray]:
    """(i, j, bits, 'exact' | 'near') for every identical pair and every other pair within ``threshold``
    dHash bits, i < j; and the (N,) mask of images whose hash does not discriminate.

    An image "near" more than ``max_neighbours`` others has a hash that cannot tell it apart (fundus
    photos: a bright disc on black; dHash puts most of RetinaMNIST within 4 bits of each other): its
    near pairs are left out rather than flooding the list and chaining half the set into one group."""
    same: dict[str, list[int]] = {}
    for i, d in enumerate(digests):
        same.setdefault(str(d), []).append(i)
    exact = {(i, j) for g in same.values() for k, i in enumerate(g) for j in g[k + 1 :]}
    near = [(i, j, d) for i, j, d in near_pairs(bits, threshold) if (i, j) not in exact]
    degree = np.bincount([k for i, j, _ in near for k in (i, j)], minlength=len(digests))
    vague = degree > max_neighbours
    pairs = [(i, j, 0, "exact") for i, j in sorted(exact)]
    return pairs + [(i, j, d, "near") for i, j, d in near if not (vague[i] or vague[j])], vague


def duplicate_groups(store: Store, threshold: int) -> np.ndarray:
    """``store.groups`` merged along duplicate pairs (union-find): images linked by a chain of exact or
    near duplicates, or by a shared group, get one group name (the smallest member's)."""
    parent = np.arange(len(store.labels))
    pairs, vague = duplicate_pairs(*store.fingerprints(), threshold)
    if vague.any():
        log.warning(
            "%s: %d images are within %d dHash bits of many others; the hash cannot tell them apart, so only "
            "their exact duplicates are grouped (`lowshot check check.embeddings=true` compares content)",
            store.name,
            int(vague.sum()),
            threshold,
        )

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = int(parent[i])
        return i

    _, first = np.unique(store.groups, return_inverse=True)
    links = [(i, j) for i, j, _, _ in pairs]
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
