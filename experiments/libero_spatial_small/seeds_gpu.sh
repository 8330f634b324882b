#!/usr/bin/env bash
# GRPO or PPO from the embedded base, several seeds side by side on one GPU inside the embedded world model at run 22's
# scale (64 sub-envs, 4 rollout passes, 1536 chunk steps a training step; run 36's rows). Run on the lent machine from
# the repository root.
# usage: seeds_gpu.sh RESULT_DIR SECONDS STEPS "SEEDS" [overrides...]
#   Each seed's run stops at STEPS or after SECONDS (checkpoints every 5 steps); the overrides go to every run after
#   the scale's settings, so they may change them (e.g. actor.global_batch_size=384 for 4 optimizer steps a training
#   step; PPO's settings: experiments/libero_spatial_small/README.md, run 36). RESULT_DIR receives pack.tar.part*
#   (15 MiB pieces: cat pack.tar.part* | tar -x): seedS/policy (the last checkpoint's, float16), seedS/step,
#   seedS/tensorboard, seedS.log, gpu.txt.
set -uo pipefail
result=$1 seconds=$2 steps=$3 seeds=$4
shift 4
here=$(dirname "$0")
source "$here/pack_seeds.sh"
source "$here/device_setup.sh"
export PYTHONUNBUFFERED=1
work=$(mktemp -d)
mkdir -p "$work/pack" "$result"
scale=(runner.device=cuda runner.save_interval=5 runner.max_steps="$steps" env.train.dtype=bfloat16
  env.train.total_num_envs=64 env.train.rollout_epoch=4 actor.global_batch_size=768 actor.micro_batch_size=96
  env.train.video_cfg.save_video=false runner.progress_bar=false)
for seed in $seeds; do
  timeout "$seconds" opensora-gym train --config libero_spatial_small_grpo runner.log_path="$work/seed$seed" \
    runner.experiment_name=run actor.seed="$seed" "${scale[@]}" "$@" > "$work/pack/seed$seed.log" 2>&1 &
done
wait
nvidia-smi --query-gpu=name --format=csv,noheader > "$work/pack/gpu.txt"
pack_seeds "$work" run "$seeds"
tar -cf - -C "$work/pack" . | split -b 15M -d - "$result/pack.tar.part"
ls -la "$result"
tail -n 3 "$work"/pack/seed*.log
