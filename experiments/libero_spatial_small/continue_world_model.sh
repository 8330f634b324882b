#!/usr/bin/env bash
# More training of an exported world model on the 64 px dataset, on one GPU: a 10-minute GPU slice cannot hold the
# whole run, and the optimizer state is too large to carry between slices, so each slice starts from the last
# export's weights (fresh AdamW with a short warmup, the same action statistics).
# usage: continue_world_model.sh WORLD_MODEL_DIR VAE_DIR DATA_TARBALL WORK_DIR RESULT_DIR STEPS
#   WORLD_MODEL_DIR: world_model/ of train_models.sh (config.json, weights, dataset_statistics.json, resnet_rm.pth);
#   VAE_DIR: its vae/. RESULT_DIR receives models.tar.part* laid out as train_models.sh's (vae/, reward/,
#   world_model/, wm_tensorboard/, times.json).
set -euo pipefail
world_model=$1 vae=$2 data=$3 work=$4 result=$5 steps=$6
device=${DEVICE:-cuda}
mkdir -p "$work/init" "$result"
tar -xJf "$data" -C "$work"
cp -r "$world_model"/. "$work/init/"
cp -r "$vae" "$work/init/vae"
t0=$(date +%s)
opensora-gym train-world-model --init-checkpoint "$work/init" --dataset "$work/spatial64/dataset" \
  --statistics "$world_model/dataset_statistics.json" --reward-model "$world_model/resnet_rm.pth" --out "$work/wm" \
  --image-size 64 --device "$device" --batch-size "${BATCH_SIZE:-128}" --lr 2e-4 --warmup-steps 300 --ema-decay 0.999 \
  --max-steps "$steps" --checkpoint-every 2000 --preview-every 2000 --log-every 500
t1=$(date +%s)
echo "{\"world_model_s\": $((t1 - t0)), \"wm_steps\": $steps, \"continued_from\": \"$(basename "$world_model")\"}" \
  > "$work/times.json"
mkdir -p "$work/pack/world_model" "$work/pack/reward"
cp -r "$vae" "$work/pack/vae"
cp "$world_model/resnet_rm.pth" "$work/pack/reward/"
find "$work/wm/world_model" -maxdepth 1 -type f -exec cp {} "$work/pack/world_model/" \;
cp -r "$work/wm/tensorboard" "$work/pack/wm_tensorboard"
cp "$work/times.json" "$work/pack/"
tar -cf - -C "$work/pack" . | split -b 15M -d - "$result/models.tar.part"
ls -la "$result"
