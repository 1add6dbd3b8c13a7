"""Linear probe or full fine-tune of a backbone, then one evaluation on the test split.

    accelerate launch finetune/train.py --probe model.weights=runs/<pretrain>/checkpoint
    accelerate launch finetune/train.py model.weights=runs/<pretrain>/checkpoint     # full fine-tune

--probe: the backbone is frozen (eval mode, so BatchNorm statistics stay frozen too), embeddings are
extracted once, and a multinomial logistic regression (L-BFGS) is fitted with its L2 strength chosen
on the validation split. Fine-tune: AdamW/SGD, warmup + cosine, no weight decay on norms/biases,
early stopping on validation AUROC keeping a copy of the best weights. Either way the test split is
read once, at the end, by the selected model; results.json holds every metric with a bootstrap CI.
"""

import sys

import numpy as np
import torch
from accelerate.utils import set_seed
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from lowshot.cli import user_errors
from lowshot.config import parse_args
from lowshot.data import eval_transform, load_store, split_loader, train_transform
from lowshot.evaluation import auroc, classification_report, format_report
from lowshot.finetune import EarlyStopping, fit_probe, make_optimizer, warmup_cosine
from lowshot.models import backbone_for, cached_embeddings, save_checkpoint
from lowshot.tracking import Run, make_accelerator

user_errors()
cfg, overrides = parse_args(sys.argv[1:])
job = "probe" if cfg.train.probe else "finetune"
accelerator = make_accelerator(cfg)
set_seed(cfg.seed)
with accelerator.main_process_first():
    store = load_store(cfg.data)
accelerator.print(store.describe())
run = Run(accelerator, cfg, job, store.name, overrides)

backbone, in_chans, norm = backbone_for(cfg, store.grayscale)
rgb, plain, workers = in_chans == 3, eval_transform(norm), cfg.data.num_workers


def report(y: np.ndarray, prob: np.ndarray) -> dict:
    return classification_report(y, prob, store.classes, cfg.eval.bootstrap, cfg.eval.ci, cfg.seed)


results: dict = {
    "job": job,
    "data": store.name,
    "classes": store.classes,
    "counts": store.counts(),
    "model": cfg.model.name,
    "weights": cfg.model.weights,
}

if cfg.train.probe:
    # ---- linear probe on embeddings extracted once ---------------------------------------------------
    # Embeddings of every split, extracted once by the frozen backbone (eval mode: BatchNorm
    # statistics frozen) and cached; the test rows are scored only at the end, by the selected probe.
    backbone.requires_grad_(False)
    feats, cache_hit = cached_embeddings(cfg, store, backbone, in_chans, norm, accelerator)
    (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = (
        (feats.numpy()[store.indices(s)], store.labels[store.indices(s)]) for s in ("train", "val", "test")
    )
    accelerator.print(f"probe: embeddings {tuple(feats.shape)}{' (from the cache)' if cache_hit else ''}")
    clf, c, curve = fit_probe(x_tr, y_tr, x_va, y_va, cfg.train.probe_cs, cfg.seed)
    for i, point in enumerate(curve):
        run.log(
            {"probe/C": point["C"], "val/auroc": point["val_auroc"], "val/accuracy": point["val_accuracy"]},
            step=i,
        )
    results["selected"] = {"C": c, "val_auroc": max(p["val_auroc"] for p in curve), "curve": curve}
    results["val"] = report(y_va, clf.predict_proba(x_va))
    # The lockbox: the test embeddings are scored only now, once, by the selected probe.
    results["test"] = report(y_te, clf.predict_proba(x_te))
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
    aug = train_transform(cfg.data.size, cfg.train.crop_min_scale, cfg.train.hflip, cfg.train.vflip, norm)
    n = accelerator.num_processes
    train_l = split_loader(store, "train", aug, rgb, cfg.train.batch_size, workers, train=True, processes=n)
    optimizer = make_optimizer(
        model, cfg.train.optimizer, cfg.train.lr, cfg.train.weight_decay, cfg.train.momentum
    )
    model, optimizer, train_l, val_l = accelerator.prepare(
        model, optimizer, train_l, split_loader(store, "val", plain, rgb, 256, workers)
    )
    spe = len(train_l)
    scheduler = warmup_cosine(
        optimizer, cfg.train.warmup_epochs * spe, cfg.train.epochs * spe, cfg.train.min_lr_ratio
    )
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
            "val/loss": float(
                nn.functional.nll_loss(
                    torch.log(torch.from_numpy(val_prob).clamp_min(1e-12)), torch.from_numpy(val_y).long()
                )
            ),
            "val/auroc": val_auc,
            "val/accuracy": float((val_prob.argmax(1) == val_y).mean()),
            "lr": scheduler.get_last_lr()[0],
        }
        run.log(metrics, step=epoch + 1)
        accelerator.print(
            " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
        )
        if stopper.step(val_auc, epoch + 1, accelerator.unwrap_model(model)):
            accelerator.print(f"early stop: no better validation AUROC for {cfg.train.patience} epochs")
            break
    stopper.restore(accelerator.unwrap_model(model))
    results["selected"] = {"epoch": stopper.best_epoch, "val_auroc": stopper.best_score}
    val_prob, val_y = predict(val_l)
    results["val"] = report(val_y, val_prob)
    # The lockbox: the test split is loaded and scored only now, by the restored best model.
    test_prob, test_y = predict(accelerator.prepare(split_loader(store, "test", plain, rgb, 256, workers)))
    results["test"] = report(test_y, test_prob)
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

accelerator.print(format_report(results["val"], f"validation ({job}, selected)"))
accelerator.print(format_report(results["test"], f"TEST ({job}, evaluated once)"))
run.finish(results)
accelerator.print(f"results: {run.dir / 'results.json'}")
