"""End to end through the real `accelerate launch`, real timm models, real BreastMNIST and BUSI
images, real W&B (offline). Small on purpose: 28-32 px, a few epochs, subsets of the splits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import HANG_S, lowshot_cli

from lowshot.config import ConfigError, SSLConfig, load_yaml, parse_args
from lowshot.resume import plan
from lowshot.tracking import preflight

REPO = Path(__file__).resolve().parents[1]


def launch(
    script: str, args: list[str], tmp: Path, launcher: list[str] | None = None, env: dict | None = None
) -> subprocess.CompletedProcess:
    launcher = launcher if launcher is not None else ["--cpu"]
    e = {
        **os.environ,
        "HF_HOME": str(tmp / "hf"),  # no accelerate config file: the defaults must work
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "PYTHONUNBUFFERED": "1",
        **(env or {}),
    }
    e = {k: v for k, v in e.items() if v is not None}  # None: unset
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launcher, str(REPO / script), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=e, timeout=HANG_S, cwd=REPO)


def ok(p: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


def common(data_root: Path, cache_dir: Path, out: Path, source: str) -> list[str]:
    return [
        f"data.root={data_root}",
        f"data.source={source}",
        f"data.cache_dir={cache_dir}",
        f"out_dir={out}",
        "data.size=32",
        "eval.bootstrap=100",
        "ssl.batch_size=64",
        "ssl.knn_every=1",
        "check.leakage=drop",  # BreastMNIST's official split holds one image twice (test_protocol.py)
    ]


def check_test_report(run: Path) -> dict:
    res = json.loads((run / "results.json").read_text())
    m = res["test"]["metrics"]
    for k in ("auroc", "accuracy", "balanced_accuracy"):
        assert m[k]["low"] <= m[k]["value"] <= m[k]["high"], (k, m[k])
    assert (run / "config.yaml").is_file() and (run / "meta.json").is_file()
    # what identifies the number: the images of each split, the processor and the packages
    assert {"train", "val", "test"} <= set(res["splits"]) and len(set(res["splits"].values())) >= 3
    meta = json.loads((run / "meta.json").read_text())
    assert meta["cpu"] and "absent" not in (meta["versions"]["pillow"], meta["versions"]["faiss-cpu"])
    assert meta["command"].startswith("accelerate launch "), meta["command"]  # what the user typed
    # the operating point chosen on validation, stored beside the model, and the test scored at it
    point = json.loads((run / "operating_point.json").read_text())
    assert point == res["operating_point"] and point["classes"] == res["classes"]
    if res["job"] == "finetune":
        assert json.loads((run / "checkpoint" / "operating_point.json").read_text()) == point
    at = res["test_at_point"]
    assert at["n"] == res["test"]["n"] and set(at["metrics"]) == {"accuracy", "balanced_accuracy", "macro_f1"}
    assert (
        at["per_class"][point["positive"]]["sensitivity"]["low"]
        <= at["per_class"][point["positive"]]["sensitivity"]["high"]
    )
    return res


def check_wandb_offline(run: Path, job: str, uses: str = "") -> None:
    """The offline W&B run, as `wandb sync` would send it (protobuf strings): the config, job type, final
    summary under the shared top-level names, the model artifact, its lineage and the predictions table."""
    files = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, list((run / "wandb").rglob("*"))
    raw = files[0].read_bytes()
    assert b"data.source" in raw and b"train.lr" in raw  # the resolved config
    assert job.encode() in raw
    assert (b"test.metrics.auroc.value" if job != "pretrain" else b"final_loss") in raw  # the summary
    assert (b"test/auroc_low" if job != "pretrain" else b"pretrain/final_loss") in raw  # runs-table names
    kind = {"pretrain": "backbone", "probe": "probe", "finetune": "classifier"}[job]
    meta = json.loads((run / "meta.json").read_text())
    art = meta["wandb_artifact"]
    assert art["artifact"] == f"{run.name}-{kind}" and art["artifact"].encode() in raw, art
    assert art["alias"].encode() in raw  # the sha alias a later run names
    if uses:  # started from a logged checkpoint: the lineage is in the config
        assert meta["lineage"]["artifact"] == f"{uses}-backbone" and b"lineage" in raw
    if job != "pretrain":  # the report's figures, metric table and per-image predictions went to W&B too
        media = {p.name.split("_")[0] for p in (run / "wandb").glob("offline-run-*/files/media/*/report/*")}
        assert media >= {"roc", "confusion", "reliability", "learning", "test"}, media
        table = list((run / "wandb").glob("offline-run-*/files/media/table/test/predictions_*.table.json"))
        rows = json.loads(table[0].read_text())
        assert rows["columns"][:4] == ["image", "path", "label", "predicted"]
        assert len(rows["data"]) == json.loads((run / "results.json").read_text())["test"]["n"]


@pytest.mark.slow
def test_breastmnist_pretrain_probe_finetune(data_root: Path, cache_dir: Path, tmp_path: Path) -> None:
    args = [*common(data_root, cache_dir, tmp_path, "breastmnist.npz"), "data.limit=160", "track.group=e2e"]
    # a length in optimizer steps (ssl.steps) that ends inside an epoch: 160 images, batches of 64
    ok(launch("ssl/pretrain.py", [*args, "name=pre", "ssl.steps=5"], tmp_path, launcher=[]))
    ckpt = tmp_path / "pre" / "checkpoint"
    assert {p.name for p in ckpt.iterdir()} >= {"backbone.safetensors", "config.yaml"}
    pre = json.loads((tmp_path / "pre" / "results.json").read_text())
    assert 0.0 <= pre["knn/val_accuracy"] <= 1.0 and pre["world_size"] == 1
    epochs = [json.loads(line) for line in (tmp_path / "pre" / "metrics.jsonl").read_text().splitlines()]
    per = pre["steps_per_epoch"]
    assert pre["steps"] == 5 and 5 % per and [e["epoch"] for e in epochs] == [1, 2, 3][: -(-5 // per)]
    assert all("knn/val_accuracy" in e for e in epochs) and epochs[-1]["lr"] == pytest.approx(
        2e-3 * SSLConfig().min_lr_ratio, rel=1e-3
    )  # the cosine schedule spans the 5 steps, not whole epochs
    check_wandb_offline(tmp_path / "pre", "pretrain")

    p = ok(launch("finetune/train.py", ["--probe", *args, "name=probe", f"model.weights={ckpt}"], tmp_path))
    assert "TEST (probe, evaluated once)" in p.stdout and "TEST at the operating point (balanced" in p.stdout
    probe = check_test_report(tmp_path / "probe")
    assert probe["selected"]["C"] in [p["C"] for p in probe["curve"]]
    assert probe["splits"] == pre["splits"]  # the same images in each split, recorded by both jobs
    assert probe["test"]["n"] == 156 and len(probe["curve"]) >= 5
    check_wandb_offline(tmp_path / "probe", "probe", uses="pre")

    ok(launch("finetune/train.py", [*args, "name=ft", f"model.weights={ckpt}", "train.epochs=2"], tmp_path))
    ft = check_test_report(tmp_path / "ft")
    assert ft["selected"]["epoch"] in (1, 2)
    assert (tmp_path / "ft" / "checkpoint" / "head.safetensors").is_file()
    check_wandb_offline(tmp_path / "ft", "finetune", uses="pre")


@pytest.mark.slow
def test_two_cpu_processes(data_root: Path, cache_dir: Path, tmp_path: Path) -> None:
    two = ["--multi_gpu", "--num_processes", "2", "--main_process_port", "29541"]
    env = {"ACCELERATE_USE_CPU": "1"}
    args = [
        *common(data_root, cache_dir, tmp_path, "breastmnist.npz"),
        "data.limit=128",
        "track.log_with=none",
    ]
    # batched views: each process augments its share of one shared permutation
    pre_args = [*args, "name=pre2", "ssl.epochs=1", "ssl.batch_size=32", "data.augment_path=batched"]
    # with an unlabelled pool (RetinaMNIST's 1,600 images, another modality: no copies), sharded too
    ok(launch("ssl/pretrain.py", [*pre_args, "ssl.unlabelled=[retinamnist.npz]"], tmp_path, two, env))
    pre = json.loads((tmp_path / "pre2" / "results.json").read_text())
    assert pre["world_size"] == 2 and pre["global_batch"] == 64 and pre["negatives_per_anchor"] == 126
    assert pre["pretrain_images"] == 128 + 1600 and pre["pool_leakage"]["pairs"] == 0
    epoch = json.loads((tmp_path / "pre2" / "metrics.jsonl").read_text().splitlines()[0])
    assert epoch["pairs_per_s"] > 0  # each process drew its 864-image share: 27 steps of 32
    meta = json.loads((tmp_path / "pre2" / "meta.json").read_text())
    assert "MULTI_CPU" in meta["distributed_type"]
    ok(
        launch(
            "finetune/train.py",
            # gradual unfreezing under DDP: epoch 1 trains the head only, epoch 2 also the last stage
            [
                *args,
                "name=ft2",
                "train.epochs=2",
                "train.strategy=gradual",
                "train.unfreeze_every=1",
                f"model.weights={tmp_path / 'pre2' / 'checkpoint'}",
            ],
            tmp_path,
            two,
            env,
        )
    )
    ft = check_test_report(tmp_path / "ft2")
    assert ft["test"]["n"] == 128  # gather_for_metrics: every test image once, none doubled
    epochs = [json.loads(line) for line in (tmp_path / "ft2" / "metrics.jsonl").read_text().splitlines()]
    assert [e["trainable/stages"] for e in epochs] == [0, 1]
    w = f"model.weights={tmp_path / 'pre2' / 'checkpoint'}"
    ok(launch("finetune/train.py", ["--probe", *args, "name=probe2", w], tmp_path, two, env))
    probe = check_test_report(tmp_path / "probe2")
    assert (
        probe["test"]["n"] == 128
        and json.loads((tmp_path / "probe2" / "meta.json").read_text())["world_size"] == 2
    )


@pytest.mark.slow
def test_pool_pretraining_from_imagenet_then_probe(
    data_root: Path, busi: Path, cache_dir: Path, tmp_path: Path
) -> None:
    """ssl.unlabelled through the real `accelerate launch`: busi/ holds the source images of BreastMNIST,
    so its copies of the val/test images stop the run (the default) before anything is written;
    check.pool_leakage=drop leaves them out; MoCo continues from ImageNet Lite0 on the training split +
    the rest of the pool; the checkpoint says where it started, and the probe reads it."""
    args = [
        *common(data_root, cache_dir, tmp_path, "breastmnist.npz"),
        "data.limit=48",
        "track.log_with=none",
        "ssl.unlabelled=[busi]",
        "model.name=tf_efficientnet_lite0",
        "model.weights=efficientnet-lite0",
        "ssl.method=moco",
        "ssl.memory_bank=512",
        "ssl.epochs=1",
    ]
    leaky = launch("ssl/pretrain.py", [*args, "name=leaky"], tmp_path)
    assert leaky.returncode != 0 and "check.pool_leakage=drop" in leaky.stderr and "busi/" in leaky.stderr
    assert not (tmp_path / "leaky").exists()
    ok(launch("ssl/pretrain.py", [*args, "name=pool", "check.pool_leakage=drop"], tmp_path))
    res = json.loads((tmp_path / "pool" / "results.json").read_text())
    guard = res["pool_leakage"]
    assert guard["dropped"] >= 0.9 * 96 and guard["eval_images_with_a_copy"]["test"] >= 0.9 * 48
    assert res["pretrain_images"] == 48 + 780 - guard["dropped"]
    assert res["method"] == "moco" and res["negatives_per_anchor"] == 512
    meta = json.loads((tmp_path / "pool" / "checkpoint" / "meta.json").read_text())
    assert meta["started_from"]["weights"] == "efficientnet-lite0" and meta["method"] == "moco"
    assert meta["pretrained_on"]["pool"] == ["busi"]
    probe_args = [
        *common(data_root, cache_dir, tmp_path, "breastmnist.npz"),
        "data.limit=48",
        "track.log_with=none",
    ]
    w = [f"model.weights={tmp_path / 'pool' / 'checkpoint'}", "model.name=tf_efficientnet_lite0"]
    ok(launch("finetune/train.py", ["--probe", *probe_args, "name=probe", *w], tmp_path))
    assert check_test_report(tmp_path / "probe")["test"]["n"] == 48


@pytest.mark.slow
def test_busi_folder_pipeline(busi: Path, cache_dir: Path, tmp_path: Path) -> None:
    args = [
        *common(busi.parent, cache_dir, tmp_path, busi.name),
        "data.limit=96",
        "data.color=gray",
        "data.channels=single",
        "track.log_with=none",
    ]
    # the per-image (PIL, DataLoader) augmentation path, on one grayscale channel
    per_image = "data.augment_path=per_image"
    ok(
        launch(
            "ssl/pretrain.py",
            [*args, "name=pre", "ssl.epochs=1", "model.name=test_resnet", per_image],
            tmp_path,
        )
    )
    assert json.loads((tmp_path / "pre" / "results.json").read_text())["augment_path"] == "per_image"
    w = f"model.weights={tmp_path / 'pre' / 'checkpoint'}"
    ok(launch("finetune/train.py", ["--probe", *args, "name=probe", "model.name=test_resnet", w], tmp_path))
    res = check_test_report(tmp_path / "probe")
    assert res["classes"] == ["benign", "malignant", "normal"] and len(res["test"]["per_class"]) == 3
    ok(
        launch(
            "finetune/train.py",
            [
                *args,
                "name=ft",
                "model.name=test_resnet",
                "train.epochs=1",
                w,
                per_image,
                "train.rotate=10",
                "eval.operating_point=youden",
                "eval.positive_class=malignant",
            ],
            tmp_path,
        )
    )
    ft = check_test_report(tmp_path / "ft")
    assert np.array(ft["test"]["confusion_matrix"]).shape == (3, 3)
    point = ft["operating_point"]
    assert point["rule"] == "youden" and point["positive"] == "malignant" and "threshold" not in point
    # the point was chosen to maximise validation balanced accuracy: never below argmax's
    val_argmax = ft["val"]["metrics"]["balanced_accuracy"]["value"]
    assert point["val"]["balanced_accuracy"] >= val_argmax - 1e-9


@pytest.mark.slow
def test_bad_input_fails_fast_with_a_clear_message(data_root: Path, tmp_path: Path) -> None:
    """Through the launcher, a user error is one lowshot line on stderr; what is refused before any
    data are read (a misspelt key, a finished run's name) is checked in-process, the launcher adding nothing."""
    p = launch(
        "finetune/train.py",
        [f"data.root={tmp_path}", "data.source=missing.npz", "track.log_with=none", f"out_dir={tmp_path}"],
        tmp_path,
    )
    assert p.returncode != 0 and str(tmp_path / "missing.npz") in p.stderr
    assert "lowshot: error:" in p.stderr
    with pytest.raises(ConfigError, match=r"did you mean 'train\.lr'"):
        parse_args(["train.lrr=0.1"])
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "config.yaml").write_text("seed: 0\n")
    (tmp_path / "done" / "results.json").write_text("{}")  # a finished run: never overwritten unasked
    cfg, _ = parse_args([f"data.root={data_root}", f"out_dir={tmp_path}", "name=done"])
    with pytest.raises(ConfigError, match="holds a finished run; choose another name=, or overwrite=true"):
        preflight(cfg)


