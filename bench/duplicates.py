"""What `lowshot check` calls a duplicate on each shared set, before and after verification, and what it
finds between two sources.

    LOWSHOT_DATA_ROOT=../shared/data python bench/duplicates.py

For BreastMNIST (official split), BUSI (lowshot's grouped split) and RetinaMNIST (official split): the
hash candidates (dHash within data.duplicate_bits, what the check reported before verification) against
the verified pairs (exact, near = hash candidate with detail NCC >= data.duplicate_ncc, copy = found by
the crop-tolerant search), the look-alikes the verification rejected, and pairs across splits and
classes counted on each; with the time (uncached) and, as a consistency check a person can read,
how many verified pairs join two images of the same label and split (copies of one scan should). Then
`check.against`: BUSI against BreastMNIST (the same scans, other crop and size). Sheets: RetinaMNIST's
verified pairs and strongest look-alikes (retinamnist_pairs.png), the weakest accepted BUSI ~
BreastMNIST pairs (breastmnist_vs_busi.png). Writes bench/results/duplicates/{table.md,table.json}.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from lowshot.check import check_store
from lowshot.config import parse_args
from lowshot.data import calibration, duplicate_pairs, load_store
from lowshot.data.duplicates import VERIFIED
from lowshot.data.guards import against
from lowshot.data.pool import load_pool

OUT = Path(__file__).resolve().parent / "results" / "duplicates"
SETS = {"breastmnist": ["data.source=breastmnist.npz"], "busi": ["--config", "configs/busi.yaml"]}
SETS["retinamnist"] = ["data.source=retinamnist.npz"]


def sheet(rows: list[tuple[np.ndarray, np.ndarray, str]], path: Path, px: int = 112) -> None:
    w, h = 2 * px + 10, px + 14
    im = Image.new("RGB", (4 * w, h * ((len(rows) + 3) // 4)), "white")
    d = ImageDraw.Draw(im)
    for k, (a, b, cap) in enumerate(rows):
        x, y = (k % 4) * w, (k // 4) * h
        for j, t in enumerate((a, b)):
            t = t[..., 0] if t.shape[-1] == 1 else t
            im.paste(
                Image.fromarray(t).convert("RGB").resize((px, px), Image.Resampling.NEAREST),
                (x + j * (px + 2), y),
            )
        d.text((x, y + px + 1), cap, fill="black")
    im.save(path)


def main() -> None:
    cache = tempfile.mkdtemp(prefix="lowshot-dups-")  # uncached: the time is the first run's
    root = os.environ.get("LOWSHOT_DATA_ROOT", "../shared/data")
    res: dict[str, dict] = {}
    OUT.mkdir(parents=True, exist_ok=True)
    for name, args in SETS.items():
        cfg, _ = parse_args([*args, f"data.root={root}", f"data.cache_dir={cache}"])
        store = load_store(cfg.data)
        hashed, _ = duplicate_pairs(*store.fingerprints(), cfg.data.duplicate_bits)
        shutil.rmtree(Path(cache) / "duplicates")  # load_store verified and cached them: time it afresh
        t0 = time.perf_counter()
        report, images = check_store(store, cfg.data)
        took = time.perf_counter() - t0
        ok = [r for r in report["pairs"] if r["kind"] in VERIFIED]
        res[name] = {
            "images": report["images"],
            "hash_pairs": len(hashed),
            "hash_across_splits": sum(store.split[i] != store.split[j] for i, j, _, _ in hashed),
            "hash_across_classes": sum(store.labels[i] != store.labels[j] for i, j, _, _ in hashed),
            **{k: report[k] for k in ("exact_pairs", "near_pairs", "copy_pairs", "lookalike_pairs")},
            "cross_split_pairs": report["cross_split_pairs"],
            "cross_class_pairs": report["cross_class_pairs"],
            "verified_same_label_and_split": sum(not r["cross_class"] and not r["cross_split"] for r in ok),
            "hash_blind_images": report["hash_blind_images"],
            "verified_at_ncc": report["verified_at_ncc"],
            "verified_at_ncc_low": report["verified_at_ncc_low"],
            # verified pairs the detail band rejected and the band an octave lower accepted
            "verified_by_low_band": sum(r["ncc_low"] is not None for r in ok),
            "seconds": took,
        }
        low_only = sorted((r for r in ok if r["ncc_low"] is not None), key=lambda r: r["ncc_low"])
        if low_only:
            sheet(
                [
                    (
                        images[r["a"]["index"]],
                        images[r["b"]["index"]],
                        f"{r['ncc']:.2f}/{r['ncc_low']:.3f}{' LABELS' if r['cross_class'] else ''}",
                    )
                    for r in low_only[:16]
                ],
                OUT / f"{name}_low_band.png",
            )
        if name == "retinamnist":
            look = sorted((r for r in report["pairs"] if r["kind"] == "lookalike"), key=lambda r: -r["ncc"])
            rows = ok + look[:8]
            sheet(
                [
                    (images[r["a"]["index"]], images[r["b"]["index"]], f"{r['kind']} {r['ncc'] or 1:.3f}")
                    for r in rows
                ],
                OUT / "retinamnist_pairs.png",
            )
        if name == "breastmnist":
            other = load_pool(["busi"], cfg.data, channels=store.images.shape[-1])
            t0 = time.perf_counter()
            found = against(other, store, cfg)
            res["busi against breastmnist"] = {
                "seconds": time.perf_counter() - t0,
                **{
                    k: found[k]
                    for k in ("images", "by_kind", "images_with_a_copy", "other_images_with_a_copy")
                },
            }
            index = {str(p): i for i, p in enumerate(store.paths)}
            weakest = sorted(found["pairs"], key=lambda p: p["score"])[:16]
            sheet(
                [
                    (
                        images[index[p["image"]]],
                        other.images[p["pool_row"]],
                        f"{p['kind']} {p['score']:.3f}"
                        + (f"/{p['score_low']:.3f}" if p["score_low"] else ""),
                    )
                    for p in weakest
                ],
                OUT / "breastmnist_vs_busi.png",
            )
    (OUT / "table.json").write_text(json.dumps(res, indent=1, default=int))
    lines = [
        "| set | images | hash candidates | across splits | across classes | verified: exact · near · copy | "
        "look-alikes (rejected) | verified across splits | verified across classes | verified same label and split | "
        "of them by the low band | thresholds used (detail · low) | s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in SETS:
        r = res[name]
        lines.append(
            f"| {name} | {r['images']} | {r['hash_pairs']} | {r['hash_across_splits']} | {r['hash_across_classes']} | "
            f"{r['exact_pairs']} · {r['near_pairs']} · {r['copy_pairs']} | {r['lookalike_pairs']} | "
            f"{r['cross_split_pairs']} | {r['cross_class_pairs']} | {r['verified_same_label_and_split']} | "
            f"{r['verified_by_low_band']} | {r['verified_at_ncc']} · {r['verified_at_ncc_low'] or 'off'} | "
            f"{r['seconds']:.1f} |"
        )
    a = res["busi against breastmnist"]
    lines += [
        "",
        f"`check.against=busi` on BreastMNIST: {a['other_images_with_a_copy']} of {a['images']} BUSI images are copies of "
        f"{sum(a['images_with_a_copy'].values())} of 780 BreastMNIST images {a['images_with_a_copy']} {a['by_kind']}, "
        f"{a['seconds']:.1f} s. Sheet of the 16 weakest accepted pairs: breastmnist_vs_busi.png.",
        "",
        "Hash candidates: dHash within data.duplicate_bits (4), exact pairs included, images the hash cannot tell "
        "apart left out (what `lowshot check` counted before verification). Verified: detail NCC >= "
        "the threshold used: data.duplicate_ncc (0.88), raised to the set's best score against its own mirrored "
        f"images + {calibration.MIRROR_GAP} where that is higher (calibration.calibrate; the time includes that calibration), "
        "or, where that fails, the NCC an octave lower >= that band's threshold, calibrated the same way (off where "
        f"it would pass {calibration.MIRROR_COPY}). Sheets of the pairs only the low band accepts, weakest first "
        "(detail/low NCC): SET_low_band.png. "
        "BUSI is split by lowshot with duplicate groups, so its verified pairs never cross splits. Sheet of "
        "RetinaMNIST's verified pairs and strongest look-alikes: retinamnist_pairs.png.",
    ]
    (OUT / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
