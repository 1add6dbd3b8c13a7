#!/usr/bin/env bash
# The GPU check, as run on a lent machine (one call): the throughput benchmark at 224 px for resnet18
# and resnet50 (bf16, fp16, compile, lightly-style, lowshot per-image and batched), SimCLR pretraining on
# BUSI at 224 px with the batched device views and with per-image views (pairs/s and data-time share
# from the real script), then a short real pretrain → probe → fine-tune through `accelerate launch`
# (bf16 by default on GPU). Data and wheels travel with the call (.devdata/, .whl/, ignored by git); results
# land in $OUT and are committed under bench/results/.
#   usage: bash bench/gpu_run.sh OUT_DIR DATA_ROOT
set -uo pipefail
out=${1:?out dir}; data=${2:?data root}
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 LOWSHOT_CACHE=/tmp/lowshot-cache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu_log.txt"
python3 -c "import torch, timm, torchvision; print('torch', torch.__version__, 'timm', timm.__version__, 'torchvision', torchvision.__version__)" | tee -a "$out/gpu_log.txt"
python3 bench/simclr_throughput.py --data-root "$data" --size 224 --batch 256 --workers 15 --steps 20 \
    --models resnet18 resnet50 --compile --out "$out" 2>&1 | grep -v Warning | tee -a "$out/gpu_log.txt"
for path in batched per_image; do
  python3 -m accelerate.commands.launch --num_processes 1 --num_machines 1 --dynamo_backend no --mixed_precision no \
      ssl/pretrain.py data.root="$data" --config configs/busi.yaml data.color=rgb data.size=224 ssl.epochs=3 \
      ssl.batch_size=256 ssl.knn_every=0 track.log_with=none out_dir=/tmp/gpu_runs name=busi224-$path \
      data.augment_path=$path check.leakage=warn 2>&1 | grep -E "^epoch|^SimCLR" | tee -a "$out/gpu_pretrain224.txt"
done
common=(data.root="$data" data.size=64 track.log_with=none out_dir=/tmp/gpu_runs eval.bootstrap=500 check.leakage=drop)
{
  python3 -m accelerate.commands.launch --num_processes 1 --num_machines 1 --dynamo_backend no --mixed_precision no \
      ssl/pretrain.py "${common[@]}" name=pre ssl.epochs=20 ssl.batch_size=256 &&
  python3 -m accelerate.commands.launch --num_processes 1 --num_machines 1 --dynamo_backend no --mixed_precision no \
      finetune/train.py --probe "${common[@]}" name=probe model.weights=/tmp/gpu_runs/pre/checkpoint &&
  python3 -m accelerate.commands.launch --num_processes 1 --num_machines 1 --dynamo_backend no --mixed_precision no \
      finetune/train.py "${common[@]}" name=ft model.weights=/tmp/gpu_runs/pre/checkpoint train.epochs=30
} 2>&1 | grep -v -E "Warning|it/s\]|s/it\]" | tee "$out/gpu_e2e_log.txt"
for r in pre probe ft; do cp /tmp/gpu_runs/$r/results.json "$out/gpu_e2e_$r.json" 2>/dev/null; done
ls -la "$out"
