"""A trained run in use: `lowshot predict` (exact preprocessing, calibrated probabilities, the operating
point, "unlike the training data"), on real BUSI ultrasound files, with real RetinaMNIST fundus images as
the unfamiliar ones."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import lowshot_cli as lowshot
from PIL import Image
from test_dicom import write_dicom
from test_e2e import common, launch, ok

from lowshot import inference
from lowshot import operating_point as op


@pytest.fixture(scope="module")
def runs(busi: Path, cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A probe (gray replicated to 3 channels) and a fine-tune (one channel) of ImageNet Lite0 on BUSI, and
    a fine-tune from random init (whose starting weights exist only in the run)."""
    out = tmp_path_factory.mktemp("runs")
    args = [
        *common(busi.parent, cache_dir, out, busi.name),
        "data.limit=120",
        "data.color=gray",
        "track.log_with=none",
        "model.name=tf_efficientnet_lite0",
        "model.weights=efficientnet-lite0",
    ]
    ok(launch("finetune/train.py", ["--probe", *args, "name=probe"], out))
    ok(launch("finetune/train.py", [*args, "name=ft", "train.epochs=2", "data.channels=single"], out))
    scratch = [*args, "name=scratch", "train.epochs=1", "model.name=test_resnet", "model.weights=none"]
    ok(launch("finetune/train.py", scratch, out))
    assert (out / "scratch" / "detector.safetensors").is_file()
    return out


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
@pytest.mark.parametrize("job", ["probe", "ft", "scratch"])
def test_predict_reproduces_the_runs_own_validation_scores(runs: Path, tmp_path: Path, job: str) -> None:
    """The validation files, decoded again from disk by `lowshot predict`, get the probabilities the
    training run stored for them: the preprocessing is the run's, not a re-guess."""
    run = runs / job
    saved = np.load(run / "predictions.npz")
    paths = [str(p) for p in saved["val_path"]]
    out = tmp_path / "val.csv"
    p = lowshot("predict", str(run), *paths, "--out", str(out))
    assert p.returncode == 0, p.stderr
    rows = read_csv(out)
    assert [r["path"] for r in rows] == paths and all(r["error"] == "" for r in rows)
    classes = json.loads((run / "results.json").read_text())["classes"]
    raw = np.array([[float(r[f"p_raw_{c}"]) for c in classes] for r in rows])
    np.testing.assert_allclose(raw, saved["val_prob"], atol=2e-4)
    point = op.load_point(run)
    want = [classes[i] for i in op.decide(saved["val_prob"], point["weights"])]
    agree = np.mean([r["predicted"] == w for r, w in zip(rows, want, strict=True)])
    assert agree >= 0.98, agree  # a probability within 2e-4 of the threshold may fall either side
    cal = np.array([[float(r[f"p_{c}"]) for c in classes] for r in rows])
    np.testing.assert_allclose(cal.sum(1), 1.0, atol=1e-4)
    assert (cal.argmax(1) == raw.argmax(1)).all()  # temperature scaling keeps the ranking
    # the validation images' own percentiles are spread over 0-100, about 5% flagged at the 95th
    pct = np.array([float(r["ood_percentile"]) for r in rows])
    assert pct.min() < 10 and pct.max() >= 90
    assert np.mean([r["unlike_training"] == "True" for r in rows]) <= 0.10


