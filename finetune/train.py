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

import sys

import numpy as np
import torch
from accelerate.utils import set_seed

from lowshot import finetune as ft
from lowshot import inference
from lowshot import operating_point as op
from lowshot import probe as lp
from lowshot.augment import finetune_loader
from lowshot.config import parse_args
from lowshot.data import eval_transform, load_store, split_loader, store_loader
from lowshot.data.guards import copied_from_train_val, leakage_guard
from lowshot.device import memory_format
from lowshot.errors import user_errors
from lowshot.evaluation import final_reports, format_clean, format_point, format_report
from lowshot.figures import run_figures
from lowshot.guard import DivergenceError, check_epoch, weight_norm
from lowshot.models import backbone_for, cached_embeddings, weights_fingerprint, weights_kind
from lowshot.optim import lr_schedule, make_optimizer
from lowshot.resume import States
from lowshot.tracking import Run, make_accelerator, preflight

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

    if accelerator.is_main_process:  # plain arrays: standardise, then a linear layer
        lp.save_probe(clf, run.dir / inference.PROBE, weights_fingerprint(cfg.model.weights))
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
    optimizer = make_optimizer(ft.param_groups(model, tc), tc.optimizer, tc.lr, tc.weight_decay, tc.momentum)
    val_l = split_loader(store, "val", plain, rgb, 256, workers)
    train_eval_l = split_loader(store, "train", plain, rgb, 256, workers)  # un-augmented, for the clean curve
    train_l = finetune_loader(store, cfg, accelerator, in_chans, norm, sampler)  # views batched or per image
    model, optimizer, val_l, train_eval_l = accelerator.prepare(model, optimizer, val_l, train_eval_l)
    train_l = train_l.prepare(accelerator)  # shards the chunks over processes (the device loader: itself)
    scheduler = lr_schedule(optimizer, tc, len(train_l))
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
        # lr: the head's; backbone groups run at their own multiple
        metrics |= ft.val_metrics(scored, val_l, accelerator) | {"lr": lr_now}
        if tc.eval_train:  # the same images without augmentation or dropout, in eval mode
            metrics |= ft.clean_train_metrics(scored, train_eval_l, accelerator)
        run.log(metrics, step=epoch + 1)
        accelerator.print(
            " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
        )
        stop = stopper.step(metrics["val/auroc"], epoch + 1, accelerator.unwrap_model(scored))
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

    if accelerator.is_main_process:  # the backbone as a lowshot checkpoint, the head beside it
        meta = {"in_chans": in_chans, "epoch": stopper.best_epoch, **run.meta}
        ft.save_classifier(run.dir / "checkpoint", accelerator.unwrap_model(model), cfg, meta)

# The operating point, chosen on validation (a label budget or class balancing trains on a prior unlike the
# one the model will meet), stored beside the model; test metrics are reported at it and at argmax.
point = op.from_config(
    cfg.eval, store.classes, store.labels[store.indices("train")], balanced, val_y, val_prob
)
if accelerator.is_main_process:  # what `lowshot predict/evaluate/export` read back beside the model
    inference.write_bundle(run.dir, cfg, store, in_chans, norm, point, reference)
files = [run.dir / n for n in inference.BUNDLE]
if cfg.train.probe:  # the W&B model artifact (its input, the backbone's, is in config.meta.lineage)
    run.log_model([run.dir / inference.PROBE, *files], "probe", run.dir / inference.PROBE)
else:
    run.log_model(
        [run.dir / "checkpoint", *files], "classifier", run.dir / "checkpoint" / "backbone.safetensors"
    )
# The lockbox: the test split is opened only now, once, for the selected model (never with eval.test=false).
arrays = {"val_prob": val_prob, "val_y": val_y, "val_path": store.paths[store.indices("val")].astype(str)}
test = clean = None
if cfg.eval.test:
    test_rows = run.open_test(store)
    test_prob, test_y = score(test_rows)
    clean = ~np.isin(test_rows, copied_from_train_val(store, cfg))  # test images without a copy in train/val
    test = (test_y, test_prob)
    arrays |= {"test_prob": test_prob, "test_y": test_y, "test_path": store.paths[test_rows].astype(str)}
    decision = op.decide(test_prob, point["weights"])
    run.log_predictions(
        store.images[test_rows], store.paths[test_rows], test_y, test_prob, decision, store.classes
    )
results |= final_reports((val_y, val_prob), test, store.classes, cfg.eval, cfg.seed, point, clean)
run.save_predictions(**arrays)
accelerator.print(format_report(results["val"], f"validation ({job}, selected)"))
if test is not None:
    accelerator.print(format_report(results["test"], f"TEST ({job}, evaluated once)"))
    accelerator.print(format_point(results["test_at_point"], point, "TEST"))
    accelerator.print(format_clean(results))
run.finish(results, figures=run_figures)
accelerator.print(f"results: {run.dir / 'results.json'}")
