#!/usr/bin/env bash
# GRPO of the behaviour-cloned policy inside the trained world model, on one GPU, within a wall-clock budget.
# usage: grpo_gpu.sh MODELS_TARBALL BC_POLICY_DIR WORK_DIR RESULT_DIR SECONDS [overrides...]
#   MODELS_TARBALL: models.tar.xz of train_models.sh; its world_model/ gets the start frames of START_FRAMES_DIR
#   (env var; the 64 px dataset's first frames, made by package.py) before training.
#   The run stops at runner.max_steps or after SECONDS (checkpoints every runner.save_interval steps survive);
#   RESULT_DIR receives grpo.tar.xz: every checkpoint's policy/, the TensorBoard log, the training videos.
set -euo pipefail
models=$1 policy=$2 work=$3 result=$4 seconds=$5
shift 5
mkdir -p "$work/models" "$result"
tar -xJf "$models" -C "$work/models"
cp -r "$START_FRAMES_DIR" "$work/models/world_model/dataset"
status=0
timeout "$seconds" opensora-gym train --config experiments/libero_spatial_small/grpo.yaml \
  env.train.checkpoint="$work/models/world_model" actor.model.model_path="$policy" runner.log_path="$work/runs" \
  "$@" || status=$?
echo "train exit status $status (124: stopped at the time budget)"
run="$work/runs/spatial_small_grpo"
tar -cJf "$result/grpo.tar.xz" -C "$run" tensorboard video $(cd "$run" && ls -d checkpoints/*/policy)
ls -la "$result"