@pytest.mark.slow
def test_predict_flags_unfamiliar_images_and_lists_unreadable_ones(
    runs: Path, data_root: Path, tmp_path: Path
) -> None:
    """Fundus photographs are far from breast ultrasound: most are flagged; unreadable files are listed
    and the rest still scored."""
    folder = tmp_path / "new"
    folder.mkdir()
    retina = np.load(data_root / "retinamnist.npz")["test_images"][:30]
    for i, a in enumerate(retina):
        Image.fromarray(a).save(folder / f"fundus_{i:02d}.png")
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.png").write_text("not an image")
    (folder / ".hidden.png").write_bytes(b"")  # hidden files are not inputs
    (folder / "readme.txt").write_text(
        "scan notes"
    )  # not an image: listed as not scored, never dropped unsaid
    write_dicom(folder / "IM0001", retina[0][..., :1])  # a DICOM export without a suffix is scored
    out = tmp_path / "new.csv"
    p = lowshot("predict", str(runs / "ft"), str(folder), str(tmp_path / "gone.png"), "--out", str(out))
    assert p.returncode == 0, p.stderr
    rows = {Path(r["path"]).name: r for r in read_csv(out)}
    assert len(rows) == 35 and ".hidden.png" not in rows
    assert rows["IM0001"]["error"] == "" and rows["IM0001"]["predicted"], rows["IM0001"]
    for bad in ("empty.png", "notes.png", "gone.png", "readme.txt"):
        assert rows[bad]["error"] and rows[bad]["predicted"] == "", rows[bad]
        assert bad in p.stdout
    assert rows["gone.png"]["error"] == "no such file"
    fundus = [r for n, r in rows.items() if n.startswith("fundus")]
    assert all(r["error"] == "" and r["predicted"] in ("benign", "malignant", "normal") for r in fundus)
    flagged = np.mean([r["unlike_training"] == "True" for r in fundus])
    assert flagged >= 0.8, flagged
    assert "scored 31 of 35 images" in p.stdout
    # nothing readable is a failed call, not "scored 0 of 1" with exit 0
    p = lowshot("predict", str(runs / "ft"), str(tmp_path / "nonexistent"))
    assert p.returncode != 0 and "could be read" in p.stderr and "nonexistent" in p.stderr


@pytest.mark.slow
def test_predict_refuses_what_is_not_a_train_run(runs: Path, tmp_path: Path) -> None:
    p = lowshot("predict", str(tmp_path), str(tmp_path))
    assert p.returncode != 0 and "results.json does not exist" in p.stderr
    assert "Traceback" not in p.stderr


@pytest.mark.slow
def test_ensemble_averages_the_members_and_predicts_as_one_run(runs: Path, tmp_path: Path) -> None:
    """`lowshot ensemble`: the members' stored probabilities averaged, an operating point chosen on the
    averaged validation scores, and `lowshot predict` on the ensemble giving those averages from the files
    (members with other input channels: one channel and three)."""
    ens = tmp_path / "ens"
    p = lowshot("ensemble", str(runs / "ft"), str(runs / "scratch"), "--out", str(ens))
    assert p.returncode == 0, p.stderr
    assert "ensemble of 2 runs" in p.stdout
    a, b, e = (np.load(d / "predictions.npz") for d in (runs / "ft", runs / "scratch", ens))
    for split in ("val", "test"):
        np.testing.assert_allclose(
            e[f"{split}_prob"], (a[f"{split}_prob"] + b[f"{split}_prob"]) / 2, atol=1e-7
        )
        assert (e[f"{split}_path"] == a[f"{split}_path"]).all()
    res = json.loads((ens / "results.json").read_text())
    assert res["job"] == "ensemble" and res["members"] == [str(runs / "ft"), str(runs / "scratch")]
    assert "lowshot ensemble" in json.loads((ens / "meta.json").read_text())["command"]
    point = op.load_point(ens)  # chosen on the averaged validation probabilities, not copied from a member
    assert point == op.from_config(
        inference.load_run(runs / "ft").cfg.eval,
        res["classes"],
        np.repeat(np.arange(len(res["classes"])), res["counts"]["train"]),
        False,
        e["val_y"],
        e["val_prob"],
    )
    out = tmp_path / "val.csv"
    paths = [str(x) for x in e["val_path"]]
    p = lowshot("predict", str(ens), *paths, "--out", str(out))
    assert p.returncode == 0, p.stderr
    rows = read_csv(out)
    raw = np.array([[float(r[f"p_raw_{c}"]) for c in res["classes"]] for r in rows])
    np.testing.assert_allclose(raw, e["val_prob"], atol=2e-4)
    c = lowshot("compare", str(runs / "ft"), str(ens))  # an ensemble is a run to compare with
    assert c.returncode == 0 and "auroc" in c.stdout, c.stdout + c.stderr


