#!/usr/bin/env bash
# Fine-tuning on K labels per class (data.train_per_class=K, 5 draws each) of the BreastMNIST SimCLR
# backbone made by bench/fewshot_compare.sh, pooled by `lowshot curves` next to the probe curves.
# Early stopping reads the validation split (78 labelled images) in every run: say so with the numbers.
#   usage: LOWSHOT_DATA_ROOT=../shared/data bash bench/finetune_labels.sh [RUNS_DIR]
set -euo pipefail
runs=${1:-runs/fewshot-compare}
ckpt="$runs/breastmnist-simclr/checkpoint"
[ -f "$ckpt/backbone.safetensors" ] || { echo "run bench/fewshot_compare.sh first ($ckpt missing)"; exit 1; }
# per-image views, as when bench/results/fewshot_compare was made (data.augment_path=auto was per_image on CPU then)
launch() { accelerate launch --cpu --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
    "$1" data.augment_path=per_image "${@:2}"; }
for k in 2 5 20 50 0; do
  for d in 0 1 2 3 4; do
    [ "$k" = 0 ] && [ "$d" != 0 ] && continue  # all labels: nothing to draw
    name=breastmnist-simclr-ft-k$k-d$d
    [ -f "$runs/$name/results.json" ] || launch finetune/train.py out_dir="$runs" name=$name model.weights="$ckpt" \
        data.size=32 data.train_per_class=$k data.train_draw=$d eval.bootstrap=200 track.group=fewshot-compare check.leakage=warn
  done
done
lowshot curves "$runs"/breastmnist-{resnet18-random,resnet18-simclr,lite0-imagenet-64px} "$runs"/breastmnist-simclr-ft-k* \
    --out bench/results/finetune_labels/breastmnist_probe_vs_finetune.png
