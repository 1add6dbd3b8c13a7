"""`lowshot report`, `show` and `compare`: what a run's number is worth, as text and as Markdown with figures.

``show`` prints each run's test report, its numbers at the operating point and on the clean test images.
``report`` writes, per run (from its ``results.json``, ``metrics.jsonl``, ``predictions.npz``, ``meta.json``;
the figures are drawn by :mod:`lowshot.figures`):

- learning curves: training loss/accuracy on *augmented* batches (train mode) and on the *clean*
  training images (eval mode), next to validation; augmentation and dropout are why validation can
  sit above the running training curve. A probe run shows validation AUROC against its L2 strength;
- ROC of the test split with a bootstrap 95% band, the confusion matrix, a reliability diagram
  (before and after the temperature fitted on validation);
- "how much to believe this": the CI widths, what one test and one validation image are worth in
  points, the validation→test gap, how many candidates the validation split chose among, how often
  the test split had been opened before (the lockbox ledger), leakage found before training.

Several runs (seeds, folds) that differ only in seed / fold / split seed / name are aggregated:
mean, standard deviation and t-CI across runs, next to each run's own bootstrap CI. Two or more runs
on the same test images get paired comparisons against the first (paired bootstrap; DeLong for a
binary AUROC).
"""

from __future__ import annotations

import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from .config import setting_key
from .evaluation import delong, format_clean, format_point, format_report, mean_ci, paired_bootstrap
from .figures import run_figures
from .run_folder import HEADLINE, PROVENANCE, RESULTS, read_results, read_run, scored

# ------------------------------------------------------------------------------------------------- text


def show(run_dirs: list[Path]) -> None:
    """``lowshot show``: each run's test report (validation for a selection-only run), its numbers at the
    operating point and what validation selected."""
    for d in run_dirs:
        f = Path(d) / RESULTS
        if not f.is_file():
            raise SystemExit(f"lowshot: error: {f} does not exist (did the run finish?)")
        res = read_results(d)
        if "selected" not in res:  # pretraining or few-shot: no classifier, no test report
            print(_no_report(Path(d), res))
            continue
        split = "test" if "test" in res else "val"  # val: a selection-only run (eval.test=false)
        print(format_report(res[split], f"{d}: {split.upper()} {res['job']} ({res['model']}, {res['data']})"))
        if f"{split}_at_point" in res:  # the decisions a clinic acts on, at the point chosen on validation
            print(format_point(res[f"{split}_at_point"], res["operating_point"], split.upper()))
        if "test_clean" in res:  # the test images without a copy in train/val
            print(format_clean(res))
        sel = res["selected"]
        if "members" in sel:  # an ensemble (lowshot ensemble): each member selected its own epoch
            print(
                f"  ensemble of {sel['members']} runs (their selected val AUROC, mean: {sel['val_auroc']:.3f})\n"
            )
            continue
        what = f"C={sel['C']:g}" if "C" in sel else f"epoch {sel['epoch']}"
        print(f"  selected on validation: {what} (val AUROC {sel['val_auroc']:.3f})\n")


def _no_report(d: Path, res: dict[str, Any]) -> str:
    """What ``show`` says of a run without a classifier: its job, data and headline numbers."""
    what = {k: v for k, v in res.items() if k in ("final_loss", "steps") or k.startswith("knn/")}
    numbers = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in what.items())
    nxt = f"; its checkpoint: {res['checkpoint']}" if "checkpoint" in res else ""
    return f"{d}: {res.get('job', 'unknown')} run on {res.get('data')} ({numbers or 'no test report'}){nxt}\n"


