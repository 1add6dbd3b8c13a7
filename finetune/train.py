"""Linear probe or full fine-tune of a backbone, then one evaluation on the test split.

    accelerate launch finetune/train.py --probe model.weights=runs/<pretrain>/checkpoint
    accelerate launch finetune/train.py model.weights=runs/<pretrain>/checkpoint     # full fine-tune

--probe: the backbone is frozen (eval mode, so BatchNorm statistics stay frozen too), embeddings are
extracted once, and a multinomial logistic regression (L-BFGS) is fitted with its L2 strength chosen
on the validation split. Fine-tune: AdamW/Adam/SGD, warmup + cosine or step decay, no weight decay on
norms/biases, early stopping on validation AUROC keeping a copy of the best weights; each epoch also
scores the un-augmented training images. Before training, identical images across splits stop the
run (check.leakage). The test split is sealed while anything is selected and read once, at the end,
by the selected model (the read is logged in the lockbox ledger). results.json holds every metric
with a bootstrap CI and the calibration (temperature fitted on validation); predictions.npz and the
report figures sit beside it.
"""

import sys

import numpy as np
import torch
from accelerate.utils import set_seed
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from lowshot.check import leakage_guard
from lowshot.cli import user_errors
from lowshot.config import parse_args
from lowshot.data import eval_transform, load_store, split_loader, store_loader, train_transform
from lowshot.evaluation import auroc, final_reports, format_report, nll
from lowshot.finetune import EarlyStopping, fit_probe, lr_schedule, make_optimizer
from lowshot.models import backbone_for, cached_embeddings, save_checkpoint
from lowshot.tracking import Run, make_accelerator

user_errors()
cfg, overrides = parse_args(sys.argv[1:])
job = "probe" if cfg.train.probe else "finetune"
accelerator = make_accelerator(cfg)
set_seed(cfg.seed)
with accelerator.main_process_first():
    store = load_store(cfg.data)
leakage = leakage_guard(store, cfg)  # identical images in two splits: stop, warn or drop (check.leakage)
store.seal()  # the lockbox: from here until the final evaluation, reading the test split raises
accelerator.print(store.describe())
run = Run(accelerator, cfg, job, store.name, overrides)

backbone, in_chans, norm = backbone_for(cfg, store.grayscale)
rgb, plain, workers = in_chans == 3, eval_transform(norm), cfg.data.num_workers
results: dict = {
    "job": job,
    "data": store.name,
    "classes": store.classes,
    "counts": store.counts(),
    "model": cfg.model.name,
    "weights": cfg.model.weights,
    "leakage": leakage,
}

