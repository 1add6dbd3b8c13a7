"""Copies of one set's images in another: resized, re-cropped or re-exported versions of the same scan.

A hash of the native image (dHash) finds re-encoded and resized copies, but misses re-cropped ones
(shared/data's ``breastmnist.npz`` is made from the images in ``busi/``, other crop and size: dHash
finds 54 of the 780). The search here works on 32 px grayscale thumbnails of the padded-square native
images (``data.pool.thumbnail``) in two stages:

1. **Candidates** (sub-quadratic in practice, one BLAS pass): every thumbnail and a few centred crops
   of it (full, 80 % of the width, 80 % of the height, 90 % and 80 % of both) are reduced to 8x8,
   mean-removed and normalised; for each query variant faiss finds the ``K`` x 5 most correlated pool
   variants (exact inner-product search; 1,200 queries against 100,000 pool images is ~2 x 10^11
   multiply-adds, seconds).
2. **Verification** of the candidates only: the normalised cross-correlation of the two thumbnails'
   *detail* (image minus its blur, central 60 %) after the best crop of either one (a grid of scales
   0.7-1 per axis, then a pattern search over scale and centre to sub-pixel alignment, which detail
   needs). A pair is a copy when it reaches ``threshold`` (``data.duplicate_ncc``, 0.88), chosen from
   measurement (bench/pool_copies.py: real copies ~0.98, JPEG q70 copies at 28 px 0.97 found; the best
   distinct RetinaMNIST pair 0.883, where the calibration below uses 0.895). Each image's coarse crops
   are made once, and pairs too far below the threshold after the coarse grid skip the fine search
   (``FINE_GAIN``).

A pair the detail band rejects gets a second chance an octave lower (LOW_BAND), with its own calibrated
threshold: copies that lost their finest detail (resized to half and back, heavy JPEG, noise) keep that band.

At 32 px two different images that look the same (a homogeneous modality at low resolution) can
correlate as highly as a copy, so the threshold is calibrated on each set (:mod:`.calibration`, which
also decides the candidate pairs at it: ``judge_pairs``, ``find_copies``): the best
score of its images against left-right mirrored images of the set, which are never copies, plus a
margin. Where the set's look-alikes come within MIRROR_GAP of it the threshold rises, and the run says so.

What it cannot see: copies rotated by more than a few degrees, flipped, cropped to less than ~70 % of
the field of view per axis, or with heavy overlays; look-alike structure at fixed positions of the frame
(JPEG blocks, marks burned in at one place in every image), which mirroring moves, so the calibration
misses it (RetinaMNIST re-encoded at JPEG q40: one distinct pair at 0.922, mirrored level 0.856).
Mirroring also overstates the look-alike level where mirrored images resemble real ones (left and right
eyes): within all of RetinaMNIST the threshold becomes 0.928, 17 pairs are verified where 0.882 verified
22, and the rejected pairs at 0.906-0.928 look like the same photographs (bench/results/duplicates).
"""

from __future__ import annotations

import functools
import logging

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from .decode import square_resize

log = logging.getLogger(__name__)

THUMB = 32  # px: the grayscale thumbnail the copy search compares


def thumbnail(a: np.ndarray) -> np.ndarray:
    """(H, W, C) uint8, padded square → (32, 32) uint8 grayscale (ITU-R 601 luma), antialiased."""
    im = Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).convert("L")
    return np.asarray(im.resize((THUMB, THUMB), Image.Resampling.BICUBIC))


def native_thumbnail(a: np.ndarray) -> np.ndarray:
    """A labelled image's thumbnail from its native (H, W, C) uint8 array: resized to 32 px in its own
    channels first, then ``thumbnail``, the same pixels as the thumbnail of its data.size=32 store image
    (where the duplicates recorded before thumbnails were taken at decoding came from), at any data.size."""
    return thumbnail(square_resize(a, THUMB))