def believe(run: dict[str, Any]) -> list[str]:
    """The "how much to believe this" bullet points of one run."""
    res, meta = run["results"], run["meta"]
    val, sel = res["val"], res["selected"]
    if "test" not in res:
        return [
            f"Selection-only run (eval.test=false): the test split stayed sealed. The {val['n']} validation images "
            f"chose among {sel.get('candidates', 1)} candidates, so this validation number is optimistic; it is "
            "for choosing a setting (compare the mean over folds), not for reporting."
        ]
    test = res["test"]
    a, acc = test["metrics"]["auroc"], test["metrics"]["accuracy"]
    notes = [
        f"Test: {test['n']} images, so one image moves accuracy by {100 / test['n']:.2f} points; the 95% CI "
        f"is {100 * (a['high'] - a['low']):.1f} points wide for AUROC and {100 * (acc['high'] - acc['low']):.1f} "
        f"for accuracy.",
        f"Validation: {val['n']} images (one image = {100 / val['n']:.2f} accuracy points).",
    ]
    k = sel.get("candidates", 1)
    what = "epochs" if "epoch" in sel else "L2 strengths"
    if k > 1:
        warn = " **Warning:**" if val["n"] < 300 else ""
        notes.append(
            f"Selection:{warn} {'each member' if 'members' in sel else 'the model'} is the best of {k} {what} on "
            f"those {val['n']} validation images, so its "
            f"validation AUROC ({sel['val_auroc']:.3f}) is optimistic by construction; report the test number."
        )
    gap = sel["val_auroc"] - a["value"]
    half = (a["high"] - a["low"]) / 2
    verdict = (
        "larger than the test CI half-width: suspect selection on a small validation split, a shift between "
        "splits, or leakage"
        if abs(gap) > half
        else "within the test CI half-width: consistent with noise"
    )
    ext = res.get("external")
    if ext:  # `lowshot evaluate`: the "test" is another data set, scored once by a finished run
        c, internal = ext["copies"], res.get("internal", {}).get("test")
        notes.append(
            f"**External validation** of `{ext['run']}` on {res['data']} ({ext['n']} images, classes mapped "
            f"{ext['class_map']})"
            + (
                f"; the run's own test AUROC was {internal['metrics']['auroc']['value']:.3f}"
                if internal
                else ""
            )
            + "."
        )
        seen = c.get("external_images_with_a_copy_in_train_or_val", 0)
        if not c["run"]:
            notes.append(f"**Copy check not run** (the run's data were not reachable): {c['why']}")
        elif seen:
            notes.append(
                f"**Copies:** {seen} of the {ext['n']} external images are copies of the run's own training or "
                f"validation images ({c['by_split']}); they are not external evidence. Without them: AUROC "
                + (
                    f"{ext['without_copies']['metrics']['auroc']['value']:.3f}."
                    if ext["without_copies"]
                    else "not computable (too few images or one class left)."
                )
            )
        else:
            notes.append("Copy check: no external image is a copy of the run's images.")
        if ext["absent_classes"]:
            notes.append(f"Classes absent from the external set: {ext['absent_classes']}.")
        notes.append(f"External set opened {ext['lockbox']['opened_before'] + 1} time(s) (ledger).")
    else:
        notes.append(f"Validation→test gap: {100 * gap:+.1f} AUROC points ({verdict}).")
    lock = meta.get("lockbox")
    if lock:
        others = lock.get("other_settings_before")  # absent in ledgers before settings were recorded
        if lock.get("opened_before", 0) and others == 0:
            notes.append(
                f"Lockbox: this test split had been opened {lock['opened_before']} time(s) before, only by runs of "
                f"this same setting (other seeds or folds): no choice among settings was made on it."
            )
        elif lock.get("opened_before", 0):
            by = f"runs of {others} other setting(s)" if others else f"{lock['runs_before']} run(s)"
            notes.append(
                f"**Lockbox:** this test split had been opened {lock['opened_before']} time(s) before, by {by} "
                f"(ledger `{Path(lock['ledger']).name}`). If this setting was chosen after seeing those numbers, "
                f"the test number is itself selected and optimistic."
            )
        else:
            notes.append("Lockbox: this was the first run to open this test split.")
    leak = res.get("leakage") or {}
    if leak.get("exact_across_splits") or leak.get("near_across_splits"):
        notes.append(
            f"**Leakage check:** {leak.get('exact_across_splits', 0)} identical and {leak.get('near_across_splits', 0)} "
            f"near-identical image pairs across splits"
            + (f"; dropped {leak['dropped']}" if leak.get("dropped") else "")
            + ". Run `lowshot check` to look at them."
        )
    if test.get("degenerate"):
        notes.append("**Degenerate:** the model predicts one class for every test image.")
    point, at = res.get("operating_point"), res.get("test_at_point")
    if point and at:  # what a decision threshold does to the finding's sensitivity and specificity
        pos = point["positive"]

        def ss(r: dict[str, Any]) -> str:
            s, sp = r["per_class"][pos]["sensitivity"], r["per_class"][pos]["specificity"]
            return (
                f"sensitivity {s['value']:.2f} [{s['low']:.2f}, {s['high']:.2f}], "
                f"specificity {sp['value']:.2f} [{sp['low']:.2f}, {sp['high']:.2f}]"
            )

        thr = f", threshold {point['threshold']:.3f} on P({pos})" if "threshold" in point else ""
        notes.append(
            f"Operating point ({point['rule']}{thr}, chosen on validation, stored in operating_point.json): "
            f"'{pos}' {ss(at)}, balanced accuracy {at['metrics']['balanced_accuracy']['value']:.3f}; at argmax (0.5): "
            f"{ss(test)}, balanced accuracy {test['metrics']['balanced_accuracy']['value']:.3f}."
        )
    cal = res.get("calibration", {})
    if "test_scaled" in cal:
        notes.append(
            f"Calibration: test ECE {cal['test']['ece']:.3f}, {cal['test_scaled']['ece']:.3f} after a temperature "
            f"T={cal['temperature']:.2f} fitted on validation (accuracy does not change)."
        )
    return notes


