#!/usr/bin/env bash
# The GPU check, as run on a lent machine (~8 min; 2026-11-27 on an H200: the benchmark 194 s):
#  1. bench/simclr_throughput.py at 224 px, batch 256, resnet18 and resnet50: compute bound (bf16, fp16,
#     bf16 + torch.compile), lightly-style and lowshot per-image loaders on 15 workers, lowshot batched
#     views (compiled and eager), and lowshot batched end to end with each model setting;
#  2. the real scripts through `accelerate launch` (defaults: bf16, channels_last, batched compiled
#     views on the GPU): SimCLR on BUSI at 224 px, a fine-tune from its checkpoint, and the same SimCLR
#     with per-image views for comparison (pairs/s and data-time share per epoch).
# Data and wheels travel with the call (.devdata/, .whl/, ignored by git); results land in OUT_DIR and
# are committed under bench/results/gpu_run/.
#   usage: GIT_SHA=<commit> bash bench/gpu_run.sh OUT_DIR DATA_ROOT   (the device copy's .git may be stale)
set -uo pipefail
out=${1:?out dir}; data=${2:?data root}
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 LOWSHOT_CACHE=/tmp/lowshot-cache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu_log.txt"
python3 -c "import torch, timm, torchvision; print('torch', torch.__version__, 'timm', timm.__version__, 'torchvision', torchvision.__version__)" | tee -a "$out/gpu_log.txt"
echo "git ${GIT_SHA:-unknown}" | tee -a "$out/gpu_log.txt"
python3 bench/simclr_throughput.py --data-root "$data" --size 224 --batch 256 --workers 15 --steps 20 \
    --slow-steps 3 --models resnet18 resnet50 --compile --out "$out" 2>&1 | grep -v Warning | tee -a "$out/gpu_log.txt"
launch=(python3 -m accelerate.commands.launch --num_processes 1 --num_machines 1 --dynamo_backend no --mixed_precision no)
common=(data.root="$data" --config configs/busi.yaml data.size=224 track.log_with=none out_dir=/tmp/gpu_runs check.leakage=warn)
{
  "${launch[@]}" ssl/pretrain.py "${common[@]}" name=pre224 ssl.epochs=6 ssl.batch_size=64 ssl.knn_every=3
  "${launch[@]}" finetune/train.py "${common[@]}" name=ft224 model.weights=/tmp/gpu_runs/pre224/checkpoint \
      train.epochs=4 eval.bootstrap=200
  "${launch[@]}" ssl/pretrain.py "${common[@]}" name=pre224-per-image ssl.epochs=3 ssl.batch_size=64 \
      ssl.knn_every=0 data.augment_path=per_image
} 2>&1 | tr '\r' '\n' | grep -v -E "Warning|warn\(|it/s\]|s/it\]" | tee "$out/gpu_scripts.txt"  # tqdm's \r lines
for r in pre224 ft224 pre224-per-image; do cp /tmp/gpu_runs/$r/results.json "$out/gpu_$r.json" 2>/dev/null; done
ls -la "$out"