@pytest.mark.slow
def test_ensemble_exports_as_one_onnx_graph_and_evaluates_as_one_run(
    runs: Path, data_root: Path, tmp_path: Path
) -> None:
    """An ensemble in use without lowshot: one ONNX graph (members with one and three input channels)
    whose softmax is the ensemble's stored validation probability, decided with the ensemble's own
    operating point; and `lowshot evaluate` scores an external set with it like with one run."""
    import onnxruntime as ort

    ens = tmp_path / "ens"
    assert lowshot("ensemble", str(runs / "ft"), str(runs / "scratch"), "--out", str(ens)).returncode == 0
    out = tmp_path / "export"
    p = lowshot("export", str(ens), "--format", "onnx", "--out", str(out))
    assert p.returncode == 0, p.stderr
    parity = json.loads((out / "parity.json").read_text())
    assert parity["max_abs_logit_diff"] < 1e-3 and parity["reference"].startswith("lowshot.ensemble.Averaged")
    assert parity["members"] == [str((runs / m).resolve()) for m in ("ft", "scratch")]
    assert json.loads((out / "operating_point.json").read_text()) == op.load_point(ens)
    assert (out / "preprocessing.json").read_text() == (runs / "ft" / "preprocessing.json").read_text()
    e = np.load(ens / "predictions.npz")
    prep = json.loads((out / "preprocessing.json").read_text())
    images, _, bad = inference.read_images([Path(f) for f in e["val_path"]], prep)
    assert not bad
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    logits = sess.run(["logits"], {"image": inference.to_input(images, prep).numpy()})[0]
    prob = np.exp(logits - logits.max(1, keepdims=True))
    prob /= prob.sum(1, keepdims=True)
    np.testing.assert_allclose(prob, e["val_prob"], atol=2e-4)  # the averaged members, from the files
    t = lowshot("export", str(ens), "--format", "timm", "--out", str(tmp_path / "timm"))
    assert t.returncode != 0 and "--format onnx" in t.stderr and "Traceback" not in t.stderr

    # a cache (and lockbox ledger) of its own: the other evaluate test counts the openings of the shared one
    base = [f"data.root={data_root}", "data.source=breastmnist.npz", f"data.cache_dir={tmp_path / 'cache'}"]
    v = lowshot(
        "evaluate", str(ens), *base, "--map", "normal, benign=benign+normal", "--out", str(tmp_path / "x")
    )
    assert v.returncode == 0, v.stderr
    res = json.loads((tmp_path / "x" / "results.json").read_text())
    assert res["test"]["n"] == 780 and res["external"]["copies"]["run"]
    assert res["internal"]["test"] == json.loads((ens / "results.json").read_text())["test"]
    assert (
        res["operating_point"]["weights"] == op.load_point(ens)["weights"]
    )  # the ensemble's, not a member's


@pytest.mark.slow
def test_ensemble_of_selection_only_members_opens_the_test_split_once(runs: Path, tmp_path: Path) -> None:
    """Members chosen with the test split sealed (eval.test=false: no test scores) make an ensemble
    without a test report; `--open-test` scores the test images with every member, once, and records the
    opening in the lockbox ledger. The scores equal what the members gave those images when they opened
    the test themselves."""
    sealed = []
    for name in ("ft", "scratch"):
        d = tmp_path / name
        shutil.copytree(runs / name, d)
        res = json.loads((d / "results.json").read_text())
        (d / "results.json").write_text(
            json.dumps({k: v for k, v in res.items() if not k.startswith("test")})
        )
        z = dict(np.load(d / "predictions.npz"))
        np.savez(d / "predictions.npz", **{k: v for k, v in z.items() if not k.startswith("test_")})
        sealed.append(str(d))
    p = lowshot("ensemble", *sealed, "--out", str(tmp_path / "val-only"))
    assert p.returncode == 0, p.stderr
    assert "test" not in json.loads((tmp_path / "val-only" / "results.json").read_text())
    ens = tmp_path / "ens"
    p = lowshot("ensemble", *sealed, "--out", str(ens), "--open-test")
    assert p.returncode == 0, p.stderr
    res, e = json.loads((ens / "results.json").read_text()), np.load(ens / "predictions.npz")
    a, b = (np.load(runs / m / "predictions.npz") for m in ("ft", "scratch"))
    assert (e["test_path"] == a["test_path"]).all() and (e["test_y"] == a["test_y"]).all()
    np.testing.assert_allclose(e["test_prob"], (a["test_prob"] + b["test_prob"]) / 2, atol=2e-4)
    assert res["test"]["n"] == len(a["test_y"])
    lockbox = json.loads((ens / "meta.json").read_text())["lockbox"]
    ledger = [json.loads(x) for x in Path(lockbox["ledger"]).read_text().splitlines()]
    assert ledger[-1]["run"] == str(ens.resolve()) and ledger[-1]["job"] == "ensemble"
    again = lowshot(
        "ensemble", str(runs / "ft"), str(runs / "scratch"), "--out", str(tmp_path / "x"), "--open-test"
    )
    assert again.returncode != 0 and "already scored the test split" in again.stderr


