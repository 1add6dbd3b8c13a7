#!/usr/bin/env bash
# Few-shot and label-efficiency comparison of random-init, SimCLR (lowshot) and ImageNet backbones on
# BreastMNIST (2-way) and RetinaMNIST (3-way episodes over 5 grades), 32 px, 2 CPU cores, seed 0.
# Writes bench/results/fewshot_compare/{breastmnist,retinamnist}_{label_efficiency.png,.md,runs.json}.
#   usage: LOWSHOT_DATA_ROOT=../shared/data bash bench/fewshot_compare.sh [RUNS_DIR]
set -euo pipefail
runs=${1:-runs/fewshot-compare}
out=bench/results/fewshot_compare
mkdir -p "$out"
# per-image views, as when bench/results/fewshot_compare was made (data.augment_path=auto was per_image on CPU then)
launch() { accelerate launch --cpu --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
    "$1" data.augment_path=per_image "${@:2}"; }
# check.leakage=warn: the official splits as published, as when these results were recorded (lowshot check lists their duplicates)
common=(out_dir="$runs" data.size=32 track.group=fewshot-compare check.leakage=warn)
for set in breastmnist retinamnist; do
  if [ "$set" = breastmnist ]; then cfg=(); way=2; else cfg=(--config configs/retinamnist.yaml); way=3; fi
  [ -f "$runs/$set-simclr/checkpoint/backbone.safetensors" ] ||
    launch ssl/pretrain.py "${cfg[@]}" "${common[@]}" name=$set-simclr
  fs=("${cfg[@]}" "${common[@]}" fewshot.n_way=$way)
  fewshot() { [ -f "$runs/$1/results.json" ] || launch fewshot/evaluate.py "${fs[@]}" name="$1" "${@:2}"; }
  fewshot $set-resnet18-random model.weights=none
  fewshot $set-resnet18-simclr model.weights="$runs/$set-simclr/checkpoint"
  fewshot $set-lite0-random model.name=tf_efficientnet_lite0
  fewshot $set-lite0-imagenet model.name=tf_efficientnet_lite0 model.weights=efficientnet-lite0
  # ImageNet weights were trained at 224 px: the same weights on the same images at 64 and 128 px
  fewshot $set-lite0-imagenet-64px model.name=tf_efficientnet_lite0 model.weights=efficientnet-lite0 data.size=64
  fewshot $set-lite0-imagenet-128px model.name=tf_efficientnet_lite0 model.weights=efficientnet-lite0 data.size=128
  lowshot curves "$runs"/$set-{resnet18-random,resnet18-simclr,lite0-random,lite0-imagenet,lite0-imagenet-64px,lite0-imagenet-128px} \
      --out "$out/${set}_label_efficiency.png"
  python - "$runs" "$set" "$out/${set}_runs.json" <<'PY'
import json, sys
from pathlib import Path
runs, name, out = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
keep = {}
for d in sorted(runs.glob(f"{name}-*")):
    if not (d / "results.json").is_file():
        continue
    r, meta = json.loads((d / "results.json").read_text()), json.loads((d / "meta.json").read_text())
    if r["job"] == "pretrain":
        keep[d.name] = {"command": meta["command"], "git_sha": meta["git_sha"], "results": r}
    else:
        keep[d.name] = {"command": meta["command"], "git_sha": meta["git_sha"], "episodes": r["rows"], "label_efficiency": r["label_efficiency"]}
out.write_text(json.dumps(keep, indent=1))
PY
done
