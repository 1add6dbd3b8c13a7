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
found in a second source (:func:`lowshot.data.guards.against`). :func:`check_command` is ``lowshot check``.
The guards the training scripts run, and the copy search behind them, are :mod:`lowshot.data.guards`.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from accelerate import Accelerator
from PIL import Image

from .config import DataConfig, parse_args
from .data import Store, decode_image, groups_across_splits, load_store, source_path
from .data.calibration import judge_pairs, rounded
from .data.dicom import is_dicom
from .data.duplicates import VERIFIED, store_thumbnails, verified_pairs
from .data.guards import against
from .data.pool import Pool, load_pool
from .models import backbone_for, cached_embeddings

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
    gray, RGB, RGBA, P = palette, 1 = 1-bit), "DICOM" for DICOM files (issue 41: PIL cannot open them),
    the array dtype for an npz; read from headers only."""
    if source_path(cfg).suffix == ".npz":
        with np.load(source_path(cfg), allow_pickle=False) as z:
            return {f"{z['train_images'].dtype} array": len(store.paths)}
    modes: Counter[str] = Counter()
    for p in store.paths:
        if is_dicom(Path(p)):
            modes["DICOM"] += 1
            continue
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
        ok, ncc, low = judge_pairs(thumbs, thumbs, ij, cut, cascade=False)
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


def check_command(argv: list[str]) -> int:
    """``lowshot check [--config F] [key=value ...] [--warn-only]``: exit 1 on leakage or label conflicts
    (unless check.leakage is warn or drop)."""
    if {"-h", "--help"} & set(argv):  # the command's own flag first, then every setting (issue 41)
        print("usage: lowshot check [--config FILE.yaml] [key=value ...] [--warn-only]\n")
        print("  --warn-only   exit 0 even when leakage or label conflicts are found (check.leakage=warn)\n")
    cfg, _ = parse_args(argv)
    store = load_store(cfg.data)
    feats = None
    if (
        cfg.check.embeddings
    ):  # the configured backbone (model.name, model.weights), through the embedding cache
        backbone, in_chans, norm = backbone_for(cfg, store.grayscale)
        feats = cached_embeddings(cfg, store, backbone, in_chans, norm, Accelerator(cpu=False))[0].numpy()
    report, images = check_store(store, cfg.data, feats, cfg.check.cosine)
    out = Path(cfg.out_dir) / (cfg.name or f"check-{store.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    sheet = plot_pairs(report, images, out / "pairs.png", cfg.check.sheet_pairs)
    print(summary(report))
    for r in ranked(report)[:10]:
        print(
            f"  {r['kind']:<9} {closeness(r):>22}  {r['a']['path']} [{r['a']['label']}, {r['a']['split']}]  ~  "
            f"{r['b']['path']} [{r['b']['label']}, {r['b']['split']}]  {flags(r)}"
        )
    print(f"report: {out / 'report.json'}" + (f", sheet: {sheet}" if sheet else ""))
    bad = report["cross_split_pairs"] or report["cross_class_pairs"] or report["groups_across_splits"]
    if cfg.check.against:  # copies of any of this source's images in a second source
        other = load_pool([cfg.check.against], cfg.data, channels=store.images.shape[-1])
        report["against"] = found = against(other, store, cfg)
        (out / "report.json").write_text(json.dumps(report, indent=1))
        sheet = plot_against(found, other, store, out / "against.png", cfg.check.sheet_pairs)
        print(
            f"  against {cfg.check.against} ({found['images']} images): {found['other_images_with_a_copy']} are "
            f"copies of {sum(found['images_with_a_copy'].values())} images here {found['images_with_a_copy']} "
            f"{found['by_kind']}" + (f"; sheet: {sheet}" if sheet else "")
        )
        bad = bad or found["pairs"]
    if bad and cfg.check.leakage == "error":
        print(
            "lowshot check: leakage across splits or sources, or label conflicts found (--warn-only to exit 0)",
            file=sys.stderr,
        )
        return 1
    return 0
