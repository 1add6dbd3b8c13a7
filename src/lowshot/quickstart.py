"""``lowshot quickstart``: pretrain with SimCLR → probe that backbone, beside an ImageNet probe → fine-tune →
the test reports, the numbers at the operating point, which start validation favours (``choice.json``),
a Markdown report and ``keep.sh`` (the model to keep: seeds of the chosen recipe, averaged).

The training jobs are the entry scripts ``ssl/pretrain.py`` and ``finetune/train.py``, each run through
``accelerate launch`` (:func:`launch`), so the quickstart runs exactly what a user runs step by step.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np

from .config import parse_args
from .data.cache import write_atomic
from .evaluation import format_ci, paired_bootstrap
from .report import same_images, show, write_report
from .run_folder import PREDICTIONS, read_results


def repo_root() -> Path:
    """The checkout holding ssl/, finetune/ (an editable install lives in its src/; else the cwd)."""
    for cand in (Path(__file__).resolve().parents[2], Path.cwd()):
        if (cand / "ssl" / "pretrain.py").is_file():
            return cand
    raise SystemExit(
        "lowshot: error: cannot find ssl/pretrain.py; run from the lowshot checkout (pip install -e .)"
    )


def launch_flags() -> list[str]:
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


def launch(script: str, args: list[str]) -> None:
    flags = launch_flags()
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
    launch("ssl/pretrain.py", [*common, f"name={group}/pretrain"])
    launch("finetune/train.py", ["--probe", *common, f"name={group}/probe", f"model.weights={ckpt}"])
    # The question the user has: does pretraining beat ImageNet here? The same probe on ImageNet
    # EfficientNet-Lite0 (PyPI weights, offline), at >= 64 px: trained at 224 px, those weights lose
    # 0.08 test AUROC on BreastMNIST at 32 px against 64 px (docs/pretraining.md), a strawman below that.
    size = max(cfg.data.size, 64)
    imagenet = ["model.name=tf_efficientnet_lite0", "model.weights=efficientnet-lite0", f"data.size={size}"]
    imagenet.append("model.small_input_stem=false")  # a ResNet-only setting a user's config may hold
    launch("finetune/train.py", ["--probe", *common, f"name={group}/imagenet-probe", *imagenet])
    launch("finetune/train.py", [*common, f"name={group}/finetune", f"model.weights={ckpt}"])
    print()
    runs = [base / "probe", base / "imagenet-probe", base / "finetune"]
    show(runs)
    print(point_table(runs) + "\n")
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
    will be used at), with the rule used, the validation AUROC and the test AUROC on the test images without
    a copy in train/val ("clean", with their number; issue 41)."""
    head = "| run | test AUROC [95% CI] | accuracy | balanced accuracy | sensitivity | specificity | rule | val AUROC |"
    lines = [head + " clean test AUROC (n) |", "|---" * 9 + "|"]
    for d in run_dirs:
        res = read_results(d)
        split = "test" if "test" in res else "val"
        auc = res[split]["metrics"]["auroc"]
        row = f"| {Path(d).name} | {format_ci(auc)} |"
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
        row += f" {res['selected']['val_auroc']:.3f} |"
        clean = res.get("test_clean")
        lines.append(row + (f" {format_ci(clean['metrics']['auroc'])} ({clean['n']}) |" if clean else " – |"))
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
            *launch_flags(),
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
    a, b = (dict(np.load(d / PREDICTIONS)) for d in (ssl_probe, imagenet_probe))
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