def _spread(m: dict[str, float]) -> str:
    """'0.861 ± 0.012 [0.831, 0.891]' over runs; one run has no spread to show."""
    if m["n"] < 2:
        return f"{m['mean']:.3f} (one run: no spread)"
    return f"{m['mean']:.3f} ± {m['std']:.3f} [{m['low']:.3f}, {m['high']:.3f}]"


def _metric_row(name: str, m: dict[str, float]) -> str:
    return f"| {name} | {m['value']:.3f} | [{m['low']:.3f}, {m['high']:.3f}] |"


def _experiment_key(run: dict[str, Any]) -> str:
    return setting_key(run["config"])


def aggregate(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Runs grouped into experiments (same config but for seed / fold / split seed / name); per group,
    mean/std/t-CI of each headline test metric and of the selected validation AUROC."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in runs:
        groups[_experiment_key(r)].append(r)
    out = []
    for members in groups.values():
        row: dict[str, Any] = {"runs": [m["name"] for m in members], "n": len(members)}
        split = "test" if all("test" in r["results"] for r in members) else "val"
        row["split"] = split
        row["test"] = {
            m: mean_ci([r["results"][split]["metrics"][m]["value"] for r in members]) for m in HEADLINE
        }
        row["val_selected_auroc"] = mean_ci([r["results"]["selected"]["val_auroc"] for r in members])
        c = members[0]["config"]
        row["label"] = f"{c['model']['name']} · {c['model']['weights']} · {members[0]['results']['job']}"
        row["folds"] = c["data"].get("folds", 0)
        out.append(row)
    return out


def same_images(
    pa: dict[str, np.ndarray], pb: dict[str, np.ndarray], split: str, a: str, b: str
) -> np.ndarray:
    """The labels of ``split`` ("val" or "test") that two runs' predictions share, after checking they
    scored the same images in the same order with the same labels: paths are compared where both runs
    recorded them (two splits can carry the same label vector). Raises ValueError naming the runs otherwise."""
    for name, p in ((a, pa), (b, pb)):
        if f"{split}_prob" not in p:
            sealed = " (none with eval.test=false)" if split == "test" else ""
            raise ValueError(f"{name} has no {split} predictions in predictions.npz{sealed}")
    keys = [f"{split}_y"] + [f"{split}_path"] * (f"{split}_path" in pa and f"{split}_path" in pb)
    if any(len(pa[k]) != len(pb[k]) or (pa[k] != pb[k]).any() for k in keys):
        raise ValueError(
            f"{a} and {b} were scored on different {split} images; a paired comparison needs the same {split} split"
        )
    return pa[f"{split}_y"].astype(int)


def compare(a: dict[str, Any], b: dict[str, Any], n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """B − A on the same test images: paired bootstrap of every headline metric, DeLong for 2 classes."""
    pa, pb = a["pred"] or {}, b["pred"] or {}
    y = same_images(pa, pb, "test", str(a["dir"]), str(b["dir"]))
    out: dict[str, Any] = {"a": a["name"], "b": b["name"], "n": len(y)}
    out["paired_bootstrap"] = paired_bootstrap(y, pa["test_prob"], pb["test_prob"], n_boot, 0.95, seed)
    if pa["test_prob"].shape[1] == 2:
        out["delong"] = delong(y, pa["test_prob"][:, 1], pb["test_prob"][:, 1])
    return out


def format_compare(c: dict[str, Any]) -> str:
    lines = [
        f"B = {c['b']} vs A = {c['a']} on the same {c['n']} test images (B − A, 95% CI, two-sided p)",
        "",
    ]
    lines.append("| metric | A | B | B − A | 95% CI | p |")
    lines.append("|---|---|---|---|---|---|")
    for m in HEADLINE:
        d = c["paired_bootstrap"][m]
        lines.append(
            f"| {m} (paired bootstrap) | {d['a']:.3f} | {d['b']:.3f} | {d['diff']:+.3f} | [{d['low']:+.3f}, {d['high']:+.3f}] | {d['p']:.3f} |"
        )
    if "delong" in c:
        d = c["delong"]
        lines.append(
            f"| auroc (DeLong) | {d['auroc_a']:.3f} | {d['auroc_b']:.3f} | {d['diff']:+.3f} | [{d['low']:+.3f}, {d['high']:+.3f}] | {d['p']:.3f} |"
        )
    return "\n".join(lines)


def write_report(run_dirs: list[Path], out: Path) -> Path:
    """``out/report.md`` with each run's figures, config, meta, results and metrics under
    ``out/<run name>/``; returns the Markdown path."""
    runs = [read_run(d) for d in run_dirs]
    out.mkdir(parents=True, exist_ok=True)
    md = ["# lowshot report", ""]
    if len(runs) > 1:
        md += [
            "## Across runs",
            "",
            "Runs that differ only in seed, fold or split seed are one experiment: the mean, "
            "standard deviation and 95% t-interval are over its runs (n), the spread that a reader's rerun "
            "would see; each run's own bootstrap CI (below) is the spread from its finite test split.",
            "",
        ]
        md += [
            "| experiment | n | scored on | AUROC mean ± sd [95% CI] | accuracy mean ± sd [95% CI] | selected val AUROC (mean) |",
            "|---|---|---|---|---|---|",
        ]
        for g in aggregate(runs):
            t = g["test"]
            fold = f" · {g['folds']}-fold" if g["folds"] else ""
            cells = [_spread(t["auroc"]), _spread(t["accuracy"]), f"{g['val_selected_auroc']['mean']:.3f}"]
            md.append(f"| {g['label']}{fold} | {g['n']} | {g['split']} | " + " | ".join(cells) + " |")
        md.append("")
        same = [r for r in runs[1:] if "test" in r["results"] and "test" in runs[0]["results"]]
        if same:
            md += ["## Paired comparisons with the first run", ""]
            for r in same:
                try:
                    md += [format_compare(compare(runs[0], r)), ""]
                except ValueError as err:
                    md += [f"{r['name']}: {err}", ""]
    for r in runs:
        res, meta = r["results"], r["meta"]
        md += [f"## {r['name']}", ""]
        md.append(
            f"{res['job']} · {res['data']} · {res['model']} · weights `{res['weights']}` · seed {meta.get('seed')} · "
            f"git {meta.get('git_sha')}  "
        )
        md += [f"`{meta.get('command', '')}`", ""]
        split = scored(r)
        md += [f"| {split} metric | value | 95% bootstrap CI |", "|---|---|---|"]
        md += [_metric_row(m, res[split]["metrics"][m]) for m in HEADLINE]
        md += ["", "### How much to believe this", ""]
        md += [f"- {n}" for n in believe(r)]
        md.append("")
        (out / r["name"]).mkdir(parents=True, exist_ok=True)
        figs = run_figures(r["dir"], out / r["name"])
        for key, path in figs.items():
            md.append(f"![{key}]({path.relative_to(out).as_posix()})")
        md.append("")
        for f in PROVENANCE:  # what reproduces the number
            if (r["dir"] / f).is_file():
                shutil.copy(r["dir"] / f, out / r["name"] / f)
    path = out / "report.md"
    path.write_text("\n".join(md) + "\n")
    return path