@pytest.mark.slow
def test_ensemble_refuses_members_of_other_splits(runs: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    shutil.copytree(runs / "ft", other)
    z = dict(np.load(other / "predictions.npz"))
    z["val_path"] = z["val_path"][::-1]  # the same labels could hide other images: paths are compared
    z["val_y"] = z["val_y"][::-1]
    np.savez(other / "predictions.npz", **z)
    p = lowshot("ensemble", str(runs / "ft"), str(other), "--out", str(tmp_path / "ens"))
    assert p.returncode != 0 and "different val images" in p.stderr and "Traceback" not in p.stderr
    p = lowshot("ensemble", str(runs / "ft"), "--out", str(tmp_path / "ens"))
    assert p.returncode != 0 and "at least two runs" in p.stderr
    assert not (tmp_path / "ens" / "results.json").exists()


def test_probe_folds_into_one_linear_layer() -> None:
    """The standardise + logistic regression probe, folded, gives scikit-learn's probabilities (2 and 3
    classes)."""
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    for k in (2, 3):
        x = rng.normal(size=(200, 16)) * rng.uniform(0.1, 5, 16) + rng.normal(size=16)
        y = rng.integers(0, k, 200)
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(x, y)
        s, lr = clf[0], clf[-1]
        arrays = {
            n: torch.from_numpy(np.asarray(v, dtype=np.float64))
            for n, v in (
                ("mean", s.mean_),
                ("scale", s.scale_),
                ("coef", lr.coef_),
                ("intercept", lr.intercept_),
            )
        }
        lin = inference.probe_as_linear(arrays)
        got = lin(torch.from_numpy(x).float()).softmax(1).detach().numpy()
        np.testing.assert_allclose(got, clf.predict_proba(x), atol=1e-5)


def test_knn_distance_and_percentile() -> None:
    import torch

    ref = torch.nn.functional.normalize(torch.eye(4)[:3], dim=1)  # three unit vectors
    q = torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 2.0]])
    np.testing.assert_allclose(inference.knn_distance(q, ref, 1), [0.0, 1.0], atol=1e-6)
    np.testing.assert_allclose(inference.knn_distance(q, ref, 2), [1.0, 1.0], atol=1e-6)
    val = np.array([0.1, 0.2, 0.3, 0.4])
    np.testing.assert_allclose(inference.percentile(np.array([0.05, 0.25, 0.9]), val), [0, 50, 100])


@pytest.mark.slow
@pytest.mark.parametrize(
    ("job", "fmt"), [("probe", "onnx"), ("ft", "onnx"), ("probe", "timm"), ("ft", "timm")]
)
def test_export_matches_lowshot_on_real_images(runs: Path, tmp_path: Path, job: str, fmt: str) -> None:
    """The exported model, run by onnxruntime or rebuilt by plain timm, gives lowshot's logits on the
    run's validation images; what a user needs to preprocess and decide travels with it."""
    import torch

    out = tmp_path / "export"
    p = lowshot("export", str(runs / job), "--format", fmt, "--out", str(out))
    assert p.returncode == 0, p.stderr
    parity = json.loads((out / "parity.json").read_text())
    assert parity["inputs"].endswith("validation images of busi"), parity
    assert parity["max_abs_logit_diff"] < 1e-3 and parity["max_abs_prob_diff"] < 1e-4, parity
    assert {"preprocessing.json", "operating_point.json", "calibration.json", "reference.safetensors"} <= {
        f.name for f in out.iterdir()
    }
    prep = json.loads((out / "preprocessing.json").read_text())
    run = inference.load_run(runs / job)
    saved = np.load(runs / job / "predictions.npz")
    images, _, bad = inference.read_images([Path(f) for f in saved["val_path"][:16]], prep)
    assert not bad
    x = inference.to_input(images, prep)
    if fmt == "onnx":
        import onnxruntime as ort

        # a fine-tune's "unlike the training data" embedding comes from its frozen starting backbone
        assert (out / "detector.onnx").is_file() == (job == "ft")
        if job == "ft":
            assert parity["detector_max_abs_embedding_diff"] < 1e-3
            det = ort.InferenceSession(str(out / "detector.onnx"), providers=["CPUExecutionProvider"])
            emb = det.run(["embedding"], {"image": inference.to_input(images, prep).numpy()})[0]
            np.testing.assert_allclose(emb, inference.score(run, images)["embedding"], atol=1e-3)

        sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
        logits, emb = sess.run(["logits", "embedding"], {"image": x.numpy()})
        assert emb.shape == (16, run.reference.shape[1])
    else:
        import timm
        from safetensors.torch import load_file

        cfg = json.loads((out / "config.json").read_text())
        model = timm.create_model(cfg["architecture"], num_classes=cfg["num_classes"], **cfg["model_args"])
        model.load_state_dict(load_file(out / "model.safetensors"))
        with torch.no_grad():
            logits = model.eval()(x).numpy()
        assert cfg["pretrained_cfg"]["label_names"] == run.classes
    probs = torch.from_numpy(np.asarray(logits)).softmax(1).numpy()
    np.testing.assert_allclose(probs, saved["val_prob"][:16], atol=2e-4)