@pytest.mark.slow
def test_divergence_stops_the_run_before_anything_is_saved_or_tested(data_root: Path, tmp_path: Path) -> None:
    """lr=1e6: the fine-tune's loss and the pretraining's weights blow up; each run stops with one line
    naming the epoch, the lr and the setting to lower; no model is saved or selected, the test split is
    never opened (no lockbox ledger exists)."""
    cache = tmp_path / "cache"
    args = [*common(data_root, cache, tmp_path, "breastmnist.npz"), "data.limit=64", "track.log_with=none"]
    p = launch("finetune/train.py", [*args, "name=ft", "train.lr=1e6", "train.epochs=3"], tmp_path)
    assert p.returncode != 0 and "lowshot: error: fine-tuning epoch 1/3: training diverged" in p.stderr
    assert (
        "train.lr=1e+05" in p.stderr and "DivergenceError" not in p.stderr
    )  # one line, no traceback of ours
    assert not (tmp_path / "ft" / "results.json").exists() and not (tmp_path / "ft" / "checkpoint").exists()
    assert not (cache / "lockbox").exists()
    # failed, with its reason; the same run with a sane lr may start again
    meta = json.loads((tmp_path / "ft" / "meta.json").read_text())
    assert meta["status"] == "failed" and "training diverged" in meta["failure"], meta
    assert plan(parse_args([*args, "name=ft", "train.lr=1e-3"])[0]).wipe
    p = launch("ssl/pretrain.py", [*args, "name=pre", "ssl.lr=1e6", "ssl.epochs=3"], tmp_path)
    assert p.returncode != 0 and "pretraining epoch" in p.stderr and "training diverged" in p.stderr
    assert "ssl.lr=" in p.stderr and not (tmp_path / "pre" / "checkpoint").exists()


