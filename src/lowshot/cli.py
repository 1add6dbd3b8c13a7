"""The ``lowshot`` command: ``quickstart`` (pretrain → probe, beside an ImageNet probe → fine-tune → test
report), ``check`` (duplicates and leakage), ``show`` (test reports), ``predict`` (new images with a
trained run), ``evaluate`` (external validation), ``export`` (ONNX, timm), ``ensemble`` (seeds averaged),
``report`` (Markdown + figures: what a number is worth, aggregated over seeds/folds), ``compare`` (two
runs on the same test images) and ``curves`` (label efficiency).

This module parses the arguments and dispatches; each subcommand lives beside the code it runs and
prints: :mod:`.quickstart`, :mod:`.check`, :mod:`.report` (show, report, compare), :mod:`.predict`,
:mod:`.external` (evaluate), :mod:`.export`, :mod:`.ensemble`, :mod:`.fewshot` (curves).
The training jobs themselves are the entry scripts ``ssl/pretrain.py`` and ``finetune/train.py``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from . import report
from .check import check_command
from .ensemble import combine
from .errors import USER_ERRORS
from .export import export
from .external import evaluate_command
from .fewshot import curves
from .predict import predict_files
from .quickstart import quickstart
from .report import show
from .run_folder import read_run


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="lowshot",
        description=(__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser(
        "quickstart",
        help="pretrain → probe (beside an ImageNet probe) → fine-tune → test report; takes --config FILE and key=value",
    )
    sub.add_parser(
        "check",
        help="duplicates, leakage across splits, label conflicts; takes --config, key=value, --warn-only",
    )
    sub.add_parser(
        "evaluate",
        help="external validation: a finished run on another labelled set (RUN_DIR data.source=OTHER, --map O=M)",
    )
    s = sub.add_parser("show", help="print the test report of finished runs")
    s.add_argument("run_dirs", nargs="+", type=Path)
    e = sub.add_parser(
        "ensemble",
        help="average the probabilities of finished train runs (seeds of one recipe) into one ensemble run",
    )
    e.add_argument("run_dirs", nargs="+", type=Path)
    e.add_argument("--out", type=Path, required=True, help="the ensemble's run folder to write")
    e.add_argument(
        "--open-test",
        action="store_true",
        help="members trained with eval.test=false: open the test split once for the ensemble (lockbox ledger)",
    )
    c = sub.add_parser("curves", help="one label-efficiency figure from several fewshot/evaluate.py runs")
    c.add_argument("run_dirs", nargs="+", type=Path)
    c.add_argument("--out", type=Path, required=True, help="PNG to write")
    c.add_argument("--metric", default="auroc", choices=["auroc", "accuracy", "balanced_accuracy"])
    r = sub.add_parser(
        "report", help="Markdown report with figures of finished train runs (several: aggregated)"
    )
    r.add_argument("run_dirs", nargs="+", type=Path)
    r.add_argument("--out", type=Path, required=True, help="folder for report.md and its figures")
    k = sub.add_parser("compare", help="is run B better than run A on the same test images, by how much")
    k.add_argument("run_a", type=Path)
    k.add_argument("run_b", type=Path)
    k.add_argument("--bootstrap", type=int, default=2000)
    p = sub.add_parser(
        "predict", help="score new images (folders, files, CSV manifests) with a finished train run"
    )
    p.add_argument("run_dir", type=Path)
    p.add_argument(
        "inputs", nargs="+", help="image files, folders of images, or CSV manifests with a path column"
    )
    p.add_argument("--out", type=Path, help="CSV to write (default: RUN_DIR/predictions-<time>.csv)")
    p.add_argument(
        "--flag-percentile",
        type=float,
        default=95.0,
        help="flag images farther from the training data than this percentile of familiar images (default 95)",
    )
    p.add_argument("--batch-size", type=int, default=64)
    x = sub.add_parser(
        "export", help="a finished train run's model as ONNX or a timm safetensors + config.json"
    )
    x.add_argument("run_dir", type=Path)
    x.add_argument("--format", default="onnx", choices=["onnx", "timm"])
    x.add_argument("--out", type=Path, help="folder to write (default: RUN_DIR/export-FORMAT)")
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    try:
        if argv[:1] == ["quickstart"]:  # the rest are lowshot settings, parsed by lowshot.config
            quickstart(argv[1:])
        elif argv[:1] == ["check"]:
            raise SystemExit(check_command(argv[1:]))
        elif argv[:1] == ["evaluate"]:
            evaluate_command(argv[1:])
        else:
            args = parser.parse_args(argv)
            if args.cmd == "show":
                show(args.run_dirs)
            elif args.cmd == "export":
                where, parity = export(args.run_dir, args.format, args.out)
                print(
                    f"wrote {where}/ ({', '.join(sorted(p.name for p in where.iterdir()))}); parity with lowshot on "
                    f"{parity['inputs']}: max |logit diff| {parity['max_abs_logit_diff']:.2e}, "
                    f"max |prob diff| {parity['max_abs_prob_diff']:.2e}"
                )
            elif args.cmd == "ensemble":
                combine(args.run_dirs, args.out, shlex.join(["lowshot", *argv]), args.open_test)
                show([args.out])
            elif args.cmd == "predict":
                predict_files(args.run_dir, args.inputs, args.out, args.flag_percentile, args.batch_size)
            elif args.cmd in ("report", "compare"):
                try:
                    if args.cmd == "report":
                        print(f"wrote {report.write_report(args.run_dirs, args.out)}")
                    else:
                        a, b = read_run(args.run_a), read_run(args.run_b)
                        print(report.format_compare(report.compare(a, b, args.bootstrap)))
                except ValueError as err:  # runs that cannot be compared: other test images, no predictions
                    raise SystemExit(f"lowshot: error: {err}") from None
            else:
                curves(args.run_dirs, args.out, args.metric)
    except (*USER_ERRORS, FileNotFoundError) as err:
        raise SystemExit(f"lowshot: error: {err}") from None


if __name__ == "__main__":
    main()
