"""Linear probe or fine-tune of a backbone, then one evaluation on the test split.

    accelerate launch finetune/train.py --probe model.weights=runs/<pretrain>/checkpoint
    accelerate launch finetune/train.py model.weights=runs/<pretrain>/checkpoint     # full fine-tune
    accelerate launch finetune/train.py --config configs/recipes/lowshot-recommended.yaml

--probe: the backbone is frozen (eval mode, so BatchNorm statistics stay frozen too), embeddings are
extracted once, and a multinomial logistic regression (L-BFGS) is fitted with its L2 strength chosen
on the validation split. Fine-tune: a dropout + linear head on the backbone; train.strategy decides
which stage groups train at each epoch (full, head on a frozen backbone, the last N, or gradual
unfreezing), each layer with its own lr (layer-wise decay, discriminative backbone factor); AdamW /
Adam / SGD, warmup + cosine or step decay, no weight decay on norms/biases; optional L1, label
smoothing, mixup/cutmix, EMA weights, class-weighted loss or balanced sampling; early stopping on
validation AUROC keeping a copy of the best weights. Before training, identical images across splits
stop the run (check.leakage). The test split is sealed while anything is selected and read once, at
the end, by the selected model (the read is logged in the lockbox ledger), after the operating point
(eval.operating_point) was chosen on validation and written beside the model. results.json holds every
metric with a bootstrap CI, at argmax and at the operating point, and the calibration (temperature
fitted on validation); predictions.npz and the report figures sit beside it.
"""

import json
import sys

import numpy as np
import torch
from accelerate.utils import set_seed
from safetensors.torch import save_file

from lowshot import finetune as ft
from lowshot import inference
from lowshot import operating_point as op
from lowshot import probe as lp
from lowshot.augment import batched_loader, train_spec, use_batched
from lowshot.check import leakage_guard
from lowshot.cli import user_errors
from lowshot.config import parse_args
from lowshot.data import (
    eval_transform,
    load_store,
    split_loader,
    split_train_loader,
    store_loader,
    train_transform,
)
from lowshot.data.cache import write_atomic
from lowshot.evaluation import auroc, final_reports, format_point, format_report, nll
from lowshot.guard import DivergenceError, check_epoch, weight_norm
from lowshot.models import backbone_for, cached_embeddings, save_checkpoint, weights_fingerprint, weights_kind
from lowshot.resume import States
from lowshot.tracking import Run, make_accelerator, memory_format, preflight

