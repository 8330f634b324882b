#!/usr/bin/env bash
# The world model, its VAE and its success classifier from the 64 px dataset, on one GPU (about 8 minutes).
# usage: train_models.sh DATA_TARBALL WORK_DIR RESULT_DIR [WM_STEPS]
#   DATA_TARBALL: spatial64.tar.xz (dataset/ and dataset_statistics.json, made by shrink.py + tar -cJ)
#   RESULT_DIR receives models.tar.part*: vae/, reward/, world_model/ without its dataset/ and vae/, the reports.
set -euo pipefail
data=$1 work=$2 result=$3 steps=${4:-6000}
# a quick check of the script on the CPU: DEVICE=cpu VAE_STEPS=2 RM_STEPS=2 train_models.sh ... 2
device=${DEVICE:-cuda} vae_steps=${VAE_STEPS:-3000} rm_steps=${RM_STEPS:-2000}
mkdir -p "$work" "$result"
tar -xJf "$data" -C "$work"
dataset="$work/spatial64/dataset"
t0=$(date +%s)
opensora-gym train-vae --dataset "$dataset" --out "$work/vae" --image-size 64 --device "$device" \
  --block-out-channels 32 64 128 128 --max-steps "$vae_steps" --batch-size 64 --lr 2e-4 --log-every 500
t1=$(date +%s)
opensora-gym train-reward-model --dataset "$dataset" --out "$work/reward" --image-size 64 --device "$device" \
  --widths 16 32 64 128 --max-steps "$rm_steps" --batch-size 128 --log-every 500
t2=$(date +%s)
opensora-gym train-world-model --dataset "$dataset" --vae "$work/vae/vae" --reward-model "$work/reward" \
  --statistics "$work/spatial64/dataset_statistics.json" --out "$work/wm" --image-size 64 --preset tiny \
  --device "$device" --batch-size "${BATCH_SIZE:-64}" --lr 2e-4 --warmup-steps 300 --ema-decay 0.999 --max-steps "$steps" \
  --checkpoint-every 2000 --preview-every 2000 --log-every 500
t3=$(date +%s)
echo "{\"vae_s\": $((t1 - t0)), \"reward_s\": $((t2 - t1)), \"world_model_s\": $((t3 - t2)), \"wm_steps\": $steps}" \
  > "$work/times.json"
mkdir -p "$work/pack/world_model"
cp -r "$work/vae/vae" "$work/pack/vae"
cp -r "$work/reward" "$work/pack/reward"
find "$work/wm/world_model" -maxdepth 1 -type f -exec cp {} "$work/pack/world_model/" \;  # its vae/ is vae/
cp -r "$work/wm/tensorboard" "$work/pack/wm_tensorboard"
cp "$work/times.json" "$work/pack/"
# pieces of 15 MiB: the GPU machine returns files of at most 16 MiB (cat models.tar.part* | tar -x)
tar -cf - -C "$work/pack" . | split -b 15M -d - "$result/models.tar.part"
ls -la "$result"