@pytest.mark.slow
def test_evaluate_external_set_maps_classes_finds_copies_and_records_the_opening(
    runs: Path, data_root: Path, cache_dir: Path, tmp_path: Path
) -> None:
    """BreastMNIST is BUSI again at 28 px: as an "external" set for a BUSI run, its two classes map onto
    the run's three (benign + normal merged), and the copy check says most images are the run's own."""
    base = [f"data.root={data_root}", "data.source=breastmnist.npz", f"data.cache_dir={cache_dir}"]
    merge = ["--map", "normal, benign=benign+normal"]
    p = lowshot("evaluate", str(runs / "ft"), *base, *merge, "--out", str(tmp_path / "ext"))
    assert p.returncode == 0, p.stderr
    res = json.loads((tmp_path / "ext" / "results.json").read_text())
    assert res["classes"] == ["normal, benign", "malignant"] and res["test"]["n"] == 780
    ext = res["external"]
    assert ext["class_map"] == {"malignant": "malignant", "normal, benign": "normal, benign"}
    assert ext["copies"]["run"] and ext["copies"]["external_images_with_a_copy_in_train_or_val"] >= 50
    assert "are copies of the run's own training/validation images" in p.stdout
    assert res["internal"]["test"]["n"] == json.loads((runs / "ft" / "results.json").read_text())["test"]["n"]
    m = res["test"]["metrics"]["auroc"]
    assert m["low"] <= m["value"] <= m["high"]
    assert {"roc.png", "confusion.png", "predictions.npz"} <= {f.name for f in (tmp_path / "ext").iterdir()}
    ledger = Path(ext["lockbox"]["ledger"])
    assert ledger.name.startswith("breastmnist-external-") and ext["lockbox"]["opened_before"] == 0
    p2 = lowshot("evaluate", str(runs / "probe"), *base, *merge, "--out", str(tmp_path / "ext2"))
    assert p2.returncode == 0, p2.stderr
    assert (
        json.loads((tmp_path / "ext2" / "results.json").read_text())["external"]["lockbox"]["opened_before"]
        == 1
    )
    assert len(ledger.read_text().splitlines()) == 2
    from lowshot.report import believe
    from lowshot.run_folder import read_run as load_run

    notes = " ".join(believe(load_run(tmp_path / "ext")))
    assert "External validation" in notes and "**Copies:**" in notes


@pytest.mark.slow
def test_evaluate_refuses_unknown_classes_and_the_runs_own_settings(
    runs: Path, data_root: Path, cache_dir: Path
) -> None:
    base = [f"data.root={data_root}", f"data.cache_dir={cache_dir}"]
    p = lowshot("evaluate", str(runs / "ft"), *base, "data.source=retinamnist.npz")
    assert p.returncode != 0 and "class '0', which the model never saw" in p.stderr and "--map" in p.stderr
    p = lowshot("evaluate", str(runs / "ft"), *base, "data.source=breastmnist.npz", "data.size=64")
    assert p.returncode != 0 and "data.size" in p.stderr and "preprocessing" in p.stderr
    p = lowshot("evaluate", str(runs / "ft"), *base, "data.source=breastmnist.npz", "--map", "cats=benign")
    assert p.returncode != 0 and "not classes of the external set" in p.stderr
    assert all("Traceback" not in q.stderr for q in (p,))


def test_class_map_merges_and_matches_by_name() -> None:
    from lowshot.external import class_map

    classes, merge, labels = class_map(
        ["benign", "malignant", "normal"], ["Malignant", "other"], {"other": ["benign", "normal"]}
    )
    assert classes == ["other", "malignant"]
    np.testing.assert_array_equal(merge, [[1, 0], [0, 1], [1, 0]])
    np.testing.assert_array_equal(labels, [1, 0])
