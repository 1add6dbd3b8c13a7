"""The ``lowshot`` command: ``quickstart`` (pretrain → probe, beside an ImageNet probe → fine-tune → test
report), ``check`` (duplicates and leakage), ``show`` (test reports), ``predict`` (new images with a
trained run), ``evaluate`` (external validation), ``export`` (ONNX, timm), ``report`` (Markdown + figures:
what a number is worth, aggregated over seeds/folds), ``compare`` (two runs on the same test images) and
``curves`` (label efficiency).

The training jobs themselves are the entry scripts ``ssl/pretrain.py`` and ``finetune/train.py``,
run through ``accelerate launch``; this command chains them for the Quickstart.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import TracebackType

import numpy as np

from .config import ConfigError, load_yaml, parse_args
from .data import IMAGE_SUFFIXES, DataError
from .data.cache import write_atomic
from .evaluation import format_point, format_report
from .guard import DivergenceError
from .models import WeightsError

USER_ERRORS = (ConfigError, DataError, WeightsError, DivergenceError)


def user_errors() -> None:
    """Show bad input (config, data, weights) as one clear line instead of a traceback."""
    previous = sys.excepthook

    def hook(kind: type[BaseException], err: BaseException, tb: TracebackType | None) -> None:
        if issubclass(kind, USER_ERRORS):
            print(f"lowshot: error: {err}", file=sys.stderr)
        else:
            previous(kind, err, tb)

    sys.excepthook = hook


def repo_root() -> Path:
    """The checkout holding ssl/, finetune/ (an editable install lives in its src/; else the cwd)."""
    for cand in (Path(__file__).resolve().parents[2], Path.cwd()):
        if (cand / "ssl" / "pretrain.py").is_file():
            return cand
    raise SystemExit(
        "lowshot: error: cannot find ssl/pretrain.py; run from the lowshot checkout (pip install -e .)"
    )


def _launch_flags() -> list[str]:
    import torch

    # Explicit launcher settings: no accelerate config file is needed, and none is half-applied.
    # "--mixed_precision no" leaves the choice to lowshot's mixed_precision=auto (bf16 on GPU).
    n = torch.cuda.device_count()
    flags = ["--num_machines", "1", "--dynamo_backend", "no", "--mixed_precision", "no"]
    flags += ["--multi_gpu", "--num_processes", str(n)] if n > 1 else ["--num_processes", "1"]
    # Without --cpu, accelerate launch pins a CPU run to OMP_NUM_THREADS=1: ~1.7x slower on 2 cores.
    if n == 0:
        flags.append("--cpu")
    return flags


def _launch(script: str, args: list[str]) -> None:
    flags = _launch_flags()
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *flags, str(repo_root() / script), *args]
    print("\n$ accelerate launch " + " ".join([*flags, script, *args]), flush=True)
    done = subprocess.run(cmd)
    if done.returncode != 0:
        raise SystemExit(f"lowshot: {script} failed (exit {done.returncode}); see the messages above")


def quickstart(extra: list[str]) -> Path:
    """Pretrain with SimCLR, probe and fine-tune that backbone, probe ImageNet Lite0 beside it, print the
    test reports and which start validation favours (``choice.json``), write a report.

    ``extra`` overrides apply to all four jobs (e.g. ``data.source=busi``, ``--config FILE``). Identical
    images across the source's own split are dropped from train/val (check.leakage=drop; BreastMNIST's
    official split holds one), and copies of the val/test images in an ``ssl.unlabelled`` pool are left
    out of pretraining (check.pool_leakage=drop; a user's unlabelled export usually holds the labelled
    images too), each recorded in results.json, unless ``extra`` says otherwise."""
    cfg, _ = parse_args(extra)  # fail early on a bad override, before any training
    group = cfg.name or f"quickstart-{time.strftime('%Y%m%d-%H%M%S')}"
    base = Path(cfg.out_dir) / group
    ckpt = base / "pretrain" / "checkpoint"
    told = any(a.lstrip("-").startswith("check.leakage") or a == "--warn-only" for a in extra)
    told_pool = any(a.lstrip("-").startswith("check.pool_leakage") for a in extra)
    common = [
        *([] if told else ["check.leakage=drop"]),
        *([] if told_pool else ["check.pool_leakage=drop"]),
        *extra,
        f"track.group={group}",
    ]
    _launch("ssl/pretrain.py", [*common, f"name={group}/pretrain"])
    _launch("finetune/train.py", ["--probe", *common, f"name={group}/probe", f"model.weights={ckpt}"])
    # The question the user has: does pretraining beat ImageNet here? The same probe on ImageNet
    # EfficientNet-Lite0 (PyPI weights, offline), at >= 64 px: trained at 224 px, those weights lose
    # 0.08 test AUROC on BreastMNIST at 32 px against 64 px (docs/pretraining.md), a strawman below that.
    size = max(cfg.data.size, 64)
    imagenet = ["model.name=tf_efficientnet_lite0", "model.weights=efficientnet-lite0", f"data.size={size}"]
    imagenet.append("model.small_input_stem=false")  # a ResNet-only setting a user's config may hold
    _launch("finetune/train.py", ["--probe", *common, f"name={group}/imagenet-probe", *imagenet])
    _launch("finetune/train.py", [*common, f"name={group}/finetune", f"model.weights={ckpt}"])
    print()
    runs = [base / "probe", base / "imagenet-probe", base / "finetune"]
    show(runs)
    print(point_table(runs) + "\n")
    from .report import write_report

    choice = ssl_or_imagenet(base / "probe", base / "imagenet-probe")
    write_atomic(base / "choice.json", json.dumps(choice, indent=2))
    md = write_report(runs, base / "report")
    at_point = "\n## At the operating point (chosen on validation)\n\n" + point_table(runs) + "\n"
    write_atomic(
        md,
        md.read_text()
        + at_point
        + "\n## SSL or ImageNet? (chosen on validation)\n\n"
        + choice["text"]
        + "\n",
    )
    print(choice["text"])
    keep = write_keep_script(base, group, common, choice["verdict"], ckpt)
    print(
        f"\nthe model to keep: bash {keep} [SEEDS]  (the chosen start's fine-tune with SEEDS seeds, 5 unless "
        "given, the test split sealed; then their average opens it once: about SEEDS times the fine-tune above)"
    )
    print(f"\nall four runs: {base}/  (config.yaml, metrics.jsonl, results.json, checkpoint/, wandb/)")
    print(f"report (figures, paired comparisons, how much to believe the numbers): {md}")
    return base


def point_table(run_dirs: list[Path]) -> str:
    """One row per run: test AUROC, and at the operating point chosen on validation the accuracy, balanced
    accuracy, and the positive class's sensitivity and specificity (the numbers at the threshold the model
    will be used at), with the rule used and the validation AUROC."""
    head = "| run | test AUROC [95% CI] | accuracy | balanced accuracy | sensitivity | specificity | rule | val AUROC |"
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for d in run_dirs:
        res = json.loads((Path(d) / "results.json").read_text())
        split = "test" if "test" in res else "val"
        auc = res[split]["metrics"]["auroc"]
        row = f"| {Path(d).name} | {auc['value']:.3f} [{auc['low']:.3f}, {auc['high']:.3f}] |"
        at, point = res.get(f"{split}_at_point"), res.get("operating_point")
        if at is None or point is None:
            row += " – | – | – | – | – |"
        else:
            pc = at["per_class"][point["positive"]]
            row += (
                f" {at['metrics']['accuracy']['value']:.3f} | {at['metrics']['balanced_accuracy']['value']:.3f} |"
                f" {pc['sensitivity']['value']:.3f} ({point['positive']}) | {pc['specificity']['value']:.3f} |"
                f" {point['rule']} |"
            )
        lines.append(row + f" {res['selected']['val_auroc']:.3f} |")
    return "\n".join(lines)


def write_keep_script(base: Path, group: str, common: list[str], verdict: str, ckpt: Path) -> Path:
    """``base/keep.sh [SEEDS]``: the ENSEMBLE_ADVICE as commands. The start validation chose (the SSL
    checkpoint's fine-tune if ``verdict`` is "ssl", else the recommended ImageNet recipe) is fine-tuned
    with seeds 0..SEEDS-1 and ``eval.test=false``, so choosing the members spends no test read; then
    ``lowshot ensemble --open-test`` averages them and opens the test split once, in the lockbox ledger.
    Finished members are skipped and a killed one continues (resume=auto), so a stopped script resumes
    by running it again."""
    if verdict == "ssl":
        recipe = [*common, f"model.weights={ckpt.resolve()}"]
    else:  # ImageNet ahead, or a tie: with every label lowshot's measurements favour this recipe
        config = repo_root() / "configs" / "recipes" / "lowshot-recommended.yaml"
        recipe = ["--config", str(config), *common, "model.small_input_stem=false"]
    launch = shlex.join(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            *_launch_flags(),
            str(repo_root() / "finetune/train.py"),
        ]
    )
    keep = base / "keep"
    root = os.environ.get("LOWSHOT_DATA_ROOT")
    text = "\n".join(
        [
            "#!/usr/bin/env bash",
            f"# Written by lowshot quickstart (verdict: {verdict}): the model to keep, SEEDS fine-tunes (default 5)",
            "# averaged. Members are trained with the test split sealed; the ensemble opens it once.",
            "set -euo pipefail",
            f"cd {shlex.quote(str(Path.cwd()))}",  # the quickstart's own relative paths (--config, out_dir)
            *([f"export LOWSHOT_DATA_ROOT=${{LOWSHOT_DATA_ROOT:-{shlex.quote(root)}}}"] if root else []),
            "seeds=${1:-5}",
            "members=()",
            "for s in $(seq 0 $((seeds - 1))); do",
            f"  d={shlex.quote(str(keep.resolve()))}/seed$s",
            # resume=auto: a member killed midway continues from its newest training state
            f'  [ -f "$d/results.json" ] || {launch} {shlex.join(recipe)} seed=$s eval.test=false '
            f"name={shlex.quote(group)}/keep/seed$s resume=auto",
            '  members+=("$d")',
            "done",
            f"out={shlex.quote(str(keep.resolve()))}/ensemble-$seeds",
            f'lowshot() {{ {shlex.quote(sys.executable)} -m lowshot.cli "$@"; }}',
            'if [ -f "$out/results.json" ]; then lowshot show "$out"',
            'else lowshot ensemble "${members[@]}" --out "$out" --open-test; fi',
            "",
        ]
    )
    write_atomic(base / "keep.sh", text)
    (base / "keep.sh").chmod(0o755)
    return base / "keep.sh"


# What the quickstart says about the model to keep, whichever start wins (docs/recipes.md).
ENSEMBLE_ADVICE = (
    "For the model you keep, train the chosen recipe with 5 seeds and average them (lowshot ensemble): on a few "
    "hundred images the seed moves test AUROC by 0.01-0.03, and 5 seeds of the recommended recipe averaged "
    "reached test AUROC 0.944 / 0.885 / 0.746 on BreastMNIST / BUSI / RetinaMNIST where one run reached "
    "0.907 / 0.849 / 0.721 (docs/recipes.md)."
)


def ssl_or_imagenet(ssl_probe: Path, imagenet_probe: Path, n_boot: int = 2000) -> dict:
    """Which start the validation split favours: the SSL probe against the ImageNet probe, paired over
    the same validation images (bootstrap 95% CI of the AUROC difference). The test split is not read:
    choosing on it would spend the lockbox. Returns the numbers and the advice as ``text``."""
    from .evaluation import paired_bootstrap
    from .report import same_images

    a, b = (dict(np.load(d / "predictions.npz")) for d in (ssl_probe, imagenet_probe))
    y = same_images(a, b, "val", str(ssl_probe), str(imagenet_probe))
    d = paired_bootstrap(y, b["val_prob"], a["val_prob"], n_boot)["auroc"]  # SSL − ImageNet
    d = {"ssl": d["b"], "imagenet": d["a"], **{k: d[k] for k in ("diff", "low", "high", "p")}}
    n = len(y)
    head = (
        f"SSL or ImageNet? Probe validation AUROC on the same {n} images: SSL {d['ssl']:.3f}, ImageNet "
        f"Lite0 {d['imagenet']:.3f}; SSL − ImageNet {d['diff']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}] "
        "(paired bootstrap 95% CI)"
    )
    recipe = "finetune/train.py --config configs/recipes/lowshot-recommended.yaml (ImageNet Lite0, fine-tuned whole)"
    if d["low"] > 0:
        verdict, advice = (
            "ssl",
            "the pretrained backbone is ahead on validation: keep it (its fine-tune is above).",
        )
    elif d["high"] < 0:
        verdict, advice = "imagenet", f"ImageNet is ahead on validation: start from it instead, {recipe}."
    else:
        verdict, advice = (
            "unresolved",
            (
                f"{n} validation images do not separate them. In lowshot's measurements (docs/pretraining.md) "
                "SSL's probe led with 5-20 labels per class on ultrasound and tied on fundus photographs; with "
                f"every label, {recipe} was as good or better. Point ssl.unlabelled at more unlabelled images, "
                "or compare the two fine-tunes on validation."
            ),
        )
    return {
        "val_images": n,
        "ssl_minus_imagenet_val_auroc": d,
        "verdict": verdict,
        "text": head
        + "\n"
        + textwrap.fill(advice, 100, initial_indent="  → ", subsequent_indent="    ")
        + "\n"
        + textwrap.fill(ENSEMBLE_ADVICE, 100, initial_indent="  → ", subsequent_indent="    "),
    }


def show(run_dirs: list[Path]) -> None:
    for d in run_dirs:
        f = Path(d) / "results.json"
        if not f.is_file():
            raise SystemExit(f"lowshot: error: {f} does not exist (did the run finish?)")
        res = json.loads(f.read_text())
        split = "test" if "test" in res else "val"  # val: a selection-only run (eval.test=false)
        print(format_report(res[split], f"{d}: {split.upper()} {res['job']} ({res['model']}, {res['data']})"))
        if f"{split}_at_point" in res:  # the decisions a clinic acts on, at the point chosen on validation
            print(format_point(res[f"{split}_at_point"], res["operating_point"], split.upper()))
        sel = res["selected"]
        if "members" in sel:  # an ensemble (lowshot ensemble): each member selected its own epoch
            print(
                f"  ensemble of {sel['members']} runs (their selected val AUROC, mean: {sel['val_auroc']:.3f})\n"
            )
            continue
        what = f"C={sel['C']:g}" if "C" in sel else f"epoch {sel['epoch']}"
        print(f"  selected on validation: {what} (val AUROC {sel['val_auroc']:.3f})\n")


def curves(run_dirs: list[Path], out: Path, metric: str) -> None:
    """Label-efficiency curves of several runs in one PNG and a Markdown table beside it.

    A fewshot/evaluate.py run gives its probe curve; finetune/train.py runs with
    ``data.train_per_class=K`` (one per draw ``data.train_draw``) are pooled into a fine-tune curve
    per backbone, K = 0 meaning every label."""
    from .fewshot import plot_label_efficiency, summarise_draws
    from .models import weights_tag

    data: dict[str, list[dict[str, float]]] = {}
    finetunes: dict[str, dict[int, tuple[int, dict[str, list[float]]]]] = {}
    names = set()
    for d in run_dirs:
        f = Path(d) / "results.json"
        res = json.loads(f.read_text()) if f.is_file() else {}
        if res.get("job") not in ("fewshot", "finetune"):
            raise SystemExit(
                f"lowshot: error: {f} is not a finished fewshot/evaluate.py or finetune/train.py run"
            )
        cfg = load_yaml(Path(d) / "config.yaml")
        tag = f"{weights_tag(res['model'], res['weights'])} · {cfg.data.size} px"
        names.add(res["data"])
        if res["job"] == "fewshot":
            tag += " · probe"
            data[f"{tag} ({Path(d).name})" if tag in data else tag] = res["label_efficiency"]
        else:
            k = cfg.data.train_per_class
            _, scores = finetunes.setdefault(tag + " · fine-tune", {}).setdefault(
                k, (sum(res["counts"]["train"]), {"accuracy": [], "balanced_accuracy": [], "auroc": []})
            )
            for m in scores:
                scores[m].append(res["test"]["metrics"][m]["value"])
    for tag, by_k in finetunes.items():
        data[tag] = [
            summarise_draws(k, n, sc) for k, (n, sc) in sorted(by_k.items(), key=lambda kv: kv[0] or 1 << 30)
        ]
    plot_label_efficiency(data, metric, out, " / ".join(sorted(names)))
    budgets = sorted(
        {int(r["labels_per_class"]) for rows in data.values() for r in rows}, key=lambda k: k or 1 << 30
    )
    table = [
        f"Test {'AUROC' if metric == 'auroc' else metric.replace('_', ' ')}, mean [95% CI] over draws, by labelled "
        "training images per class (probe: fewshot/evaluate.py; fine-tune: finetune/train.py data.train_per_class=K)",
        "",
        "| backbone | " + " | ".join(str(k) if k else "all" for k in budgets) + " |",
        "|---" * (len(budgets) + 1) + "|",
    ]
    for name, rows in data.items():
        at = {int(r["labels_per_class"]): r for r in rows}
        cells = [
            f"{at[k][metric]:.3f} [{at[k][metric + '_low']:.3f}, {at[k][metric + '_high']:.3f}]"
            if k in at
            else "–"
            for k in budgets
        ]
        table.append(f"| {name} | " + " | ".join(cells) + " |")
    out.with_suffix(".md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    print(f"wrote {out} and {out.with_suffix('.md')}")


def check(argv: list[str]) -> int:
    """``lowshot check [--config F] [key=value ...] [--warn-only]``: exit 1 on leakage or label conflicts
    (unless check.leakage is warn or drop)."""
    from .check import check_store, closeness, flags, plot_pairs, ranked, summary
    from .data import load_store

    cfg, _ = parse_args(argv)
    store = load_store(cfg.data)
    feats = None
    if (
        cfg.check.embeddings
    ):  # the configured backbone (model.name, model.weights), through the embedding cache
        from accelerate import Accelerator

        from .models import backbone_for, cached_embeddings

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
        from .check import against, plot_against
        from .data.pool import load_pool

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


def predict(run_dir: Path, inputs: list[str], out: Path | None, flag_at: float, batch_size: int) -> Path:
    """Score image files (folders, files, CSV manifests) with a run's selected model: one CSV row per file."""
    import torch

    from . import inference

    run = inference.load(run_dir)  # an ensemble loads as one module: its members averaged
    files, labels = inference.expand_inputs(list(inputs))
    if not files:
        raise DataError(
            f"no image files in {' '.join(map(str, inputs))} ({'/'.join(sorted(IMAGE_SUFFIXES))})"
        )
    images, kept, bad = inference.read_images(files, run.prep)
    run.model.to("cuda" if torch.cuda.is_available() else "cpu")
    scores = inference.score(run, images, batch_size)
    rows = inference.predictions_table(run, files, labels, scores, kept, bad, flag_at)
    out = out or Path(run_dir) / f"predictions-{time.strftime('%Y%m%d-%H%M%S')}.csv"
    inference.write_csv(rows, out)
    counts = {c: sum(r.get("predicted") == c for r in rows) for c in run.classes}
    flagged = sum(bool(r.get("unlike_training")) for r in rows)
    rule = run.point["rule"] + (
        f", P({run.point['positive']}) >= {run.point['threshold']:.3f}" if "threshold" in run.point else ""
    )
    print(
        f"scored {len(kept)} of {len(files)} images with {run_dir} (operating point: {rule}; T={run.temperature:.2f})"
    )
    print(f"  predicted: {counts}")
    print(
        f"  unlike the training data (distance above the {flag_at:g}th percentile of familiar images'): "
        f"{flagged} of {len(kept)}"
    )
    for f, why in bad[:10]:
        print(f"  not scored: {f}: {why}")
    if len(bad) > 10:
        print(f"  ... and {len(bad) - 10} more unreadable files (the CSV lists all)")
    print(f"wrote {out}")
    return out


def evaluate(argv: list[str]) -> Path:
    """``lowshot evaluate RUN_DIR data.source=OTHER [data.root=...] [--map O=M[+M]] [--out DIR]``."""
    from .external import evaluate as run_external
    from .external import format_side_by_side

    ap = argparse.ArgumentParser(prog="lowshot evaluate", description="external validation of a train run")
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--map", action="append", default=[], metavar="OTHER_CLASS=MODEL_CLASS[+MODEL_CLASS]")
    ap.add_argument("--out", type=Path, help="folder to write (default: RUN_DIR/external-<name>-<time>)")
    args, overrides = ap.parse_known_args(argv)
    explicit = {}
    for m in args.map:
        if "=" not in m:
            raise DataError(f"--map {m}: write OTHER_CLASS=MODEL_CLASS (or MODEL_CLASS+MODEL_CLASS to merge)")
        o, _, t = m.rpartition("=")
        explicit[o.strip()] = [x.strip() for x in t.split("+")]
    if not any(o.lstrip("-").startswith("data.source=") for o in overrides):
        raise DataError(
            "lowshot evaluate needs the external set: data.source=OTHER (and data.root= if elsewhere)"
        )
    out, results = run_external(args.run_dir, overrides, explicit, args.out)
    print(format_side_by_side(results))
    print(f"wrote {out}/ (results.json, predictions.npz, roc.png, confusion.png, reliability.png)")
    return out


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="lowshot", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
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
            raise SystemExit(check(argv[1:]))
        elif argv[:1] == ["evaluate"]:
            evaluate(argv[1:])
        else:
            args = parser.parse_args(argv)
            if args.cmd == "show":
                show(args.run_dirs)
            elif args.cmd == "export":
                from .export import export

                where, parity = export(args.run_dir, args.format, args.out)
                print(
                    f"wrote {where}/ ({', '.join(sorted(p.name for p in where.iterdir()))}); parity with lowshot on "
                    f"{parity['inputs']}: max |logit diff| {parity['max_abs_logit_diff']:.2e}, "
                    f"max |prob diff| {parity['max_abs_prob_diff']:.2e}"
                )
            elif args.cmd == "ensemble":
                from .ensemble import combine

                combine(args.run_dirs, args.out, shlex.join(["lowshot", *argv]), args.open_test)
                show([args.out])
            elif args.cmd == "predict":
                predict(args.run_dir, args.inputs, args.out, args.flag_percentile, args.batch_size)
            elif args.cmd in ("report", "compare"):
                from . import report

                try:
                    if args.cmd == "report":
                        print(f"wrote {report.write_report(args.run_dirs, args.out)}")
                    else:
                        a, b = report.load_run(args.run_a), report.load_run(args.run_b)
                        print(report.format_compare(report.compare(a, b, args.bootstrap)))
                except ValueError as err:  # runs that cannot be compared: other test images, no predictions
                    raise SystemExit(f"lowshot: error: {err}") from None
            else:
                curves(args.run_dirs, args.out, args.metric)
    except (*USER_ERRORS, FileNotFoundError) as err:
        raise SystemExit(f"lowshot: error: {err}") from None


if __name__ == "__main__":
    main()
