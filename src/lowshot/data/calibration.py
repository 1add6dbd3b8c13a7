"""The copy search's verdicts: thresholds calibrated on each set against its own mirrored images (never
copies, same look), and the decision on candidate pairs at them (the detail band, then an octave lower).

At 32 px two different images that look the same (a homogeneous modality at low resolution) can
correlate as highly as a copy, so the threshold is calibrated on each set (``mirror_levels``): the best
score of its images against left-right mirrored images of the set, plus a margin. Where the set's
look-alikes come within MIRROR_GAP of it the threshold rises, and the run says so. Candidates and
scores are :mod:`.copies`'.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch

from .copies import (
    FINE_GAIN,
    FINE_REJECTS,
    GRID,
    K,
    as_tensor,
    candidates,
    coarse,
    fine_search,
    progress_bar,
    verify,
)

log = logging.getLogger(__name__)

# The look-alike level of a set, measured on the set itself: each query image against the left-right
# *mirrored* pool images, which are never its copies yet have the same modality, anatomy, contrast and
# detail statistics. A pair must beat the best mirrored look-alike by MIRROR_GAP. Measured
# (bench/pool_copies.py, "Look-alikes measured on mirrored images"): on RetinaMNIST the best mirrored
# look-alike (0.855) came within 0.028 of the best real one (0.883), so 0.04; at half resolution (a
# modality with less detail, like chest X-rays at 28 px) 82 distinct RetinaMNIST pairs pass 0.88, the
# mirrored ones reach 0.946, and the calibrated threshold 0.96 passes none. Scores >= MIRROR_COPY are
# mirrored copies (a set that holds flipped images), not look-alikes; the threshold never rises past it.
MIRROR_GAP = 0.04
MIRROR_COPY = 0.96
# A mirrored image is never a re-cropped copy, so the sub-pixel search raises its coarse score less than
# a copy's (FINE_GAIN): at most 0.35 among mirrored pairs ending >= 0.8 on the shared sets and their
# half-res and JPEG versions (bench/pool_copies.py, the calibration table). Pairs more than LOOKALIKE_GAIN
# below the level that could raise the threshold skip the search.
LOOKALIKE_GAIN = 0.4
# The mirror is left-right only. Up-down as well (the higher level of the two) was tried and not adopted
# (EXPERIMENTS.md, "The verification as matrix products; the up-down mirror again"): it stops a distinct
# JPEG q40 RetinaMNIST pair, but a fundus photo flipped up-down looks like itself (the vessel arcades above
# and below the disc), so where the pool holds a copy of a query, the copy's mirror raises the level: planted
# copies of RetinaMNIST test images calibrated to 0.89-0.96 instead of 0.89-0.90, and their recall fell
# (rotated 3 degrees: 0.995 -> 0.620).


class Cut(NamedTuple):
    """Where a pair becomes a verified copy: detail NCC >= ``detail`` in the detail band, or >= ``low`` in
    the band an octave lower (LOW_BAND; None: off on this set, whose look-alikes reach copies' scores there)."""

    detail: float
    low: float | None = None

    def record(self) -> dict[str, float | None]:
        """The thresholds used, for results.json and reports."""
        return {"verified_at_ncc": self.detail, "verified_at_ncc_low": self.low}


# The calibration searches its pairs in chunks of this many, best coarse score first (``_level``).
LEVEL_CHUNK = 1024


def _fine_at(
    query: np.ndarray, pool: np.ndarray, pairs: np.ndarray, stage: tuple, rows: np.ndarray, low: bool
) -> np.ndarray:
    """The sub-pixel search (``fine_search``) of ``pairs[rows]`` from their coarse optimum ``stage`` (``coarse``'s
    three tensors); (len(rows),) float32."""
    best, side, g = stage
    if not len(rows):
        return np.zeros(0, np.float32)
    at = torch.from_numpy(rows)
    pr = pairs[rows]
    params = torch.cat([torch.tensor(GRID)[g[at]], torch.zeros(len(rows), 2)], 1)
    with torch.no_grad():
        s = fine_search(
            as_tensor(query[pr[:, 0]]), as_tensor(pool[pr[:, 1]]), best[at].clone(), side[at], params, low
        )
    return s.numpy().astype(np.float32)


def _level(
    query: np.ndarray,
    pool: np.ndarray,
    pairs: np.ndarray,
    floor: float,
    saturated: Callable[[float], bool],
    low: bool,
    counts: Callable[[np.ndarray, np.ndarray, bool], np.ndarray],
) -> tuple[float, np.ndarray, tuple]:
    """The highest verified score among ``pairs`` that ``counts(rows, scores, search)`` admits (``search``:
    it may run a search to tell; False for the pairs left as lower bounds), searched best coarse
    score first: a chunk whose best coarse score is below ``floor`` or more than LOOKALIKE_GAIN below the
    level found so far cannot raise it (its pairs keep their coarse scores, lower bounds, as ``verify``
    with ``floor`` does), and the search stops once ``saturated(level)``, where a higher level changes no
    threshold. So a look-alike-rich set, whose mirrored pairs all score high, costs a few chunks instead of
    every pair's sub-pixel search (issue 38: 20 min on 6,000 chest X-rays). Returns (level, (P,) fine scores,
    NaN where not searched, the coarse stage)."""
    stage = coarse(query, pool, pairs, low)
    c = stage[0].numpy()
    fine = np.full(len(pairs), np.nan, np.float32)
    order = np.argsort(-c, kind="stable")
    level = -1.0
    bar = progress_bar(len(order), f"look-alike level on mirrored images{' (low band)' * low}")
    for lo in range(0, len(order), LEVEL_CHUNK):
        at = order[lo : lo + LEVEL_CHUNK]
        if saturated(level):
            break
        if c[at[0]] < max(floor, level - LOOKALIKE_GAIN):
            rest = order[lo:]
            rest = rest[counts(rest, c[rest], False)]
            level = max(level, float(c[rest].max())) if len(rest) else level  # lower bounds, as verify's
            break
        fine[at] = _fine_at(query, pool, pairs, stage, at, low)
        bar.update(len(at))  # pairs searched; the rest are left as lower bounds
        ok = counts(at, fine[at], True)
        if ok.any():
            level = max(level, float(fine[at][ok].max()))
    bar.close()
    return level, fine, stage


def mirror_levels(
    query: np.ndarray, pool: np.ndarray, threshold: float, own: np.ndarray | None = None
) -> tuple[float, float]:
    """The best detail NCC of any query thumbnail with a mirrored pool thumbnail, in the detail band and in
    the low band (-1 where there is none; a lower bound where it stays below ``threshold - MIRROR_GAP``,
    where it changes nothing, or where it passed the level at which the threshold stops rising). Pairs whose
    detail-band score reaches MIRROR_COPY are mirrored copies (a set that holds flipped images) and count in
    neither band. ``own`` (one per query): the pool row that is the query itself (-1: none), which is not
    compared with its own mirror. Candidates as for copies, verified in both bands best first (``_level``)."""
    if not len(query) or not len(pool):
        return -1.0, -1.0
    flipped = np.ascontiguousarray(pool[:, :, ::-1])
    pairs = candidates(query, flipped)
    if own is not None:
        pairs = pairs[pairs[:, 1] != own[pairs[:, 0]]]
    floor = threshold - MIRROR_GAP - LOOKALIKE_GAIN
    top = max(threshold, MIRROR_COPY)
    level, detail, stage = _level(
        query,
        flipped,
        pairs,
        floor,
        lambda v: calibrated(threshold, v) >= top,
        False,
        lambda r, s, _: s < MIRROR_COPY,
    )
    coarse_detail = stage[0].numpy()

    def no_copy(rows: np.ndarray, _: np.ndarray, search: bool) -> np.ndarray:
        # a mirrored copy (detail >= MIRROR_COPY) counts in no band; a pair below the detail floor keeps its
        # coarse score there, as verify's cascade does; the others' detail search is made where still missing
        # (not for lower bounds: a pair left unsearched there does not count, which changes no threshold)
        unknown = np.isnan(detail[rows]) & (coarse_detail[rows] >= floor)
        if search:
            detail[rows[unknown]] = _fine_at(query, flipped, pairs, stage, rows[unknown], False)
            unknown[:] = False
        d = np.where(np.isnan(detail[rows]), coarse_detail[rows], detail[rows])
        return (d < MIRROR_COPY) & ~unknown

    level_low, _, _ = _level(
        query, flipped, pairs, floor, lambda v: calibrated_low(threshold, v) is None, True, no_copy
    )
    return level, level_low


def calibrated(threshold: float, level: float) -> float:
    """``data.duplicate_ncc``, raised to the set's mirrored look-alike level + MIRROR_GAP (at most
    MIRROR_COPY): the threshold the verification uses on that set."""
    return round(min(max(threshold, level + MIRROR_GAP), max(threshold, MIRROR_COPY)), 4)


def calibrated_low(threshold: float, level: float) -> float | None:
    """The low band's threshold: ``data.duplicate_ncc`` or the set's low-band look-alike level +
    MIRROR_GAP, whichever is higher; None (the band is off) where that passes MIRROR_COPY, since copies
    with less detail score ~0.96-0.99 there (LOW_BAND) and look-alikes that close cannot be told apart."""
    t = round(max(threshold, level + MIRROR_GAP), 4)
    return t if t <= MIRROR_COPY else None


def calibrate(
    query: np.ndarray, pool: np.ndarray, threshold: float, what: str, own: np.ndarray | None = None
) -> tuple[tuple[float, float], Cut]:
    """((detail, low) look-alike levels, the Cut to use): ``mirror_levels``, ``calibrated`` and
    ``calibrated_low``, with a warning naming ``what`` (the set, or the two sources) where the detail
    threshold rises, since the user's pairs change, and a note where the low band is off."""
    level, level_low = mirror_levels(query, pool, threshold, own)
    cut = Cut(calibrated(threshold, level), calibrated_low(threshold, level_low))
    if cut.detail > threshold:
        log.warning(
            "%s: mirrored images (never copies) reach a detail NCC of %.3f, so distinct images look alike "
            "at this resolution: pairs are verified at %.3f here instead of data.duplicate_ncc=%.2f (look at "
            "the sheet of `lowshot check`)",
            what,
            level,
            cut.detail,
            threshold,
        )
    if cut.low is None:
        log.info(
            "%s: an octave below the detail, mirrored images reach %.3f, so copies that lost their detail "
            "(downsized, heavy JPEG, noise) cannot be told from look-alikes here and are not searched for",
            what,
            level_low,
        )
    return (level, level_low), cut


def judge_pairs(
    query: np.ndarray, pool: np.ndarray, pairs: np.ndarray, cut: Cut, cascade: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each (query row, pool row) pair verified against ``cut``: (P,) bool verified, (P,) detail-band NCC,
    (P,) low-band NCC (NaN where not needed: the detail band passed, or the low band is off). With
    ``cascade`` pairs too far below the detail threshold after the coarse grid (FINE_GAIN), or of images that
    met FINE_REJECTS look-alikes among better-ranked candidates, skip that band's sub-pixel search, and those
    too far below it after LATE_ROUND rounds skip the rest; their scores are lower bounds. Without it (hash and embedding candidates, a few per image) every pair is searched."""
    rejects = FINE_REJECTS if cascade else None
    floor, stop = (cut.detail - FINE_GAIN, cut.detail) if cascade else (None, None)
    detail = verify(query, pool, pairs, floor=floor, stop=stop, rejects=rejects)
    ok = detail >= cut.detail
    low = np.full(len(pairs), np.nan, np.float32)
    rest = np.flatnonzero(~ok)
    if cut.low is not None and len(rest):
        # no floor here: the sub-pixel search raised a low-band score by up to 0.88 (a planted 80 % crop
        # of BreastMNIST against a real copy at another crop), more than FINE_GAIN; the look-alike count
        # applies (FINE_REJECTS); at 100,000 pool images the whole low band adds ~4 s (bench/pool_copies.py)
        low[rest] = verify(
            query, pool, pairs[rest], low=True, stop=cut.low if cascade else None, rejects=rejects
        )
        ok[rest] = low[rest] >= cut.low
    return ok, detail, low


def rounded(v: float) -> float | None:
    """A low-band score for the record: None where it was not needed (NaN), else 4 decimals."""
    return None if np.isnan(v) else round(v, 4)


def find_copies(
    query: np.ndarray, pool: np.ndarray, cut: Cut, k: int = K
) -> list[tuple[int, int, float, float | None]]:
    """(query row, pool row, detail NCC, low-band NCC (``rounded``) or None) for every verified copy at
    ``cut`` (already calibrated), highest detail NCC first."""
    pairs = candidates(query, pool, k)
    ok, detail, low = judge_pairs(query, pool, pairs, cut)
    keep = np.flatnonzero(ok)
    order = keep[np.argsort(-detail[keep], kind="stable")]
    return [(int(pairs[i, 0]), int(pairs[i, 1]), float(detail[i]), rounded(float(low[i]))) for i in order]