if cfg.train.probe:
    # ---- linear probe on embeddings extracted once ---------------------------------------------------
    # Embeddings of every split, extracted once by the frozen backbone (eval mode: BatchNorm
    # statistics frozen) and cached; the test rows are scored only at the end, by the selected probe.
    backbone.requires_grad_(False)
    feats, cache_hit = cached_embeddings(cfg, store, backbone, in_chans, norm, accelerator)
    (x_tr, y_tr), (x_va, y_va) = (
        (feats.numpy()[store.indices(s)], store.labels[store.indices(s)]) for s in ("train", "val")
    )
    accelerator.print(f"probe: embeddings {tuple(feats.shape)}{' (from the cache)' if cache_hit else ''}")
    clf, c, curve = fit_probe(x_tr, y_tr, x_va, y_va, cfg.train.probe_cs, cfg.seed)
    for i, point in enumerate(curve):
        run.log(
            {"probe/C": point["C"], "val/auroc": point["val_auroc"], "val/accuracy": point["val_accuracy"]},
            step=i,
        )
    results["selected"] = {"C": c, "val_auroc": max(p["val_auroc"] for p in curve), "candidates": len(curve)}
    results["curve"] = curve
    val_prob, val_y = clf.predict_proba(x_va), y_va

    def score(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return clf.predict_proba(feats.numpy()[rows]), store.labels[rows]

    if accelerator.is_main_process:
        # The probe as plain arrays: standardise with mean/scale, then logits = x @ coef.T + intercept.
        scaler, lr = clf[0], clf[-1]
        arrays = {"mean": scaler.mean_, "scale": scaler.scale_, "coef": lr.coef_, "intercept": lr.intercept_}
        save_file(
            {k: torch.from_numpy(np.ascontiguousarray(v)).float() for k, v in arrays.items()},
            str(run.dir / "probe.safetensors"),
        )
else:
    # ---- full fine-tune with early stopping on validation AUROC --------------------------------------
    model = nn.Sequential(backbone, nn.Linear(backbone.num_features, store.num_classes))
    tc = cfg.train
    aug = train_transform(cfg.data.size, tc.crop_min_scale, tc.hflip, tc.vflip, norm) if tc.augment else plain
    n = accelerator.num_processes
    train_l = split_loader(store, "train", aug, rgb, tc.batch_size, workers, train=True, processes=n)
    optimizer = make_optimizer(model, tc.optimizer, tc.lr, tc.weight_decay, tc.momentum)
    model, optimizer, train_l, val_l, train_eval_l = accelerator.prepare(
        model,
        optimizer,
        train_l,
        split_loader(store, "val", plain, rgb, 256, workers),
        split_loader(store, "train", plain, rgb, 256, workers),  # un-augmented, for the clean curve
    )
    scheduler = lr_schedule(optimizer, tc, len(train_l))
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing)
    stopper = EarlyStopping(cfg.train.patience)

    def predict(loader: torch.utils.data.DataLoader) -> tuple[np.ndarray, np.ndarray]:
        """(N, K) softmax probabilities and (N,) labels over all processes."""
        model.eval()
        probs, ys = [], []
        with torch.no_grad():
            for x, y in loader:
                p = model(x).float().softmax(1)
                p, y = accelerator.gather_for_metrics((p, y))
                probs.append(p.cpu())
                ys.append(y.cpu())
        return torch.cat(probs).numpy(), torch.cat(ys).numpy()

    for epoch in range(cfg.train.epochs):
        model.train()
        total, correct, seen = torch.zeros((), device=accelerator.device), 0, 0
        for x, y in tqdm(
            train_l,
            desc=f"epoch {epoch + 1}/{cfg.train.epochs}",
            disable=not accelerator.is_local_main_process,
            leave=False,
        ):
            logits = model(x)
            loss = criterion(logits.float(), y)
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            total += loss.detach() * len(y)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
        val_prob, val_y = predict(val_l)
        val_auc = auroc(val_y, val_prob)
        metrics = {
            "epoch": epoch + 1,
            "train/loss": float(accelerator.reduce(total / seen, reduction="mean")),
            "train/accuracy_augmented": correct / seen,
            "val/loss": nll(val_prob, val_y),
            "val/auroc": val_auc,
            "val/accuracy": float((val_prob.argmax(1) == val_y).mean()),
            "lr": scheduler.get_last_lr()[0],
        }
        if tc.eval_train:  # the same images without augmentation or dropout, in eval mode
            tr_prob, tr_y = predict(train_eval_l)
            metrics |= {
                "train/loss_clean": nll(tr_prob, tr_y),
                "train/accuracy_clean": float((tr_prob.argmax(1) == tr_y).mean()),
                "train/auroc_clean": auroc(tr_y, tr_prob),
            }
        run.log(metrics, step=epoch + 1)
        accelerator.print(
            " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
        )
        if stopper.step(val_auc, epoch + 1, accelerator.unwrap_model(model)):
            accelerator.print(f"early stop: no better validation AUROC for {cfg.train.patience} epochs")
            break
    stopper.restore(accelerator.unwrap_model(model))
    results["selected"] = {
        "epoch": stopper.best_epoch,
        "val_auroc": stopper.best_score,
        "candidates": epoch + 1,
    }
    val_prob, val_y = predict(val_l)

    def score(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return predict(accelerator.prepare(store_loader(store, rows, plain, rgb, workers)))

    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        save_checkpoint(
            run.dir / "checkpoint",
            unwrapped[0],
            cfg,
            {"in_chans": in_chans, "epoch": stopper.best_epoch, **run.meta},
        )
        save_file(
            {k: v.contiguous().cpu() for k, v in unwrapped[1].state_dict().items()},
            str(run.dir / "checkpoint" / "head.safetensors"),
        )

# The lockbox: the test split is opened only now, once, for the selected model (never with eval.test=false).
arrays = {"val_prob": val_prob, "val_y": val_y, "val_path": store.paths[store.indices("val")].astype(str)}
test = None
if cfg.eval.test:
    test_rows = run.open_test(store)
    test_prob, test_y = score(test_rows)
    test = (test_y, test_prob)
    arrays |= {"test_prob": test_prob, "test_y": test_y, "test_path": store.paths[test_rows].astype(str)}
results |= final_reports((val_y, val_prob), test, store.classes, cfg.eval, cfg.seed)
run.save_predictions(**arrays)
accelerator.print(format_report(results["val"], f"validation ({job}, selected)"))
if test is not None:
    accelerator.print(format_report(results["test"], f"TEST ({job}, evaluated once)"))
run.finish(results)
accelerator.print(f"results: {run.dir / 'results.json'}")