# Centred crops (width fraction, height fraction) taken of both sides for the candidate search. The two
# square ones find copies cropped on all four sides among look-alikes: planted 90 % and 80 % crops of
# RetinaMNIST test images (round fundus photos, each with many look-alike discs) reached the candidates
# for 49 % and 18 % of the images with the first three alone, 100 % and 100 % with all five
# (EXPERIMENTS.md, "Square crops in the candidates").
VARIANTS = ((1.0, 1.0), (0.8, 1.0), (1.0, 0.8), (0.9, 0.9), (0.8, 0.8))
# Neighbours per query variant: K x len(VARIANTS) pool crops, 25 (24 with the three variants and k = 8
# before), so the candidate pairs, and the verification's time, stay as they were (RetinaMNIST 35 a query
# against 32; BreastMNIST 21 against 23) while the square crops add the recall above; at k = 8 the pairs
# grew 1.7x and the pool guard's 100,000-image check took 49.5 s (40.3 s at k = 5; bench/pool_copies.py).
K = 5
SCALES = (1.0, 0.9, 0.8, 0.7)  # crop fractions per axis of the verification's coarse grid
# Pattern-search steps (width, height, centre x, centre y as fractions of the image), halved each round:
# 4 rounds reach ~0.2 px at 32 px.
STEPS = (0.04, 0.04, 0.03, 0.03)
ROUNDS = 4