user_errors()
cfg, overrides = parse_args(sys.argv[1:])
preflight(cfg)  # output folder, weights, W&B: fail before any decoding
job = "probe" if cfg.train.probe else "finetune"
accelerator = make_accelerator(cfg, find_unused_parameters=cfg.train.strategy != "full")
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
    "splits": store.split_digests(),  # which images each split held: tells a changed split from a changed run
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
    # The features are standardised with statistics of every image seen without labels (train, the images a
    # label budget left unlabelled, val), not of the few labelled ones (lowshot.probe).
    x_free = feats.numpy()[store.indices("train", "unlabelled", "val")]
    clf, c, curve = lp.fit_probe(x_tr, y_tr, x_va, y_va, cfg.train.probe_cs, cfg.seed, x_free)
    for i, point in enumerate(curve):
        run.log(
            {"probe/C": point["C"], "val/auroc": point["val_auroc"], "val/accuracy": point["val_accuracy"]},
            step=i,
        )
    results["selected"] = {"C": c, "val_auroc": max(p["val_auroc"] for p in curve), "candidates": len(curve)}
    results["curve"] = curve
    val_prob, val_y = clf.predict_proba(x_va), y_va
    balanced = False  # an unweighted logistic regression learns the training labels' prior

    def score(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return clf.predict_proba(feats.numpy()[rows]), store.labels[rows]

    if accelerator.is_main_process:
        # The probe as plain arrays: standardise with mean/scale, then logits = x @ coef.T + intercept.
        scaler, lr = clf[0], clf[-1]
        arrays = {"mean": scaler.mean_, "scale": scaler.scale_, "coef": lr.coef_, "intercept": lr.intercept_}
        save_file(
            {k: torch.from_numpy(np.ascontiguousarray(v)).float() for k, v in arrays.items()},
            str(run.dir / inference.PROBE),
            metadata={"backbone_weights": weights_fingerprint(cfg.model.weights)},  # checked by predict
        )
    reference = feats[torch.from_numpy(store.indices("train"))], feats[torch.from_numpy(store.indices("val"))]
    if weights_kind(cfg.model.weights) == "none" and accelerator.is_main_process:
        inference.save_detector(backbone, run.dir)  # random init: the probe's backbone exists only here
else:
    # ---- fine-tune: train.strategy decides which stage groups train when -----------------------------
    tc = cfg.train
    model = ft.classifier(backbone, store.num_classes, cfg.model.drop_rate)
    groups = ft.stage_groups(backbone)  # stem, stage 1, ...: the units that freeze and unfreeze
    sampler = tc.balance == "sampler"  # class-balanced draws
    model = model.to(memory_format=memory_format(cfg.channels_last, accelerator.device))
    optimizer = ft.make_optimizer(
        ft.param_groups(model, tc), tc.optimizer, tc.lr, tc.weight_decay, tc.momentum
    )
    val_l = split_loader(store, "val", plain, rgb, 256, workers)
    train_eval_l = split_loader(store, "train", plain, rgb, 256, workers)  # un-augmented, for the clean curve
    if tc.augment and use_batched(cfg.data.augment_path):  # views made batched
        spec = train_spec(tc, cfg.data.size, norm)
        train_l = batched_loader(
            store, ("train",), spec, tc.batch_size, accelerator, cfg, 1, in_chans, sampler
        )
    else:  # PIL transforms per image in the DataLoader
        aug = train_transform(cfg.data.size, tc, norm) if tc.augment else plain
        n = accelerator.num_processes
        train_l = split_train_loader(store, "train", aug, rgb, tc.batch_size, workers, n, sampler)
    model, optimizer, val_l, train_eval_l = accelerator.prepare(model, optimizer, val_l, train_eval_l)
    train_l = train_l.prepare(accelerator)  # shards the chunks over processes (the device loader: itself)
    scheduler = ft.lr_schedule(optimizer, tc, len(train_l))
    criterion = ft.make_criterion(tc, store.labels[store.indices("train")], store.num_classes)
    criterion = criterion.to(accelerator.device)
    mixup = ft.make_mixup(tc, store.num_classes)
    ema = ft.make_ema(accelerator.unwrap_model(model), tc)
    scored = ema.module if ema is not None else model  # what is validated, selected and tested
    stopper = ft.EarlyStopping(tc.patience)
    # Training states (every state.every_minutes, after the last epoch, on SIGTERM/SIGINT; lowshot.resume):
    # a killed or preempted run continues with resume=auto, bit-identically.
    states = States(accelerator, run, cfg.state, train_l, scheduler, ema, stopper)
    states.extra = {"start_norm": weight_norm(model), "stop": False}  # the guard's yardstick; early stop
    if run.plan.state is not None:
        states.restore(run.plan.state)
    start_norm = states.extra["start_norm"]

    for epoch in range(states.epoch, tc.epochs if not states.extra["stop"] else 0):
        stages = ft.trainable_stages(tc, epoch, len(groups))
        trainable = ft.set_trainable(backbone, groups, stages)
        metrics = {"epoch": epoch + 1, "trainable/stages": stages, "trainable/backbone_params": trainable}
        desc = f"epoch {epoch + 1}/{tc.epochs}"
        metrics |= ft.train_epoch(
            model, train_l, optimizer, scheduler, criterion, accelerator, tc, mixup, ema, desc, states
        )
        lr_now = scheduler.get_last_lr()[-1]
        check_epoch(metrics["train/loss"], model, start_norm, f"fine-tuning {desc}", lr_now, "train.lr")
        val_prob, val_y = ft.predict(scored, val_l, accelerator)
        val_auc = auroc(val_y, val_prob)
        metrics |= {
            "val/loss": nll(val_prob, val_y),
            "val/auroc": val_auc,
            "val/accuracy": float((val_prob.argmax(1) == val_y).mean()),
            "lr": lr_now,  # the head's; backbone groups run at their own multiple
        }
        if tc.eval_train:  # the same images without augmentation or dropout, in eval mode
            tr_prob, tr_y = ft.predict(scored, train_eval_l, accelerator)
            metrics |= {
                "train/loss_clean": nll(tr_prob, tr_y),
                "train/accuracy_clean": float((tr_prob.argmax(1) == tr_y).mean()),
                "train/auroc_clean": auroc(tr_y, tr_prob),
            }
        run.log(metrics, step=epoch + 1)
        accelerator.print(
            " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
        )
        stop = stopper.step(val_auc, epoch + 1, accelerator.unwrap_model(scored))
        states.extra["stop"] = stop and ft.unfreezing_done(tc, epoch, len(groups))
        states.end_epoch(tc.epochs)
        if states.extra["stop"]:
            accelerator.print(f"early stop: no better validation AUROC for {tc.patience} epochs")
            break
    if stopper.best_state is None:  # every validation AUROC was NaN: nothing may be selected or tested
        raise DivergenceError(
            f"no epoch of {states.epoch} gave a finite validation AUROC; nothing was selected and the test split "
            "stays sealed. Check the validation split's classes and the training loss in metrics.jsonl."
        )
    stopper.restore(accelerator.unwrap_model(model))
    results["selected"] = {
        "epoch": stopper.best_epoch,
        "val_auroc": stopper.best_score,
        "candidates": states.epoch,
    }
    val_prob, val_y = ft.predict(model, val_l, accelerator)
    # "unlike the training data" is measured in the frozen starting backbone's embedding (lowshot.inference)
    reference = inference.reference_embeddings(cfg, store, in_chans, norm, accelerator, run.dir)
    balanced = tc.balance != "none"  # a weighted loss or a balanced sampler trains on a uniform prior

    def score(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return ft.predict(
            model, accelerator.prepare(store_loader(store, rows, plain, rgb, workers)), accelerator
        )

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

# The operating point, chosen on validation (a label budget or class balancing trains on a prior unlike the
# one the model will meet), stored beside the model; test metrics are reported at it and at argmax.
point = op.from_config(
    cfg.eval, store.classes, store.labels[store.indices("train")], balanced, val_y, val_prob
)
if accelerator.is_main_process:
    # What `lowshot predict/evaluate/export` need: the point, the exact preprocessing, and the training
    # embeddings that "unlike the training data" is measured against.
    for where in [run.dir] + ([] if cfg.train.probe else [run.dir / "checkpoint"]):
        op.save(point, where)
        prep = inference.preprocessing(cfg, store, in_chans, norm)
        write_atomic(where / inference.PREPROCESSING, json.dumps(prep, indent=2))
    inference.write_reference(run.dir, *reference, weights_fingerprint(cfg.model.weights))
files = [run.dir / n for n in (inference.PREPROCESSING, op.FILE, inference.REFERENCE, inference.DETECTOR)]
if cfg.train.probe:  # the W&B model artifact (its input, the backbone's, is in config.meta.lineage)
    run.log_model([run.dir / inference.PROBE, *files], "probe", run.dir / inference.PROBE)
else:
    run.log_model(
        [run.dir / "checkpoint", *files], "classifier", run.dir / "checkpoint" / "backbone.safetensors"
    )
# The lockbox: the test split is opened only now, once, for the selected model (never with eval.test=false).
arrays = {"val_prob": val_prob, "val_y": val_y, "val_path": store.paths[store.indices("val")].astype(str)}
test = None
if cfg.eval.test:
    test_rows = run.open_test(store)
    test_prob, test_y = score(test_rows)
    test = (test_y, test_prob)
    arrays |= {"test_prob": test_prob, "test_y": test_y, "test_path": store.paths[test_rows].astype(str)}
    decision = op.decide(test_prob, point["weights"])
    run.log_predictions(
        store.images[test_rows], store.paths[test_rows], test_y, test_prob, decision, store.classes
    )
results |= final_reports((val_y, val_prob), test, store.classes, cfg.eval, cfg.seed, point)
run.save_predictions(**arrays)
accelerator.print(format_report(results["val"], f"validation ({job}, selected)"))
if test is not None:
    accelerator.print(format_report(results["test"], f"TEST ({job}, evaluated once)"))
    accelerator.print(format_point(results["test_at_point"], point, "TEST"))
run.finish(results)
accelerator.print(f"results: {run.dir / 'results.json'}")
