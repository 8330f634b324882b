#!/usr/bin/env bash
# GRPO of the behaviour-cloned policy inside the trained world model, on one GPU, within a wall-clock budget.
# usage: grpo_gpu.sh WORLD_MODEL_DIR BC_POLICY_DIR WORK_DIR RESULT_DIR SECONDS [overrides...]
#   WORLD_MODEL_DIR: a world-model folder (package.py's output); BC_POLICY_DIR: train-policy's out/policy.
#   The run stops at runner.max_steps or after SECONDS (checkpoints every runner.save_interval steps survive);
#   RESULT_DIR receives grpo.tar.part* (15 MiB pieces: cat grpo.tar.part* | tar -x): the last checkpoint's policy/,
#   the TensorBoard log and the training videos (if any: the GPU machine has no ffmpeg writer, so pass
#   env.train.video_cfg.save_video=false there).
set -euo pipefail
world_model=$1 policy=$2 work=$3 result=$4 seconds=$5
shift 5
mkdir -p "$work" "$result"
status=0
timeout "$seconds" opensora-gym train --config experiments/libero_spatial_small/grpo.yaml \
  env.train.checkpoint="$world_model" actor.model.model_path="$policy" runner.log_path="$work/runs" "$@" || status=$?
echo "train exit status $status (124: stopped at the time budget)"
run="$work/runs/spatial_small_grpo"
last=$(cd "$run" && ls -d checkpoints/global_step_* | sort -t_ -k3 -n | tail -1)
tar -cf - -C "$run" tensorboard $(cd "$run" && ls -d video 2>/dev/null) "$last/policy" | split -b 15M -d - "$result/grpo.tar.part"
ls -la "$result"
