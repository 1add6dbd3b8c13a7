"""Does an exported ensemble, run by someone without lowshot, give the ensemble's numbers, and what does
averaging M members cost per image?

    python bench/ensemble_export.py ENSEMBLE_DIR [--out bench/results/ensemble_export/busi]

``ENSEMBLE_DIR`` is a ``lowshot ensemble`` folder whose members still hold their checkpoints. The script
runs ``lowshot export ENSEMBLE_DIR --format onnx`` and ``lowshot export MEMBER --format onnx`` (the first
member), then, with onnxruntime only and the exported ``preprocessing.json``: decodes every validation
and test file the ensemble stored, scores it, and compares the softmax of ``logits`` with the
ensemble's stored probabilities (max |difference|, test AUROC from the file-decoded scores against the
stored ones, decisions at the exported operating point). Time per image (batches of 64, CPU, 2 threads)
is compared as a ratio inside one run: the ensemble's graph against one member's. Writes
``export.md`` and ``export.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from sklearn.metrics import roc_auc_score

from lowshot import inference
from lowshot import operating_point as op
from lowshot.ensemble import member_dirs


def export(run_dir: Path, out: Path) -> dict:
    cmd = [sys.executable, "-m", "lowshot.cli", "export", str(run_dir), "--format", "onnx", "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads((out / "parity.json").read_text())


def scores(folder: Path, x: np.ndarray) -> tuple[np.ndarray, float]:
    """(N, K) probabilities from the exported model.onnx, and seconds per image (best of 3 passes)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(folder / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        logits = np.concatenate(
            [sess.run(["logits"], {"image": x[i : i + 64]})[0] for i in range(0, len(x), 64)]
        )
        best = min(best, (time.perf_counter() - t) / len(x))
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True), best


def auroc(y: np.ndarray, p: np.ndarray) -> float:
    """Binary, or one-vs-rest macro as lowshot's reports give it."""
    return float(roc_auc_score(y, p if p.shape[1] > 2 else p[:, 1], multi_class="ovr"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("ensemble", type=Path)
    ap.add_argument("--out", type=Path, default=Path("bench/results/ensemble_export/busi"))
    args = ap.parse_args()
    ens = args.ensemble
    stored = np.load(ens / "predictions.npz")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        parity = export(ens, Path(tmp) / "ens")
        export_s = time.perf_counter() - t0
        export(member_dirs(ens)[0], Path(tmp) / "one")
        prep = json.loads((Path(tmp) / "ens" / inference.PREPROCESSING).read_text())
        point = op.load_point(Path(tmp) / "ens")
        rows, times = [], {}
        for split in ("val", "test"):
            files = [Path(f) for f in stored[f"{split}_path"]]
            images, _, bad = inference.read_images(files, prep)
            assert not bad, bad
            x = inference.to_input(images, prep).numpy()
            prob, times["ensemble"] = scores(Path(tmp) / "ens", x)
            _, times["one member"] = scores(Path(tmp) / "one", x)
            want, y = stored[f"{split}_prob"], stored[f"{split}_y"].astype(int)
            rows.append(
                {
                    "split": split,
                    "n": len(files),
                    "max_abs_prob_diff": float(np.abs(prob - want).max()),
                    "auroc_onnx_from_files": auroc(y, prob),
                    "auroc_stored": auroc(y, want),
                    "decisions_differing": int(
                        (op.decide(prob, point["weights"]) != op.decide(want, point["weights"])).sum()
                    ),
                }
            )
    members = len(member_dirs(ens))
    record = {
        "ensemble": ens.name,
        "members": members,
        "export_seconds": round(export_s, 1),
        "parity_json": {k: v for k, v in parity.items() if k != "members"},  # paths of this machine
        "rows": rows,
        "ms_per_image": {k: round(1000 * v, 2) for k, v in times.items()},
        "ratio": round(times["ensemble"] / times["one member"], 2),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "export.json").write_text(json.dumps(record, indent=2))
    lines = [
        f"# The ensemble exported to ONNX ({members} members), scored from the files by onnxruntime",
        "",
        f"`python bench/ensemble_export.py {ens.name}`: `lowshot export --format onnx` took {export_s:.0f} s.",
        "",
        "| split | images | max abs(prob − stored) | AUROC, ONNX from files | AUROC stored | decisions differing |",
        "|---|---|---|---|---|---|",
        *(
            f"| {r['split']} | {r['n']} | {r['max_abs_prob_diff']:.1e} | {r['auroc_onnx_from_files']:.4f} | "
            f"{r['auroc_stored']:.4f} | {r['decisions_differing']} |"
            for r in rows
        ),
        "",
        f"Time per image (CPU, 2 threads, batches of 64, test split): ensemble {record['ms_per_image']['ensemble']} ms, "
        f"one member {record['ms_per_image']['one member']} ms: {record['ratio']}× for {members} members.",
        "",
    ]
    (args.out / "export.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
