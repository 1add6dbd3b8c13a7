#!/usr/bin/env bash
# The honest-numbers records under bench/results/ (2 CPU cores, fp32):
#  1. MedMNIST v2's ResNet-18 (28) protocol on BreastMNIST, seeds 0-2 (~30 min a seed), then the report
#     that is the README's example: bench/results/honest_numbers/medmnist-breastmnist/. Seeds 1-2 skip the clean-training
#     curve (train.eval_train=false, to save time; it changes no weight, but each extra DataLoader pass draws
#     a base seed from torch's generator, so later shuffles differ: keep the flag to reproduce the numbers).
#  2. 5-fold cross-validation of a probe on BUSI (ImageNet EfficientNet-Lite0 embeddings, 64 px) with the
#     test split sealed (eval.test=false), then the one final run that opens it: bench/results/honest_numbers/busi-cv/.
#   usage: LOWSHOT_DATA_ROOT=../shared/data bash bench/honest_numbers.sh [RUNS_DIR]
set -euo pipefail
runs=${1:-runs}
launch() { accelerate launch --cpu --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no "$@"; }
for s in 0 1 2; do
  [ -f "$runs/medmnist/resnet18-28-seed$s/results.json" ] ||
    launch finetune/train.py --config configs/medmnist-breast-resnet18.yaml seed=$s out_dir="$runs/medmnist" \
        name=resnet18-28-seed$s track.group=medmnist-breast-resnet18 $([ $s = 0 ] || echo train.eval_train=false)
done
lowshot report "$runs"/medmnist/resnet18-28-seed{0,1,2} --out bench/results/honest_numbers/medmnist-breastmnist
lite=(--config configs/busi.yaml model.name=tf_efficientnet_lite0 model.weights=efficientnet-lite0 data.size=64
      out_dir="$runs/busi-cv" track.group=busi-cv)
for f in 0 1 2 3 4; do
  [ -f "$runs/busi-cv/fold$f/results.json" ] ||
    launch finetune/train.py --probe "${lite[@]}" data.folds=5 data.fold=$f eval.test=false name=fold$f
done
[ -f "$runs/busi-cv/final/results.json" ] || launch finetune/train.py --probe "${lite[@]}" name=final
lowshot report "$runs"/busi-cv/fold{0,1,2,3,4} "$runs/busi-cv/final" --out bench/results/honest_numbers/busi-cv