@pytest.mark.slow
def test_quickstart_command(data_root: Path, cache_dir: Path, tmp_path: Path) -> None:
    """The README's main job, shrunk by configs/smoke.yaml: pretrain → probe → fine-tune → report."""
    args = [
        "--config",
        "configs/smoke.yaml",
        f"data.root={data_root}",
        f"data.cache_dir={cache_dir}",
        f"out_dir={tmp_path}",
    ]
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    p = subprocess.run(
        [sys.executable, "-m", "lowshot.cli", "quickstart", *args, "name=qs"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=HANG_S,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    for job in ("pretrain", "probe", "imagenet-probe", "finetune"):
        assert (tmp_path / "qs" / job / "results.json").is_file()
    assert "qs/probe: TEST probe" in p.stdout and "qs/finetune: TEST finetune" in p.stdout
    # the ImageNet baseline: Lite0's PyPI weights at >= 64 px, judged against the SSL probe on validation
    base = load_yaml(tmp_path / "qs" / "imagenet-probe" / "config.yaml")
    assert (base.model.weights, base.data.size) == ("efficientnet-lite0", 64)
    choice = json.loads((tmp_path / "qs" / "choice.json").read_text())
    d = choice["ssl_minus_imagenet_val_auroc"]
    # the verdict compares each probe's own selected validation AUROC
    for job, key in (("probe", "ssl"), ("imagenet-probe", "imagenet")):
        res = json.loads((tmp_path / "qs" / job / "results.json").read_text())
        assert d[key] == pytest.approx(res["selected"]["val_auroc"])
    assert choice["verdict"] in ("ssl", "imagenet", "unresolved") and "SSL or ImageNet?" in p.stdout
    assert "selected on validation: C=" in p.stdout and "selected on validation: epoch" in p.stdout
    # the numbers at the threshold the model is used at, one row a run, with the positive class named
    table = "| run | test AUROC [95% CI] | accuracy | balanced accuracy | sensitivity | specificity |"
    assert table in p.stdout and "| finetune |" in p.stdout and "positive class" in p.stdout
    report = (tmp_path / "qs" / "report" / "report.md").read_text()  # the three runs, compared, with figures
    assert "Paired comparisons" in report and (tmp_path / "qs" / "report" / "finetune" / "roc.png").is_file()
    assert (
        choice["text"] in report and table in report
    )  # the verdict and the table in the report a user shares
    # The model to keep, as the advice says: the chosen start's fine-tune with 2 seeds (5 by default), each
    # trained with the test split sealed, then averaged, the ensemble opening the test split once.
    keep = tmp_path / "qs" / "keep.sh"
    assert f"bash {keep} [SEEDS]" in p.stdout
    k = subprocess.run(["bash", str(keep), "2"], capture_output=True, text=True, env=env, timeout=HANG_S)
    assert k.returncode == 0, k.stdout[-3000:] + k.stderr[-3000:]
    for s in (0, 1):
        member = json.loads((tmp_path / "qs" / "keep" / f"seed{s}" / "results.json").read_text())
        assert "test" not in member and "val" in member
        cfg = load_yaml(tmp_path / "qs" / "keep" / f"seed{s}" / "config.yaml")
        ssl_start = str((tmp_path / "qs" / "pretrain" / "checkpoint").resolve())
        assert cfg.seed == s and cfg.model.weights == (
            ssl_start if choice["verdict"] == "ssl" else "efficientnet-lite0"
        )
    ens = json.loads((tmp_path / "qs" / "keep" / "ensemble-2" / "results.json").read_text())
    assert ens["selected"]["members"] == 2 and "auroc" in ens["test"]["metrics"] and "TEST" in k.stdout
    again = subprocess.run(["bash", str(keep), "2"], capture_output=True, text=True, env=env, timeout=HANG_S)
    assert (
        again.returncode == 0 and "ensemble of 2 runs" in again.stdout
    )  # finished: shown, nothing retrained
    bad = lowshot_cli("quickstart", "ssl.epoch=3")  # refused before anything runs or is written
    assert (
        bad.returncode != 0
        and "did you mean 'ssl.epochs'" in bad.stderr
        and not (REPO / "runs" / "qs").exists()
    )


@pytest.mark.slow
def test_multi_gpu_launch_on_cpu_without_use_cpu_is_refused(data_root: Path, tmp_path: Path) -> None:
    """`accelerate launch --multi_gpu` on a CPU machine starts 2 processes that each think they are
    alone; the scripts refuse rather than run two copies."""
    two = ["--multi_gpu", "--num_processes", "2", "--main_process_port", "29542"]
    p = launch(
        "ssl/pretrain.py",
        ["track.log_with=none", f"out_dir={tmp_path}"],
        tmp_path,
        two,
        {"ACCELERATE_USE_CPU": None},
    )
    assert p.returncode != 0
    assert (
        "2 processes were launched but Accelerate sees 1" in p.stderr and "ACCELERATE_USE_CPU=1" in p.stderr
    )


@pytest.mark.slow
def test_fewshot_script_and_curves(data_root: Path, cache_dir: Path, tmp_path: Path) -> None:
    """fewshot/evaluate.py on RetinaMNIST (3-way episodes over 5 grades), twice: the second run reads
    the cached embeddings; then `lowshot curves` draws both runs in one figure."""
    args = [
        f"data.root={data_root}",
        f"data.cache_dir={cache_dir}",
        f"out_dir={tmp_path}",
        "data.source=retinamnist.npz",
        "data.size=28",
        "model.name=test_resnet",
        "fewshot.n_way=3",
        "fewshot.episodes=200",
        "fewshot.shots=[1,5]",
        "fewshot.label_budgets=[1,5,0]",
        "fewshot.draws=3",
    ]
    p = ok(launch("fewshot/evaluate.py", [*args, "name=a"], tmp_path))
    assert "extracted" in p.stdout
    res = json.loads((tmp_path / "a" / "results.json").read_text())
    assert [(r["shots"], r["classifier"]) for r in res["rows"]] == [
        (k, c) for k in (1, 5) for c in ("prototype", "knn", "logreg")
    ]
    assert all(0.2 < r["accuracy"] < 0.9 and "auroc" not in r for r in res["rows"])  # 3-way: no AUROC
    assert [r["labels_per_class"] for r in res["label_efficiency"]] == [1, 5, 0]
    assert (tmp_path / "a" / "label_efficiency.png").is_file()
    wb = list((tmp_path / "a" / "wandb").glob("offline-run-*/run-*.wandb"))
    raw = wb[0].read_bytes() if wb else b""
    assert b"label_efficiency" in raw and b"label_efficiency_table" in raw  # the figure and table went to W&B
    p = ok(launch("fewshot/evaluate.py", [*args, "name=b", "fewshot.episodes=100"], tmp_path))
    assert "from the cache" in p.stdout
    c = lowshot_cli("curves", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "c.png"))
    assert c.returncode == 0, c.stderr
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG" and "| backbone |" in (
        tmp_path / "c.md"
    ).read_text()