def _crop(
    x: torch.Tensor, sx: torch.Tensor, sy: torch.Tensor, tx: torch.Tensor, ty: torch.Tensor, out: int
) -> torch.Tensor:
    """(B, 1, H, W) → (B, 1, out, out): the region of width sx, height sy (fractions) centred at
    (tx, ty) (fractions from the centre) of each image, resampled bilinearly."""
    # The sampling grid in grid_sample's [-1, 1] coordinates (pixel centres, align_corners=False). A crop
    # has no rotation, so x depends on the column only and y on the row only: built by broadcasting, what
    # F.affine_grid computes as a (B, out*out, 3) x (3, 2) product, in a quarter of the time.
    c = (2 * torch.arange(out, dtype=torch.float32) + 1) / out - 1  # (out,)
    gx = (sx[:, None] * c + 2 * tx[:, None])[:, None, :].expand(-1, out, -1)  # (B, out rows, out cols)
    gy = (sy[:, None] * c + 2 * ty[:, None])[:, :, None].expand(-1, -1, out)
    grid = torch.stack([gx, gy], -1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


# The verification correlates *detail*: each thumbnail minus its Gaussian blur (sigma 1 px), in the
# central 60 % of the side. Plain NCC at 32 px is blind on homogeneous modalities: 358 of RetinaMNIST's
# 400 test images had a train/val look-alike at NCC >= 0.95 (a bright disc on black), and the disc edge
# still dominated the detail over the whole frame (median 0.89); in the centre the best look-alike
# reached 0.82 while real copies (BreastMNIST from BUSI) score ~0.97 (bench/pool_copies.py).
# The finest band (below a blur of sigma 0.5 px) is removed first: at 28 px that is where JPEG noise
# lives, and with it JPEG q70 copies of BreastMNIST scored below the threshold (recall 0.65 -> 0.97 with
# the band removed; crops, rotations and letterboxes gained too: EXPERIMENTS.md, "The band-pass detail").
DETAIL_SIGMA = 1.0
DETAIL_LO = 0.5
CENTRE = 0.6
# The same band-pass an octave lower (the thumbnail averaged to 16 px first) is a second chance for
# a pair the detail band rejects. A copy that lost its finest detail at 28 px (resized to half and back,
# JPEG q40, noise of +-12 grey levels) keeps this band: planted BreastMNIST copies found 0.02 / 0.42 / 0.62
# -> 0.99 / 1.00 / 1.00 (bench/pool_copies.py, "The band an octave lower"). Distinct images look more
# alike there (mirrored RetinaMNIST 0.948 against 0.855 in the detail band), so the band has its own
# threshold, calibrated the same way, and is off where the set's look-alikes come within MIRROR_GAP of
# MIRROR_COPY (calibrated_low): on fundus photos at 28 px it is off, and such copies stay unseen.
LOW_BAND = 2  # the low band's averaging factor (32 px thumbnails to 16 px)


def _blur_matrix(n: int, sigma: float) -> np.ndarray:
    """(n, n) float64: the 1-D Gaussian blur (sigma px, radius max(1, int(3 sigma)) px, replicate padding)
    of a side of n px, as a matrix acting on a column of pixels."""
    r = max(1, int(3 * sigma))
    g = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    g /= g.sum()
    m = np.zeros((n, n))
    for i in range(n):
        for t in range(-r, r + 1):
            m[i, min(max(i + t, 0), n - 1)] += g[t + r]
    return m


@functools.lru_cache(maxsize=8)
def _band(n: int, low: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The band-pass of ``_detail_unit`` on an (n, n) thumbnail, window = a1 X a1^T - a2 X a2^T with a1, a2
    (k, n), k the central window's side, as the two float32 matrices its two products use: [a1; a2]
    (2k, n), which filters the rows both ways, and [a1, -a2] (k, 2n), which filters the columns and subtracts.

    Every step is linear and separable per axis: the averaging to n / LOW_BAND px (``low``), the blur of
    sigma DETAIL_LO (B_lo), the detail band-pass B_lo - B_s B_lo that removes the finest band and the shape
    of sigma DETAIL_SIGMA (B_s), and the central window W (CENTRE). So a1 = W B_lo P and a2 = W B_s B_lo P,
    and the band-pass of a batch is two matrix products (BLAS): 5x faster on 2 cores than blurring with
    shifted sums (4,096 thumbnails, EXPERIMENTS.md), the same numbers to float32 rounding (tests/test_pool.py)."""
    pool = np.eye(n)
    if low:
        pool = np.kron(np.eye(n // LOW_BAND), np.full((1, LOW_BAND), 1 / LOW_BAND))
    side = len(pool)
    b_lo = _blur_matrix(side, DETAIL_LO) @ pool
    b_s = _blur_matrix(side, DETAIL_SIGMA) @ b_lo
    m = round(side * (1 - CENTRE) / 2)
    a1, a2 = b_lo[m : side - m], b_s[m : side - m]
    return torch.from_numpy(np.vstack([a1, a2])).float(), torch.from_numpy(np.hstack([a1, -a2])).float()


def _unit(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) → (B, D) mean-removed, unit-norm rows: dot products are NCCs (a flat image gives 0)."""
    x = x.flatten(1).float()
    x = x - x.mean(1, keepdim=True)
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-3)


def _detail_unit(x: torch.Tensor, low: bool = False) -> torch.Tensor:
    """(B, 1, n, n) → (B, k*k) unit rows of the band-pass detail (sigma DETAIL_LO minus sigma DETAIL_SIGMA)
    in the central window (CENTRE); ``low``: of the thumbnail averaged by LOW_BAND first, the band an octave
    lower. Computed as ``_band``'s matrix products: (B*n, n) @ (n, 2k), then (B*k, 2n) @ (2n, k)."""
    rows, cols = _band(x.shape[-1], low)
    k, n = cols.shape[0], rows.shape[1]
    y = x.reshape(-1, n, n) @ rows.T  # (B, n rows, 2k): each row filtered both ways
    # (B, k cols, 2 filters, n rows): the rows to filter, then one product with [a1, -a2] over (filter, row)
    y = y.view(-1, n, 2, k).permute(0, 3, 2, 1).reshape(-1, 2 * n)
    out = (y @ cols.T).view(-1, k, k)  # (B, k cols, k rows)
    return _unit(out.transpose(1, 2))


def as_tensor(thumbs: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(thumbs, dtype=np.float32))[:, None] / 255.0


def descriptors(thumbs: np.ndarray, size: int = 8) -> np.ndarray:
    """(N, 32, 32) uint8 → (N, V, size*size) float32 unit rows of each centred crop in ``VARIANTS``."""
    if not len(thumbs):
        return np.zeros((0, len(VARIANTS), size * size), np.float32)
    x = as_tensor(thumbs)
    n, zero = len(x), torch.zeros(len(x))
    out = [
        _unit(_crop(x, torch.full((n,), fx), torch.full((n,), fy), zero, zero, size)) for fx, fy in VARIANTS
    ]
    return torch.stack(out, 1).numpy()


def candidates(query: np.ndarray, pool: np.ndarray, k: int = K) -> np.ndarray:
    """(P, 2) distinct (query row, pool row) pairs: for each query and crop variant the ``k`` x
    len(VARIANTS) most correlated pool crops (faiss exact inner product over 8x8 descriptors)."""
    import faiss

    if not len(query) or not len(pool):
        return np.zeros((0, 2), np.int64)
    q, p = descriptors(query), descriptors(pool)
    v, d = q.shape[1], q.shape[2]
    index = faiss.IndexFlatIP(d)
    index.add(np.ascontiguousarray(p.reshape(-1, d)))
    _, found = index.search(np.ascontiguousarray(q.reshape(-1, d)), min(k * v, len(p) * v))
    rows = np.repeat(np.arange(len(q)), v * found.shape[1])
    pairs = np.stack([rows, found.reshape(-1) // v], 1)
    return np.unique(pairs[pairs[:, 1] >= 0], axis=0)


def _score(
    pair: tuple[torch.Tensor, torch.Tensor],
    refs: tuple[torch.Tensor, torch.Tensor],
    side: torch.Tensor,
    p: torch.Tensor,
    low: bool,
) -> torch.Tensor:
    """(n,) detail NCC of each pair with the crop ``p`` (n, 4: sx, sy, tx, ty) of side 0 (the query, vs
    the whole pool image) or side 1 (the pool image, vs the whole query)."""
    s = torch.empty(len(p))
    for k in (0, 1):
        m = side == k
        if m.any():
            sx, sy, tx, ty = p[m].unbind(1)
            crop = _crop(pair[k][m], sx, sy, tx, ty, out=pair[k].shape[-1])
            s[m] = (_detail_unit(crop, low) * refs[k][m]).sum(1)
    return s


def _centred_crops(x: torch.Tensor, low: bool) -> torch.Tensor:
    """(n, 1, 32, 32) → (n, len(SCALES)**2, D) detail-unit rows of every centred crop of the coarse grid;
    crop 0 is the whole image (scale 1, 1)."""
    n, zero = len(x), torch.zeros(len(x))
    rows = [
        _detail_unit(_crop(x, torch.full((n,), sx), torch.full((n,), sy), zero, zero, x.shape[-1]), low)
        for sx in SCALES
        for sy in SCALES
    ]
    return torch.stack(rows, 1)


GRID = [(sx, sy) for sx in SCALES for sy in SCALES]  # the coarse grid, in _centred_crops' order


def fine_search(
    a: torch.Tensor,
    b: torch.Tensor,
    best: torch.Tensor,
    side: torch.Tensor,
    params: torch.Tensor,
    low: bool,
    stop: float | None = None,
) -> torch.Tensor:
    """(n,) best detail NCC after a pattern search from the coarse optimum (``side``, ``params`` n x 4).
    ``stop``: a threshold; pairs more than LATE_GAIN below it after LATE_ROUND rounds cannot reach it and
    keep that score (a lower bound) without the finer rounds."""
    out = best.clone()
    rows = torch.arange(len(best))
    pair, refs = (a, b), (_detail_unit(b, low), _detail_unit(a, low))
    step = torch.tensor(STEPS)
    for r in range(ROUNDS):  # pattern search on the best side
        if stop is not None and r == LATE_ROUND:
            go = best >= stop - LATE_GAIN
            out[rows] = best
            rows, best, side, params = rows[go], best[go], side[go], params[go]
            pair, refs = (pair[0][go], pair[1][go]), (refs[0][go], refs[1][go])
        for d in range(4):
            for sign in (-1.0, 1.0):
                p = params.clone()
                p[:, d] += sign * step[d]
                p[:, :2] = p[:, :2].clamp(0.5, 1.0)
                s = _score(pair, refs, side, p, low)
                better = s > best
                best = torch.where(better, s, best)
                params[better] = p[better]
        step = step / 2
    out[rows] = best
    return out


# The last rounds refine to sub-pixel steps and raise a score little: after LATE_ROUND rounds, verified pairs
# gained at most 0.100 more (BUSI against BreastMNIST; 0.064 within BreastMNIST; low band 0.047), so a pair
# more than LATE_GAIN below the threshold then stops there (EXPERIMENTS.md, "Bounding the copy check").
LATE_ROUND = 2
LATE_GAIN = 0.15
# How far the pattern search raised a pair's coarse-grid score, at most, among the pairs that ended at
# NCC >= 0.85 on real and planted copies (bench/pool_copies.py, "the cascade's margin": 0.56 for BUSI
# against BreastMNIST; 0.62 at most on planted copies, a 95 % crop of a BreastMNIST image). A pair whose coarse
# score is more than FINE_GAIN below the threshold cannot become a copy and skips the fine search: 29 % of
# the candidates of BUSI against BreastMNIST do (tests/test_pool.py), few of a pool of look-alike crops.
FINE_GAIN = 0.75
# And each image's candidates are searched best coarse score first until FINE_REJECTS of them have failed
# the threshold (``verify``'s ``rejects``; a pair goes on while either of its images has fewer): a copy
# ranks near the top of its original's candidates even where look-alikes crowd the rest. On every verified
# pair of BreastMNIST, RetinaMNIST and BUSI against BreastMNIST at most 4 failed pairs ranked above it in
# the band that verified it (1,189 of 1,190 BUSI pairs: none; EXPERIMENTS.md, "Bounding the copy check"),
# where its plain rank reached 6. On a look-alike-rich set every one of an image's ~45 candidates passed
# FINE_GAIN; this bounds the searches at about 2 x FINE_REJECTS per image.
FINE_REJECTS = 6


# A sub-pixel search of more pairs than this shows a progress bar (about 10 s on 2 cores).
BAR_PAIRS = 10000


def progress_bar(total: int, what: str) -> tqdm:
    """A progress bar over ``total`` pairs, shown only for a search long enough to need one."""
    return tqdm(total=total, desc=f"copies: {what}", unit="pair", leave=False, disable=total < BAR_PAIRS)


# Above this many distinct query images the coarse stage makes their crops per chunk, not once (memory:
# 25.6 kB an image, len(GRID) crops of the central window's k*k floats).
CROPS_ONCE = 20000


@torch.no_grad()
def coarse(
    query: np.ndarray, pool: np.ndarray, pairs: np.ndarray, low: bool = False, chunk: int = 4096
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The coarse stage of ``verify``: (P,) best detail NCC over the grid of centred crops of either
    thumbnail (``SCALES`` per axis), and where it was reached: (P,) side (0: a crop of the query against the
    whole pool image, 1: the other way round) and (P,) index into GRID. Each image's crops are made once
    (the query side's for all pairs, the pool side's per chunk of pairs in pool-row order), so the pairs'
    scores are dot products: within a set whose images have ~45 candidates each, each image's crops are made
    about twice instead of once per pair it is in."""
    best = torch.zeros(len(pairs))
    side = torch.zeros(len(pairs), dtype=torch.long)
    g = torch.zeros(len(pairs), dtype=torch.long)
    if not len(pairs):
        return best, side, g
    uq, a = np.unique(pairs[:, 0], return_inverse=True)
    crops_q = _centred_crops(as_tensor(query[uq]), low) if len(uq) <= CROPS_ONCE else None
    order = np.argsort(pairs[:, 1], kind="stable")  # a chunk makes each of its pool images' crops once
    for lo in range(0, len(pairs), chunk):
        at = order[lo : lo + chunk]
        pr = pairs[at]
        up, b = np.unique(pr[:, 1], return_inverse=True)
        crops_p = _centred_crops(as_tensor(pool[up]), low)
        if crops_q is None:
            uq_c, a_c = np.unique(pr[:, 0], return_inverse=True)
            cq, ta = _centred_crops(as_tensor(query[uq_c]), low), torch.from_numpy(a_c.reshape(-1))
        else:
            cq, ta = crops_q, torch.from_numpy(a[at].reshape(-1))
        tb = torch.from_numpy(b.reshape(-1))
        s0 = torch.einsum("ngd,nd->ng", cq[ta], crops_p[tb, 0])
        s1 = torch.einsum("ngd,nd->ng", crops_p[tb], cq[ta, 0])
        top, arg = torch.cat([s0, s1], 1).max(1)
        t = torch.from_numpy(at)
        best[t], side[t], g[t] = top, arg // len(GRID), arg % len(GRID)
    return best, side, g


def row_ranks(pairs: np.ndarray, score: np.ndarray) -> np.ndarray:
    """(P, 2) each pair's rank (0 = best ``score``) among the pairs of its query row and of its pool row."""
    out = np.zeros((len(pairs), 2), np.int64)
    for col in (0, 1):
        order = np.lexsort((-score, pairs[:, col]))  # by row, best score first
        keys = pairs[order, col]
        first = np.r_[0, np.flatnonzero(np.diff(keys)) + 1]  # where each row's run starts
        out[order, col] = np.arange(len(keys)) - np.repeat(first, np.diff(np.r_[first, len(keys)]))
    return out


@torch.no_grad()
def verify(
    query: np.ndarray,
    pool: np.ndarray,
    pairs: np.ndarray,
    floor: float | None = None,
    chunk: int = 4096,
    low: bool = False,
    stop: float | None = None,
    rejects: int | None = None,
) -> np.ndarray:
    """(P,) detail NCC of each (query row, pool row) pair at its best alignment: a coarse grid of
    centred crops of either thumbnail (``coarse``), then a pattern search over width, height and centre
    (steps halved ``ROUNDS`` times) to sub-pixel alignment, which the detail needs. Pairs whose coarse
    score is below ``floor`` keep it (a lower bound) and skip the pattern search; with ``stop`` (the
    threshold), pairs that cannot reach it skip the last rounds (``fine_search``), and with ``rejects`` each
    image's pairs are searched best coarse score first, in waves of equal rank, a pair only while its query
    row or its pool row has had fewer than ``rejects`` pairs fail ``stop`` (the others keep their coarse
    scores). ``low``: in the band an octave lower (LOW_BAND)."""
    best, side, g = coarse(query, pool, pairs, low, chunk)
    go = np.ones(len(pairs), dtype=bool) if floor is None else best.numpy() >= floor
    grid = torch.tensor(GRID)
    if rejects is not None and stop is not None and go.any():
        wave = row_ranks(pairs, best.numpy()).min(1)
        waves = [np.flatnonzero(go & (wave == w)) for w in range(int(wave[go].max()) + 1)]
    else:
        waves, rejects = [np.flatnonzero(go)], None
    failed = [np.zeros(int(pairs[:, c].max()) + 1 if len(pairs) else 0, np.int64) for c in (0, 1)]
    bar = progress_bar(int(go.sum()), f"sub-pixel search of {len(pairs)} pairs{' (low band)' * low}")
    for rows in waves:
        if rejects is not None:  # pairs whose images both met enough look-alikes already stay coarse
            rows = rows[(failed[0][pairs[rows, 0]] < rejects) | (failed[1][pairs[rows, 1]] < rejects)]
        for lo in range(0, len(rows), chunk):
            at = torch.from_numpy(rows[lo : lo + chunk])
            pr = pairs[at.numpy()]
            params = torch.cat([grid[g[at]], torch.zeros(len(at), 2)], 1)
            best[at] = fine_search(
                as_tensor(query[pr[:, 0]]), as_tensor(pool[pr[:, 1]]), best[at], side[at], params, low, stop
            )
        if rejects is not None and len(rows):
            bad = rows[best[torch.from_numpy(rows)].numpy() < stop]
            np.add.at(failed[0], pairs[bad, 0], 1)
            np.add.at(failed[1], pairs[bad, 1], 1)
        bar.update(len(rows))
    bar.close()
    return best.numpy().astype(np.float32)
